"""``judge_preference`` (tokalign/rewards/judge_pairwise.py): a general preference oracle asked which of two responses is
better ([[A]] / [[B]] / [[C]]), each pair in both orders.

Parsing and the preference arithmetic on hand cases; the requests, their number and the win rates against an
in-process OpenAI-compatible stub that prefers the shorter response (equal lengths: [[C]]), and, by the prompt, answers
[[A]] always (position bias), prose without a verdict (GARBAGE), HTTP n (STATUS n), or prose when response A contains
"?"; then `tokalign score` and `tokalign train inpo` on the scores through the real CLI."""

from __future__ import annotations

import json
import re
from typing import ClassVar

import pytest
from conftest import cli
from openai_stub import StubHandler, serving
from score_plugins import make_rollouts

from tokalign import rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.judge_pairwise import (
    PreferenceConfig,
    PreferenceJudge,
    parse_verdict,
    preference,
    request_messages,
)


NAME = "tokalign.rewards.judge_pairwise:PreferenceJudge"


# ------------------------------------------------------------------------------- parsing


def test_verdicts():
    """[[A]] = the first response shown wins (1), [[B]] = the second (0), [[C]] = a tie (½); the last token counts."""
    assert parse_verdict("A is clearer.\n[[A]]") == 1.0
    assert parse_verdict("[[b]]") == 0.0 and parse_verdict("tie: [[ C ]]") == 0.5
    assert parse_verdict("At first [[A]] seemed right, but on reflection: [[B]]") == 0.0
    assert parse_verdict("") is None and parse_verdict("A is better. [A] [[D]]") is None


def test_preference_from_both_orders():
    """P(i ≻ j) = ½(o(i, j) + 1 − o(j, i)): consistent orders 1 or 0; a position-biased judge ([[A]] both times)
    ½; one win and one tie ¾; one order unreadable: the other alone (o(j, i) = 0 ⇒ 1); neither: None."""
    assert preference(1.0, 0.0) == 1.0 and preference(0.0, 1.0) == 0.0
    assert preference(1.0, 1.0) == 0.5 and preference(1.0, 0.5) == 0.75
    assert preference(None, 0.0) == 1.0 and preference(0.5, None) == 0.5 and preference(None, None) is None


def test_request_layout():
    """System instructions, then the user message: prompt, reference (JSON text when not a string), A then B; a
    response's own "{prompt}" is left as it is."""
    cfg = PreferenceConfig(base_url="http://x")
    system, user = request_messages(cfg, Sample("a", [{"role": "user", "content": "2+2?"}], "4 {prompt}", reference=["4"]),
                                    Sample("b", "ignored", "5"))
    assert system["role"] == "system" and '"[[A]]"' in system["content"] and '"[[C]]"' in system["content"]
    assert user["content"] == ("[User prompt]\n2+2?\n\n[Reference answer]\n[\"4\"]\n\n"
                               "[The start of assistant A's response]\n4 {prompt}\n[The end of assistant A's response]\n\n"
                               "[The start of assistant B's response]\n5\n[The end of assistant B's response]")
    (only,) = request_messages(PreferenceConfig(base_url="http://x", system="", template="{response_a} or {response_b}"),
                               Sample("a", "q", "x"), Sample("b", "q", "y"))
    assert only == {"role": "user", "content": "x or y"}


# ------------------------------------------------------------------------------- requests


class Comparer(StubHandler):
    """Prefers the shorter response; see the module docstring for the prompts that change that."""

    requests: ClassVar[list[tuple[str, str, str]]] = []  # (prompt, A, B) per request, in arrival order

    model_id = "stub-comparer"

    def do_POST(self):
        body = self.body()
        user = body["messages"][-1]["content"]
        prompt = re.search(r"\[User prompt\]\n(.*?)\n\n\[Reference answer\]", user, re.DOTALL)[1]
        a = re.search(r"assistant A's response\]\n(.*?)\n\[The end of assistant A", user, re.DOTALL)[1]
        b = re.search(r"assistant B's response\]\n(.*?)\n\[The end of assistant B", user, re.DOTALL)[1]
        Comparer.requests.append((prompt, a, b))
        if "STATUS " in prompt:
            return self._send(int(prompt.split("STATUS ")[1]), {"error": {"message": "no"}})
        if "GARBAGE" in prompt or "?" in a:
            answer = "Both have merits."
        elif "BIASED" in prompt:
            answer = "The first one. [[A]]"
        else:
            answer = "Shorter is better. " + ("[[A]]" if len(a) < len(b) else "[[B]]" if len(b) < len(a) else "[[C]]")
        self.answer(answer)


@pytest.fixture(scope="module")
def comparer():
    with serving(Comparer) as url:
        yield url


def judge(url: str, **cfg) -> PreferenceJudge:
    return PreferenceJudge(PreferenceConfig(base_url=url, concurrency=1, **cfg))


def test_win_rates_and_requests(comparer):
    """Prompt q: samples "x", "xxx", "xx" (1, 3, 2 characters); the stub prefers the shorter in either order, so each
    pair's P is 1 or 0: "x" wins 2 of 2 (1.0), "xx" 1 of 2 (0.5), "xxx" 0 of 2 (0.0). 3 pairs × 2 orders = 6 requests,
    (1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2) by sample place. A lone sample (prompt "other") makes no request and
    gets unparsed_value ½."""
    samples = [Sample("a", "q", "x"), Sample("b", "q", "xxx"), Sample("c", "q", "xx"), Sample("d", "other", "long")]
    Comparer.requests.clear()
    got = judge(comparer)(samples)
    assert [r.value for r in got] == [1.0, 0.0, 0.5, 0.5]
    assert got[0].info == {"parsed": True, "pairs": 2, "wins": 2.0, "vs": {"2": 1.0, "3": 1.0}}
    assert got[2].info["vs"] == {"1": 0.0, "2": 1.0}
    assert got[3].info == {"parsed": False, "pairs": 0, "wins": 0.0, "vs": {}, "detail": "alone in its group: nothing to compare it with"}
    assert Comparer.requests == [("q", "x", "xxx"), ("q", "xxx", "x"), ("q", "x", "xx"), ("q", "xx", "x"),
                                 ("q", "xxx", "xx"), ("q", "xx", "xxx")]


def test_two_samples_a_tie_and_one_order_only(comparer):
    """Two samples per prompt (INPO's pairs): "yy" vs "y" ⇒ values 0, 1 (sample 2 preferred); equal lengths ⇒ [[C]] both
    ways ⇒ ½, ½ (no pair). swap off: one request per pair. Response A containing "?" gets prose: that order is left
    out and the other decides — "?" vs "zz": only ("zz" first) is read, [[B]] ⇒ P("?" ≻ "zz") = 1 − 0 = 1."""
    Comparer.requests.clear()
    got = judge(comparer)([Sample("a", "p", "yy"), Sample("b", "p", "y"), Sample("c", "t", "ab"), Sample("d", "t", "cd")])
    assert [r.value for r in got] == [0.0, 1.0, 0.5, 0.5] and len(Comparer.requests) == 4
    Comparer.requests.clear()
    got = judge(comparer, swap=False)([Sample("a", "p", "yy"), Sample("b", "p", "y")])
    assert [r.value for r in got] == [0.0, 1.0] and Comparer.requests == [("p", "yy", "y")]
    got = judge(comparer)([Sample("a", "p", "?"), Sample("b", "p", "zz")])
    assert [r.value for r in got] == [1.0, 0.0] and got[0].info["pairs"] == 1
    assert got[0].info["failed_pairs"] == ["vs 2 (1 first): no [[A]]/[[B]]/[[C]] verdict in the judge's answer: 'Both have merits.'"]


def test_position_bias_cancels_with_swap(comparer):
    """A judge that always answers [[A]]: with swap every pair is ½ (a tie, no training pair); without swap the sample
    shown first always wins."""
    samples = [Sample("a", "BIASED", "long answer"), Sample("b", "BIASED", "s")]
    assert [r.value for r in judge(comparer)(samples)] == [0.5, 0.5]
    assert [r.value for r in judge(comparer, swap=False)(samples)] == [1.0, 0.0]


def test_failures_are_recorded(comparer):
    """No verdict in any answer, or HTTP 400: no readable pair, so unparsed_value with the reasons (both orders)."""
    two = [Sample("a", "GARBAGE", "x"), Sample("b", "GARBAGE", "xx")]
    got = judge(comparer, unparsed_value=-1.0)(two)
    assert [r.value for r in got] == [-1.0, -1.0] and not got[0].info["parsed"]
    assert [f.split(":")[0] for f in got[0].info["failed_pairs"]] == ["vs 2 (1 first)", "vs 2 (2 first)"]
    got = judge(comparer)([Sample("a", "STATUS 400", "x"), Sample("b", "STATUS 400", "xx")])
    assert [r.value for r in got] == [0.5, 0.5] and got[1].info["failed_pairs"][0].startswith("vs 1 (1 first): HTTP 400")


def test_bad_options_and_unreachable_server():
    with pytest.raises(UserError, match=r"^judge_preference needs a server: --reward-opt judge_preference.base_url="):
        PreferenceJudge()
    with pytest.raises(ValueError, match=r"template must contain \{response_b\}"):
        PreferenceConfig(template="{response_a}")
    with pytest.raises(UserError, match="bad option value|swap"):
        rewards.resolve([NAME], {NAME: {"base_url": "http://127.0.0.1:1", "swap": "maybe"}})
    (r,) = rewards.resolve([NAME], {NAME: {"base_url": "http://127.0.0.1:1", "swap": False}})
    assert r.fn.batched and r.fn.config.swap is False and r.fn.config.model == ""
    down = PreferenceJudge(PreferenceConfig(base_url="http://127.0.0.1:1", model="m", retries=0))
    with pytest.raises(UserError, match=r"judge_preference: cannot reach http://127.0.0.1:1/v1"):
        down([Sample("a", "q", "x"), Sample("b", "q", "y")])


# ------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_score_then_train_inpo(comparer, tmp_path):
    """8 synthetic rollouts, two prompts of 4 (completions of 1..4 and 5..8 characters): 4·3 = 12 requests per prompt,
    win rates 3/3, 2/3, 1/3, 0/3 in each. `tokalign train inpo` on the scores trains each prompt's best vs worst (the
    shortest vs the longest) for one step."""
    make_rollouts(tmp_path / "R", 8)
    Comparer.requests.clear()
    cli("score", "R", "-r", NAME, "--reward-opt", f"{NAME}.base_url={comparer}/v1", "--no-cache", "--out", "S", cwd=tmp_path)
    from tokalign import artifacts

    rows = sorted(artifacts.read(tmp_path / "S", ["scored"]).rows(), key=lambda r: int(r["id"][1:]))
    assert [r["reward"] for r in rows] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0] * 2) and len(Comparer.requests) == 24
    cli("train", "tokalign.algorithms.inpo:INPO", "--data", "S", "--max-steps", "1", "--batch-size", "2", "--out", "T",
        "--quiet", cwd=tmp_path)
    from tokalign.train.sources import pairs_from_scored

    assert [(p["chosen"], p["rejected"]) for p in pairs_from_scored(rows)] == [("c", "cccc"), ("c" * 5, "c" * 8)]
    metrics = [json.loads(x) for x in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["loss"] == pytest.approx(25.0, rel=1e-6)  # π = π_t = π_ref: h = 0, (0 − 5)²

    bad = cli("score", "R", "-r", NAME, "--no-cache", "--out", "S2", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "needs a server" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
