"""``rubric_judge`` (Search-Gen-V, arXiv:2510.14660): every nugget of a sample labelled in one request, labels
aggregated into Σ w_i v_i / Σ w_i.

Aggregation and parsing are checked on hand-written answers; requests and the CLI against an in-process
OpenAI-compatible stub verifier with a rule: a nugget whose whole text is in the passage (case-insensitive) is
"support", one whose first word only is there "partial_support", else "not_support". It answers with a <think>
block, a <reasoning> block that itself mentions labels, then the JSON array."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from conftest import cli
from openai_stub import StubHandler, serving

from tokalign import rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.rubric_judge import (
    Nugget,
    RubricConfig,
    RubricJudge,
    aggregate,
    parse_labels,
    request_messages,
    rubric,
)


PATH = "tokalign.rewards.rubric_judge:RubricJudge"

# ------------------------------------------------------------------------------- aggregation


def test_aggregation_by_hand():
    """[vital, vital, okay] labelled [support, partial, not], okay_weight 0.5: (1·1 + 1·0.5 + 0.5·0) / 2.5 = 0.6;
    unweighted (defaults): (1 + 0.5 + 0) / 3 = 0.5; partial_value 0: 1/3; all support: 1; none: 0."""
    labels = ["support", "partial_support", "not_support"]
    assert aggregate(RubricConfig(okay_weight=0.5), labels, [1.0, 1.0, 0.5]) == pytest.approx(0.6)
    assert aggregate(RubricConfig(), labels, [1.0, 1.0, 1.0]) == pytest.approx(0.5)
    assert aggregate(RubricConfig(partial_value=0.0), labels, [1.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    assert aggregate(RubricConfig(), ["support"] * 2, [2.0, 0.0]) == 1.0
    assert aggregate(RubricConfig(), ["not_support"] * 2, [1.0, 3.0]) == 0.0


def test_rubric_from_the_reference():
    """A list, its JSON text, an object under ``field``; importance -> vital_weight/okay_weight; "weight" wins."""
    cfg = RubricConfig(okay_weight=0.5, vital_weight=2.0)
    items = [{"text": "a", "importance": "vital"}, {"nugget": "b", "importance": "okay"}, "c", {"text": "d", "weight": 3}]
    want = [Nugget("a", 2.0), Nugget("b", 0.5), Nugget("c", 1.0), Nugget("d", 3.0)]
    assert rubric(cfg, Sample("s", "q", "x", reference=items)) == want
    assert rubric(cfg, Sample("s", "q", "x", reference=json.dumps(items))) == want
    assert rubric(cfg, Sample("s", "q", "x", reference={"nuggets": items, "answer": "z"})) == want
    other = RubricConfig(field="block_nuggets_assignment")
    assert rubric(other, Sample("s", "q", "x", reference={"block_nuggets_assignment": ["e"]})) == [Nugget("e", 1.0)]


@pytest.mark.parametrize("ref, says", [
    (None, "has no rubric"), ("a", "has no rubric"), ([], "has no rubric"), ({"answer": "a"}, "has no rubric"),
    ([3], "nugget 1 is neither a string"), (["a", {"text": "b", "importance": "key"}], "nugget 2 has importance 'key'"),
    ([{"text": "b", "weight": -1}], "nugget 1 has weight -1"), ([{"text": "b", "weight": 0}], "weigh 0 in all"),
    (["  "], "nugget 1 is empty"),
])
def test_bad_rubrics_name_the_row_and_the_fix(ref, says):
    with pytest.raises(UserError) as e:
        rubric(RubricConfig(), Sample("row7", "q", "x", reference=ref))
    assert str(e.value).startswith("rubric_judge: row row7") and says in str(e.value) and "\n" not in str(e.value)
    if says == "has no rubric":
        assert "JSON list of nuggets" in str(e.value) and "rubric_judge.field=KEY" in str(e.value)


# ------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, want", [
    ('<reasoning>1. decision="support"\n2. decision="not_support"</reasoning>\n["partial_support", "support"]',
     ["partial_support", "support"]),
    ("<think>support? no</think>support,not_support", ["support", "not_support"]),
    ("* Support\n* partial support", ["support", "partial_support"]),
    ("1. not-support\n2. support", ["not_support", "support"]),
    ("<labels><label>support</label><label>not_support</label></labels>", ["support", "not_support"]),
    ("['support', 'support']", ["support", "support"]),
    ("support|partial_support", ["support", "partial_support"]),
])
def test_good_answers(text, want):
    assert parse_labels(text, 2) == want


@pytest.mark.parametrize("text", ["", "I cannot decide.", '["support"]', '["support", "support", "not_support"]',
                                  "<reasoning>support, support</reasoning>", "supported, unsupported"])
def test_garbled_answers(text):
    """No labels, too few or too many after the reasoning: unparsed (never a partial reading)."""
    assert parse_labels(text, 2) is None
    judge = RubricJudge(RubricConfig(base_url="http://127.0.0.1:1", unparsed_value=-1.0))
    r = judge.read_answer(text, [Nugget("a", 1.0), Nugget("b", 1.0)])
    assert r.value == -1.0 and r.info["parsed"] is False and r.info["detail"].startswith("expected 2 labels")


def test_request_holds_every_nugget_numbered():
    (system, user) = request_messages(RubricConfig(), Sample("s", [{"role": "user", "content": "q?"}], "ans"),
                                      [Nugget("a", 1.0), Nugget("b c", 1.0)])
    assert user["content"] == "Search Query: q?\nPassage: ans\nNuggets (2):\n1. a\n2. b c\n\nBegin reasoning and final labels:"
    assert system["role"] == "system" and "exactly 2 strings" in system["content"] and "{n}" not in system["content"]


# ------------------------------------------------------------------------------- requests


class Verifier(StubHandler):
    """The rule of the module docstring; a passage containing GARBAGE gets prose, STATUS n gets HTTP n."""

    requests: ClassVar[list[dict]] = []

    model_id = "stub-verifier"

    def do_POST(self):
        body = self.body()
        Verifier.requests.append(body)
        user = body["messages"][-1]["content"]
        passage = user.split("\nPassage: ", 1)[1].split("\nNuggets (", 1)[0].lower()
        nuggets = [line.split(". ", 1)[1].lower() for line in user.split("):\n", 1)[1].split("\n\n")[0].splitlines()]
        if "status " in passage:
            return self._send(int(passage.split("status ")[1][:3]), {"error": {"message": "no"}})
        labels = ["support" if g in passage else "partial_support" if g.split()[0] in passage else "not_support" for g in nuggets]
        answer = "I think it is supported." if "garbage" in passage else \
            "<think>checking</think><reasoning>" + "".join(f'{k}. decision="{lab}"\n' for k, lab in enumerate(labels, 1)) + \
            "</reasoning>\n" + json.dumps(labels)
        self.answer(answer)


@pytest.fixture(scope="module")
def verifier():
    with serving(Verifier) as url:
        yield url


QA = [{"text": "Paris", "importance": "vital"}, {"text": "big city", "importance": "okay"}]
QB = ["red", "blue sky", "green"]


def four_samples() -> list[Sample]:
    return [Sample("a0", "qa", "Paris is a big city", reference=QA), Sample("b0", "qb", "red", reference=QB),
            Sample("a1", "qa", "paris is big", reference=QA), Sample("b1", "qb", "blue green", reference=QB)]


def test_two_prompts_two_samples_exact_rewards_one_request_each(verifier):
    """okay_weight 0.5. qa [vital Paris, okay big city]: a0 s,s -> 1; a1 s,partial -> (1 + 0.5·0.5)/1.5 = 5/6.
    qb [red, blue sky, green] unweighted: b0 s,n,n -> 1/3; b1 n,partial,s -> (0 + 0.5 + 1)/3 = 0.5. 4 requests."""
    Verifier.requests.clear()
    got = RubricJudge(RubricConfig(base_url=verifier, okay_weight=0.5, concurrency=2))(four_samples())
    assert [r.value for r in got] == pytest.approx([1.0, 1 / 3, 5 / 6, 0.5])
    assert got[2].info["labels"] == ["support", "partial_support"] and got[2].info["parsed"] and got[2].info["n"] == 2
    assert len(Verifier.requests) == 4 and {r["model"] for r in Verifier.requests} == {"stub-verifier"}
    assert sorted(r["messages"][-1]["content"].count("\n1. ") for r in Verifier.requests) == [1, 1, 1, 1]
    assert {r["temperature"] for r in Verifier.requests} == {0.0}


def test_failures_are_recorded_per_sample(verifier):
    got = RubricJudge(RubricConfig(base_url=verifier, unparsed_value=-1))(
        [Sample("g", "q", "GARBAGE", reference=["x"]), Sample("h", "q", "STATUS 400", reference=["x"]),
         Sample("ok", "q", "x", reference=["x"])])
    assert [r.value for r in got] == [-1.0, -1.0, 1.0]
    assert got[0].info["detail"] == "expected 1 labels after the reasoning, found 0" and got[0].info["parsed"] is False
    assert got[1].info["error"].startswith("HTTP 400")


def test_a_row_without_rubric_fails_before_any_request(verifier):
    Verifier.requests.clear()
    with pytest.raises(UserError, match=r"^rubric_judge: row b has no rubric"):
        RubricJudge(RubricConfig(base_url=verifier))([Sample("a", "q", "x", reference=["x"]), Sample("b", "q", "x", reference="a")])
    assert Verifier.requests == []


def test_bad_options():
    with pytest.raises(UserError, match=r"^rubric_judge needs a server: --reward-opt rubric_judge.base_url="):
        RubricJudge()
    with pytest.raises(ValueError, match="partial_value must be in"):
        RubricConfig(partial_value=2)
    (r,) = rewards.resolve([PATH], {PATH: {"base_url": "http://127.0.0.1:1", "okay_weight": 0.5}})
    assert r.fn.batched and r.fn.config.okay_weight == 0.5


def test_unreachable_server_is_one_user_error():
    with pytest.raises(UserError, match=r"^rubric_judge: cannot reach http://127.0.0.1:1/v1: .*fix --reward-opt rubric_judge.base_url"):
        RubricJudge(RubricConfig(base_url="http://127.0.0.1:1", retries=0, model="m"))([Sample("a", "q", "x", reference=["x"])])


# ------------------------------------------------------------------------------- the CLI


def write_rollouts(path, references: list) -> None:
    from tokalign import artifacts

    rows = [{"id": f"s{i}", "prompt_id": f"p{i // 2}", "group_id": i // 2, "sample_idx": i % 2, "prompt": json.dumps(f"q{i // 2}"),
             "prompt_text": f"q{i // 2}", "prompt_ids": [1, 2], "reference": json.dumps(ref), "completion": comp,
             "completion_ids": [1], "sampler_logps": [0.0], "finish_reason": "stop", "max_new_tokens": 64}
            for i, (ref, comp) in enumerate(references)]
    with artifacts.writing(path, "rollouts", artifacts.Provenance(config={"synthetic": True})) as w:
        w.write_rows(rows)


def test_score_cli_against_a_local_server(verifier, tmp_path):
    """The four samples above as 2 prompts × 2 rows (reference: the rubric object under "nuggets" for qa, the bare
    list for qb): the same rewards through `tokalign score`, 4 requests."""
    s = four_samples()
    write_rollouts(tmp_path / "R", [({"nuggets": QA}, s[0].completion), ({"nuggets": QA}, s[2].completion),
                                    (QB, s[1].completion), (QB, s[3].completion)])
    Verifier.requests.clear()
    cli("score", "R", "-r", PATH, "--reward-opt", f"{PATH}.base_url={verifier}/v1", "--reward-opt", f"{PATH}.okay_weight=0.5",
        "--no-cache", "--workers", "1", "--out", "S", cwd=tmp_path)
    from tokalign import artifacts

    rows = sorted(artifacts.read(tmp_path / "S", ["scored"]).rows(), key=lambda r: int(r["id"][1:]))
    assert [r["reward"] for r in rows] == pytest.approx([1.0, 5 / 6, 1 / 3, 0.5]) and len(Verifier.requests) == 4

    write_rollouts(tmp_path / "B", [(QB, "red"), ("just an answer", "red")])
    # the scorer isolates a reward's failure to its sample: the row without a rubric scores 0 and stderr holds
    # one line naming the row and the fix; the other row is scored (red: s,n,n -> 1/3)
    bad = cli("score", "B", "-r", PATH, "--reward-opt", f"{PATH}.base_url={verifier}", "--no-cache", "--workers", "1",
              "--out", "S2", cwd=tmp_path)
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "rubric_judge: row s1 has no rubric" in bad.stderr and "JSON list of nuggets" in bad.stderr
    rows = sorted(artifacts.read(tmp_path / "S2", ["scored"]).rows(), key=lambda r: int(r["id"][1:]))
    assert [r["reward"] for r in rows] == pytest.approx([1 / 3, 0.0])
