"""Reinforce-Ada — "Reinforce-Ada: An Adaptive Sampling Framework for Reinforce-Style LLM Training",
Xiong et al. 2025 (arXiv:2510.04996 — id not re-checked offline). Sampling is adaptive per prompt: round after round, every prompt whose
pool of samples does not yet satisfy the stop rule gets ``round_n`` more; then its pool is down-sampled to a
group of ``rollout.n``, and the advantage's baseline comes from the whole pool (``global_stat_est``).

Stop rules (a sample is positive when R ≥ positive_threshold):
- ``balanced``: ≥ ⌊n/2⌋ positives and ≥ n − ⌊n/2⌋ negatives; the group keeps that many of each.
- ``positive_focused``: ≥ 1 positive; the group keeps up to ⌊n/2⌋ positives and fills with negatives.
A prompt still unfinished after ``max_rounds`` keeps what its pool has, filled from the larger side.

    A_i = (R_i − mean_pool R) [/ (std_pool R + eps)]      (scale_rewards none = the recipe's norm_adv_by_std false)
    loss = GRPO's PPO-clip surrogate (recipe: ε 0.2 / 0.28, token-mean, no KL)

Official code: RLHFlow/Reinforce-Ada ``verl/trainer/ppo/ray_trainer.py`` (multi-round adaptive down-sampling),
``verl/trainer/ppo/core_algos.py`` (GRPO with global statistics), ``scripts/run_reinforce_ada.sh`` (defaults).
Balanced selection leaves no all-equal group unless a prompt never produced both kinds within ``max_rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign.algorithms.grpo import GRPO, GRPOConfig
import dataclasses

from tokalign.protocols import TokenBatch
from tokalign.sampling import AdaptiveSampling

CHOICES = ("balanced", "positive_focused")


@dataclass
class ReinforceAdaConfig(GRPOConfig):
    epsilon_high: float = 0.28
    scale_rewards: str = "none"
    choice: str = "balanced"
    max_rounds: int = 4
    round_n: int = 8  # samples per unfinished prompt per round
    positive_threshold: float = 0.7

    def __post_init__(self):
        super().__post_init__()
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        if self.max_rounds < 1 or self.round_n < 1:
            raise ValueError("max_rounds and round_n must be ≥ 1")
        if self.scale_rewards == "batch":
            raise ValueError("scale_rewards must be group or none (the baseline is the prompt's whole pool)")


@dataclass
class Selection:
    """Reinforce-Ada's stop-and-select rule for ``sampling.AdaptiveSampling``: ``select(pool, n, final)`` returns the
    group to train on, or None to keep sampling."""

    choice: str
    max_rounds: int
    round_n: int
    positive_threshold: float

    def select(self, pool: list[dict], n: int, final: bool) -> list[dict] | None:
        pos = [r for r in pool if float(r["reward"]) >= self.positive_threshold]
        neg = [r for r in pool if float(r["reward"]) < self.positive_threshold]
        half = n // 2
        if self.choice == "balanced":
            ready = len(pos) >= half and len(neg) >= n - half
        else:
            ready = len(pos) >= 1
        if not (ready or final):
            return None
        take_pos = min(len(pos), half if len(neg) >= n - half else n - len(neg))
        return pos[:take_pos] + neg[: n - take_pos]


class ReinforceAda(GRPO):
    Config = ReinforceAdaConfig

    def __init__(self, config: ReinforceAdaConfig):
        super().__init__(config)
        rule = Selection(config.choice, config.max_rounds, config.round_n, config.positive_threshold)
        self.needs = dataclasses.replace(self.needs, hooks=(*self.needs.hooks, AdaptiveSampling(rule.select, config.max_rounds, config.round_n)))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        if "pool_mean" not in f:  # offline (scored) data: the group is the pool
            return super().prepare(batch)
        adv = f["rewards"] - f["pool_mean"]
        if c.scale_rewards == "group":
            adv = adv / (f["pool_std"] + c.adv_eps)
        f["advantages"] = adv
        return batch
