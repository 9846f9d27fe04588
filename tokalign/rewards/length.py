"""Reward ``length``: length penalties for efficient reasoning.

``mode: dler`` (default) — DLER's truncation penalty ("DLER: Doing Length pEnalty Right -
Incentivizing More Intelligence per Token via Reinforcement Learning", 2025,
arXiv:2510.15110; recipe NVlabs/DLER ``dler.sh``: L_trunc = 4,000 response tokens). A completion
is *over* when |y| > L_trunc, or when the sampler cut it (``finish_reason == "length"``, which is
how the released recipe truncates: ``max_response_length=4000``). Then

    with a base reward b (``base: math``):   r = b(y) if not over else 0       (DLER: R = 0 above L_trunc)
    without one:                             r = 0    if not over else −penalty (to add to a correctness reward)

The first form is DLER exactly (a multiplier on the correctness reward); the additive form equals it
only for samples that are correct (1 − 1 = 0), so prefer ``base``. ``max_len: 0`` means "cut by the
sampler" only.

``mode: linear`` — a plain linear penalty, r = −penalty · max(0, |y| − free_len) / L, with L =
``max_len``, or when it is 0 the sampler's ``max_new_tokens`` recorded with the rollout (so r ∈
[−penalty, 0] for completions the sampler could produce). Rollouts without a recorded limit score
0 then.

|y| counts completion tokens (``unit: tokens``) or characters (``unit: chars``). DAPO's soft
overlong punishment is the separate ``overlong`` reward; it reads the same length and limit
through :func:`completion_length` and :func:`sampler_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokalign.protocols import Reward, Sample

MODES = ("dler", "linear")
UNITS = ("tokens", "chars")


def completion_length(sample: Sample, unit: str = "tokens") -> int:
    """|y|: completion tokens, or characters with ``unit="chars"``."""
    return len(sample.completion or "") if unit == "chars" else len(sample.completion_ids)


def sampler_limit(sample: Sample) -> int | None:
    """The sampler's ``max_new_tokens`` for this rollout (kept per row by ``rollout``), if recorded."""
    return (sample.metadata or {}).get("max_new_tokens") or None


@dataclass
class LengthConfig:
    mode: str = "dler"  # "dler" (truncation) | "linear"
    max_len: int = 4000  # dler: L_trunc (DLER's 4,000); linear: the normaliser L. 0: the sampler's limit
    base: str = ""  # dler: the reward kept up to L_trunc (e.g. "math"); "" = an additive penalty
    base_options: dict[str, Any] = field(default_factory=dict)  # options of the base reward
    penalty: float = 1.0  # dler without base: the value above L_trunc is −penalty; linear: the coefficient
    free_len: int = 0  # linear: length allowed before the penalty starts
    unit: str = "tokens"  # "tokens" | "chars"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        for name in ("max_len", "free_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number ≥ 0, got {v!r}")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float)) or self.penalty < 0:
            raise ValueError(f"penalty must be a number ≥ 0, got {self.penalty!r}")
        if not isinstance(self.base, str) or self.base == "length":
            raise ValueError(f"base must name another reward (e.g. math), got {self.base!r}")
        if self.base and self.mode != "dler":
            raise ValueError("base is only used with mode=dler (a truncation multiplier); drop it or set mode=dler")
        if not isinstance(self.base_options, dict):
            raise ValueError(f"base_options must be a mapping of option: value, got {self.base_options!r}")
        if self.base_options and not self.base:
            raise ValueError("base_options given without base; set base to the reward they configure")
        if self.mode == "linear" and self.max_len and self.free_len >= self.max_len:
            raise ValueError(f"free_len ({self.free_len}) must be below max_len ({self.max_len})")


class Length:
    Config = LengthConfig

    def __init__(self, config: LengthConfig | None = None):
        self.config = config or LengthConfig()
        self.base = None
        if self.config.base:
            from tokalign import rewards

            self.base = rewards.resolve_base(self.config.base, self.config.base_options)

    def over(self, sample: Sample) -> bool:
        """DLER's truncation: longer than L_trunc, or cut by the sampler."""
        cfg = self.config
        cut = sample.finish_reason == "length"
        return cut or (cfg.max_len > 0 and completion_length(sample, cfg.unit) > cfg.max_len)

    def linear(self, sample: Sample) -> Reward:
        cfg = self.config
        n = completion_length(sample, cfg.unit)
        norm = cfg.max_len or sampler_limit(sample)
        if not norm:
            return Reward(0.0, info={"length": n, "detail": "no max_len and no max_new_tokens recorded for this rollout"})
        if norm <= cfg.free_len:
            return Reward(0.0, info={"length": n, "detail": f"the limit {norm} is not above free_len {cfg.free_len}"})
        return Reward(-cfg.penalty * max(0, n - cfg.free_len) / (norm - cfg.free_len), info={"length": n, "norm": norm})

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        cfg = self.config
        if cfg.mode == "linear":
            return [self.linear(s) for s in samples]
        if self.base is None:
            return [Reward(-cfg.penalty if self.over(s) else 0.0, info={"length": completion_length(s, cfg.unit),
                                                                          "over": self.over(s)}) for s in samples]
        from tokalign.rewards import normalise

        values = list(self.base.fn(samples))
        out = []
        for s, v in zip(samples, values):
            r = normalise(self.base.name, s, v)
            over = self.over(s)
            info = {**r.info, "base": r.value, "length": completion_length(s, cfg.unit), "over": over}
            if over:
                tokens = [0.0] * len(r.token_values) if r.token_values is not None else None
                out.append(Reward(0.0, tokens, info))
            else:
                out.append(Reward(r.value, r.token_values, info))
        return out
