"""HAPO — "From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's Nature", Liu et al. 2025,
arXiv:2509.16591. Official code: starriver030515/HAPO ``verl/trainer/ppo/core_algos.py`` (``compute_entropy_h``,
``ada_clip``, ``ada_advantage``, ``compute_hapo_outcome_advantage``, ``compute_policy_loss``) and
``verl/workers/actor/dp_actor.py``; defaults from ``recipe/*.sh``.

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, ``entropy``,
mask, ĥ, per-token ε and A: [B, T] (completion tokens, aligned with the predicted token).

Token-level group average (``prepare``): with |y_i| the completion lengths, per group
    μ = Σ|y_i|R_i / Σ|y_i|,   σ = √(Σ|y_i|(R_i − μ)² / Σ|y_i|)   (token-weighted, population std)
    A_i = (R_i − μ)/(σ + eps);   if any |A_i| ≥ 5 in the group: the GRPO advantage (R_i − mean)/(std_unbiased + eps)
Equal lengths give the GRPO mean, with the population instead of the unbiased std. The official check also sees
padding positions (value −μ/(σ+eps)); here only the group's rows count.

Normalised entropy (in ``loss``, from ``out.entropy``, the current policy's entropy — the official code uses the
training forward's entropy too): over the micro-batch's completion tokens,
    h_t = log max(H_t, 1e-8) − Q_p,   Q_p = the ``entropy_pivot`` quantile of log H ("nearest" interpolation)
    h_t ← h_t / √mean(h²);   ĥ_t = h_t / max(h > 0) if h_t > 0 else h_t / |min(h < 0)|    ∈ [−1, 1]
(the official code divides the negative side by min(h < 0) itself, which flips its sign so that ĥ ≥ 0 everywhere and
the low-entropy branches below never fire; we follow the paper: low-entropy tokens have ĥ < 0).

Asymmetric adaptive clip:  ĥ ≤ 0: ε_l,t = ε_l(1 − αĥ_t);  ĥ > 0: ε_h,t = ε_h(1 + αĥ_t)  (others unchanged).
Differential advantage redistribution, with A_ent = A(1 + β_a ĥ_t) and the neutral band
1 − ε_l,t/2 < ρ_t < 1 + ε_h,t/2 (ρ detached): ĥ > 0 ⇒ A_ent outside the band, A inside; ĥ ≤ 0 ⇒ A_ent inside, A outside.
Loss: DCPO's dual-clip surrogate with bounds [1 − ε_l,t, 1 + ε_h,t] and C = ``clip_ratio_c``, then ``aggregation``.

ĥ is normalised over the tokens of the micro-batch the loss sees (as the official dp_actor), so the loss is
micro-batch consistent only when ĥ is (e.g. the default ``train.micro_batch_size=0``: one micro-batch per step).
The official verl also takes "token-mean" per micro-batch; tokalign's token-mean uses the step's token total.
Constant entropy ⇒ ĥ = 0 ⇒ the DAPO/PPO dual-clip loss.

Adaptive Temperature Sampling at rollout (per-token temperature from entropy, τ = 0.05 in the recipes) belongs to the
rollout engine, not to the loss: it is the logits processor ``adaptive_temperature``
(``tokalign/decoding/adaptive_temperature.py``): ``train hapo --logits-processor adaptive_temperature``.

Defaults (``recipe/qwen2.5_math_7b.sh`` et al.): ε_l = ε_h = 0.2, clip_ratio_c = 10, entropy_pivot 0.8,
clip_alpha 1, adv_beta 1, token-mean, no KL (the recipes also use DAPO's dynamic sampling and overlong buffer,
n = 16, lr 1e-6).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


def token_group_advantages(rewards, lengths, group_ids, eps: float = 1e-6, scale: str = "group", fallback: float = 5.0):
    """HAPO's token-level group average. rewards, lengths, group_ids: [B] -> (advantages [B], fell_back [B] bool)."""
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    k, r, w = len(counts), rewards.double(), lengths.double()
    tot = r.new_zeros(k).index_add_(0, inv, w).clamp(min=1e-12)
    mean = (r.new_zeros(k).index_add_(0, inv, w * r) / tot)[inv]
    std = (r.new_zeros(k).index_add_(0, inv, w * (r - mean).square()) / tot).sqrt()[inv]
    adv = (r - mean) / (std + eps) if scale == "group" else r - mean
    big = r.new_zeros(k).index_add_(0, inv, (adv.abs() >= fallback).to(r.dtype))[inv] > 0
    adv = torch.where(big, ops.group_advantages(r, group_ids, scale, eps), adv)
    return adv.to(rewards.dtype), big


@torch.no_grad()
def entropy_h_hat(entropy: torch.Tensor, mask: torch.Tensor, pivot: float, eps: float = 1e-8) -> torch.Tensor:
    """ĥ [B, T] in [−1, 1] from token entropies [B, T] over the ``mask``ed tokens (zeros elsewhere)."""
    valid = mask.bool()
    if not valid.any():
        return torch.zeros_like(entropy)
    log_h = entropy.float().clamp(min=eps).log()
    ordered = log_h[valid].sort().values
    h = log_h - ordered[round(pivot * (len(ordered) - 1))]
    h = h / (h.square()[valid].mean().clamp(min=eps).sqrt())
    pos = h[valid & (h > 0)].max() if (valid & (h > 0)).any() else h.new_tensor(eps)
    neg = h[valid & (h < 0)].min().abs() if (valid & (h < 0)).any() else h.new_tensor(eps)
    return torch.where(h > 0, h / pos.clamp(min=eps), h / neg.clamp(min=eps)) * valid


@dataclass
class HAPOConfig(GRPOConfig):
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    clip_ratio_c: float = 10.0  # dual-clip constant for A < 0
    entropy_pivot: float = 0.8  # quantile of log-entropy that maps to ĥ = 0
    adaptive_clip: bool = True
    clip_alpha: float = 1.0
    adaptive_advantage: bool = True
    adv_beta: float = 1.0
    token_level_advantage: bool = True  # False: plain GRPO advantages
    fallback_threshold: float = 5.0  # any |A| ≥ this in a group ⇒ that group uses the GRPO advantage

    def __post_init__(self):
        super().__post_init__()
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"scale_rewards must be group or none for HAPO, got {self.scale_rewards!r}")
        if not 0 <= self.entropy_pivot <= 1:
            raise ValueError(f"entropy_pivot is a quantile and must be in [0, 1], got {self.entropy_pivot}")
        if self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c is the dual-clip constant and must be > 1, got {self.clip_ratio_c}")
        if self.clip_alpha < 0 or self.adv_beta < 0 or self.fallback_threshold <= 0:
            raise ValueError("clip_alpha and adv_beta must be ≥ 0, fallback_threshold > 0")


class HAPO(GRPO):
    Config = HAPOConfig

    def __init__(self, config: HAPOConfig):
        super().__init__(config)
        # ĥ normalises entropies over the micro-batch's tokens: a group stays in one micro-batch
        self.needs = dataclasses.replace(self.needs, split_groups=False)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        if not c.token_level_advantage:
            return super().prepare(batch)
        adv, fell_back = token_group_advantages(batch.fields["rewards"], batch.completion_mask.sum(-1),
                                                batch.fields["group_ids"], c.adv_eps, c.scale_rewards, c.fallback_threshold)
        batch.fields["advantages"], batch.fields["grpo_fallback"] = adv, fell_back.float()
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        if out.entropy is None:
            raise ValueError("HAPO needs the policy's token entropies (PolicyOutput.entropy)")
        old = self.behaviour_logps(batch, out)
        h = entropy_h_hat(out.entropy, mask, c.entropy_pivot)
        eps_l, eps_h = torch.full_like(h, c.epsilon_low), torch.full_like(h, c.epsilon_high)
        if c.adaptive_clip:
            eps_l = torch.where(h <= 0, eps_l * (1 - c.clip_alpha * h), eps_l)
            eps_h = torch.where(h > 0, eps_h * (1 + c.clip_alpha * h), eps_h)
        adv = batch.fields["advantages"].unsqueeze(-1).expand_as(h)
        if c.adaptive_advantage:
            ratio = (out.logps.detach() - old).exp()
            inside = (ratio > 1 - eps_l / 2) & (ratio < 1 + eps_h / 2)
            adv = torch.where((h > 0) ^ inside, adv * (1 + c.adv_beta * h), adv)
        per_token, clipped, lower = ops.dual_clip_surrogate(out.logps, old, adv, eps_l, eps_h, c.clip_ratio_c)
        base = batch.fields["advantages"].unsqueeze(-1).expand_as(h)
        metrics = {"clip_fraction": float(ops.masked_mean(clipped.float(), mask)),
                   "clip_fraction_lower": float(ops.masked_mean(lower.float(), mask)),
                   "h_hat/mean": float(ops.masked_mean(h, mask)),
                   "h_hat/positive_fraction": float(ops.masked_mean((h > 0).float(), mask)),
                   "clip/eps_low_mean": float(ops.masked_mean(eps_l, mask)),
                   "clip/eps_high_mean": float(ops.masked_mean(eps_h, mask)),
                   "advantage/abs_mean": float(ops.masked_mean(adv.abs(), mask)),
                   "advantage/redistributed_fraction": float(ops.masked_mean((adv != base).float(), mask))}
        if "grpo_fallback" in batch.fields:
            metrics["advantage/grpo_fallback_fraction"] = float(batch.fields["grpo_fallback"].mean())
        return self.finish(per_token, batch, out, metrics)
