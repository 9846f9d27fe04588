"""Reward ``gated``: Gated Reward Accumulation (G-RA) — "Stabilizing Long-term Multi-turn Reinforcement Learning
with Gated Rewards" (2025; the seed listing 001 gives title and abstract, not the authors' names or arXiv id).

Immediate (step) rewards are added only when the high-level (outcome) reward meets a threshold, so step rewards
cannot pay for a failed episode (the reward hacking G-RA was made against):

    R = R_out + w · 1[R_out ≥ τ] · Σ_k r_k

``R_out`` is the ``base`` reward (the outcome; ``exact_match`` by default); ``r_k`` are the environment's rewards of
the episode's model turns (``Sample.metadata["turn_rewards"]``: what ``Reply.reward`` gave; None counts 0). Per-token
values follow the token-reward contract (their sum is R): the base's own token values, or R_out on the last token,
plus each gated step reward on the last token of its model turn. Limiting cases: τ = −inf is plain accumulation
(R_out + w·Σ r_k); no step rewards (a single-turn sample) or w = 0 is the base reward.

The paper's setting is SWE tasks in Docker (its step rewards are rule-based checks of each action); no machine here
has that environment, so this reward is built and tested against stand-in environments that give per-turn rewards
(any ``tokalign.environments`` environment whose ``Reply.reward`` is set). The formula follows the paper's abstract
and method summary; its official code was not found, so τ's default (1.0: the outcome passed) is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tokalign.protocols import Reward, Sample


@dataclass
class GatedConfig:
    base: str = "exact_match"  # the outcome reward R_out (any reward or verifier name)
    base_options: dict[str, Any] = field(default_factory=dict)
    threshold: float = 1.0  # τ: step rewards count only when R_out ≥ τ
    step_weight: float = 1.0  # w

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or self.base in ("", "gated"):
            raise ValueError(f"base must name another reward (e.g. exact_match), got {self.base!r}")
        for name in ("threshold", "step_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")


def step_ends(sample: Sample) -> list[int]:
    """The completion position of the last token of each model turn (one position per turn)."""
    spans = (sample.metadata or {}).get("turn_spans") or []
    return [end - 1 for start, end, who in spans if who == "model" and end > start]


class Gated:
    Config = GatedConfig

    def __init__(self, config: GatedConfig | None = None):
        from tokalign import rewards

        self.config = config or GatedConfig()
        self.base = rewards.resolve_base(self.config.base, self.config.base_options)

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        from tokalign.rewards import normalise

        cfg, out = self.config, []
        for s, v in zip(samples, self.base.fn(samples)):
            r = normalise(self.base.name, s, v)
            steps = [float(x or 0.0) for x in (s.metadata or {}).get("turn_rewards") or []]
            gate = r.value >= cfg.threshold
            added = cfg.step_weight * sum(steps) if gate else 0.0
            n = len(s.completion_ids)
            tokens = list(r.token_values) if r.token_values is not None else [0.0] * n
            if r.token_values is None and n:
                tokens[-1] += r.value
            if gate and n:
                for pos, x in zip(step_ends(s), steps):
                    tokens[min(pos, n - 1)] += cfg.step_weight * x
            out.append(Reward(r.value + added, tokens if n else None,
                              {**r.info, "outcome": r.value, "gate_open": gate, "step_rewards": steps}))
        return out
