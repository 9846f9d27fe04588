"""DARS — Difficulty Adaptive Rollout Sampling, "Depth-Breadth Synergy in RLVR: Unlocking LLM Reasoning Gains with
Adaptive Exploration", Yang, Guo, Huang, Wang, Xie, Wang, Liang, Tang 2025, arXiv:2508.13755. GRPO's cumulative
advantage Σ_i |A_i| of a group is largest at accuracy ½ and small for hard prompts; DARS gives each hard prompt a second
round of rollouts, sized so that its cumulative advantage reaches a target ("depth"), and trains on the whole pool.

Per prompt, on the first round's N = ``rollout.n`` samples with accuracy a = mean R (rewards in [0, 1]):

    a ← ½/N if a = 0;   ΔN = 0 if a ≥ ½, else
    S(a) = 2a(1 − a), A_peak = N/2           (scale_rewards none: A = R − mean)
    S(a) = 2√(a(1 − a)), A_peak = N          (scale_rewards group: A = (R − mean) / std)
    equal treatment (ET):    ΔN = ⌈(A_peak − N·S(a)) / S(a)⌉
    hardness weighted (HW):  ΔN = ⌈(2(1 − a)·A_peak − N·S(a)) / S(a)⌉,    both capped at N_max − N
    group = all N + ΔN samples; groups with pool accuracy 0 or ≥ ``upper_threshold`` are dropped
    A_i = R_i − mean_group R [/ (std + eps)],   loss = GRPO's PPO-clip surrogate

Shapes: ``rewards``, ``group_ids``: [B] (groups of varying size N + ΔN); ``logps``, ``old_logps``, mask: [B, T].

Checked against the official code, yangzhch6/DARS: ``verl/verl/trainer/ppo/ray_dars_trainer.py`` (``schedule_ET``,
``schedule_HW``, the second sampling and the (0, upper_threshold) filter in ``fit``), ``verl/verl/trainer/ppo/core_algos.py``
(GRPO advantage, ``use_std``), ``experiments/DARS-1.5B-{ET,HW}-Breadth.sh`` (defaults: N = 8, N_max 32 for ET and 64 for
HW, no std, no KL, ε = 0.2) and ``verl/verl/trainer/config/ppo_trainer.yaml`` (``use_token_level_loss``: per-token sum
over the padded response length, which is ``seq-mean-token-sum-norm`` here). "Breadth" (DARS-B) is a run setting, not
a loss: a large ``--batch-size`` updated as one batch (tokalign's default) for ``train.updates_per_batch=2`` epochs.
Not here: verl's entropy bonus (entropy_coeff 0.001 in its default config) — tokalign's GRPO family has none.
Limit: ``n_max`` = N draws no second round: the batch is one plain round of N (less the groups all right or all
wrong, as DAPO drops them, without refill) and the loss is GRPO's with the same settings, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.sampling import AdaptiveSampling

SCHEDULES = ("ET", "HW")


@dataclass
class DARSConfig(GRPOConfig):
    scale_rewards: str = "none"  # the scripts' grpo_use_std=False
    aggregation: str = "seq-mean-token-sum-norm"  # verl's use_token_level_loss: Σ m·L / response length
    schedule: str = "ET"  # ET (resampling_func=1) | HW (resampling_func=2)
    n_max: int = 32  # most samples per prompt, both rounds (the HW scripts use 64)
    upper_threshold: float = 1.0  # groups whose pool accuracy is ≥ this (or 0) are dropped

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.scale_rewards == "batch":
            raise ValueError("scale_rewards must be none or group (DARS's schedule is derived for those two)")
        if self.n_max < 1:
            raise ValueError(f"n_max must be ≥ 1, got {self.n_max}")


def extra_rollouts(acc: float, n: int, n_max: int, schedule: str = "ET", std: bool = False) -> int:
    """ΔN, the second round's samples for a prompt whose first ``n`` samples have accuracy ``acc``."""
    if not -1e-9 <= acc <= 1 + 1e-9:
        raise UserError(f"dars needs rewards in [0, 1] (an accuracy), got a group mean of {acc}. Use a 0/1 reward such "
                        "as exact_match.")
    acc = 0.5 / n if acc <= 1e-6 else acc
    if acc >= 0.5:
        return 0
    s = 2 * math.sqrt(acc * (1 - acc)) if std else 2 * acc * (1 - acc)
    peak = n if std else 0.5 * n
    target = peak if schedule == "ET" else 2 * (1 - acc) * peak
    return max(0, min(math.ceil((target - n * s) / s), n_max - n))


def _accuracy(rows: list[dict]) -> float:
    return sum(float(r["reward"]) for r in rows) / len(rows)


@dataclass
class Schedule:
    """DARS's two rounds for ``sampling.AdaptiveSampling``: N samples, then ΔN(accuracy of those N)."""

    n_max: int
    schedule: str
    std: bool
    upper_threshold: float

    def round_n(self, pool: list[dict], n: int) -> int:
        return n if not pool else extra_rollouts(_accuracy(pool[:n]), n, self.n_max, self.schedule, self.std)

    def select(self, pool: list[dict], n: int, final: bool) -> list[dict] | None:
        if len(pool) < n:
            return pool if final else None
        want = n + extra_rollouts(_accuracy(pool[:n]), n, self.n_max, self.schedule, self.std)
        return pool if final or len(pool) >= want else None

    def keep(self, group: list[dict]) -> bool:
        return 0 < _accuracy(group) < self.upper_threshold


class DARS(GRPO):
    Config = DARSConfig

    def __init__(self, config: DARSConfig):
        super().__init__(config)
        rule = Schedule(config.n_max, config.schedule, config.scale_rewards == "group", config.upper_threshold)
        hook = AdaptiveSampling(rule.select, 2, rule.round_n, keep=rule.keep)
        self.needs = dataclasses.replace(self.needs, hooks=(*self.needs.hooks, hook))
