"""GRPO-S (DR-IRL's policy step) — "Inverse Reinforcement Learning with Dynamic Reward Scaling for LLM Alignment",
Cheng, Ma, Wang, Duan, Liu, Jia, Qin, Cao, Liu, Jia 2025 (ICLR 2026), arXiv:2503.18991 (no official code found).
DR-IRL trains category-specific reward models by IRL on a balanced safety set, then aligns the policy with GRPO-S:
GRPO whose signal is scaled by the task's difficulty — data-level hardness (a text encoder's cosine similarity) and
model-level responsiveness (reward gaps). This module is the GRPO-S step; the IRL reward models are any ``--reward``.

Shapes: ``rewards``, ``group_ids``, ``hardness`` (optional, per row, in [0, 1]): [B]; ``advantages``: [B];
``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i   = (R_i − mean_g R) / (std_g R + eps)                    (GRPO's group advantage)
    h_g   = mean_{i∈g} hardness_i                                  (0 when the batch has no ``hardness`` field)
    Δ_g   = max_{i∈g} R_i − mean_{i∈g} R_i                          (reward gap: the group's mean below its best)
    s_g   = (1 + α h_g) · (1 + β Δ_g)
    A^S_i = s_g · A_i,  then GRPO's clipped surrogate, β_KL · KL and aggregation

Hardness is data: 1 − cos(e(x), e(ref)) of a text encoder between the prompt and the category's reference (the
paper's CLIP-style encoder), computed offline and carried per row — the seam is a sampling hook that copies the
record's value into the row (``set_field(row, "hardness", h)``), or a ``hardness`` column of scored data. Limits:
α = β = 0 (or h = Δ = 0) is GRPO bit for bit.

⚠ unchecked: only the abstract and summaries were readable offline ("scales the reward … to task difficulty —
data-level hardness measured by CLIP similarity and model-level responsiveness measured by reward gaps"). The
product form of s, the reward gap's definition Δ_g (best minus mean of the group), the scaling of the advantage (the
paper speaks of scaling the reward; a per-group factor on R would cancel in the standardised advantage, so it is
applied after it) and α = β = 1 are tokalign's readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

HARDNESS_FIELD = "hardness"


@dataclass
class GRPOSConfig(GRPOConfig):
    hardness_weight: float = 1.0  # α
    gap_weight: float = 1.0  # β

    def __post_init__(self):
        super().__post_init__()
        for name in ("hardness_weight", "gap_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0 (0 turns that factor off), got {v}")


def group_max(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-row max of ``values`` [B] over the rows sharing its group id."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    x = values.double()
    return x.new_full((int(inv.max()) + 1,), -math.inf).scatter_reduce(0, inv, x, "amax")[inv].to(values.dtype)


class GRPOS(GRPO):
    Config = GRPOSConfig

    def scales(self, batch: TokenBatch) -> torch.Tensor:
        """s_g per row [B]."""
        c, f = self.config, batch.fields
        r, gids = f["rewards"], f["group_ids"]
        mean, _ = ops.group_stats(r, gids)
        gap = group_max(r, gids) - mean
        hard = ops.group_stats(f[HARDNESS_FIELD].to(r.dtype), gids)[0] if HARDNESS_FIELD in f else torch.zeros_like(r)
        return (1 + c.hardness_weight * hard) * (1 + c.gap_weight * gap)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(batch)
        f = batch.fields
        s = self.scales(batch)
        f["grpo_s_scale"] = s
        f["advantages"] = f["advantages"] * s
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        result.metrics["grpo_s/scale_mean"] = float(batch.fields["grpo_s_scale"].mean())
        return result
