"""GRPO — "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
Shao et al. 2024, arXiv:2402.03300. With switches that make Dr.GRPO ("Understanding R1-Zero-Like
Training: A Critical Perspective", Liu et al. 2025, arXiv:2503.20783) and DAPO ("DAPO: An
Open-Source LLM Reinforcement Learning System at Scale", Yu et al. 2025, arXiv:2503.14476)
configurations of this one module.

Shapes: ``rewards``, ``group_ids``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i = (R_i − mean_g R) / (std_g R + eps)          (scale_rewards="group"; "none" = Dr.GRPO)
    L_t = max(−A_i ρ_t, −A_i clip(ρ_t, 1−ε_low, 1+ε_high)) + β·KL_t,   ρ_t = exp(ℓ_t − ℓ^old_t)
    loss = aggregate(L, mask, aggregation)

DAPO's dynamic sampling drops all-equal groups (online: resamples to refill the batch); its overlong
reward shaping is a reward, ``--reward exact_match --reward overlong`` (tokalign/rewards/overlong.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch
from tokalign.sampling import DynamicSampling


@dataclass
class GRPOConfig:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # KL coefficient; > 0 loads the reference model (paper: 0.04)
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    scale_rewards: str = "group"  # group | batch | none
    adv_eps: float = 1e-6
    # sampler/trainer mismatch (vLLM samples, transformers trains): truncated importance sampling, none | token | sequence
    mismatch_correction: str = "none"
    mismatch_cap: float = 2.0

    def __post_init__(self):
        if self.kl_estimator not in ops.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(ops.KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError("epsilon_low, epsilon_high and beta must be ≥ 0")
        if self.mismatch_correction not in ("none", "token", "sequence"):
            raise ValueError(f"mismatch_correction must be none, token or sequence, got {self.mismatch_correction!r}")
        if self.mismatch_cap <= 0:
            raise ValueError(f"mismatch_cap must be > 0, got {self.mismatch_cap}")


class GRPO:
    Config = GRPOConfig

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0, groups=True, old_logps=True, split_groups=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        batch.fields["advantages"] = ops.group_advantages(batch.fields["rewards"], batch.fields["group_ids"], c.scale_rewards, c.adv_eps)
        return batch

    def behaviour_logps(self, batch: TokenBatch, out: PolicyOutput):
        """The ℓ^old of ρ_t = exp(ℓ_t − ℓ^old_t), [B, T]; variants (GSPO) override this hook."""
        return batch.fields["old_logps"]

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        adv = batch.fields["advantages"]
        adv = adv if adv.dim() == 2 else adv.unsqueeze(-1)  # per token [B, T] (TEMPO, ...) or per row [B]
        old = self.behaviour_logps(batch, out)
        per_token, clipped = ops.clipped_surrogate(out.logps, old, adv, c.epsilon_low, c.epsilon_high)
        metrics = {"clip_fraction": float(ops.masked_mean(clipped.float(), mask)),
                   "advantage/abs_mean": float(ops.masked_mean(adv.abs().expand_as(mask), mask))}
        return self.finish(per_token, batch, out, metrics)

    def finish(self, per_token, batch: TokenBatch, out: PolicyOutput, metrics: dict) -> LossOutput:
        """Correct for sampler/trainer mismatch, add β·KL to the reference (when β > 0) and aggregate: the tail every
        GRPO variant shares."""
        c, f, mask = self.config, batch.fields, batch.completion_mask
        if "sampler_logps" in f and "old_logps" in f:  # the trainer's log-probs of the sampled tokens vs the sampler's
            gap = (f["old_logps"] - f["sampler_logps"]) * mask
            metrics["mismatch/logp_gap_abs"] = float(ops.masked_mean(gap.abs(), mask))
            if c.mismatch_correction != "none":
                w = ops.truncated_is_weights(f["old_logps"], f["sampler_logps"], mask, c.mismatch_correction, c.mismatch_cap)
                per_token = per_token * w
                metrics["mismatch/is_weight_mean"] = float(ops.masked_mean(w, mask))
        if c.beta > 0:
            kl = ops.kl_penalty(out.logps, batch.fields["ref_logps"], c.kl_estimator)
            per_token = per_token + c.beta * kl
            metrics["kl"] = float(ops.masked_mean(kl.detach(), batch.completion_mask))
        return LossOutput(batch.aggregate(per_token, c.aggregation), metrics)


@dataclass
class DrGRPOConfig(GRPOConfig):
    scale_rewards: str = "none"
    aggregation: str = "seq-mean-token-sum-norm"


class DrGRPO(GRPO):
    """Dr.GRPO: no std scaling of advantages, a constant length normaliser (arXiv:2503.20783)."""

    Config = DrGRPOConfig


@dataclass
class DAPOConfig(GRPOConfig):
    epsilon_high: float = 0.28
    aggregation: str = "token-mean"
    dynamic_sampling: bool = True  # drop all-equal groups; online, resample (rollout.max_sampling_rounds)


class DAPO(GRPO):
    """DAPO's clip-higher, token-level loss and dynamic sampling (arXiv:2503.14476)."""

    Config = DAPOConfig

    def __init__(self, config: DAPOConfig):
        super().__init__(config)
        if config.dynamic_sampling:
            self.needs = dataclasses.replace(self.needs, hooks=(*self.needs.hooks, DynamicSampling()))
