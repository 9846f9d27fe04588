"""MODPO — "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization",
Zhou et al. 2024, arXiv:2310.03708. DPO on the preference pairs of one objective, with the other
objectives' rewards entering as a margin, so one run yields the policy for a chosen weighting w.

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; margins m(y): [B, K] (K other objectives).

    r_θ(y) = (1/w_0) · [ β Δ(y) − w_{1:} · m(y) ]        Δ(y) = Σ_t (ℓ_t − ℓ^ref_t)
    L = −log σ(r_θ(y_w) − r_θ(y_l))         (loss_type hinge: max(0, 1 − (r_θ(y_w) − r_θ(y_l))))

Margins come either from the data (``margin_source: data``: columns ``chosen_margins`` / ``rejected_margins``,
a number or a list of K numbers per pair, e.g. scores of other reward models written by ``tokalign score``), or
from a frozen model (``margin_source: model``, ``--with margin=PATH``): the implicit reward of a DPO model trained on
the other objective, m(y) = β_m Σ_t (ℓ^margin_t − ℓ^ref_t) — the paper's "margin reward model" (K = 1).

Official code: ZHZisZZ/modpo ``src/trainer/modpo_trainer.py`` (``modpo_loss``). Defaults β = 0.1, w = (0.5, 0.5).
No margins and w_0 = 1 is exactly DPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class MODPOConfig:
    beta: float = 0.1
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])  # w_0 (this objective), then one per margin
    margin_source: str = "model"  # model (--with margin=PATH) | data (chosen_margins / rejected_margins columns)
    margin_beta: float = 0.1  # β of the margin DPO model's implicit reward (margin_source model)
    loss_type: str = "sigmoid"  # sigmoid | hinge

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.weights or self.weights[0] <= 0:
            raise ValueError(f"weights must start with w_0 > 0 (this objective's weight), got {self.weights}")
        if self.margin_source not in ("model", "data"):
            raise ValueError(f"margin_source must be model or data, got {self.margin_source!r}")
        if self.margin_source == "model" and len(self.weights) != 2:
            raise ValueError(f"margin_source model has one margin objective: weights must be [w_0, w_1], got {self.weights}")
        if self.loss_type not in ("sigmoid", "hinge"):
            raise ValueError(f"loss_type must be sigmoid or hinge, got {self.loss_type!r}")


class MODPO:
    Config = MODPOConfig

    def __init__(self, config: MODPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True, models=("margin",) if config.margin_source == "model" else ())

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        if c.margin_source == "model":
            f["margins"] = (c.margin_beta * ops.masked_sum(f["margin_logps"] - f["ref_logps"], batch.completion_mask, -1)).unsqueeze(-1)
        else:
            k = len(c.weights) - 1
            missing = [f"margin_{j}" for j in range(k) if f"margin_{j}" not in f]
            if missing:
                from tokalign.errors import UserError

                raise UserError(f"modpo with margin_source data and {k} margin weight(s) needs chosen_margins/rejected_margins "
                                f"with {k} value(s) per pair in the data; found fewer. Fix the data or algorithm.weights.")
            f["margins"] = torch.stack([f[f"margin_{j}"] for j in range(k)], -1) if k else torch.zeros_like(f["is_chosen"])[:, None][:, :0]
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c = self.config
        w = torch.tensor(c.weights, dtype=out.logps.dtype, device=out.logps.device)
        delta = ops.masked_sum(out.logps - batch.fields["ref_logps"], batch.completion_mask, -1)
        reward = (c.beta * delta - batch.fields["margins"].to(w.dtype) @ w[1:]) / w[0]
        r_w, r_l = split_pairs(reward, batch)
        logits = r_w - r_l
        losses = -F.logsigmoid(logits) if c.loss_type == "sigmoid" else torch.relu(1 - logits)
        metrics = {"rewards/accuracy": float((logits > 0).float().mean()), "rewards/margin": float(logits.detach().mean())}
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
