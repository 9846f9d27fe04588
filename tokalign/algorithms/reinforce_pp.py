"""REINFORCE++-baseline — "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward
Models", Hu et al. 2025, arXiv:2501.03262. Group-mean baseline, then whitening over the whole batch, trained with
GRPO's PPO-clip surrogate (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``).

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

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import TokenBatch

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
