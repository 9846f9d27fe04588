"""Reward ``otc``: OTC-PO's tool-integrated reward — "Acting Less is Reasoning More! Teaching Model to Act
Efficiently" (first titled "OTC: Optimal Tool Calls via Reinforcement Learning"), Wang, Qian, Zhong, Chen, Qiu,
Huang, Jin, Wang, Wong, Ji 2025, arXiv:2504.14870.

A correct answer is worth less the further its number of tool calls m is from the fewest that suffice, n:

    r      = α · r_tool(m, n) · r_φ             r_φ: the ``base`` reward (correctness; exact_match by default)
    f(m,n) = 0 if m = n = 0;  m if n = 0;  2nm / (m + n) otherwise
    r_tool = 1                    if f(m,n) = n = 0
             cos(m·π / (2m + c))  if n = 0          (OTC-PPO's form: every call costs)
             sin(f(m,n)·π / (2n)) otherwise         (OTC-GRPO's form: 1 at m = n, 0 at m = 0 and as m → ∞)

m counts the episode's ``metadata["tool_calls"]`` (malformed ones too: each is a turn spent), or, for a single-turn
sample, the completion's ``<tool_call>`` tags. n is ``n_optimal`` (default 0: the cosine form, fewer is better), or
per sample the reference's ``"n_optimal"`` when the reference is a dict; its ``"answer"`` is then what ``base``
checks. OTC-GRPO estimates n as the fewest calls among the correct responses to the question seen so far; a reward
scores one sample at a time, so here n is given. With a given n > 0, a correct answer using fewer calls than n scores
below α·r_φ (0 with no call): give n as a lower bound. Limiting cases: ``efficiency: false`` or m = n ⇒ r = α·r_φ.

A base value ≤ 0 is passed through unscaled (the paper's r_φ is 0 or 1, where this changes nothing): otherwise more
calls would soften a negative base's penalty. A base's per-token values are scaled by the same factor.

Defaults: α = 1, c = 1, n = 0, base exact_match. Checked offline against summaries of the paper and third-party
re-implementations (the formulas above agree across them); the authors' code was not found, and the paper's values of
c and α could not be read here: c = 1 is a guess (larger c is more tolerant: m = 1 gives cos(π/(2 + c))).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tokalign.protocols import Reward, Sample

_CALL_TAG = re.compile(r"<tool_call>")


def tool_reward(m: int, n: int, c: float = 1.0) -> float:
    """r_tool(m, n) of OTC-PO."""
    if n == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    f = 2 * n * m / (m + n)
    return math.sin(f * math.pi / (2 * n))


def tool_calls(sample: Sample) -> int:
    """m: the episode's tool calls, or the completion's <tool_call> tags for a single-turn sample."""
    meta = sample.metadata or {}
    if "tool_calls" in meta:
        return len(meta["tool_calls"] or [])
    return len(_CALL_TAG.findall(sample.completion or ""))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _whole(name: str, v: Any) -> int:
    whole = not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
    _need(whole and v >= 0, f"{name} must be a whole number ≥ 0, got {v!r}")
    return int(v)


@dataclass
class OTCConfig:
    base: str = "exact_match"  # the correctness reward r_φ (any reward or verifier name: math, code, ...)
    base_options: dict[str, Any] = field(default_factory=dict)  # options of the base reward
    n_optimal: int = 0  # n; a dict reference's "n_optimal" overrides it per sample
    c: float = 1.0  # the cosine form's smoothing constant (n = 0)
    alpha: float = 1.0  # α
    efficiency: bool = True  # false: r = α·r_φ

    def __post_init__(self) -> None:  # ValueError throughout: config.build turns it into the one-line user error
        _need(isinstance(self.base, str) and self.base not in ("", "otc"),
              f"base must name another reward (e.g. exact_match, math), got {self.base!r}")
        _need(isinstance(self.base_options, dict), f"base_options must be a mapping of option: value, got {self.base_options!r}")
        _whole("n_optimal", self.n_optimal)
        for name in ("c", "alpha"):
            v = getattr(self, name)
            _need(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0, f"{name} must be a number ≥ 0, got {v!r}")
        _need(isinstance(self.efficiency, bool), f"efficiency must be true or false, got {self.efficiency!r}")


class OTC:
    Config = OTCConfig

    def __init__(self, config: OTCConfig | None = None):
        from tokalign import rewards

        self.config = config or OTCConfig()
        self.base = rewards.resolve_base(self.config.base, self.config.base_options)

    def _split(self, sample: Sample) -> tuple[Sample, int]:
        """(the sample as the base sees it, n): a dict reference may carry n_optimal and the answer."""
        ref = sample.reference
        if not isinstance(ref, dict) or "n_optimal" not in ref:
            return sample, self.config.n_optimal
        n = _whole("the reference's n_optimal", ref["n_optimal"])
        return (dataclasses.replace(sample, reference=ref["answer"]) if "answer" in ref else sample), n

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        from tokalign.rewards import normalise

        cfg = self.config
        split = [self._split(s) for s in samples]
        values = list(self.base.fn([s for s, _ in split]))
        out = []
        for (s, n), v in zip(split, values):
            r = normalise(self.base.name, s, v)
            m = tool_calls(s)
            r_tool = tool_reward(m, n, cfg.c) if cfg.efficiency else 1.0
            factor = cfg.alpha * r_tool if r.value > 0 else 1.0
            tokens = [t * factor for t in r.token_values] if r.token_values is not None else None
            info = {**r.info, "base": r.value, "tool_calls": m, "n_optimal": n, "r_tool": r_tool}
            out.append(Reward(r.value * factor, tokens, info))
        return out
