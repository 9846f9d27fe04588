"""REINFORCE++ and REINFORCE++-baseline — "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both
Prompt and Reward Models", Hu et al. 2025, arXiv:2501.03262.

REINFORCE++ (``reinforce_pp``; verl ``compute_reinforce_plus_plus_outcome_advantage``): per-token rewards
r_t = −β_KL·k1_t + token_rewards_t + 1[t = last]·(R − Σ token_rewards) (the token rewards' sum is part of R), returns G_t = Σ_{k≥t} γ^{k−t} r_k, whitened over every
completion token of the batch: A_t = whiten(G)_t. No critic, no groups needed.

REINFORCE++-baseline (``reinforce_pp_baseline``): group-mean baseline, then whitening over the whole batch,
trained with GRPO's PPO-clip surrogate (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``).

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    c_i = R_i − mean_g R                                  (scale_rewards="none"; "group" divides by std_g first)
    A_i = (c_i − μ) / √(σ² + eps)                         μ, σ² (unbiased) over the batch:
          whiten_over="tokens": every completion token carries its row's c_i (verl, OpenRLHF) — long rows weigh more
          whiten_over="seqs":   one value per row
    loss = GRPO's loss with these advantages; KL as a loss term, k2 with β = 1e-3 (OpenRLHF's reinforce_baseline
    recipe: --use_kl_loss --kl_estimator k2 --init_kl_coef 1e-3)

A is constant along a row, so it is stored per row ([B]) even when whitened over tokens. ``prepare`` must see the
whole optimiser batch (the train loop calls it before splitting into micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import BehaviourLogps
from tokalign.protocols import Needs, TokenBatch

WHITEN_OVER = ("tokens", "seqs")


@dataclass
class ReinforcePPBaselineConfig(GRPOConfig):
    beta: float = 1e-3
    kl_estimator: str = "k2"
    scale_rewards: str = "none"  # group step before whitening; "none" is the paper's R − mean_g R
    whiten_over: str = "tokens"
    adv_eps: float = 1e-8  # inside the square root, as verl's masked_whiten

    def __post_init__(self):
        super().__post_init__()
        if self.whiten_over not in WHITEN_OVER:
            raise ValueError(f"whiten_over must be one of {', '.join(WHITEN_OVER)}, got {self.whiten_over!r}")


class ReinforcePPBaseline(GRPO):
    Config = ReinforcePPBaselineConfig

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        centred = ops.group_advantages(batch.fields["rewards"], batch.fields["group_ids"], c.scale_rewards, c.adv_eps)
        weights = batch.completion_mask.sum(-1) if c.whiten_over == "tokens" else centred.new_ones(centred.shape)
        batch.fields["advantages"] = ops.masked_whiten(centred, weights, c.adv_eps)
        return batch


@dataclass
class ReinforcePPConfig(GRPOConfig):
    kl_coef: float = 0.01  # β_KL of the k1 penalty inside the reward (OpenRLHF --init_kl_coef 1e-2); > 0 loads the ref
    gamma: float = 1.0
    adv_eps: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


class ReinforcePP(GRPO):
    Config = ReinforcePPConfig

    def __init__(self, config: ReinforcePPConfig):
        super().__init__(config)
        upfront = (BehaviourLogps(upfront=True),) if config.kl_coef > 0 else ()  # a KL in the reward: before prepare()
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0 or config.kl_coef > 0, old_logps=True, components=upfront,
                           split_groups=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        reward = ops.placed_rewards(f["rewards"], mask, f.get("token_rewards"))
        if c.kl_coef > 0:
            reward = reward - c.kl_coef * ops.kl_penalty(f["old_logps"], f["ref_logps"], "k1") * mask
        returns, _ = ops.gae(reward, torch.zeros_like(reward), mask, c.gamma, 1.0)  # V = 0, λ = 1: discounted returns
        f["advantages"] = ops.masked_whiten(returns, mask, c.adv_eps) * mask
        return batch
