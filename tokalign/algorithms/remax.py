"""ReMax — "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
Large Language Models", Li et al. 2023, arXiv:2310.10505. REINFORCE whose baseline is the reward of
the greedy completion of the same prompt (decoded and scored by the online loop).

Shapes: ``rewards``, ``baseline``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_t = clip(R − R(ŷ_greedy), ±c) · γ^{T−t} − β·k1_t        (KL per token, not accumulated)
    L   = −Σ_t m_t A_t ℓ_t / Σ_t m_t                           (no ratio, no clip)

Defaults from the official trainer (liziniu/ReMax ``step3_rlhf_finetuning/remax_trainer.py``):
β = 0.1 (``--kl_ctl``), γ = 1; c = 0 disables the clip (set it to the reward clip you use). A sampled
completion equal to the greedy one has A = −β·k1 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.components import BehaviourLogps
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch
from tokalign.sampling import GreedyBaseline


@dataclass
class ReMaxConfig:
    kl_coef: float = 0.1
    gamma: float = 1.0
    reward_clip: float = 0.0  # c; 0 = no clip
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


class ReMax:
    Config = ReMaxConfig

    def __init__(self, config: ReMaxConfig):
        self.config = config
        kl = config.kl_coef > 0
        # the KL is in the advantages, so the behaviour log-probs are needed before prepare()
        self.needs = Needs(data=("online",), reference=kl, old_logps=kl, components=(BehaviourLogps(upfront=True),) if kl else (),
                           hooks=(GreedyBaseline(),))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        gain = f["rewards"] - f["baseline"]
        if c.reward_clip:
            gain = gain.clamp(-c.reward_clip, c.reward_clip)
        # γ^{T−t}: distance of each completion token from its row's last token
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * (mask > 0)).amax(-1, keepdim=True)
        advantages = gain.unsqueeze(-1) * c.gamma ** (last - positions).clamp(min=0).to(mask.dtype)
        if c.kl_coef > 0:
            advantages = advantages - c.kl_coef * ops.kl_penalty(f["old_logps"], f["ref_logps"], "k1")
        f["advantages"] = advantages * mask
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        per_token = -batch.fields["advantages"] * out.logps
        loss = batch.aggregate(per_token, self.config.aggregation)
        return LossOutput(loss, {"advantage/abs_mean": float(ops.masked_mean(batch.fields["advantages"].abs(), batch.completion_mask))})
