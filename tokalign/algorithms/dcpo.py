"""DCPO — "DCPO: Dynamic Clipping Policy Optimization", Yang et al. 2025, arXiv:2509.02333.
Official code: lime-RL/DCPO ``verl/trainer/ppo/core_algos.py`` (``get_clip_low_high``, ``get_mean_std``,
``compute_dcpo_outcome_advantage``, ``compute_policy_loss_dcpo``, ``agg_loss``); recipe ``recipe/dcpo/run_dcpo.sh``.

Shapes: ``rewards``, ``group_ids``, ``prompt_index``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``,
mask, clip bounds: [B, T] (completion tokens, aligned with the predicted token).

Dynamic adaptive clipping — bounds on ρ_t = exp(ℓ_t − ℓ^old_t) from the behaviour probability q_t = exp(ℓ^old_t):

    low_t  = ½(1 + √max(0, 1 − 4ε_l/q_t))                 (= ½ whenever q_t ≤ 4ε_l)
    high_t = min(½(1 + √(1 + 4ε_h/q_t)), max(C, 10))
    L_t = max(−A ρ_t, −A clip(ρ_t, low_t, high_t));   A < 0: L_t = min(L_t, −C·A)   (dual clip)

``clip_type="dual"`` takes the fixed bounds [1 − ε_l, 1 + ε_h] instead (the official "dual" mode). As q → 0 the
bounds tend to [½, max(C, 10)]; the official code returns low = 1 when q underflows to exactly 0, we keep the limit.

Smooth advantage standardisation (SAS). Per prompt (``prompt_index``) the algorithm keeps the cumulative mean μ,
std σ and visit count n of its group rewards over all earlier steps. At a visit with group mean/std μ_s, σ_s
(unbiased std), t = n + 1:

    μ_c = (n μ + μ_s)/t,   σ_c² = (n σ² + σ_s² + (n/t)(μ_s − μ)²)/t          (n = 0: μ_c, σ_c = μ_s, σ_s)
    A_new = (R − μ_s)/σ_s,  A_cum = (R − μ_c)/σ_c       (0 where the std is 0; no eps)
    w = 1/t;  SA_new = w A_cum + (1−w) A_new,  SA_cum = w A_new + (1−w) A_cum
    A = SA_new if |SA_new| < |SA_cum| else SA_cum;      then (μ, σ, n) ← (μ_c, σ_c, t)

so the first visit is the GRPO advantage (without its 1e-6), and a group whose rewards are all equal still
trains with A = A_cum/t once the prompt has a history. ``prepare`` advances this state (call it once per step);
``state_dict``/``load_state_dict`` carry it through checkpoints. Rows with ``prompt_index < 0`` (no stable
index) get no history. The same prompt twice in one batch: both groups read the state from before the step,
the later group's statistics are kept (as the official per-row write-back). A group of one has σ_s = 0 (the
official code raises). ``smooth_advantages=False`` gives plain per-step advantages.

Aggregation. The official "only-token-mean" (OTM) is verl's ``masked_mean`` of *each micro-batch*, weighted by
the micro-batch's share of rows (dp_actor: ``loss * rows_mb / ppo_mini_batch_size``):

    loss_mb = (|mb| / B) · Σ_{t∈mb} m L / Σ_{t∈mb} m

With one micro-batch per step (tokalign's default ``train.micro_batch_size=0``) that is exactly ``token-mean``;
with one row per micro-batch it is ``seq-mean-token-mean``: the method itself depends on the micro-batch split,
so OTM is not micro-batch consistent. ``aggregation="token-mean"`` (global token count from ``batch.totals``)
is the micro-batch-consistent alternative; any tokalign aggregation is accepted.

Defaults from ``run_dcpo.sh``/``run_base.sh``: ε_l = 0.2, ε_h = 0.28, C = 10, clip_type dynamic,
only-token-mean, std-normalised advantages, no KL, no overlong penalty, no dynamic sampling (rollout.n = 16,
lr 1e-6 there). The official ``use_old_mean.coeff`` (scales the stored μ, σ; 1 in the recipe) is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

OTM = "only-token-mean"


def dynamic_clip_bounds(old_logps: torch.Tensor, eps_low: float, eps_high: float, clip_c: float):
    """DCPO's per-token ratio bounds (low, high), each [B, T], from q = exp(old_logps)."""
    q = old_logps.detach().exp()
    low = 0.5 * (1 + (1 - 4 * eps_low / q).clamp(min=0).sqrt())
    high = (0.5 * (1 + (1 + 4 * eps_high / q).sqrt())).clamp(max=max(clip_c, 10.0))
    return low, high


def only_token_mean(values: torch.Tensor, mask: torch.Tensor, total_seqs: float | None) -> torch.Tensor:
    """verl's OTM: this micro-batch's token mean, weighted by its share of the batch's rows."""
    share = 1.0 if not total_seqs else values.shape[0] / float(total_seqs)
    return ops.masked_mean(values, mask) * share


@dataclass
class DCPOConfig:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    clip_ratio_c: float = 10.0  # dual-clip constant C; the dynamic upper bound is capped at max(C, 10)
    clip_type: str = "dynamic"  # dynamic | dual (fixed 1 ± ε with dual clip)
    smooth_advantages: bool = True  # SAS with per-prompt cumulative statistics
    scale_rewards: str = "group"  # group: divide by the std (norm_adv_by_std_in_grpo) | none
    aggregation: str = OTM
    beta: float = 0.0  # KL coefficient (the recipe uses none); > 0 loads the reference model
    kl_estimator: str = "k3"

    def __post_init__(self):
        if self.clip_type not in ("dynamic", "dual"):
            raise ValueError(f"clip_type must be dynamic or dual, got {self.clip_type!r}")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"scale_rewards must be group or none, got {self.scale_rewards!r}")
        if self.aggregation not in (OTM, *ops.AGGREGATIONS):
            raise ValueError(f"aggregation must be one of {OTM}, {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")
        if self.kl_estimator not in ops.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(ops.KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError("epsilon_low, epsilon_high and beta must be ≥ 0")
        if self.clip_type == "dual" and self.epsilon_low >= 1:
            raise ValueError("clip_type=dual needs epsilon_low < 1 (the lower bound is 1 − epsilon_low)")
        if self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c is the dual-clip constant and must be > 1, got {self.clip_ratio_c}")


class DCPO:
    Config = DCPOConfig

    def __init__(self, config: DCPOConfig):
        self.config = config
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0, groups=True, old_logps=True)  # OTM: a token mean per micro-batch
        self.stats: dict[int, tuple[float, float, int]] = {}  # prompt_index -> (cumulative mean, std, visits)

    def state_dict(self) -> dict:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {int(k): (float(m), float(s), int(n)) for k, (m, s, n) in state["stats"].items()}

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        rewards, gids = batch.fields["rewards"], batch.fields["group_ids"]
        prompts = batch.fields.get("prompt_index", torch.full_like(gids, -1)).tolist()
        r64 = rewards.double()
        mean_s, std_s = ops.group_stats(r64, gids)
        adv = torch.zeros_like(r64)
        before = dict(self.stats)
        for g in torch.unique(gids).tolist():
            rows = (gids == g).nonzero().squeeze(-1)
            p = prompts[int(rows[0])]
            mu_s, sd_s = float(mean_s[rows[0]]), float(std_s[rows[0]])
            mu, sd, n = before.get(p, (0.0, 0.0, 0)) if (c.smooth_advantages and p >= 0) else (0.0, 0.0, 0)
            t = n + 1
            mu_c = (n * mu + mu_s) / t
            sd_c = sd_s if n == 0 else math.sqrt((n * sd * sd + sd_s * sd_s + n / t * (mu_s - mu) ** 2) / t)
            a_new, a_cum = self._standardise(r64[rows], mu_s, sd_s), self._standardise(r64[rows], mu_c, sd_c)
            sa_new, sa_cum = a_cum / t + (1 - 1 / t) * a_new, a_new / t + (1 - 1 / t) * a_cum
            adv[rows] = torch.where(sa_new.abs() < sa_cum.abs(), sa_new, sa_cum)
            if c.smooth_advantages and p >= 0:
                self.stats[p] = (mu_c, sd_c, t)
        batch.fields["advantages"] = adv.to(rewards.dtype)
        return batch

    def _standardise(self, r: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        if self.config.scale_rewards == "none":
            return r - mean
        return (r - mean) / std if std > 0 else torch.zeros_like(r)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        adv = batch.fields["advantages"].unsqueeze(-1)
        old = batch.fields["old_logps"]
        if c.clip_type == "dynamic":
            low, high = dynamic_clip_bounds(old, c.epsilon_low, c.epsilon_high, c.clip_ratio_c)
        else:
            low, high = torch.full_like(old, 1 - c.epsilon_low), torch.full_like(old, 1 + c.epsilon_high)
        per_token, clipped, lower = ops.dual_clip_surrogate(out.logps, old, adv, 1 - low, high - 1, c.clip_ratio_c)
        a = batch.fields["advantages"]
        metrics = {"clip_fraction": float(ops.masked_mean(clipped.float(), mask)),
                   "clip_fraction_lower": float(ops.masked_mean(lower.float(), mask)),
                   "clip_bound/low_mean": float(ops.masked_mean(low, mask)),
                   "clip_bound/high_mean": float(ops.masked_mean(high, mask)),
                   "advantage/abs_mean": float(ops.masked_mean(adv.abs().expand_as(mask), mask)),
                   "advantage/nonzero_fraction": float((a != 0).float().mean()) if len(a) else 0.0}
        if c.beta > 0:
            kl = ops.kl_penalty(out.logps, batch.fields["ref_logps"], c.kl_estimator)
            per_token = per_token + c.beta * kl
            metrics["kl"] = float(ops.masked_mean(kl.detach(), mask))
        t = batch.totals
        if c.aggregation == OTM:
            loss = only_token_mean(per_token, mask, t.get("seqs"))
        else:
            loss = batch.aggregate(per_token, c.aggregation)
        return LossOutput(loss, metrics)
