"""XRPO — "XRPO: Pushing the limits of GRPO with Targeted Exploration and Exploitation", Bamba, Fang, Yu, Zheng and
Lai 2025, arXiv:2510.06672 (official code announced at UIUC-MLSys/XRPO, not available offline). Its exploitation half,
novelty-aware advantage sharpening, as GRPO's advantages: a correct response the policy found unlikely (low mean token
log-prob relative to its group) gets a bounded bonus, so rare right answers are pushed up harder than common ones.

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``old_logps`` (the behaviour policy's), mask: [B, T].

    A_i = (R_i − mean_g R) / (std_g R + eps)                       GRPO's group advantage
    s_i = (1/|y_i|) Σ_t m_t ℓ^old_t                                 [B] mean token log-prob of the response
    η_i = exp(s_i − mean_g s)                                       [B] < 1: less likely than the group's average
    A⁺_i = A_i + min(max(λ (1 − η_i), 0), κ A_i)   where A_i > 0 (the correct responses), else A⁺_i = A_i
    loss = GRPO's loss (PPO-clip surrogate, optional β·KL, aggregation) with A⁺

"Correct" is A_i > 0 (reward above the group mean: with 0/1 rewards, the right answers of a mixed group); the bonus is
never negative and at most κ·A_i, so it never flips a sign. s uses the behaviour log-probs (the sampling policy's,
computed before ``prepare`` by ``BehaviourLogps(upfront=True)``), so the bonus is a constant of the update. With
``novelty_lambda`` 0 the advantages, hence loss and gradient, are GRPO's bit for bit (and no extra pass is made).

Defaults: ``novelty_lambda`` 1.0 and ``novelty_kappa`` 1.0 are those of a third-party re-implementation found in the
code index (the formula above is the same there and in this project's reference/algorithms.md); the GRPO part keeps
GRPO's defaults. ⚠ unchecked: the paper's own λ, κ and whether s̄ averages the whole group or its correct responses
could not be read offline; s̄ here is the whole group's mean.

Not here: XRPO's exploration half. Its rollout allocator (priority = the shrink of a Student-t confidence interval of
the prompt's mean reward, plus a count bonus) is approximated by ``reinforce_ada``'s adaptive multi-round sampling
(tokalign/algorithms/reinforce_ada.py, ``sampling.AdaptiveSampling``), not reproduced; the in-context seeding of
all-zero prompts with curated exemplars is not implemented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import BehaviourLogps
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class XRPOConfig(GRPOConfig):
    novelty_lambda: float = 1.0  # λ: bonus per unit of (1 − η); 0 = GRPO
    novelty_kappa: float = 1.0  # κ: the bonus is at most κ·A_i

    def __post_init__(self):
        super().__post_init__()
        if self.novelty_lambda < 0:
            raise ValueError(f"novelty_lambda must be ≥ 0 (0 turns the sharpening off: GRPO), got {self.novelty_lambda}")
        if self.novelty_kappa <= 0:
            raise ValueError(f"novelty_kappa must be > 0 (the bonus is capped at novelty_kappa·A), got {self.novelty_kappa}; "
                             "to turn the sharpening off set novelty_lambda=0")


def sharpened_advantages(adv: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor,
                         lam: float, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A⁺ [B], η [B]) from GRPO advantages ``adv`` [B] and the behaviour log-probs [B, T]."""
    s = ops.masked_mean(old_logps, mask, -1)
    s_bar, _ = ops.group_stats(s, group_ids)
    eta = torch.exp(s - s_bar)
    bonus = torch.minimum((lam * (1 - eta)).clamp(min=0), kappa * adv)
    return torch.where(adv > 0, adv + bonus, adv), eta


class XRPO(GRPO):
    Config = XRPOConfig

    def __init__(self, config: XRPOConfig):
        super().__init__(config)
        if config.novelty_lambda > 0:  # the novelty needs the behaviour log-probs before prepare()
            self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, BehaviourLogps(upfront=True)))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        super().prepare(batch)
        c = self.config
        if c.novelty_lambda > 0:
            adv = batch.fields["advantages"]
            sharp, eta = sharpened_advantages(adv, batch.fields["old_logps"], batch.completion_mask, batch.fields["group_ids"],
                                              c.novelty_lambda, c.novelty_kappa)
            batch.fields["advantages"], batch.fields["xrpo_novelty"] = sharp, eta
            batch.fields["xrpo_bonus"] = sharp - adv
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        if "xrpo_bonus" in batch.fields:
            bonus = batch.fields["xrpo_bonus"]
            res.metrics["xrpo/bonus_mean"] = float(bonus.mean()) if len(bonus) else 0.0
            res.metrics["xrpo/boosted_fraction"] = float((bonus > 0).float().mean()) if len(bonus) else 0.0
        return res
