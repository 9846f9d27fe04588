"""DPO — "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
Rafailov et al. 2023, arXiv:2305.18290. Sigmoid loss, with optional label smoothing
(the conservative "cDPO" of Mitchell 2023; TRL 1.16 applies it only in its "aot" loss).

Batch: each group is one pair, chosen row (``is_chosen`` = 1) then rejected row.
Shapes: ``logps``, ``ref_logps``, mask: [B, T]; sequence log-probs are token sums.

    h = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))
    L = −(1 − s)·log σ(β h) − s·log σ(−β h),   averaged over pairs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def sigmoid_loss(margin, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss from the log-ratio margin h: [P] -> [P]."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


class DPO:
    Config = DPOConfig

    def __init__(self, config: DPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        mask = batch.completion_mask
        ratio = ops.masked_sum(out.logps - batch.fields["ref_logps"], mask, -1)  # [B] Δ(y)
        chosen = batch.fields["is_chosen"] > 0.5
        margin = ratio[chosen] - ratio[~chosen]  # rows alternate chosen/rejected per pair
        losses = sigmoid_loss(margin, self.config.beta, self.config.label_smoothing)
        pairs = batch.totals.get("groups", float(margin.numel()))
        r_w, r_l = self.config.beta * ratio[chosen].detach(), self.config.beta * ratio[~chosen].detach()
        metrics = {
            "rewards/chosen": float(r_w.mean()),
            "rewards/rejected": float(r_l.mean()),
            "rewards/accuracy": float((r_w > r_l).float().mean()),
            "rewards/margin": float((r_w - r_l).mean()),
        }
        # the micro-batch's share of the mean over all pairs of the optimiser batch
        return LossOutput(losses.sum() / pairs, metrics)
