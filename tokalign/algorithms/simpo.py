"""SimPO — "SimPO: Simple Preference Optimization with a Reference-Free Reward", Meng, Xia & Chen 2024,
arXiv:2405.14734. DPO without a reference model: the implicit reward is the length-normalised log-likelihood, and a
target margin γ separates chosen from rejected.

Batch: each group is one pair, chosen row (``is_chosen`` = 1) and rejected row (as DPO).
Shapes: ``logps``, mask: [B, T]; ℓ̄, per pair values: [B] -> [P].

    ℓ̄(y) = (1/|y|) Σ_t m_t ℓ_t
    L = −(1 − s)·log σ(β(ℓ̄(y_w) − ℓ̄(y_l)) − γ) − s·log σ(−β(ℓ̄(y_w) − ℓ̄(y_l)) + γ)    (s = label smoothing, 0)
    loss = mean over pairs

Defaults β = 2.0, γ = 0.5: the official SimPOConfig (princeton-nlp/SimPO ``scripts/simpo_config.py``: beta 2.0,
gamma_beta_ratio 0.25, γ = β·ratio). The paper's tuned runs use β 2.0–10 and γ/β 0.1–0.8; TRL's CPOTrainer
(loss_type="simpo") takes γ as ``simpo_gamma`` (default 0.5) with β 0.1 and adds a chosen-NLL term unless
``cpo_alpha=0``; no NLL term here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign import ops
from tokalign.algorithms.dpo import sigmoid_loss, split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class SimPOConfig:
    beta: float = 2.0
    gamma: float = 0.5  # target reward margin γ (not γ/β)
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


class SimPO:
    Config = SimPOConfig

    def __init__(self, config: SimPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=False)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c = self.config
        avg = ops.masked_mean(out.logps, batch.completion_mask, -1)  # [B] ℓ̄(y)
        avg_w, avg_l = split_pairs(avg, batch)
        # β(ℓ̄_w − ℓ̄_l) − γ = β·(ℓ̄_w − ℓ̄_l − γ/β): DPO's sigmoid loss of a shifted margin
        losses = sigmoid_loss(avg_w - avg_l - c.gamma / c.beta, c.beta, c.label_smoothing)
        metrics = {
            "rewards/chosen": float(c.beta * avg_w.detach().mean()),
            "rewards/rejected": float(c.beta * avg_l.detach().mean()),
            "rewards/accuracy": float((avg_w > avg_l).float().mean()),
            "rewards/margin": float(c.beta * (avg_w - avg_l).detach().mean()),
        }
        # this micro-batch's share of the mean over all pairs of the optimiser batch
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
