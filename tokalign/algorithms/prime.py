"""PRIME — "Process Reinforcement through Implicit Rewards", Cui et al. 2025, arXiv:2502.01456. An implicit
process reward model π_φ, trained online from outcome labels alone, gives every token a reward; the policy is
trained on RLOO returns of both the process and the outcome rewards with PPO-clip.

Shapes: ``prm_logps`` (π_φ before this step's update), ``ref_logps``, ``old_logps``, mask: [B, T];
``rewards`` (outcome, e.g. 0/1 correctness), ``group_ids``: [B].

    r_t = β (ℓ^φ_t − ℓ^ref_t)                                   implicit process reward per token
    L_φ = BCE(σ(Σ_t r_t), 1[R > threshold])                      the PRM's cross-entropy update (once per step)
    per source s ∈ {process (every token), outcome (last token)}, with its reward tensor x and coefficient c_s:
        x_{i,t} ← c_s · (G/(G−1) · x_{i,t} − Σ_j mean_t x_{j,t} / (G−1))     (RLOO, on the source's positions)
    A = whiten_batch(Σ_s reverse-cumsum(x_s))                    (γ = 1); loss = GRPO's PPO-clip surrogate

Official code: PRIME-RL/PRIME ``training/verl/trainer/ppo/core_algos.py`` (``compute_rloo_returns``,
``compute_ce_dpo_loss_rm``), ``training/verl/workers/actor/dp_prime.py``; defaults from
``training/examples/run_prime_main.sh``: β_train 0.05, reward_dpo_coef 5, reward_gt_coef 5, PRM lr 1e-6
(the policy's lr is train.lr), KL 0, clip 0.2, n 4, prompts kept with accuracy in [0.2, 0.8] (here: groups whose
outcomes all agree are dropped, ``accuracy_filter``), PRM updated after its rewards are computed
(``reward_model.model.update=after``). The PRM starts from the starting model (``--with prm=PATH`` to start
from another) and is saved in ``<out>/prm/``. φ = ref gives r ≡ 0 and L_φ = ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import TrainedModel
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch
from tokalign.sampling import DynamicSampling


@dataclass
class PRIMEConfig(GRPOConfig):
    beta_train: float = 0.05
    prm_lr: float = 1e-6
    process_coef: float = 5.0  # reward_dpo_coef
    outcome_coef: float = 5.0  # reward_gt_coef
    correct_threshold: float = 0.5  # an outcome reward above it counts as correct for the PRM's label
    accuracy_filter: bool = True
    scale_rewards: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.beta_train <= 0 or self.prm_lr <= 0:
            raise ValueError("beta_train and prm_lr must be > 0")


def implicit_rewards(prm_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (prm_logps - ref_logps) * mask


def rloo_source(x: torch.Tensor, positions: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """PRIME's per-source RLOO on [B, T] rewards at ``positions``: G/(G−1)·x − Σ_j mean_j/(G−1) (0 elsewhere)."""
    means = ops.masked_sum(x, positions, -1) / positions.sum(-1).clamp(min=1)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts[inverse].to(x.dtype).unsqueeze(-1)
    sums = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, inverse, means)[inverse].unsqueeze(-1)
    out = torch.where(g > 1, g / (g - 1).clamp(min=1) * x - sums / (g - 1).clamp(min=1), torch.zeros_like(x))
    return out * positions


class PRIME(GRPO):
    Config = PRIMEConfig

    def __init__(self, config: PRIMEConfig):
        super().__init__(config)
        self.needs = Needs(data=("online", "scored"), reference=True, groups=True, old_logps=True,
                           components=(TrainedModel("prm", config.prm_lr, self.prm_loss),),
                           hooks=(DynamicSampling(),) if config.accuracy_filter else ())

    def prm_loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        """The PRM's cross-entropy update on outcome labels (``out``: the PRM's forward)."""
        c, f = self.config, batch.fields
        score = implicit_rewards(out.logps, f["ref_logps"], batch.completion_mask, c.beta_train).sum(-1)
        label = (f["rewards"] > c.correct_threshold).to(score.dtype)
        per_row = F.binary_cross_entropy_with_logits(score, label, reduction="none")
        acc = ((score > 0) == (label > 0.5)).float().mean()
        return LossOutput(per_row.sum() / batch.totals.get("seqs", float(len(per_row))), {"accuracy": float(acc)})

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        process = implicit_rewards(f["prm_logps"], f["ref_logps"], mask, c.beta_train)
        last = ops.last_token_mask(mask)
        outcome = f["rewards"].unsqueeze(-1) * last
        x = c.process_coef * rloo_source(process, mask, f["group_ids"]) + c.outcome_coef * rloo_source(outcome, last, f["group_ids"])
        returns, _ = ops.gae(x, torch.zeros_like(x), mask, 1.0, 1.0)
        f["advantages"] = ops.masked_whiten(returns, mask) * mask
        f["process_rewards"] = process
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        res.metrics["process_reward/mean"] = float(ops.masked_mean(batch.fields["process_rewards"], batch.completion_mask))
        return res
