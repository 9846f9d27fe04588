"""DPO — "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
Rafailov et al. 2023, arXiv:2305.18290 — and the losses that differ from it only in the function
of the margin:

- ``sigmoid`` (DPO): L = −(1 − s)·log σ(β h) − s·log σ(−β h), optional label smoothing s
  (the conservative "cDPO" of Mitchell 2023; TRL 1.16 applies it only in its "aot" loss)
- ``hinge`` (SLiC / RSO, "Statistical Rejection Sampling Improves Preference Optimization",
  Liu et al. 2023, arXiv:2309.06657): L = max(0, 1 − β h)
- ``ipo`` ("A General Theoretical Paradigm to Understand Learning from Human Preferences",
  Azar et al. 2023, arXiv:2310.12036): L = (h̄ − 1/(2β))², h̄ from per-token-averaged
  log-ratios (as TRL, confirmed with the IPO authors)

Batch: each group is one pair, chosen row (``is_chosen`` = 1) and rejected row.
Shapes: ``logps``, ``ref_logps``, mask: [B, T].

    Δ(y) = Σ_t m_t (ℓ_t − ℓ^ref_t)        h = Δ(y_w) − Δ(y_l)        loss = mean over pairs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type sigmoid only")


def sigmoid_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss from the log-ratio margin h: [P] -> [P]."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def pair_loss(margin: torch.Tensor, config: DPOConfig) -> torch.Tensor:
    if config.loss_type == "sigmoid":
        return sigmoid_loss(margin, config.beta, config.label_smoothing)
    if config.loss_type == "hinge":
        return torch.relu(1 - config.beta * margin)
    return (margin - 1 / (2 * config.beta)).square()  # ipo, margin of per-token means


def split_pairs(per_row: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] per-row values -> (chosen [P], rejected [P]); each group holds one chosen and one rejected row."""
    chosen = batch.fields["is_chosen"] > 0.5
    rejected = ~chosen
    if "is_gold" in batch.fields:  # triples (TPO): the gold row is neither side of the pair
        rejected = rejected & (batch.fields["is_gold"] < 0.5)
    order_c = torch.argsort(batch.fields["group_ids"][chosen], stable=True)
    order_r = torch.argsort(batch.fields["group_ids"][rejected], stable=True)
    return per_row[chosen][order_c], per_row[rejected][order_r]


class DPO:
    Config = DPOConfig

    def __init__(self, config: DPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        mask = batch.completion_mask
        reduce = ops.masked_mean if self.config.loss_type == "ipo" else ops.masked_sum
        ratio = reduce(out.logps - batch.fields["ref_logps"], mask, -1)  # [B] Δ(y) (or its per-token mean)
        r_w, r_l = split_pairs(ratio, batch)
        losses = pair_loss(r_w - r_l, self.config)
        b = self.config.beta
        metrics = {
            "rewards/chosen": float(b * r_w.detach().mean()),
            "rewards/rejected": float(b * r_l.detach().mean()),
            "rewards/accuracy": float((r_w > r_l).float().mean()),
            "rewards/margin": float(b * (r_w - r_l).detach().mean()),
        }
        # this micro-batch's share of the mean over all pairs of the optimiser batch
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)


@dataclass
class IPOConfig(DPOConfig):
    loss_type: str = "ipo"


class IPO(DPO):
    """IPO (arXiv:2310.12036) as a DPO configuration."""

    Config = IPOConfig


@dataclass
class HingeConfig(DPOConfig):
    loss_type: str = "hinge"


class Hinge(DPO):
    """SLiC / RSO hinge loss (arXiv:2309.06657) as a DPO configuration."""

    Config = HingeConfig
