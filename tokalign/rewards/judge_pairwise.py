"""``judge_preference``: a general preference oracle P(y ≻ y' | x) behind an OpenAI-compatible chat endpoint, asked
outright which of two responses is better — the oracle that general-preference methods such as INPO ("Iterative Nash
Policy Optimization", Zhang et al. 2024, arXiv:2407.00617; ``tokalign/algorithms/inpo.py``) label their pairs with.
The verdict format is MT-Bench's pairwise judge ("Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", Zheng et
al. 2023, arXiv:2306.05685): the answer ends with [[A]] (the first response shown is better), [[B]] (the second) or
[[C]] (a tie); the last such token in the answer counts.

The samples of one call are grouped by prompt as ``judge_listwise`` groups them (``metadata["group_id"]``, else the
prompt and reference). For a group of n, every pair (i, j), i < j in sample order, is asked in both orders — i shown as
A, then j shown as A — when ``swap`` is on (the default; MT-Bench's remedy for position bias). With o(a, b) = 1, 0 or
½ for a verdict [[A]], [[B]] or [[C]] when a is shown first:

    P(y_i ≻ y_j) = ½·(o(i, j) + 1 − o(j, i))       (swap; one order unreadable: the other alone; swap off: o(i, j))
    value_i = (1/|J_i|) Σ_{j ∈ J_i} P(y_i ≻ y_j)       J_i: the pairs of i with a readable verdict

n(n − 1) requests per group (n(n − 1)/2 without swap). With two samples per prompt value_1 = P(y_1 ≻ y_2) and
value_2 = 1 − value_1: a scored artifact then trains as preference pairs (``tokalign train dpo|ipo|inpo --data S``:
each prompt's best vs worst) whose chosen response is the one the oracle prefers, and a tie gives no pair. ``info``
holds the pairs counted, the summed preference (``wins``) and each preference by the other sample's 1-based place in
the group (``vs``); an unreadable order's reason goes to ``failed_pairs``. A sample with no readable pair — or alone
in its group (nothing to compare it with) — gets ``unparsed_value`` (default ½, neutral: it neither wins nor loses a
best-vs-worst pair by default) with ``parsed: false``. An unreachable server is a UserError; client, retries, API key,
model discovery and the per-group threads are ``judge``'s and ``judge_listwise``'s (groups run on ``concurrency``
threads, a group's requests one after another).

``judge_pairwise`` (``tokalign/rewards/judge_listwise.py``) differs: it asks the RewardAnything listwise request with
two responses, reads a score per response, and counts one order only.

Options (``--reward-opt judge_preference.KEY=VALUE``): base_url (required), model (default: the first the server
lists), system (the instructions), template (the user message: {prompt}, {reference}, {response_a}, {response_b}),
swap true, unparsed_value 0.5, max_tokens 1024, temperature 0, timeout 60 s, retries 2, concurrency 8, api_key_env
OPENAI_API_KEY.

⚠ unchecked: the system and user wording are tokalign's, in MT-Bench's layout and verdict tokens (not its text); no
INPO-specific judge prompt was found (the paper's oracle is a trained pairwise preference model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokalign.protocols import Reward, Sample
from tokalign.rewards import judge
from tokalign.rewards.judge_listwise import ListwiseJudge

SYSTEM = """You are an impartial judge comparing two AI assistants' responses to the same user prompt.
Decide which response answers the prompt better: correct, helpful, relevant, clear; if a reference answer is given, a response that disagrees with it is wrong.
Ignore the order in which the responses appear and their length as such; do not favour either assistant by name.
Explain briefly, then give your final verdict on the last line, exactly: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie."""

TEMPLATE = """[User prompt]
{prompt}

[Reference answer]
{reference}

[The start of assistant A's response]
{response_a}
[The end of assistant A's response]

[The start of assistant B's response]
{response_b}
[The end of assistant B's response]"""

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
FIRST_WINS = {"A": 1.0, "B": 0.0, "C": 0.5}  # o(a, b): the verdict for the response shown first
_FIELDS = re.compile(r"\{(prompt|reference|response_a|response_b)\}")


@dataclass
class PreferenceConfig:
    base_url: str = ""
    model: str = ""
    system: str = SYSTEM
    template: str = TEMPLATE
    swap: bool = True  # ask each pair in both orders and average (position bias)
    unparsed_value: float = 0.5  # a sample with no readable pair: neutral
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        judge.check_requests(self)
        missing = [f"{{{k}}}" for k in ("response_a", "response_b") if f"{{{k}}}" not in self.template]
        if missing:
            raise ValueError(f"template must contain {' and '.join(missing)}")


def request_messages(config: PreferenceConfig, first: Sample, second: Sample) -> list[dict]:
    """The chat messages asking whether ``first`` (shown as A) or ``second`` (B) answers their prompt better."""
    ref = first.reference
    values = {"prompt": judge.render_prompt(first.prompt), "response_a": first.completion, "response_b": second.completion,
              "reference": "" if ref is None else ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False)}
    user = _FIELDS.sub(lambda m: values[m[1]], config.template)  # one pass: a response's own "{prompt}" stays
    return ([{"role": "system", "content": config.system}] if config.system else []) + [{"role": "user", "content": user}]


def parse_verdict(text: str) -> float | None:
    """o(A, B) from the judge's answer — 1 ([[A]]), 0 ([[B]]), ½ ([[C]]) — by its last verdict token; None without one."""
    found = VERDICT.findall(text)
    return FIRST_WINS[found[-1].upper()] if found else None


def preference(first_shown: float | None, swapped: float | None) -> float | None:
    """P(y_i ≻ y_j) from o(i, j) and o(j, i) (either None when unreadable or not asked)."""
    if first_shown is not None and swapped is not None:
        return 0.5 * (first_shown + 1.0 - swapped)
    if first_shown is not None:
        return first_shown
    return None if swapped is None else 1.0 - swapped


class PreferenceJudge(ListwiseJudge):
    Config = PreferenceConfig
    name = "judge_preference"
    batched = True  # it needs a prompt's samples together

    def __init__(self, config: PreferenceConfig | None = None):
        super().__init__(config or PreferenceConfig())  # type: ignore[arg-type]  # the judges' client reads the shared fields

    def verdict(self, first: Sample, second: Sample) -> tuple[float | None, str]:
        """(o(first, second) or None, why not): one request, ``first`` shown as A."""
        c = self.config
        messages = request_messages(c, first, second)
        model = self.model()
        try:
            answer = self.call_api(lambda client: client.chat.completions.create(
                model=model, messages=messages, max_tokens=c.max_tokens, temperature=c.temperature))
        except judge.RequestFailed as e:
            return None, str(e)
        try:
            text = answer.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return None, "malformed answer: no message content"
        got = parse_verdict(text)
        return got, "" if got is not None else f"no [[A]]/[[B]]/[[C]] verdict in the judge's answer: {text[-200:]!r}"

    def judge_group(self, group: list[Sample]) -> list[Reward]:
        c = self.config
        n = len(group)
        wins, played = [0.0] * n, [0] * n
        vs: list[dict[str, float]] = [{} for _ in range(n)]
        failed: list[list[str]] = [[] for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                o_ij, why_ij = self.verdict(group[i], group[j])
                o_ji, why_ji = self.verdict(group[j], group[i]) if c.swap else (None, "")
                for why, order in ((why_ij, f"{i + 1} first"), (why_ji, f"{j + 1} first")):
                    if why:
                        failed[i].append(f"vs {j + 1} ({order}): {why}")
                        failed[j].append(f"vs {i + 1} ({order}): {why}")
                p = preference(o_ij, o_ji)
                if p is None:
                    continue
                for a, b, pa in ((i, j, p), (j, i, 1.0 - p)):
                    wins[a] += pa
                    played[a] += 1
                    vs[a][str(b + 1)] = pa
        out = []
        for k in range(n):
            info: dict[str, Any] = {"parsed": played[k] > 0, "pairs": played[k], "wins": wins[k], "vs": vs[k]}
            if n == 1:
                info["detail"] = "alone in its group: nothing to compare it with"
            if failed[k]:
                info["failed_pairs"] = failed[k][:8]
            out.append(Reward(wins[k] / played[k] if played[k] else c.unparsed_value, None, info))
        return out
