"""BNPO — "BNPO: Beta Normalization Policy Optimization", Xiao, Zhang & Cao 2025, arXiv:2506.02864. GRPO's PPO-clip
surrogate with an outcome advantage normalised by a Beta density fitted to the batch (official code:
changyi7231/BNPO ``recipe/bnpo/src/bnpo_ray_trainer.py``, ``compute_bnpo_outcome_advantage``, @a9c51b9).

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    s_i = (R_i − reward_min) / (reward_max − reward_min)                  scores in [0, 1]
    p_g = mean_{i∈g} s_i                                                 one per group, [G]
    m, v = mean and unbiased variance of p over the groups of the batch
    a = (m(1−m)/v − 1)·m,  b = (m(1−m)/v − 1)·(1−m)                       Beta fit by moments
    α = max(1, 1 + a/3),  β = max(1, 1 + b/3)
    A_i = min(1/Beta_pdf(p_g; α, β), 1e6) · (s_i − p_g)
    loss = GRPO's loss with these advantages (clip ε, optional β_KL·KL, aggregation)

Limits: α = β = 1 ⇒ A = s − p (REINFORCE with the group-mean baseline); α = β = 3/2 ⇒ pdf = (8/π)√(p(1−p)), so for
binary rewards in groups of G, where GRPO's unbiased std_g = √(G/(G−1)·p(1−p)): A = π/8·√(G/(G−1))·A_GRPO.

Defaults from the official ``recipe/bnpo/run.sh``: ε = (0.2, 0.28), ``seq-mean-token-sum``, no KL, rewards in [0, 1].
Where tokalign departs from the official code: fewer than two groups, or groups whose means are all equal (v = 0,
where the official fit divides by zero), use α = β = 1; a group of one has p = its own score (A = 0; the official
code sets p = 0); the official run's dual-clip (c = 10) and the optional "advantage decomposition" for multi-part
rewards are not implemented. ``norm_alpha``/``norm_beta`` fix α, β instead of fitting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class BNPOConfig(GRPOConfig):
    epsilon_high: float = 0.28
    aggregation: str = "seq-mean-token-sum"
    scale_rewards: str = "none"  # the Beta density is the normaliser; no std scaling
    reward_min: float = 0.0  # rewards are mapped to [0, 1] by (R − reward_min)/(reward_max − reward_min)
    reward_max: float = 1.0
    norm_alpha: float | None = None  # None: fitted to the batch by moments (the paper); a number fixes α
    norm_beta: float | None = None
    max_weight: float = 1e6  # cap on 1/pdf

    def __post_init__(self):
        super().__post_init__()
        if self.scale_rewards != "none":
            raise ValueError("BNPO normalises by a Beta density, not a std; "
                             f"scale_rewards must be none, got {self.scale_rewards!r}")
        if not self.reward_max > self.reward_min:
            raise ValueError(f"reward_max must be greater than reward_min, got {self.reward_min} and {self.reward_max}")
        for name in ("norm_alpha", "norm_beta"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or unset, to fit it), got {v}")
        if not self.max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {self.max_weight}")


def beta_pdf(p: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Beta(α, β) density at p ∈ [0, 1], with 0·log 0 = 0 so α = 1 or β = 1 is finite at the ends."""
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    return torch.exp(torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm)


def fit_beta(group_means: torch.Tensor) -> tuple[float, float]:
    """α, β from the mean and unbiased variance of the per-group means p [G] (official: a/3, floor 1)."""
    if group_means.numel() < 2:
        return 1.0, 1.0
    m, v = float(group_means.mean()), float(group_means.var())
    if v <= 0:
        return 1.0, 1.0
    k = m * (1 - m) / v - 1
    return max(1.0, 1 + k * m / 3), max(1.0, 1 + k * (1 - m) / 3)


class BNPO(GRPO):
    Config = BNPOConfig

    def __init__(self, config: BNPOConfig):
        super().__init__(config)
        self.fitted = (1.0, 1.0)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        rewards, group_ids = batch.fields["rewards"], batch.fields["group_ids"]
        s = ((rewards.double() - c.reward_min) / (c.reward_max - c.reward_min))
        p, _ = ops.group_stats(s, group_ids)  # [B]: each row's group mean
        if (p < 0).any() or (p > 1).any():
            raise ValueError(f"BNPO needs group-mean rewards in [reward_min, reward_max] = [{c.reward_min}, "
                             f"{c.reward_max}]; got rewards in [{float(rewards.min())}, {float(rewards.max())}]: "
                             "set algorithm.reward_min/reward_max")
        _, first = _first_rows(group_ids)
        alpha, beta = fit_beta(p[first])
        alpha = c.norm_alpha if c.norm_alpha is not None else alpha
        beta = c.norm_beta if c.norm_beta is not None else beta
        self.fitted = (alpha, beta)
        weight = beta_pdf(p, alpha, beta).reciprocal().clamp(max=c.max_weight)
        batch.fields["advantages"] = (weight * (s - p)).to(rewards.dtype)
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        res.metrics["bnpo/alpha"], res.metrics["bnpo/beta"] = self.fitted
        return res


def _first_rows(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique group ids, index of each group's first row)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    first = torch.full((len(uniq),), len(group_ids), dtype=torch.long, device=group_ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(group_ids), device=group_ids.device), reduce="amin")
    return uniq, first
