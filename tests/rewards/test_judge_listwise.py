"""``judge_listwise`` (RewardAnything, arXiv:2506.03637): a prompt's samples judged in one request.

Parsing is checked on hand-written answers; the requests and the CLI round trip against an in-process
OpenAI-compatible stub that ranks by a rule — shorter is better: the shortest of n responses scores 5, the next 4,
… (never below 1), and best-to-worst lists them shortest first."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from conftest import cli
from openai_stub import StubHandler, serving
from score_plugins import make_rollouts

from tokalign import rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.judge_listwise import (
    ListwiseConfig,
    ListwiseJudge,
    PairwiseJudge,
    groups,
    parse_answer,
    request_messages,
)


CFG = ListwiseConfig(base_url="http://127.0.0.1:1")  # 1..5


def values(text: str, n: int, **cfg) -> list[float]:
    return [r.value for r in parse_answer(ListwiseConfig(**{"base_url": "http://x", **cfg}), text, n)]


# ------------------------------------------------------------------------------- parsing


def test_a_well_formed_answer():
    """Scores 2, 5, 1 of 1..5: (s − 1)/4 = 0.25, 1, 0; ranks from best-to-worst; with use=rank 1 − p/(n − 1)."""
    text = '<think>model-2 is best</think>\n```json\n{"scores": {"model-1": 2, "model-2": 5, "model-3": 1}, ' \
           '"best-to-worst": ["model-2", "model-1", "model-3"]}\n```'
    got = parse_answer(CFG, text, 3)
    assert [r.value for r in got] == [0.25, 1.0, 0.0]
    assert [r.info["rank"] for r in got] == [2, 1, 3] and all(r.info["parsed"] and r.info["n"] == 3 for r in got)
    assert [r.info["label"] for r in got] == ["model-1", "model-2", "model-3"] and got[0].info["score"] == 2.0
    assert values(text, 3, use="rank") == [0.5, 1.0, 0.0]


def test_shuffled_order_sloppy_json_and_prose():
    """Keys in any order, single quotes, a trailing comma, 'best-to-worse', prose before and after."""
    text = "Here you go: {'best-to-worse': ['model-3', 'model-1', 'model-2'], 'scores': {'model-3': 4, 'model-2': 1, " \
           "'model-1': 3,},} Hope it helps."
    assert values(text, 3) == [0.5, 0.0, 0.75]
    assert values(text, 3, use="rank") == [0.5, 0.0, 1.0]
    assert values('{"scores": {"model-1": 1, "model-2": 2}, "best-to-worst": ["model-7", "model-2", "model-1"]}', 2,
                  use="rank") == [0.0, 1.0]  # names not in the request are passed over
    assert values('{"scores": {"MODEL-1": "4.5"}}', 1) == [0.875]  # case and a numeric string
    clipped = parse_answer(CFG, '{"scores": {"model-1": 9}}', 1)[0]
    assert clipped.value == 1.0 and clipped.info["clipped"] is True


def test_missing_ids_fail_only_their_samples():
    text = '{"scores": {"model-1": 5, "model-3": "n/a"}, "best-to-worst": ["model-1"]}'
    got = parse_answer(ListwiseConfig(base_url="http://x", unparsed_value=-1.0), text, 3)
    assert [r.value for r in got] == [1.0, -1.0, -1.0]
    assert got[1].info == {"parsed": False, "response": text, "detail": "the judge's answer gives no score for model-2"}
    assert got[2].info["detail"] == "the judge's answer gives no score for model-3"
    ranked = parse_answer(ListwiseConfig(base_url="http://x", use="rank"), '{"scores": {"model-1": 5, "model-2": 1}, '
                          '"best-to-worst": ["model-1"]}', 2)
    assert ranked[0].value == 1.0 and ranked[1].info["detail"] == "the judge's best-to-worst order leaves out model-2"


@pytest.mark.parametrize("text", ["", "I cannot decide.", "{not json at all", '["model-1"]', "<think>{\"scores\": 1"])
def test_garbage(text):
    got = parse_answer(CFG, text, 2)
    assert [r.value for r in got] == [0.0, 0.0]
    assert all(r.info == {"parsed": False, "response": text, "detail": "no JSON object in the judge's answer"} for r in got)
    assert parse_answer(CFG, '{"scores": [5, 4]}', 1)[0].info["detail"] == "the judge's answer gives no score for model-1"


def test_a_lone_sample_is_its_score():
    """A group of one: the same request with one response; its rank value is its score value."""
    assert values('{"scores": {"model-1": 4}, "best-to-worst": ["model-1"]}', 1, use="rank") == [0.75]


# ------------------------------------------------------------------------------- requests


class Ranker(StubHandler):
    """Scores by the rule "shorter is better" (see the module docstring); a principle containing GARBAGE gets
    prose, one containing STATUS n gets HTTP n."""

    requests: ClassVar[list[dict]] = []

    model_id = "stub-ranker"

    def do_POST(self):
        body = self.body()
        Ranker.requests.append(body)
        user = json.loads(body["messages"][-1]["content"])
        if "STATUS " in user["principle"]:
            return self._send(int(user["principle"].split("STATUS ")[1]), {"error": {"message": "no"}})
        order = sorted(user["responses"], key=lambda k: (len(user["responses"][k]), k))
        scores = {k: max(1, 5 - p) for p, k in enumerate(order)}
        answer = "I cannot decide." if "GARBAGE" in user["principle"] else \
            "<think>shorter is better</think>" + json.dumps({"scores": dict(reversed(scores.items())), "best-to-worst": order})
        self.answer(answer)


@pytest.fixture(scope="module")
def ranker():
    with serving(Ranker) as url:
        yield url


def test_one_request_per_prompt_with_every_sample_once(ranker):
    """Two prompts interleaved: two requests, each naming its prompt's samples model-1.. in sample order."""
    samples = [Sample("a0", "qa", "xxx"), Sample("b0", "qb", "y"), Sample("a1", "qa", "x"), Sample("a2", "qa", "xx"),
               Sample("b1", "qb", "yyyy")]
    assert groups(samples) == [[0, 2, 3], [1, 4]]
    Ranker.requests.clear()
    got = ListwiseJudge(ListwiseConfig(base_url=ranker, concurrency=1))(samples)
    assert [r.value for r in got] == [0.5, 1.0, 1.0, 0.75, 0.75]  # qa: x 5, xx 4, xxx 3; qb: y 5, yyyy 4
    assert [r.info["rank"] for r in got] == [3, 1, 1, 2, 2]
    sent = [json.loads(r["messages"][-1]["content"]) for r in Ranker.requests]
    assert [(u["prompt"], u["responses"]) for u in sent] == [
        ("qa", {"model-1": "xxx", "model-2": "x", "model-3": "xx"}), ("qb", {"model-1": "y", "model-2": "yyyy"})]
    assert Ranker.requests[0]["messages"][0]["role"] == "system" and '"best-to-worst"' in Ranker.requests[0]["messages"][0]["content"]
    assert {r["model"] for r in Ranker.requests} == {"stub-ranker"} and sent[0]["principle"].startswith("Prefer")


def test_group_of_one_and_reference():
    """A group of one is one request with one response; a reference goes along (as JSON text when not a string)."""
    (system, user) = request_messages(CFG, [Sample("s", [{"role": "user", "content": "q"}], "c", reference=["1"])])
    assert json.loads(user["content"]) == {"principle": CFG.principle, "prompt": "q", "reference": '["1"]', "responses": {"model-1": "c"}}
    assert "from 1 (" in system["content"] and "to 5 (" in system["content"]


def test_failures_are_recorded_per_sample(ranker):
    two = [Sample("a", "q", "x"), Sample("b", "q", "xx")]
    got = ListwiseJudge(ListwiseConfig(base_url=ranker, principle="GARBAGE"))(two)
    assert [r.info["detail"] for r in got] == ["no JSON object in the judge's answer"] * 2
    got = ListwiseJudge(ListwiseConfig(base_url=ranker, principle="STATUS 400", unparsed_value=-1))(two)
    assert [r.value for r in got] == [-1.0, -1.0] and got[0].info["error"].startswith("HTTP 400")


def test_bad_options():
    with pytest.raises(UserError, match=r"^judge_listwise needs a server: --reward-opt judge_listwise.base_url="):
        ListwiseJudge()
    with pytest.raises(UserError, match="use must be 'score' or 'rank'"):
        rewards.resolve(["judge_listwise"], {"judge_listwise": {"base_url": "http://127.0.0.1:1", "use": "best"}})
    with pytest.raises(ValueError, match="max_score must be greater"):
        ListwiseConfig(min_score=5, max_score=5)
    (r,) = rewards.resolve(["judge_listwise"], {"judge_listwise": {"base_url": "http://127.0.0.1:1", "use": "rank"}})
    assert r.fn.batched and r.fn.config.use == "rank"


def test_pairwise_win_rates(ranker):
    """Three samples of 1, 3, 2 characters: the stub prefers the shorter of each pair, so "x" wins 2 of 2 (1.0),
    "xx" 1 of 2 (0.5), "xxx" 0 of 2 (0.0): three requests of two responses, earlier sample first. A lone sample
    (another prompt) falls back to its listwise score, 5 of 1..5 -> 1.0: one request of one response."""
    samples = [Sample("a", "q", "x"), Sample("b", "q", "xxx"), Sample("c", "q", "xx"), Sample("d", "other", "long")]
    Ranker.requests.clear()
    got = PairwiseJudge(ListwiseConfig(base_url=ranker, concurrency=1))(samples)
    assert [r.value for r in got] == [1.0, 0.0, 0.5, 1.0]
    assert got[0].info == {"parsed": True, "pairs": 2, "wins": 2.0}
    sent = [json.loads(r["messages"][-1]["content"])["responses"] for r in Ranker.requests]
    assert sent == [{"model-1": "x", "model-2": "xxx"}, {"model-1": "x", "model-2": "xx"}, {"model-1": "xxx", "model-2": "xx"},
                    {"model-1": "long"}]
    bad = PairwiseJudge(ListwiseConfig(base_url=ranker, principle="GARBAGE", unparsed_value=-1))(samples[:2])
    assert [r.value for r in bad] == [-1.0, -1.0] and bad[0].info["failed_pairs"] == ["vs 2: no JSON object in the judge's answer"]


# ------------------------------------------------------------------------------- the CLI


def test_score_cli_against_a_local_server(ranker, tmp_path):
    """8 rows, two prompts of 4 (completions of 1..4 and 5..8 characters): one request per prompt, rewards
    following the rule: (5 − p − 1)/4 = 1, 0.75, 0.5, 0.25 for p = 0..3 in each group."""
    make_rollouts(tmp_path / "R", 8)
    Ranker.requests.clear()
    cli("score", "R", "-r", "judge_listwise", "--reward-opt", f"judge_listwise.base_url={ranker}/v1", "--no-cache",
        "--out", "S", cwd=tmp_path)
    from tokalign import artifacts

    rows = sorted(artifacts.read(tmp_path / "S", ["scored"]).rows(), key=lambda r: int(r["id"][1:]))
    assert [r["reward"] for r in rows] == [1.0, 0.75, 0.5, 0.25] * 2
    assert len(Ranker.requests) == 2
    assert [len(json.loads(r["messages"][-1]["content"])["responses"]) for r in Ranker.requests] == [4, 4]

    Ranker.requests.clear()  # pairwise: 6 pairs per prompt; win rates 3/3, 2/3, 1/3, 0/3
    cli("score", "R", "-r", "judge_pairwise", "--reward-opt", f"judge_pairwise.base_url={ranker}", "--no-cache",
        "--out", "P", cwd=tmp_path)
    rows = sorted(artifacts.read(tmp_path / "P", ["scored"]).rows(), key=lambda r: int(r["id"][1:]))
    assert [r["reward"] for r in rows] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0] * 2) and len(Ranker.requests) == 12

    bad = cli("score", "R", "-r", "judge_listwise", "--reward-opt", "judge_listwise.use=best", "--reward-opt",
              f"judge_listwise.base_url={ranker}", "--no-cache", "--out", "S2", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "use must be 'score' or 'rank'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    bad = cli("score", "R", "-r", "judge_listwise", "--no-cache", "--out", "S3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "judge_listwise needs a server" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
