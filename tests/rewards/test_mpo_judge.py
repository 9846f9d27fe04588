"""``mpo_judge`` (MPO, arXiv:2504.20157): a judge whose rubric a meta-judge rewrites every ``refine_every`` calls.

Against the in-process OpenAI-compatible stub of ``test_judge`` (it answers the text after 'ANSWER:'): the rubric sits
after 'ANSWER:' in the judge's template, so the stub's score follows the rubric (v1 "Score: 2", v2 "Score: 8"), and the
meta template ends in 'ANSWER: <the reply under test>'.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from conftest import cli
from score_plugins import make_rollouts
from test_judge import FakeOpenAI

from tokalign.protocols import Sample
from tokalign.rewards.mpo_judge import MPOJudge, parse_rubric

TEMPLATE = "RM {prompt} ANSWER: {completion} {rubric}"
V2 = "<rubric>\n<item>Score: 8</item>\n</rubric>"


def meta_template(reply: str) -> str:
    return "META [{rubric}] range {min_score}-{max_score}\n{samples}\nANSWER: " + reply


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def mpo(url, reply=V2, **opts) -> MPOJudge:
    return MPOJudge(MPOJudge.Config(base_url=url, model="m", template=TEMPLATE, rubric="Score: 2", concurrency=2,
                                    meta_template=meta_template(reply), **opts))


def sent(prefix: str) -> list[str]:
    return [r["messages"][-1]["content"] for r in FakeOpenAI.requests if r["messages"][-1]["content"].startswith(prefix)]


def batch(k: int) -> list[Sample]:
    return [Sample(f"s{k}{i}", f"q{k}{i}", f"c{k}{i}") for i in range(2)]


def test_rubric_is_refined_every_k_calls_and_used_after(stub):
    FakeOpenAI.requests.clear()
    j = mpo(stub, refine_every=2, meta_samples=3, meta_model="meta-m", meta_system="be a senior instructor")
    first = j(batch(0)) + j(batch(1))  # the 2nd call triggers the refinement, after its own scoring with v1
    assert [r.value for r in first] == [0.2] * 4 and {r.info["rubric_version"] for r in first} == {0}
    assert len(sent("RM")) == 4 and "Score: 2" in sent("RM")[0]
    metas = [r for r in FakeOpenAI.requests if r["messages"][-1]["content"].startswith("META")]
    assert len(metas) == 1 and metas[0]["model"] == "meta-m" and metas[0]["temperature"] == 0.02
    assert metas[0]["messages"][0] == {"role": "system", "content": "be a senior instructor"}
    text = metas[0]["messages"][-1]["content"]
    assert text.startswith("META [Score: 2] range 0-10\n")
    # the last meta_samples=3 triples: (q01, c01) of call 1 and both of call 2, with the judge's raw scores
    assert "q00" not in text and text.count("[Sample #") == 3
    assert "Student's Prompt Instructions:\nq01\n\nStudent's Generation:\nc01\n\nJunior Instructor's Assigned Score:\n2\n" in text
    assert j.rubric == V2 and j.version == 1 and j.counts == {"refinements": 1, "garbled": 0, "meta_failed": 0}

    after = j(batch(2))
    assert [r.value for r in after] == [0.8, 0.8] and {r.info["rubric_version"] for r in after} == {1}
    assert V2 in sent("RM")[-1] and len(sent("META")) == 1  # 3 calls: no second refinement yet
    j(batch(3))
    assert len(sent("META")) == 2 and len(sent("RM")) == 8
    assert "META [" + V2 + "]" in sent("META")[-1]  # the meta-judge reviews the rubric in force


def test_garbled_or_failed_meta_reply_keeps_the_rubric(stub):
    j = mpo(stub, reply="I think the rubric is fine.", refine_every=1)
    j(batch(0))
    assert j.rubric == "Score: 2" and j.version == 0 and j.counts["garbled"] == 1
    assert [r.value for r in j(batch(1))] == [0.2, 0.2] and j.counts["garbled"] == 2
    empty = mpo(stub, reply="<rubric>\n<item> </item>\n</rubric>", refine_every=1)
    empty(batch(0))
    assert empty.version == 0 and empty.counts["garbled"] == 1
    failing = mpo(stub, reply="x STATUS 400", refine_every=1)
    assert [r.value for r in failing(batch(0))] == [0.2, 0.2]  # the judge's own requests are fine
    assert failing.version == 0 and failing.counts["meta_failed"] == 1
    down = mpo(stub, refine_every=1, meta_base_url="http://127.0.0.1:9/v1", retries=0, timeout=0.5)
    down(batch(0))
    assert down.version == 0 and down.counts["meta_failed"] == 1


def test_parse_rubric_takes_the_last_non_empty_block():
    reply = "analysis mentions <rubric>old</rubric> ...\nfinal:\n<rubric>\n<item>a</item>\n</rubric> done"
    assert parse_rubric(reply) == "<rubric>\n<item>a</item>\n</rubric>"
    assert parse_rubric("<rubric>x</rubric><rubric></rubric>") == "<rubric>x</rubric>"
    assert parse_rubric("no block") is None and parse_rubric("<rubric>unclosed") is None


def test_state_round_trip_resumes_exactly(stub):
    j = mpo(stub, refine_every=2, meta_samples=5)
    for k in range(3):
        j(batch(k))
    state = j.state_dict()
    assert [h["version"] for h in state["history"]] == [0, 1] and state["calls"] == 3 and len(state["kept"]) == 2
    fresh = mpo(stub, refine_every=2, meta_samples=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.state_dict() == state and fresh.rubric == V2
    FakeOpenAI.requests.clear()
    a, b = j(batch(9)), fresh(batch(9))  # both refine now, from the same kept triples
    assert [r.value for r in a] == [r.value for r in b] == [0.8, 0.8]
    metas = sent("META")
    assert len(metas) == 2 and metas[0] == metas[1]
    assert j.state_dict() == fresh.state_dict()


def test_history_file_and_resume(stub, tmp_path):
    path = tmp_path / "out" / "rubrics.jsonl"
    j = mpo(stub, refine_every=1, history_file=str(path))
    j(batch(0))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["version"], x["call"], x["rubric"]) for x in lines] == [(0, 0, "Score: 2"), (1, 1, V2)]
    assert lines[1]["reply"] == V2 and [s["prompt"] for s in lines[1]["samples"]] == ["q00", "q01"]
    again = mpo(stub, refine_every=1, history_file=str(path), resume=True)
    assert again.rubric == V2 and again.version == 1 and again.calls == 1
    with pytest.raises(ValueError, match="resume=true needs a history_file"):
        MPOJudge.Config(base_url=stub, resume=True)
    with pytest.raises(ValueError, match="refine_every must be >= 1"):
        MPOJudge.Config(base_url=stub, refine_every=0)


def test_score_cli(stub, tmp_path):
    make_rollouts(tmp_path / "R", 4)
    FakeOpenAI.requests.clear()
    files = {"template_file": TEMPLATE, "rubric_file": "Score: 2", "meta_template_file": meta_template(V2)}
    for key, text in files.items():
        (tmp_path / key).write_text(text)
    opts = {"base_url": stub, "model": "m", "refine_every": 1, "history_file": str(tmp_path / "rubrics.jsonl"),
            **{key: str(tmp_path / key) for key in files}}
    path = "tokalign.rewards.mpo_judge:MPOJudge"  # not yet an entry point: options go under the path
    args = [x for k, v in opts.items() for x in ("--reward-opt", f"{path}.{k}={v}")]
    cli("score", "R", "-r", path, *args, "--no-cache", "--out", "S", cwd=tmp_path)
    from tokalign import artifacts

    rows = artifacts.read(tmp_path / "S", ["scored"]).rows()
    assert sorted(r["reward"] for r in rows) == [0.2] * 4  # one batched call of 4: scored with v1, then refined
    assert len(sent("META")) == 1
    lines = (tmp_path / "rubrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["rubric"] for x in lines] == ["Score: 2", V2]


def test_a_missing_server_is_named_by_the_reward():
    """The error line names the reward the user typed (``judge.endpoint`` used to say "judge" for every judge)."""
    from tokalign.errors import UserError
    from tokalign.rewards.mpo_judge import MPOJudgeConfig

    with pytest.raises(UserError, match=r"^mpo_judge needs a server: --reward-opt mpo_judge.base_url="):
        MPOJudge(MPOJudgeConfig(base_url="", rubric="r"))
