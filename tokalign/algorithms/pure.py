"""PURE — "Stop Summation: Min-Form Credit Assignment Is All Process Reward Model Needs for Reasoning",
Cheng et al. 2025, arXiv:2504.15275. Process rewards (PRM step scores on the step-end tokens) are turned
into a soft *minimum* before they become returns, which stops the policy from farming many small positive
steps; RLOO baselines for both the process and the verifiable reward; PPO-clip.

Inputs: ``token_rewards`` [B, T] — the per-token reward contract: a process reward places step score
r_k ∈ [−1, 1] on the last token of step k and 0 elsewhere (so a non-zero token value marks a step end) —;
``rewards`` [B]: the scalar total, of which the verifiable part is what the token values do not explain,
v_i = R_i − Σ_t r_{i,t}; ``group_ids`` [B].

    w_k  = softmax_k(−r_k / T)        r'_k = w_k · r_k          (Σ_k r'_k ≈ min_k r_k as T → 0; min_form=false: r' = r)
    baseline "token": r'_k −= b_i · n_k, b_i = Σ_{j≠i} Σ_k r'_{j,k} / Σ_{j≠i} |y_j|, n_k = tokens in step k
    baseline "step":  r'_k −= Σ_{j≠i} (Σ_k r'_{j,k} / K_j) / (G − 1)
    verifiable:       + coef · (v_i − mean_{j≠i} v_j) on the last token
    A_t = Σ_{t'≥t} r'_{t'} (γ = 1), optionally whitened over the batch; loss = GRPO's PPO-clip surrogate

Defaults from the official code (CJReinforce/PURE ``openrlhf/utils/utils.py``
``turn_process_reward_logits_to_reward``, ``openrlhf/trainer/ppo_utils/experience_maker.py``
``process_experiences``, run scripts): T = 0.1, ``--reward_baseline token``, ``--verifiable_reward_coef 1.0``,
``--advantage_estimator rloo``. A step score of exactly 0 is indistinguishable from "no step end here".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import TokenBatch


def min_form_weights(step_rewards: torch.Tensor, steps: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over each row's step positions of −r/T; 0 off the steps. [B, T] -> [B, T]."""
    logits = (-step_rewards / temperature).masked_fill(~steps, float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(w, nan=0.0) * steps  # a row without steps: all -inf -> NaN -> 0


def step_lengths(steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Completion tokens in the step ending at each step-end position (since the previous step end). [B, T]."""
    counts = torch.cumsum(mask, dim=-1)  # completion tokens up to and including t
    before = torch.zeros_like(counts)
    for i in range(steps.shape[0]):
        ends = steps[i].nonzero().flatten()
        prev = torch.cat([ends.new_zeros(1), counts[i, ends[:-1]].long()]) if len(ends) else ends
        before[i, ends] = prev.to(counts.dtype)
    return (counts - before) * steps


@dataclass
class PUREConfig(GRPOConfig):
    temperature: float = 0.1
    min_form: bool = True  # false: plain summation (the official --disable_weighted_reward)
    baseline: str = "token"  # token | step
    verifiable_coef: float = 1.0
    whiten: bool = False
    scale_rewards: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.baseline not in ("token", "step"):
            raise ValueError(f"baseline must be token or step, got {self.baseline!r}")


class PURE(GRPO):
    Config = PUREConfig

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        if "token_rewards" not in f:
            raise UserError("pure needs a per-token process reward (step scores on step-end tokens): add a reward that "
                            "returns token_values, e.g. --reward prm, or train from a scored artifact that has token_rewards.")
        raw = f["token_rewards"] * mask
        steps = (raw != 0) & (mask > 0)
        r = raw * min_form_weights(raw, steps, c.temperature) if c.min_form else raw
        gids, total = f["group_ids"], r.sum(-1)
        if c.baseline == "step":
            per_step = total / steps.sum(-1).clamp(min=1)
            r = r - ops.leave_one_out_mean(per_step, gids).unsqueeze(-1) * steps
        else:
            lengths = mask.sum(-1)
            others_reward = ops.leave_one_out_mean(total, gids)
            others_len = ops.leave_one_out_mean(lengths, gids)
            r = r - (others_reward / others_len.clamp(min=1)).unsqueeze(-1) * step_lengths(steps, mask)
        verifiable = f["rewards"] - raw.sum(-1)
        r = r + c.verifiable_coef * (verifiable - ops.leave_one_out_mean(verifiable, gids)).unsqueeze(-1) * ops.last_token_mask(mask)
        returns, _ = ops.gae(r, torch.zeros_like(r), mask, 1.0, 1.0)
        f["advantages"] = ops.masked_whiten(returns, mask) * mask if c.whiten else returns
        return batch
