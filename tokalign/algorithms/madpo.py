"""MADPO — "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization",
H. G. Rho 2025, arXiv:2510.05342. DPO whose every pair is re-weighted by a continuous function of the margin a frozen
reward model gives it: hard pairs (small RM margin) weigh more, easy ones (large margin) less.

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; RM scores s(y): [B] (one per row); per pair: [P].

    m = s(y_w) − s(y_l)                                                  (the reward model's margin, [P])
    c(|m|) = c_min + (c_max − c_min) / (1 + k · exp(λ (|m| − τ)))        k = (c_max − 1) / (1 − c_min)
    w(m) = σ(c(|m|) · m) / σ(m)   if m > −τ,   else 1                    (detached: a weight, not a gradient path)
    L = mean over pairs of  w(m) · ℓ(β h)     ℓ: DPO's pair loss (``loss_type``),  h = Δ(y_w) − Δ(y_l)

c(τ) = 1 (so w = 1 at |m| = τ); c → c_max for |m| → 0 and c → c_min for |m| → ∞. With c_max = 1 or c_min = 1,
c ≡ 1 and w ≡ 1: MADPO is DPO bit for bit.

Where the margin comes from: the pairs' ``chosen_margins`` / ``rejected_margins`` columns (the same columns MODPO reads;
``PairSource`` turns their first value into the per-row field ``margin_0``): put the reward model's score of the chosen
completion in ``chosen_margins`` ([s_w] or s_w) and that of the rejected one in ``rejected_margins``; m = s_w − s_l
(UltraFeedback's ``score_chosen`` / ``score_rejected`` are such scores, but ``tokalign prepare`` does not forward them
to the batch: copy them into these columns). The paper's scores are logits of a Bradley–Terry reward model trained on
the same pairs, so τ is in logit units.

Defaults β = 0.1, c_max = 2, c_min = 0.5, λ = 1, τ = 2: the ``MADPOLoss`` defaults of the official code
(sirano1004/Margin-Apative-Direct-Preference-Optimization ``utils/loss_functions.py``), whose weight rule this module
follows. ⚠ unchecked: the values the paper's experiments used (its ablation figures sweep c_max and τ, e.g. τ = 7),
and whether the paper's text states w exactly as the code computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.dpo import DPO, DPOConfig, pair_loss, split_pairs
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class MADPOConfig(DPOConfig):
    c_max: float = 2.0  # weight scale for the hardest pairs (|m| → 0)
    c_min: float = 0.5  # ... and for the easiest (|m| → ∞)
    lam: float = 1.0  # λ, steepness of the transition
    tau: float = 2.0  # τ, the margin where c = 1; pairs with m ≤ −τ (RM strongly disagrees) keep weight 1

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.c_min <= 1 <= self.c_max):
            raise ValueError(f"MADPO needs 0 < c_min ≤ 1 ≤ c_max (c = 1 at |margin| = tau), got c_min={self.c_min}, "
                             f"c_max={self.c_max}: set algorithm.c_min below 1 and algorithm.c_max above 1")
        if self.lam <= 0:
            raise ValueError(f"lam (λ) must be > 0, got {self.lam}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0 (a margin in reward-model units), got {self.tau}")


def margin_weight(m: torch.Tensor, config: MADPOConfig) -> torch.Tensor:
    """w(m) for reward-model margins m: [P] -> [P]."""
    c_max, c_min = config.c_max, config.c_min
    if c_max == 1 or c_min == 1:  # c ≡ 1 (the limits of the formula): plain DPO
        return torch.ones_like(m)
    k = (c_max - 1) / (1 - c_min)
    c = c_min + (c_max - c_min) / (1 + k * torch.exp(config.lam * (m.abs() - config.tau)))
    return torch.where(m > -config.tau, torch.sigmoid(c * m) / torch.sigmoid(m), torch.ones_like(m))


class MADPO(DPO):
    Config = MADPOConfig

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        if "margin_0" not in batch.fields:
            from tokalign.errors import UserError

            raise UserError("madpo needs the reward model's score of each completion: columns chosen_margins and "
                            "rejected_margins in the pairs data (see tokalign.algorithms.madpo).")
        s_w, s_l = split_pairs(batch.fields["margin_0"].float(), batch)
        w = margin_weight(s_w - s_l, self.config)  # [P], in group order
        # back onto the rows (both rows of a pair carry it), so micro-batches keep their pairs' weights
        gid = batch.fields["group_ids"]
        chosen = batch.fields["is_chosen"] > 0.5
        per_group = torch.zeros(int(gid.max()) + 1, dtype=w.dtype)
        per_group[torch.sort(gid[chosen], stable=True).values] = w
        batch.fields["madpo_weight"] = per_group[gid]
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c = self.config
        reduce = ops.masked_mean if c.loss_type == "ipo" else ops.masked_sum
        ratio = reduce(out.logps - batch.fields["ref_logps"], batch.completion_mask, -1)  # [B] Δ(y)
        r_w, r_l = split_pairs(ratio, batch)
        w, _ = split_pairs(batch.fields["madpo_weight"].to(ratio.dtype), batch)
        losses = w * pair_loss(r_w - r_l, c)
        metrics = {
            "rewards/accuracy": float((r_w > r_l).float().mean()),
            "rewards/margin": float(c.beta * (r_w - r_l).detach().mean()),
            "madpo/weight_mean": float(w.mean()),
        }
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
