"""RRHF — "RRHF: Rank Responses to Align Language Models with Human Feedback without tears", Yuan, Yuan, Tan, Wang,
Huang & Huang 2023, arXiv:2304.05302 (official code GanjinZero/RRHF, ``train.py``: ``get_score``, ``rrhf_loss``,
``sft_loss``). Several responses per prompt, scored by a reward; the policy's length-normalised log-probabilities are
ranked like the rewards (a hinge on every misordered pair), plus cross-entropy on the best response.

Shapes: ``rewards``, ``group_ids``: [B]; ``logps``, mask: [B, T].

    p_i = Σ_t m_t ℓ_t / (Σ_t m_t)^length_penalty                                  (``get_score``)
    L_rank(g) = Σ_{i, j ∈ g: r_i < r_j} max(0, p_i − p_j)                         (the paper's eq. 2)
    L_ft(g) = −(1/|y_b|) Σ_t ℓ_{b,t},   b = argmax_{i ∈ g} r_i (the first on ties)
    loss = mean over groups of  rank_weight · L_rank(g) + L_ft(g)

Defaults: rank_weight 1 and length_penalty 1, the authors' ``train.sh`` (``--rrhf_weight 1``; the code's default is
100). Where tokalign departs from the code: its ``rrhf_loss`` indexes the pair matrix with ``[0]``, keeping only the
pairs of the group's first response, whereas the paper (and here) sums every misordered pair; its ``sft_loss`` is
the best response's summed log-likelihood divided by the *padded* length, the paper's eq. 3 the plain sum, and here
the best response's token mean (independent of padding). The paper's setting samples the responses from several
policies; here they are the rollouts of a scored artifact, or sampled online. The CodeT5 paper that applies RRHF to
code optimisation (seed row 34) trains an encoder-decoder: tokalign trains decoder-only causal LMs, so that model
family is out of scope; the loss is the same. Limits: rank_weight 0 is SFT on each group's best response; equal
rewards in a group leave only its L_ft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class RRHFConfig:
    rank_weight: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.rank_weight < 0 or self.length_penalty < 0:
            raise ValueError(f"rank_weight and length_penalty must be ≥ 0, got {self.rank_weight} and {self.length_penalty}")


def best_of_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: the highest-reward row of each group (the first of equal ones)."""
    same = group_ids[:, None] == group_ids[None, :]
    idx = torch.arange(len(rewards), device=rewards.device)
    beaten = same & ((rewards[None, :] > rewards[:, None]) | ((rewards[None, :] == rewards[:, None]) & (idx[None, :] < idx[:, None])))
    return ~beaten.any(dim=1)


class RRHF:
    Config = RRHFConfig

    def __init__(self, config: RRHFConfig):
        self.config = config
        self.needs = Needs(data=("scored", "online"), groups=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, m = self.config, batch.completion_mask
        r, g = batch.fields["rewards"], batch.fields["group_ids"]
        length = m.sum(-1).clamp(min=1)
        total = (out.logps * m).sum(-1)
        p = total / length ** c.length_penalty
        worse = (g[:, None] == g[None, :]) & (r[:, None] < r[None, :])  # [i, j]: i ranked below j
        gap = (p[:, None] - p[None, :]).clamp(min=0) * worse
        rank = gap.sum()
        best = best_of_groups(r, g)
        ft = -(total / length * best).sum()
        rank_d, ft_d = float(rank.detach()), float(ft.detach())
        groups = batch.totals.get("groups") or float(best.sum())
        loss = (c.rank_weight * rank + ft) / groups
        pairs = worse.sum().clamp(min=1)
        return LossOutput(loss, {"rrhf/rank_loss": rank_d / groups, "rrhf/sft_loss": ft_d / groups,
                                 "rrhf/misordered_fraction": float(((gap > 0) & worse).sum() / pairs)})
