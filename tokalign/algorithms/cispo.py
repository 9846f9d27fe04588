"""CISPO — clipped importance-sampling-weight policy optimisation, "MiniMax-M1: Scaling Test-Time Compute Efficiently
with Lightning Attention", MiniMax et al. 2025, arXiv:2506.13585 (§3.1). PPO/GRPO clip the *update* of a token whose
ratio left the trust region, so that token gives no gradient (rare, high-entropy "fork" tokens are the first to go);
CISPO clips the detached importance weight instead, so every token keeps a REINFORCE gradient, bounded by the cap.

Shapes: ``rewards``, ``group_ids``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i = (R_i − mean_g R) / (std_g R + eps)            GRPO's group advantage
    ρ_t = exp(ℓ_t − ℓ^old_t),   r̂_t = sg(clip(ρ_t, ratio_min, ratio_max))
    L_t = −r̂_t · A_i · ℓ_t  (+ β·KL_t)
    loss = token-mean of L over the whole batch           (the paper's 1 / Σ_i |o_i|)

∂L_t/∂ℓ_t = −r̂_t·A_i, so on-policy (ρ = 1) CISPO has GRPO's gradient exactly. The paper sets no lower bound
(``ratio_min`` 0) and tunes the upper one; the default ``ratio_max`` 5.0 is ScaleRL's ε_max ("The Art of Scaling
Reinforcement Learning Compute for LLMs", arXiv:2510.13786), which TRL recommends for its ``loss_type="cispo"``
(``clamp(ρ, max=epsilon_high)``, tested for parity in tests/algorithms/test_trl_parity.py). The paper's optional
token mask M (PPO's trust-region mask in its unified form) is not implemented: M = 1, the paper's CISPO.
MiniMax-M1's official code is not public; the formula is the paper's (eq. 4–5) and TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class CISPOConfig(GRPOConfig):
    ratio_min: float = 0.0  # lower bound of the detached weight (the paper: none)
    ratio_max: float = 5.0  # upper bound (ScaleRL's ε_max; TRL's epsilon_high for cispo)
    aggregation: str = "token-mean"

    def __post_init__(self):
        super().__post_init__()
        if (self.epsilon_low, self.epsilon_high) != (0.2, 0.2):  # GRPO's clip, which CISPO does not use
            raise ValueError("cispo clips the importance weight, not the update: set ratio_max (TRL's epsilon_high for "
                             "loss_type='cispo') and ratio_min instead of epsilon_low/epsilon_high")
        if not 0 <= self.ratio_min < self.ratio_max:
            raise ValueError(f"need 0 ≤ ratio_min < ratio_max, got {self.ratio_min} and {self.ratio_max}")


class CISPO(GRPO):
    Config = CISPOConfig

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        adv = batch.fields["advantages"]
        adv = adv if adv.dim() == 2 else adv.unsqueeze(-1)
        ratio = torch.exp(out.logps.detach() - self.behaviour_logps(batch, out))
        weight = ratio.clamp(min=c.ratio_min, max=c.ratio_max)
        per_token = -weight * adv * out.logps
        capped = (ratio > c.ratio_max) | (ratio < c.ratio_min)
        metrics = {"clip_fraction": float(ops.masked_mean(capped.float(), mask)),
                   "cispo/weight_mean": float(ops.masked_mean(weight, mask)),
                   "advantage/abs_mean": float(ops.masked_mean(adv.abs().expand_as(mask), mask))}
        return self.finish(per_token, batch, out, metrics)
