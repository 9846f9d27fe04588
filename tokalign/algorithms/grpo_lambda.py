"""GRPO-λ — "Stable Reinforcement Learning for Efficient Reasoning", Dai, Liu, Si 2025, arXiv:2505.18086. A length
penalty on every group shortens the chains of thought but makes accuracy collapse early in training; GRPO-λ keeps the
penalty for the groups the policy already solves well and trains the others on the plain 0/1 reward.

Shapes: ``rewards``, ``group_ids``: [B]; mask: [B, T] (|y_i|, the completion length, is its row sum); ``logps``,
``old_logps``, ``ref_logps``: [B, T].

Each step, over the batch's Q groups (one per prompt), with c_i = 1[R_i ≥ ``correct_at``] and a group's correct ratio
p_g = mean_{i∈g} c_i:

    selection top (default; the paper's batch-wise top-λ):  the ⌈λ·Q⌉ groups of highest p_g are penalised
                                                             (ties: the lower group id first)
    selection threshold:                                     the groups with p_g ≥ λ are penalised
    penalised group, Kimi k1.5's length reward ("Kimi k1.5: Scaling Reinforcement Learning with LLMs",
    arXiv:2501.12599, §2.3.3) over the group's lengths:
        ℓ_i  = ½ − (|y_i| − min_g |y|) / (max_g |y| − min_g |y|)        (0 when the group's lengths are all equal)
        R'_i = R_i + w · (ℓ_i if c_i else min(0, ℓ_i))
    any other group: R'_i = R_i (the length-agnostic 0/1 reward)
    then GRPO on R': A_i = (R'_i − mean_g R') / (std_g R' + eps), PPO-clip, optional β·KL

Limits: no group penalised — λ = 0 with ``top``, λ > 1 with ``threshold`` — is GRPO bit for bit; every group penalised
(λ = 1 with ``top``, λ = 0 with ``threshold``) is GRPO with the length reward everywhere, the unstable baseline the
paper starts from. The other settings are GRPO's defaults.

⚠ Read from the abstract and third-party summaries (the paper's method section could not be read offline; no official
code was found): the top-λ rule over the batch's groups is theirs; the length reward's form (Kimi k1.5's, the example
the paper's introduction names), its weight w = 1, λ = 0.5, the rounding ⌈λ·Q⌉ and ``correct_at`` 0.5 (the pass mark
of a 0/1 reward) are tokalign's readings. ``threshold`` is the catalogue's first reading of the rule, kept as a switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

SELECTIONS = ("top", "threshold")


@dataclass
class GRPOLambdaConfig(GRPOConfig):
    lam: float = 0.5  # λ: the fraction of groups penalised (top), or the correct ratio from which one is (threshold)
    selection: str = "top"  # top | threshold
    length_weight: float = 1.0  # w, the length reward's weight in a penalised group
    correct_at: float = 0.5  # R ≥ this counts as correct

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.lam < 0 or (self.selection == "top" and self.lam > 1):
            raise ValueError(f"lam must be in [0, 1] with selection top (a fraction of the groups), ≥ 0 with threshold; got {self.lam}")
        if self.length_weight < 0:
            raise ValueError(f"length_weight must be ≥ 0, got {self.length_weight}")


def length_reward(lengths: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Kimi k1.5's length reward, [B] from lengths [B], correct [B] bool and group ids [B]: ℓ_i for a correct answer,
    min(0, ℓ_i) for a wrong one, with ℓ_i = ½ − (|y_i| − min_g) / (max_g − min_g), 0 in a group of equal lengths."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    k, x = int(inv.max()) + 1, lengths.double()
    lo = x.new_full((k,), math.inf).scatter_reduce(0, inv, x, "amin")[inv]
    hi = x.new_full((k,), -math.inf).scatter_reduce(0, inv, x, "amax")[inv]
    span = hi - lo
    ell = torch.where(span > 0, 0.5 - (x - lo) / span.clamp(min=1e-12), torch.zeros_like(x))
    return torch.where(correct, ell, ell.clamp(max=0)).to(lengths.dtype)


def penalised(correct: torch.Tensor, group_ids: torch.Tensor, lam: float, selection: str = "top") -> torch.Tensor:
    """[B] bool: the rows whose group gets the length reward — the ⌈λ·Q⌉ groups of highest correct ratio (``top``,
    ties to the lower group id) or those whose correct ratio is ≥ λ (``threshold``)."""
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    ratio = torch.zeros(len(counts), dtype=torch.float64, device=correct.device).index_add_(0, inv, correct.double()) / counts
    if selection == "threshold":
        return (ratio >= lam)[inv]
    chosen = torch.zeros(len(counts), dtype=torch.bool, device=correct.device)
    chosen[torch.sort(ratio, descending=True, stable=True).indices[:math.ceil(lam * len(counts) - 1e-9)]] = True
    return chosen[inv]


class GRPOLambda(GRPO):
    Config = GRPOLambdaConfig

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        r, gids = f["rewards"], f["group_ids"]
        correct = r >= c.correct_at
        on = penalised(correct, gids, c.lam, c.selection)
        bonus = length_reward(batch.completion_mask.sum(-1).to(r.dtype), correct, gids)
        f["raw_rewards"], f["length_penalised"] = r, on.to(r.dtype)
        f["rewards"] = torch.where(on, r + c.length_weight * bonus, r)
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        result.metrics["length_penalised_fraction"] = float(batch.fields["length_penalised"].mean())
        return result
