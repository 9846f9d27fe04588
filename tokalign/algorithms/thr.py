"""THR — "Token Hidden Reward: Steering Exploration-Exploitation in Group Relative Deep Reinforcement Learning",
2025 (title from the seed listing; authors and arXiv id not checked offline; no official code found). Each token's Token Hidden Reward is its influence, through
one GRPO step, on the log-likelihood of its group's *correct* responses; tokens with large |THR| are reweighted
to steer training toward exploitation (p > 0) or exploration (p < 0).

As far as the paper's abstract specifies it, with the influence taken through the unembedding (the "hidden" in the
name: it is an inner product of final hidden states). A GRPO step on token (i, t) moves W_U by η A_i (e_{y_it} − π_it) h_itᵀ,
which changes log π(y_jt') of a correct token by η A_i ⟨e_{y_it} − π_it, e_{y_jt'} − π_jt'⟩ ⟨h_it, h_jt'⟩, so

    THR_{i,t} = A_i Σ_{j correct in the group} Σ_{t'} K_{it,jt'} ⟨h_it, h_jt'⟩,
    K = ⟨e_y − π, e_y' − π'⟩ = 1[y = y'] − π'(y) − π(y') + ⟨π, π'⟩          (π = softmax of the policy's logits)
    A_{i,t} = A_i · (1 + p · sign(THR_{i,t}))  on the ``top_fraction`` of each group's tokens by |THR|, else A_i
    loss = GRPO's PPO-clip surrogate with these per-token advantages

p = 0 is exactly GRPO. The defaults (p = 0.5, top fraction 0.1) are tokalign's choices — the paper's values are not
public in a form we could check; treat them as knobs. Cost: a [N, M] kernel per group (N tokens of the group,
M tokens of its correct responses) from the full-vocabulary probabilities of the micro-batch. A group without a
correct response keeps GRPO's advantages (its A is 0 anyway when all rewards are equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import HiddenStates
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class THRConfig(GRPOConfig):
    p: float = 0.5  # > 0: amplify positive-THR tokens, damp negative ones (exploitation); < 0: the reverse
    top_fraction: float = 0.1  # share of each group's tokens, by |THR|, that are reweighted
    correct_threshold: float = 0.5  # a reward above it marks a correct response

    def __post_init__(self):
        super().__post_init__()
        if not -1 <= self.p <= 1:
            raise ValueError(f"p must be in [-1, 1], got {self.p}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


@torch.no_grad()
def token_hidden_rewards(logits: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         advantages: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """THR [B, T] for the masked tokens of every group (0 elsewhere). logits [B, T, V], hidden [B, T, H], targets [B, T],
    advantages / correct / group_ids [B]."""
    thr = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for g in torch.unique(group_ids):
        rows = (group_ids == g).nonzero().flatten()
        sel = mask[rows] > 0
        good = sel & correct[rows].unsqueeze(-1)
        if not good.any():
            continue
        probs = torch.softmax(logits[rows].float(), -1)
        p_all, p_good = probs[sel], probs[good]  # [N, V], [M, V]
        y_all, y_good = targets[rows][sel], targets[rows][good]
        kernel = (y_all[:, None] == y_good[None, :]).float() - p_good[:, y_all].T - p_all[:, y_good] + p_all @ p_good.T
        h = hidden[rows].float()
        influence = (kernel * (h[sel] @ h[good].T)).sum(-1)  # [N]
        a = advantages[rows].float().unsqueeze(-1).expand_as(sel)[sel]
        block = torch.zeros(sel.shape, dtype=torch.float32, device=mask.device)
        block[sel] = a * influence
        thr[rows] = block
    return thr


def reweight(thr: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor, p: float, top_fraction: float) -> torch.Tensor:
    """Per-token weights [B, T]: 1 + p·sign(THR) on each group's top ``top_fraction`` tokens by |THR|, 1 elsewhere."""
    weights = torch.ones_like(thr)
    for g in torch.unique(group_ids):
        rows = (group_ids == g).nonzero().flatten()
        sel = mask[rows] > 0
        scores = thr[rows][sel].abs()
        k = max(1, int(round(top_fraction * len(scores)))) if len(scores) else 0
        if k == 0:
            continue
        top = torch.zeros_like(scores, dtype=torch.bool)
        top[torch.topk(scores, k).indices] = True
        w = torch.where(top, 1 + p * torch.sign(thr[rows][sel]), torch.ones_like(scores))
        block = torch.ones(sel.shape, dtype=thr.dtype, device=thr.device)
        block[sel] = w
        weights[rows] = block
    return weights


class THR(GRPO):
    Config = THRConfig

    def __init__(self, config: THRConfig):
        super().__init__(config)
        # its loss reweights tokens by group statistics: a group stays in one micro-batch
        self.needs = dataclasses.replace(self.needs, full_vocab=True, components=(*self.needs.components, HiddenStates()),
                                         split_groups=False)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        adv = f["advantages"]
        thr = token_hidden_rewards(out.logits, out.hidden, batch.input_ids[:, 1:], mask, adv, f["rewards"] > c.correct_threshold,
                                   f["group_ids"])
        weights = reweight(thr, mask, f["group_ids"], c.p, c.top_fraction)
        per_token = TokenBatch(batch.input_ids, batch.attention_mask, mask, {**f, "advantages": adv.unsqueeze(-1) * weights},
                               batch.totals)
        res = super().loss(per_token, out)
        res.metrics.update({"thr/positive_fraction": float(((thr > 0) & (mask > 0)).float().sum() / mask.sum().clamp(min=1)),
                            "thr/reweighted_fraction": float(((weights != 1) & (mask > 0)).float().sum() / mask.sum().clamp(min=1))})
        return res
