"""SPO — "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language
Models", Guo et al. 2025, arXiv:2505.23564 (SPO-chain). Credit between token and sequence level: each completion
is cut into segments at low-probability tokens, each cut's value is estimated by Monte-Carlo rollouts from that
prefix, and every token of a segment gets the segment's value gain.

Shapes: ``sampler_logps`` (π_old of each sampled token), ``segment_value_start``/``_end`` (from the online source),
``old_logps``, mask: [B, T].

    cut points: the tokens with π_old(y_t) < p_threshold, every ``interval``-th of them (the first included),
                plus the start of the completion
    V(c) = mean reward of ``rollouts`` continuations of prompt + y_{<c};  V(end) = R
    A_t = V(c_{k+1}) − V(c_k) for t in segment k;   probability mask: A_t = 0 where π_old(y_t) > p_threshold
    loss = GRPO's PPO-clip surrogate with these per-token advantages (no group normalisation)

Official code: AIFrameResearch/SPO ``src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py``
(cut points and ``_compute_token_advantages``): p_threshold 0.9, interval 5. ``rollouts`` (MC samples per cut) is 4
here by default (a cost choice for this CPU; raise it for lower-variance values). One segment (no cut) gives every
token R − V(root). SPO-tree (tree rollouts for long chains of thought) is not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import TokenBatch
from tokalign.sampling import SegmentRollouts


@dataclass
class SPOConfig(GRPOConfig):
    p_threshold: float = 0.9
    interval: int = 5
    rollouts: int = 4
    probability_mask: bool = True
    scale_rewards: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.p_threshold <= 1:
            raise ValueError(f"p_threshold must be in (0, 1], got {self.p_threshold}")
        if self.interval < 1 or self.rollouts < 1:
            raise ValueError("interval and rollouts must be ≥ 1")


def cut_points(sampler_logps: list[float], p_threshold: float, interval: int) -> list[int]:
    """Where to cut a completion: every ``interval``-th token (the first included) with π_old(y_t) < p_threshold."""
    low = [t for t, lp in enumerate(sampler_logps) if math.exp(lp) < p_threshold]
    return low[::interval]


class SPO(GRPO):
    Config = SPOConfig

    def __init__(self, config: SPOConfig):
        super().__init__(config)
        cuts = SegmentRollouts(lambda logps: cut_points(logps, config.p_threshold, config.interval), config.rollouts)
        self.needs = dataclasses.replace(self.needs, data=("online",), groups=False, hooks=(*self.needs.hooks, cuts))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        adv = (f["segment_value_end"] - f["segment_value_start"]) * mask
        if c.probability_mask:
            adv = torch.where(f["sampler_logps"].exp() > c.p_threshold, torch.zeros_like(adv), adv)
        f["advantages"] = adv
        return batch
