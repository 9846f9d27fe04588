"""RTO — "DPO Meets PPO: Reinforced Token Optimization for RLHF", Zhong et al. 2024, arXiv:2404.18922.
PPO whose reward is dense: a frozen DPO model's token-wise implicit reward (``--dpo-model PATH``,
i.e. role ``dpo``), plus the per-token KL and the clamped outcome reward.

Shapes: ``dpo_logps``, ``ref_logps``, ``old_logps``, mask: [B, T]; ``rewards``: [B].

    r_t = clip(s·(ℓ^dpo_t − ℓ^ref_t), ±c) − β_KL·k1_t + 1[t = last]·clamp(R, ±10)    then GAE + PPO (ppo.py)

Defaults from the official script (zkshan2002/RTO ``examples/scripts/train_rto_llama_8b.sh``):
dpo_reward_scale s = 0.05, dpo_reward_clip c = 0.05, init_kl_coef 0.01, γ = 1, λ = 0.95.
s = 0 is exactly PPO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.protocols import TokenBatch


@dataclass
class RTOConfig(PPOConfig):
    kl_coef: float = 0.01
    dpo_reward_scale: float = 0.05
    dpo_reward_clip: float = 0.05  # 0 = no clip
    outcome_clip: float = 10.0


class RTO(PPO):
    Config = RTOConfig

    def __init__(self, config: RTOConfig):
        super().__init__(config)
        # the reference model is needed for the DPO reward itself, whatever kl_coef is
        self.needs = dataclasses.replace(self.needs, reference=True, models=("dpo",))

    def outcome(self, rewards: torch.Tensor) -> torch.Tensor:
        return rewards.clamp(-self.config.outcome_clip, self.config.outcome_clip)

    def dense_reward(self, batch: TokenBatch):
        c = self.config
        r = c.dpo_reward_scale * (batch.fields["dpo_logps"] - batch.fields["ref_logps"])
        return r.clamp(-c.dpo_reward_clip, c.dpo_reward_clip) if c.dpo_reward_clip else r
