"""REC and OPMD — "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm: Demystifying Some Myths About GRPO
and Its Friends", Yao, Chen, Sun et al. 2025, arXiv:2509.24203. Group-relative REINFORCE whose off-policy
corrections are switches: which tokens to drop (clip), how to weight them, and a regulariser. Official code:
agentscope-ai/Trinity-RFT (formerly modelscope/Trinity-RFT) ``trinity/algorithm/policy_loss_fn/rec_policy_loss.py``,
``opmd_policy_loss.py``, ``advantage_fn/rec_advantage.py``, ``advantage_fn/opmd_advantage.py``.

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i = R_i − mean_g R                              (scale_rewards="group" also divides by std_g)
    ρ_t = sg(exp(ℓ_t − ℓ^old_t))                      detached: it selects and weights, it carries no gradient
    keep_t:  none      1
             two-side  1−ε_l ≤ ρ ≤ 1+ε_h
             one-side  (A ≥ 0 ∧ ρ ≤ 1+ε_h) ∨ (A ≤ 0 ∧ ρ ≥ 1−ε_l)
             ring      two-side ∨ (A ≥ 0 ∧ ρ ≤ 1−ε'_l) ∨ (A ≤ 0 ∧ ρ ≥ 1+ε'_h)
    w_t:     none A;  importance_sampling A·ρ;  advantage A·exp(A/temp)
    L_t = −w_t·ℓ_t·keep_t + τ·(ℓ_t − ℓ^old_t)²  (regularizer="k2"; the ½ is absorbed in τ) + β·KL_t
    loss = aggregate(L, mask, aggregation)

At ρ = 1 every token is kept and ∂L/∂ℓ_t = −A, PPO's gradient; clip none + weight none is plain REINFORCE with the
group-mean baseline at any ρ.

OPMD (Kimi k1.5's online policy mirror descent, as Trinity-RFT implements it): A_i = R_i − b_g with b_g the group mean
or τ·log mean_g exp(R/τ); L_t = −A_i ℓ_t / (1 + τ) (+ β·KL_t), token-mean; no ratio, so no ℓ^old.

Defaults from Trinity-RFT: ε = (0.2, 0.2), ε' = (0.6, 2.0) (``RECPolicyLossFn.default_args``), clip none, weight none,
no regulariser, token-mean, advantages not std-scaled (``examples/rec_gsm8k/gsm8k.yaml``), and the framework's KL loss
for the REC and OPMD algorithm types, k2 with coefficient 1e-3 (``algorithm.py``, ``kl_fn.py``). OPMD: τ = 1, mean
baseline. Not here: Trinity's later ``gspo-one-side``, ``truncated_importance_sampling``, ``gspo_importance_sampling``
and ``forward-kl`` options, and REC's "balance" drop of surplus negatives. Trinity gives a group of one the advantage
R (baseline 0) and std-scales with the population std; tokalign gives it 0 and uses GRPO's unbiased std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

CLIP_MODES = ("none", "one-side", "two-side", "ring")
WEIGHTS = ("none", "importance_sampling", "advantage")
REGULARIZERS = ("none", "k2")
BASELINES = ("mean", "logavgexp")


@dataclass
class RECConfig(GRPOConfig):
    beta: float = 1e-3
    kl_estimator: str = "k2"
    scale_rewards: str = "none"
    clip_mode: str = "none"
    weight: str = "none"
    temp: float = 1.0  # weight="advantage": A·exp(A/temp)
    epsilon_low_prime: float = 0.6  # the ring's outer bounds
    epsilon_high_prime: float = 2.0
    regularizer: str = "none"
    tau: float = 0.0  # regularizer="k2": + τ(ℓ − ℓ_old)²

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("clip_mode", CLIP_MODES), ("weight", WEIGHTS), ("regularizer", REGULARIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 < self.epsilon_low <= 1 or not 0 < self.epsilon_low_prime <= 1:
            raise ValueError("epsilon_low and epsilon_low_prime must be in (0, 1]")
        if not self.epsilon_high > 0 or not self.epsilon_high_prime > 0:
            raise ValueError("epsilon_high and epsilon_high_prime must be > 0")
        if not self.temp > 0 or self.tau < 0:
            raise ValueError(f"temp must be > 0 and tau ≥ 0, got temp={self.temp}, tau={self.tau}")
        if self.regularizer == "none" and self.tau != 0 and type(self) is RECConfig:
            raise ValueError(f"tau is the k2 regulariser's coefficient: set regularizer=k2 to use tau={self.tau}")


class REC(GRPO):
    """prepare is GRPO's (group advantages, default not std-scaled); the loss is REINFORCE's, not PPO-clip."""

    Config = RECConfig

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask, lp = self.config, batch.completion_mask, out.logps
        adv = batch.fields["advantages"].unsqueeze(-1).expand_as(lp)
        metrics = {"advantage/abs_mean": float(ops.masked_mean(adv.abs(), mask))}
        keep, w = torch.ones_like(lp), adv
        if self._uses_ratio():
            old = batch.fields["old_logps"]
            ratio = torch.exp(lp.detach() - old)
            lo, hi = 1 - c.epsilon_low, 1 + c.epsilon_high
            inside = (ratio >= lo) & (ratio <= hi)
            if c.clip_mode == "two-side":
                inside_mode = inside
            elif c.clip_mode == "one-side":
                inside_mode = ((adv >= 0) & (ratio <= hi)) | ((adv <= 0) & (ratio >= lo))
            elif c.clip_mode == "ring":
                outer = ((adv >= 0) & (ratio <= 1 - c.epsilon_low_prime)) | ((adv <= 0) & (ratio >= 1 + c.epsilon_high_prime))
                inside_mode = inside | outer
            else:
                inside_mode = torch.ones_like(inside)
            keep = inside_mode.to(lp.dtype)
            metrics["clip_fraction"] = float(ops.masked_mean(1 - keep, mask))
            if c.weight == "importance_sampling":
                w = adv * ratio
        if c.weight == "advantage":
            w = adv * torch.exp(adv / c.temp)
        per_token = -w * lp * keep * self.policy_scale()
        if c.regularizer == "k2":
            per_token = per_token + c.tau * (lp - batch.fields["old_logps"]).square()
        return self.finish(per_token, batch, out, metrics)

    def _uses_ratio(self) -> bool:
        c = self.config
        return c.clip_mode != "none" or c.weight == "importance_sampling" or c.regularizer == "k2"

    def policy_scale(self) -> float:
        """Factor on the policy-gradient term; OPMD overrides it with 1/(1 + τ)."""
        return 1.0


@dataclass
class OPMDConfig(RECConfig):
    tau: float = 1.0  # mirror-descent temperature: loss ÷ (1 + τ), and the logavgexp baseline's temperature
    baseline: str = "mean"  # mean | logavgexp
    aggregation: str = "token-mean"

    def __post_init__(self):
        super().__post_init__()
        if (self.clip_mode, self.weight, self.regularizer) != ("none", "none", "none"):
            raise ValueError("OPMD has no clipping, weighting or k2 regulariser: clip_mode, weight and regularizer must "
                             "be none (use rec for those)")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.scale_rewards != "none":
            raise ValueError(f"OPMD advantages are not std-scaled; scale_rewards must be none, got {self.scale_rewards!r}")


class OPMD(REC):
    Config = OPMDConfig

    def __init__(self, config: OPMDConfig):
        super().__init__(config)
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0, groups=True, split_groups=True)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        if c.baseline == "mean":
            return super().prepare(batch)
        rewards, group_ids = batch.fields["rewards"], batch.fields["group_ids"]
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        z = rewards.double() / c.tau
        top = torch.full((len(counts),), -torch.inf, dtype=z.dtype, device=z.device).scatter_reduce(0, inverse, z, "amax")
        sums = torch.zeros_like(top).index_add_(0, inverse, torch.exp(z - top[inverse]))
        baseline = c.tau * (top + sums.log() - counts.to(z.dtype).log())  # τ·log mean exp(R/τ), per group
        batch.fields["advantages"] = (rewards.double() - baseline[inverse]).to(rewards.dtype)
        return batch

    def policy_scale(self) -> float:
        return 1.0 / (1.0 + self.config.tau)
