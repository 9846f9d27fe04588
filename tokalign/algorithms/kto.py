"""KTO — "KTO: Model Alignment as Prospect Theoretic Optimization", Ethayarajh et al. 2024,
arXiv:2402.01306. Unpaired: each example is one completion labelled desirable or undesirable
(TRL's unpaired preference format: prompt, completion, label).

Batch: each group holds the example row (``label`` 1/0) and its KL row (``is_kl`` = 1: the same
prompt with another example's completion). Shapes: ``logps``, ``ref_logps``, mask: [B, T].

    Δ(y) = Σ_t m_t (ℓ_t − ℓ^ref_t)
    z = max(0, mean over KL rows of Δ), no gradient  (the reference point; per micro-batch, as TRL per process)
    desirable:   λ_D (1 − σ(β (Δ − z)))
    undesirable: λ_U (1 − σ(β (z − Δ)))          loss = mean over examples

Defaults β = 0.1, λ_D = λ_U = 1 (TRL). At initialisation (π = π_ref) every example's loss is 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class KTOConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


class KTO:
    Config = KTOConfig

    def __init__(self, config: KTOConfig):
        self.config = config
        self.needs = Needs(data=("unpaired",), reference=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f = self.config, batch.fields
        delta = ops.masked_sum(out.logps - f["ref_logps"], batch.completion_mask, -1)  # [B]
        kl_rows, label = f["is_kl"] > 0.5, f["label"] > 0.5
        z = delta[kl_rows].detach().mean().clamp(min=0) if kl_rows.any() else delta.new_zeros(())
        main = ~kl_rows
        d = delta[main]
        desirable = label[main]
        losses = torch.where(desirable, c.desirable_weight * (1 - torch.sigmoid(c.beta * (d - z))),
                             c.undesirable_weight * (1 - torch.sigmoid(c.beta * (z - d))))
        metrics = {"kl": float(z), "rewards/mean": float(c.beta * d.detach().mean())}
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
