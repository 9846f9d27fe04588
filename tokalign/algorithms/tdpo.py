"""TDPO — "Token-level Direct Preference Optimization", Zeng et al. 2024, arXiv:2404.11999.
DPO in the token MDP with a sequential forward KL over the full vocabulary.

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; ``logits``, ``ref_logits``: [B, T, V] (per micro-batch).

    SeqKL(y) = Σ_t m_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t))          (ops.position_kl, chunked)
    h = Δ(y_w) − Δ(y_l),  Δ(y) = Σ_t m_t (ℓ_t − ℓ^ref_t)
    TDPO1: L = −log σ(β [h − (SeqKL(y_l) − SeqKL(y_w))])
    TDPO2: L = −log σ(β [h − α (SeqKL(y_l) − sg(SeqKL(y_w)))])      (the README's recommendation)

Defaults β = 0.1, α = 0.5, TDPO2, as the official trainers.py ``tdpo_loss`` (its yaml sets
``if_tdpo2: false`` while the function default is true; we follow the paper and README: TDPO2).
α = 0 in TDPO2 is exactly DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class TDPOConfig:
    beta: float = 0.1
    alpha: float = 0.5
    version: int = 2  # 1 | 2

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")


class TDPO:
    Config = TDPOConfig

    def __init__(self, config: TDPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True, full_vocab=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        delta = ops.masked_sum(out.logps - batch.fields["ref_logps"], mask, -1)  # [B]
        seq_kl = ops.masked_sum(ops.position_kl(out.ref_logits, out.logits), mask, -1)  # [B]
        d_w, d_l = split_pairs(delta, batch)
        kl_w, kl_l = split_pairs(seq_kl, batch)
        if c.version == 1:
            logit = (d_w - d_l) - (kl_l - kl_w)
        else:
            logit = (d_w - d_l) - c.alpha * (kl_l - kl_w.detach())
        losses = -F.logsigmoid(c.beta * logit)
        metrics = {
            "seq_kl/chosen": float(kl_w.detach().mean()),
            "seq_kl/rejected": float(kl_l.detach().mean()),
            "rewards/margin": float(c.beta * (d_w - d_l).detach().mean()),
            "rewards/accuracy": float((d_w > d_l).float().mean()),
        }
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)


@dataclass
class TDPO1Config(TDPOConfig):
    version: int = 1


class TDPO1(TDPO):
    """TDPO1: the SeqKL difference enters with weight 1 and gradients on both sides."""

    Config = TDPO1Config
