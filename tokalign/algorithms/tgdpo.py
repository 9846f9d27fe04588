"""TGDPO — "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
Optimization", Zhu et al. 2025, arXiv:2506.14574. DPO whose every token's β is rescaled by a frozen
token-level reward: the implicit reward of a "teacher" model π_R (any DPO/SimPO-trained model),
passed with ``--teacher PATH``.

Shapes: ``logps``, ``ref_logps``, ``teacher_logps``, mask: [B, T].

    Δ_t = ℓ_t − ℓ^ref_t          r̂_t = ℓ^R_t − ℓ^ref_t   (frozen)
    L = −log σ( Σ_t β(1 + αβ r̂^w_t) Δ^w_t − Σ_t β(1 − αβ r̂^l_t) Δ^l_t )

Defaults β = 0.1, α = 0.5, as the official trainer's sigmoid branch (dvlab-research/TGDPO,
src/llamafactory/train/tgdpo/trainer.py ``dpo_loss``). α = 0, or π_R = π_ref, is exactly DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class TGDPOConfig:
    beta: float = 0.1
    alpha: float = 0.5

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


class TGDPO:
    Config = TGDPOConfig

    def __init__(self, config: TGDPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True, models=("teacher",))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        token_reward = f["teacher_logps"] - f["ref_logps"]  # r̂ [B, T]
        sign = (2 * f["is_chosen"] - 1).unsqueeze(-1)  # +1 chosen, −1 rejected
        f["token_beta"] = c.beta * (1 + sign * c.alpha * c.beta * token_reward)  # [B, T]
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        f, mask = batch.fields, batch.completion_mask
        score = ops.masked_sum(f["token_beta"] * (out.logps - f["ref_logps"]), mask, -1)  # [B]
        s_w, s_l = split_pairs(score, batch)
        losses = -F.logsigmoid(s_w - s_l)
        weights = ops.masked_mean(f["token_beta"], mask, -1)
        metrics = {"token_beta/mean": float(weights.mean()), "rewards/accuracy": float((s_w > s_l).float().mean()),
                   "rewards/margin": float((s_w - s_l).detach().mean())}
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
