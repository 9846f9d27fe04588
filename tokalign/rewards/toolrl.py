"""Reward ``toolrl``: ToolRL's fine-grained tool-call reward — "ToolRL: Reward is All Tool Learning Needs",
Qian, Acikgoz, He, Wang, Chen, Hakkani-Tür, Tur, Ji 2025, arXiv:2504.13958, §3.3 (reward design).

With the gold calls G = {G_1..G_n} (``sample.reference``) and the predicted calls P = {P_1..P_m}:

    R = R_format + R_correct                                  ∈ [−3, 4] with the defaults
    R_format  = format_max if the structure is right else format_min       ∈ {0, 1}
    R_correct = (correct_max − correct_min) · R_max / S_max + correct_min  = 6 · R_max / S_max − 3 ∈ [−3, 3]
    r_name    = |N_G ∩ N_P| / |N_G ∪ N_P|                     (tool names, as multisets)       ∈ [0, 1]
    r_param   = Σ_{matched (G_j, P_i)} |keys G_j ∩ keys P_i| / |keys G_j ∪ keys P_i|           ∈ [0, n]
    r_value   = Σ_{matched (G_j, P_i)} Σ_{k ∈ keys G_j} 1[P_i[k] = G_j[k]]                     ∈ [0, Σ_j |keys G_j|]
    R_max     = r_name + max over one-to-one matchings of same-name calls of (r_param + r_value)
    S_max     = 1 + n + Σ_j |keys G_j|

The structure is right when no call is malformed, the completion calls tools exactly when the gold does (a gold
without calls asks for a non-empty direct answer), and, with ``think``, every assistant turn opens with one
``<think>…</think>`` block followed by more text. When the gold has no calls, R_correct = 0 (the released code's rule:
only the format reward speaks). A malformed call makes R_correct = correct_min (the released code gives the minimum to
a response whose calls do not parse); ``strict: false`` drops malformed calls and matches the rest.

The predicted calls are the episode's ``metadata["tool_calls"]`` (a multi-turn rollout); a single-turn sample's are
parsed from the completion: ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks (Hermes; several allowed,
and several JSON objects a line inside one block, as ToolRL's data writes them; ``"parameters"`` is read as
``"arguments"``). The reference: a list of ``{"name", "arguments"}``, a dict with ``"tool_calls"``, one call as a dict,
or a string holding any of these as JSON or the calls as ``<tool_call>`` blocks (a string with neither is a gold
without calls). Values are compared as parsed JSON (``1 == 1.0``; ``"1" != 1``).

Checked offline against a fork of the released code (qiancheng0/ToolRL ``verl/utils/reward_score/rlla.py``; the
official repository is not in our index) and summaries of the paper: the ±3 / {0, 1} ranges, S_max, multiset Jaccard
for names and parameter names, and only same-name calls being paired. The paper's text (not read here in full) speaks
of the *optimal* matching, which is ``matching: optimal`` (default, exact up to 16 calls of one name per side, greedy
beyond); the released code matches greedily, each gold call in order taking its best unused predicted call
(``matching: greedy``). The two differ only when one tool is called several times. Not reproduced: the released
code's ``<response>`` tags, its step-dependent reward scaling and its length reward.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Any

from tokalign.environments import calls as calls_mod
from tokalign.protocols import Reward, Sample
from tokalign.rewards.format import PRESETS

MATCHINGS = ("optimal", "greedy")
MAX_EXACT = 16  # calls of one name on the smaller side up to which the matching is exhaustive (2^16 subsets)

_THINK = re.compile(PRESETS["think"], re.DOTALL)


@dataclass
class ToolRLConfig:
    format_max: float = 1.0
    format_min: float = 0.0
    correct_max: float = 3.0  # the paper's "CORRECTMAX1" variant is 1 / −1
    correct_min: float = -3.0
    matching: str = "optimal"  # "optimal" (the paper) | "greedy" (the released code)
    think: bool = False  # every assistant turn opens with <think>…</think> (the paper's system prompt asks for it)
    strict: bool = True  # a malformed call makes R_correct its minimum; false: drop malformed calls, match the rest

    def __post_init__(self) -> None:  # ValueError throughout: config.build turns it into the one-line user error
        for name in ("format_max", "format_min", "correct_max", "correct_min"):
            v = getattr(self, name)
            _need(not isinstance(v, bool) and isinstance(v, (int, float)), f"{name} must be a number, got {v!r}")
        _need(self.format_max >= self.format_min and self.correct_max >= self.correct_min,
              "format_max must be ≥ format_min and correct_max ≥ correct_min")
        _need(self.matching in MATCHINGS, f"matching must be one of {', '.join(MATCHINGS)}, got {self.matching!r}")
        for name in ("think", "strict"):
            _need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _call(obj: Any) -> dict | None:
    """``{"name", "arguments"}`` from a decoded call object, None when it is not one."""
    call = calls_mod.call_from_object(obj)
    return None if call.error is not None else call.as_dict()


def _parse_calls(text: str) -> list[dict]:
    """The ``<tool_call>`` blocks of a completion, in order (the environments' Hermes parser); one that cannot be read
    is ``{"name": None, "error"}``. Multi-turn episodes come parsed in ``metadata["tool_calls"]``."""
    return [c.as_dict() for c in calls_mod.hermes(text or "")]


def _malformed(call: Any) -> bool:
    return (not isinstance(call, dict) or call.get("error") is not None or not isinstance(call.get("name"), str)
            or not call["name"] or not isinstance(call.get("arguments"), dict))


def gold_calls(reference: Any) -> list[dict]:
    """The reference as a list of ``{"name", "arguments"}``; ValueError names what is wrong with it."""
    if reference is None:
        raise ValueError('toolrl needs the gold tool calls as the reference: a list of {"name", "arguments"}')
    if isinstance(reference, str):
        text = reference.strip()
        try:
            return gold_calls(json.loads(text))
        except json.JSONDecodeError:
            pass
        if "<tool_call>" not in text:
            return []  # a direct answer: the gold calls no tool
        calls = _parse_calls(text)
        if any(_malformed(c) for c in calls):
            raise ValueError(f"the reference's <tool_call> blocks do not parse: {text[:80]!r}")
        return calls
    if isinstance(reference, dict):
        if "tool_calls" in reference:
            return gold_calls(reference["tool_calls"] or [])
        if "name" in reference:
            return gold_calls([reference])
        raise ValueError(f'a dict reference needs "tool_calls" (or is one call with "name"), got keys {sorted(reference)}')
    if isinstance(reference, (list, tuple)):
        calls = [_call(c) for c in reference]
        if any(c is None for c in calls):
            raise ValueError(f'every reference call needs a "name" and object "arguments", got {reference!r:.120}')
        return calls
    raise ValueError(f"the reference must be a list of tool calls, a dict or a string, got {type(reference).__name__}")


def _jaccard(a: list, b: list) -> float:
    """|a ∩ b| / |a ∪ b| as multisets; two empty lists match fully."""
    if not a and not b:
        return 1.0
    inter = sum((Counter(a) & Counter(b)).values())
    return inter / (len(a) + len(b) - inter)


def pair_score(gold: dict, pred: dict) -> float:
    """r_param + r_value of one matched pair: parameter-name Jaccard + the gold parameters given the gold value."""
    g, p = gold["arguments"], pred["arguments"]
    return _jaccard(list(g), list(p)) + sum(1.0 for k, v in g.items() if k in p and p[k] == v)


def _optimal(scores: list[list[float]]) -> float:
    """Max Σ scores[i][j] over one-to-one partial matchings (scores ≥ 0), exhaustive over the smaller side."""
    if scores and len(scores[0]) > len(scores):
        scores = [list(col) for col in zip(*scores)]
    rows, cols = len(scores), len(scores[0]) if scores else 0

    @cache
    def best(i: int, used: int) -> float:
        if i == rows:
            return 0.0
        out = best(i + 1, used)
        for j in range(cols):
            if not used >> j & 1:
                out = max(out, scores[i][j] + best(i + 1, used | 1 << j))
        return out

    return best(0, 0)


def _greedy(scores: list[list[float]]) -> float:
    """The released code: each gold call in order takes its best-scoring unused predicted call."""
    used: set[int] = set()
    total = 0.0
    for row in scores:
        j = max((j for j in range(len(row)) if j not in used and row[j] > 0), key=lambda j: row[j], default=None)
        if j is not None:
            used.add(j)
            total += row[j]
    return total


class ToolRL:
    Config = ToolRLConfig

    def __init__(self, config: ToolRLConfig | None = None):
        self.config = config or ToolRLConfig()

    def match(self, gold: list[dict], pred: list[dict]) -> tuple[float, float]:
        """(r_name, r_param + r_value) of the predicted calls against the gold: only same-name calls are paired."""
        total = 0.0
        for name in dict.fromkeys(g["name"] for g in gold):
            gs = [g for g in gold if g["name"] == name]
            ps = [p for p in pred if p["name"] == name]
            if not ps:
                continue
            scores = [[pair_score(g, p) for p in ps] for g in gs]
            exact = self.config.matching == "optimal" and min(len(gs), len(ps)) <= MAX_EXACT
            total += _optimal(scores) if exact else _greedy(scores)
        return _jaccard([g["name"] for g in gold], [p["name"] for p in pred]), total

    def correctness(self, gold: list[dict], pred: list[dict], malformed: int) -> tuple[float, dict]:
        cfg = self.config
        if not gold:
            return 0.0, {}
        s_max = 1 + len(gold) + sum(len(g["arguments"]) for g in gold)
        if malformed and cfg.strict:
            return cfg.correct_min, {"s_max": s_max}
        r_name, r_pairs = self.match(gold, pred) if pred else (0.0, 0.0)
        r_max = r_name + r_pairs
        value = (cfg.correct_max - cfg.correct_min) * r_max / s_max + cfg.correct_min
        return value, {"r_name": r_name, "r_match": r_max, "s_max": s_max}

    def format_ok(self, texts: list[str], gold: list[dict], pred: list[dict], malformed: int) -> bool:
        if malformed or bool(pred) != bool(gold):
            return False
        if not gold and not (texts and texts[-1].strip()):
            return False
        return not self.config.think or all(_THINK.fullmatch(t.strip()) for t in texts)

    def score(self, sample: Sample) -> Reward:
        cfg = self.config
        gold = gold_calls(sample.reference)
        meta = sample.metadata or {}
        raw = list(meta["tool_calls"] or []) if "tool_calls" in meta else _parse_calls(sample.completion or "")
        pred = [c for c in raw if not _malformed(c)]
        malformed = len(raw) - len(pred)
        if "messages" in meta:
            texts = [str(m.get("content") or "") for m in meta["messages"] or [] if m.get("role") == "assistant"]
        else:
            texts = [sample.completion or ""]
        fmt = cfg.format_max if self.format_ok(texts, gold, pred, malformed) else cfg.format_min
        correct, parts = self.correctness(gold, pred, malformed)
        info = {"format": fmt, "correctness": correct, "calls": len(raw), "gold_calls": len(gold), "malformed": malformed, **parts}
        return Reward(fmt + correct, info=info)

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        return [self.score(s) for s in samples]
