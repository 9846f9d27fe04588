"""RLOO — "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
Ahmadian et al. 2024, arXiv:2402.14740. The REINFORCE leave-one-out baseline as an outcome advantage, trained with
GRPO's PPO-clip surrogate (as verl's ``adv_estimator=rloo``).

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i = R_i − (1/(G−1)) Σ_{j≠i} R_j  =  G/(G−1) · (R_i − mean_g R)       (a group of one gets A = 0)
    loss = GRPO's loss with these advantages (clip ε, optional β·KL, aggregation)

Not here: the paper's KL-in-reward (R − β Σ_t k1_t); tokalign adds KL as a loss term (``beta``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import TokenBatch


@dataclass
class RLOOConfig(GRPOConfig):
    scale_rewards: str = "none"  # the leave-one-out advantage is not scaled

    def __post_init__(self):
        super().__post_init__()
        if self.scale_rewards != "none":
            raise ValueError(f"RLOO advantages are not std-scaled; scale_rewards must be none, got {self.scale_rewards!r} "
                             "(for std-scaled group advantages use grpo)")


class RLOO(GRPO):
    Config = RLOOConfig

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        rewards = batch.fields["rewards"]
        batch.fields["advantages"] = rewards - ops.leave_one_out_mean(rewards, batch.fields["group_ids"])
        return batch
