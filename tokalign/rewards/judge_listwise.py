"""``judge_listwise``: a judge that compares — all of a prompt's samples in one request to an OpenAI-compatible
chat endpoint, scored side by side, as in "RewardAnything: Generalizable Principle-Following Reward Models", Yu et
al. 2025, arXiv:2506.03637 (request and answer format from the authors' ``rewardanything/processing.py``).

The samples of one call are grouped by prompt (``metadata["group_id"]`` when set, else the prompt and reference),
each group in the order its samples arrive. A group of n becomes one request: the system message asks for a score
from ``min_score`` to ``max_score`` (RewardAnything: 1..5) per response and a best-to-worst order; the user message
is the JSON object ``{"principle", "prompt", "responses": {"model-1": completion 1, …, "model-n": completion n}}``.
The judge answers (after an optional ``<think>…</think>``, possibly inside a ```json fence) with

    {"scores": {"model-1": s_1, …}, "best-to-worst": ["model-2", "model-1", …]}

read leniently (single quotes, unquoted keys, trailing commas, prose around the braces; "best-to-worse" too).
A sample's value, with ``use`` = ``score`` (default):

    value_i = clip((s_i − min_score) / (max_score − min_score), 0, 1)          e.g. 4 of 1..5 -> 0.75

and with ``use`` = ``rank`` (rank-normalised, ties already broken by the judge's order): position p_i (0 = best) in
best-to-worst gives value_i = 1 − p_i / (n − 1). A group of one is the same request with one response (its
``rank`` value is its score value: there is nothing to rank against). A sample the answer gives no (finite) score
or place for, an answer that is not such a JSON object, or a request that fails (HTTP 4xx, retries outlasted) gives
``unparsed_value`` with ``parsed: false`` and the reason in ``info``, as ``judge`` does; an unreachable server is a
UserError. Client, retries, API key and model discovery are ``judge``'s (``tokalign.rewards.judge``); groups run on
``concurrency`` threads.

``judge_pairwise`` (``PairwiseJudge`` below) sends the same requests with two responses each and rewards a sample
with its win rate against the rest of its group.

The scorer hands a batched reward up to 64 samples per call and leaves out samples it finds in its cache: a group
is judged together when it arrives in one call (groups smaller than 64 in a fresh run), else in the parts it came in.

Options (``--reward-opt judge_listwise.KEY=VALUE``): base_url (required), model, principle, system (replaces the
instructions), use score|rank, min_score 1, max_score 5, unparsed_value 0, max_tokens 1024, temperature 0,
timeout 60, retries 2, concurrency 8, api_key_env OPENAI_API_KEY.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards.grouping import groups
from tokalign.rewards import judge

DEFAULT_PRINCIPLE = "Prefer the response that is correct, helpful and clear; if a reference answer is given, a response that disagrees with it is wrong."

SYSTEM = """You judge model responses by the evaluation principle given with them, putting the principle above general preferences (never endorse harmful content).
Read the principle, the prompt and every response; think briefly about how well each response follows the principle.
Give each response an integer score from {lo} (contradicts the principle or is poor) to {hi} (follows it perfectly and is excellent); use the whole range when the responses differ in quality.
Then order all responses from best to worst, breaking ties.
Answer with this JSON object only:
{{"scores": {{"model-1": 2, "model-2": 4}}, "best-to-worst": ["model-2", "model-1"]}}"""


@dataclass
class ListwiseConfig:
    base_url: str = ""
    model: str = ""
    principle: str = DEFAULT_PRINCIPLE
    system: str = ""
    use: str = "score"
    min_score: float = 1.0
    max_score: float = 5.0
    unparsed_value: float = 0.0
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        if self.use not in ("score", "rank"):
            raise ValueError(f"use must be 'score' or 'rank', got {self.use!r}")
        judge.check_limits(self)
        if self.retries < 0 or self.timeout <= 0:
            raise ValueError("retries must be >= 0 and timeout > 0")


def label(i: int) -> str:
    """The name of the i-th (0-based) response in a request."""
    return f"model-{i + 1}"


def request_messages(config: ListwiseConfig, group: list[Sample]) -> list[dict]:
    """The chat messages for one group: response k of the request is ``group[k]`` (named ``model-{k+1}``)."""
    system = config.system or SYSTEM.format(lo=f"{config.min_score:g}", hi=f"{config.max_score:g}")
    first = group[0]
    user: dict[str, Any] = {"principle": config.principle, "prompt": judge.render_prompt(first.prompt)}
    if first.reference is not None:
        user["reference"] = first.reference if isinstance(first.reference, str) else json.dumps(first.reference, ensure_ascii=False)
    user["responses"] = {label(k): s.completion for k, s in enumerate(group)}
    return [{"role": "system", "content": system}, {"role": "user", "content": json.dumps(user, ensure_ascii=False)}]


def _json_object(text: str) -> dict | None:
    body = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    body = body.split("</think>")[-1]  # an answer whose opening tag was in the prompt
    body = re.sub(r"```(?:json)?", "", body).strip()
    start, end = body.find("{"), body.rfind("}")
    candidates = [body] + ([body[start : end + 1]] if 0 <= start < end else [])
    for c in candidates:
        for attempt in (c, _repaired(c)):
            try:
                got = json.loads(attempt)
            except ValueError:
                continue
            if isinstance(got, dict):
                return got
    return None


def _repaired(text: str) -> str:
    """Common slips of a generating judge: single quotes, unquoted keys, trailing commas."""
    fixed = text.replace("'", '"')
    fixed = re.sub(r"([{,])\s*([A-Za-z0-9_-]+)\s*:", r'\1"\2":', fixed)
    return re.sub(r",\s*([}\]])", r"\1", fixed)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_answer(config: ListwiseConfig, text: str, n: int) -> list[Reward]:
    """One Reward per response ``model-1`` … ``model-n`` of the judge's answer ``text``."""
    c = config
    shown = text[:1000]

    def failed(detail: str) -> Reward:
        return Reward(c.unparsed_value, None, {"parsed": False, "response": shown, "detail": detail})

    got = _json_object(text)
    if got is None:
        return [failed("no JSON object in the judge's answer")] * n
    scores = got.get("scores")
    scores = {str(k).strip().lower(): v for k, v in scores.items()} if isinstance(scores, dict) else {}
    order = got.get("best-to-worst", got.get("best-to-worse"))
    names = {label(i) for i in range(n)}
    order = [x for x in (str(x).strip().lower() for x in order) if x in names] if isinstance(order, list) else []
    place = {}
    for p, name in enumerate(order):
        place.setdefault(name, p)
    out = []
    for i in range(n):
        name = label(i)
        raw = _number(scores.get(name))
        if raw is None:
            out.append(failed(f"the judge's answer gives no score for {name}"))
            continue
        norm = (raw - c.min_score) / (c.max_score - c.min_score)
        info: dict[str, Any] = {"parsed": True, "label": name, "score": raw, "rank": place[name] + 1 if name in place else None,
                                "n": n, "response": shown}
        if not 0.0 <= norm <= 1.0:
            info["clipped"] = True
        value = min(1.0, max(0.0, norm))
        if c.use == "rank" and n > 1:
            if name not in place:
                out.append(failed(f"the judge's best-to-worst order leaves out {name}"))
                continue
            value = 1.0 - place[name] / (n - 1)
        out.append(Reward(value, None, info))
    return out


class ListwiseJudge(judge.Judge):
    Config = ListwiseConfig
    name = "judge_listwise"
    batched = True  # it needs a prompt's samples together

    def __init__(self, config: ListwiseConfig | None = None):
        config = config or ListwiseConfig()
        if not config.base_url.strip():
            raise UserError(f"{self.name} needs a server: --reward-opt {self.name}.base_url=http://HOST:PORT/v1")
        super().__init__(config)  # type: ignore[arg-type]  # the judge's client reads the fields both configs share

    def judge_group(self, group: list[Sample]) -> list[Reward]:
        c = self.config
        messages = request_messages(c, group)
        model = self.model()
        try:
            answer = self.call_api(lambda client: client.chat.completions.create(
                model=model, messages=messages, max_tokens=c.max_tokens, temperature=c.temperature))
        except judge.RequestFailed as e:
            return [Reward(c.unparsed_value, None, {"parsed": False, "error": str(e)})] * len(group)
        try:
            text = answer.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return [Reward(c.unparsed_value, None, {"parsed": False, "error": "malformed answer: no message content"})] * len(group)
        return parse_answer(c, text, len(group))

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        from concurrent.futures import ThreadPoolExecutor

        if self._down and time.monotonic() - self._down[0] < judge.DOWN_MEMORY_S:
            raise UserError(self._down[1])
        parts = groups(samples)
        out: list[Reward | None] = [None] * len(samples)
        try:
            self.model()
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(parts))) as pool:
                for idx, rewards in zip(parts, pool.map(lambda g: self.judge_group([samples[i] for i in g]), parts)):
                    for i, r in zip(idx, rewards):
                        out[i] = r
        except judge.Unreachable as e:
            msg = f"{self.name}: cannot reach {self.base_url}: {e}; start the server or fix --reward-opt {self.name}.base_url."
            self._down = (time.monotonic(), msg)
            raise UserError(msg) from None
        return out  # type: ignore[return-value]


class PairwiseJudge(ListwiseJudge):
    """``judge_pairwise``: the same requests with two responses each — every pair (i, j), i < j in sample order, of
    a prompt's n samples, i shown first (model-1) — and a sample's value its win rate over the others:

        value_i = (wins_i + ½·ties_i) / (pairs of i the judge answered)            n(n − 1)/2 requests per group

    A pair is won by the higher score, or at equal scores by the first of best-to-worst (neither: a tie). A pair
    whose answer cannot be read is left out of both samples' rates (its reason in ``info["failed_pairs"]``); a sample
    with no readable pair gets ``unparsed_value``. A group of one falls back to ``judge_listwise`` on its own: its
    score value. ``use`` is not read (the rate is the rank-like value)."""

    name = "judge_pairwise"

    def judge_group(self, group: list[Sample]) -> list[Reward]:
        if len(group) == 1:
            return super().judge_group(group)
        c = self.config
        n = len(group)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        wins = [0.0] * n
        played = [0] * n
        failed: list[list[str]] = [[] for _ in range(n)]
        for i, j in pairs:
            a, b = super().judge_group([group[i], group[j]])
            if not (a.info.get("parsed") and b.info.get("parsed")):
                why = next(r.info.get("detail") or r.info.get("error", "") for r in (a, b) if not r.info.get("parsed"))
                failed[i].append(f"vs {j + 1}: {why}")
                failed[j].append(f"vs {i + 1}: {why}")
                continue
            if a.info["score"] != b.info["score"]:
                first = 1.0 if a.info["score"] > b.info["score"] else 0.0
            else:
                ra, rb = a.info.get("rank"), b.info.get("rank")
                first = 0.5 if ra is None or rb is None or ra == rb else float(ra < rb)
            wins[i] += first
            wins[j] += 1.0 - first
            played[i] += 1
            played[j] += 1
        out = []
        for k in range(n):
            info: dict[str, Any] = {"parsed": played[k] > 0, "pairs": played[k], "wins": wins[k]}
            if failed[k]:
                info["failed_pairs"] = failed[k][:8]
            out.append(Reward(wins[k] / played[k] if played[k] else c.unparsed_value, None, info))
        return out
