"""STEER — Stabilizing Token-level Entropy-changE via Reweighting, "Rethinking Entropy Interventions in RLVR: An
Entropy Change Perspective" (Hao et al. 2025, arXiv:2510.10150; official code zz-haooo/STEER, a verl fork:
``verl/trainer/ppo/core_algos.py`` ``compute_token_weights`` and ``compute_policy_loss_with_entropy``, loss mode
``entropy_control``). A token's update changes the policy's entropy by about Ω_t; STEER down-weights the tokens whose
|Ω_t| is largest, so that the per-step entropy change stays in a moderate band instead of collapsing.

Shapes: ``rewards``, ``group_ids``: [B]; ``logps``, ``old_logps``, entropy H (of the current policy, no grad), mask: [B, T].

    A_i    GRPO's group advantage
    x_t = π_θ(o_t) (clamped to [1e-8, 1 − 1e-8]),   Ω_t = A_i / π_old(o_t) · x_t (1 − x_t) (ln x_t + H_t)   (no grad)
    m_t = |Ω_t|, with m_min, m_max over the micro-batch's completion tokens
    mapping exp:     w_t = clip(exp(−k m_t), w_min, w_max),  k = −ln w_min / max(m_max, 0.02)
    mapping linear:  w_t = clip(w_max − (m_t − m_min)(w_max − w_min) / (m_max − m_min), w_min, w_max)
                     (all m equal: (w_min + w_max) / 2)
    L_t = w_t · dual-clip PPO_t(ρ_t, A_i; ε_low, ε_high, c)   (+ β·KL_t),   loss = token-mean

Defaults are the authors' main script (``run/run_exp.sh``): mapping exp, w ∈ [0.8, 1.0], ε = (0.2, 0.28), dual clip
c = 10, no KL loss, token-mean; their linear script uses w ∈ [0.8, 1.2]. (The code clamps the exp mapping at 1.0 whatever
w_max; here it is clamped at w_max, which is 1.0 by default.) As in the official code, m_min and m_max are taken over
each micro-batch, so unlike most tokalign losses STEER's value depends on how the batch is split into micro-batches.
Limit: w_min = w_max = 1 and dual_clip 0 is GRPO exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

MAPPINGS = ("exp", "linear")


@dataclass
class STEERConfig(GRPOConfig):
    epsilon_high: float = 0.28
    dual_clip: float = 10.0  # c (verl's clip_ratio_c); 0 disables it
    weight_min: float = 0.8
    weight_max: float = 1.0
    mapping: str = "exp"

    def __post_init__(self):
        super().__post_init__()
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        if not 0 < self.weight_min <= self.weight_max:
            raise ValueError(f"need 0 < weight_min ≤ weight_max, got {self.weight_min} and {self.weight_max}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 to disable), got {self.dual_clip}")


def token_weights(logps, old_logps, advantages, entropy, mask, w_min: float, w_max: float, mapping: str) -> torch.Tensor:
    """STEER's per-token weights [B, T] (0 outside the mask), from the entropy-change estimate |Ω_t|."""
    with torch.no_grad():
        x = logps.exp().clamp(1e-8, 1 - 1e-8)
        omega = advantages / old_logps.exp().clamp(1e-8, 1.0) * x * (1 - x) * (x.log() + entropy)
        m = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega)).abs()
        valid = mask > 0
        if not valid.any():
            return torch.zeros_like(mask)
        lo, hi = m[valid].min(), m[valid].max()
        if mapping == "linear":
            w = (w_max - (m - lo) * (w_max - w_min) / (hi - lo)) if hi > lo else torch.full_like(m, (w_min + w_max) / 2)
        else:
            k = -math.log(w_min) / torch.clamp(hi, min=0.02)
            w = torch.exp(-k * m)
        return w.clamp(w_min, w_max) * mask


class STEER(GRPO):
    Config = STEERConfig

    def __init__(self, config: STEERConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, split_groups=False)  # m_min, m_max over a micro-batch: groups stay whole

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        if out.entropy is None:
            raise UserError("steer needs the policy's per-token entropy (PolicyOutput.entropy); the forward gave none.")
        adv = batch.fields["advantages"]
        adv = (adv if adv.dim() == 2 else adv.unsqueeze(-1)).expand_as(mask)
        old = self.behaviour_logps(batch, out)
        if c.dual_clip:
            pg, clipped, _ = ops.dual_clip_surrogate(out.logps, old, adv, c.epsilon_low, c.epsilon_high, c.dual_clip)
        else:
            pg, clipped = ops.clipped_surrogate(out.logps, old, adv, c.epsilon_low, c.epsilon_high)
        w = token_weights(out.logps.detach(), old, adv, out.entropy, mask, c.weight_min, c.weight_max, c.mapping)
        metrics = {"clip_fraction": float(ops.masked_mean(clipped.float(), mask)),
                   "steer/weight_mean": float(ops.masked_mean(w, mask)),
                   "advantage/abs_mean": float(ops.masked_mean(adv.abs(), mask))}
        return self.finish(pg * w, batch, out, metrics)
