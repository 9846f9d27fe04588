"""TPO — "Triple Preference Optimization: Achieving Better Alignment using a Single Step
Optimization", Saeidi et al. 2024, arXiv:2405.16681. Reference-free, single stage: a preference term
on (chosen, rejected) plus supervised learning on a gold response.

Batch: each group holds the chosen row (``is_chosen`` = 1), the rejected row and the gold row
(``is_gold`` = 1, the data's ``reference`` text). Shapes: ``logps``, mask: [B, T].

    L = −log σ(β (ℓ(y_w) − ℓ(y_l))) + α · NLL_token-mean(y_gold)       ℓ(y) = Σ_t m_t ℓ_t

Defaults β = 0.1, α = 0.5 (official ``run_tpo.sh``; the trainer's config default is 1.0).
α = 0 is reference-free DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class TPOConfig:
    beta: float = 0.1
    alpha: float = 0.5

    def __post_init__(self):
        if self.beta <= 0 or self.alpha < 0:
            raise ValueError("beta must be > 0 and alpha ≥ 0")


class TPO:
    Config = TPOConfig

    def __init__(self, config: TPOConfig):
        self.config = config
        self.needs = Needs(data=("triples",))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        seq = ops.masked_sum(out.logps, mask, -1)  # [B]
        s_w, s_l = split_pairs(seq, batch)
        pref = -F.logsigmoid(c.beta * (s_w - s_l))
        gold = f["is_gold"] > 0.5
        nll = ops.masked_mean(-out.logps[gold], mask[gold], -1)  # token mean per gold response
        groups = batch.totals.get("groups", float(pref.numel()))
        metrics = {"pref_loss": float(pref.detach().mean()), "gold_nll": float(nll.detach().mean())}
        return LossOutput((pref.sum() + c.alpha * nll.sum()) / groups, metrics)
