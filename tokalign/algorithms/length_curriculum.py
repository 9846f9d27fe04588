"""Curriculum GRPO — "Train Long, Think Short: Curriculum Learning for Efficient Reasoning", Hammoud, Alhamoud,
Hammoud, Bou-Zeid, Ghassemi, Ghanem 2025, arXiv:2508.08940 (official code hammoudhasan/curriculum_grpo, not in the
index). GRPO whose length term's token budget starts generous and shrinks over training: the policy first finds
strategies that work, then compresses them.

Shapes: ``rewards`` (the run's ``--reward`` total: correctness, plus ``format`` for the paper's tag term),
``group_ids``, ``train_step``: [B]; mask: [B, T] (|y_i| is its row sum); ``logps``, ``old_logps``, ``ref_logps``:
[B, T].

    k    = ⌊t / T⌋                                   (t: the training step, 0-based; T: ``decay_interval``)
    B(t) = max(B_min, B_0 · γ^k)                     schedule exponential (the paper's: max(1, B_0 γ^⌊t/T⌋))
           max(B_min, B_0 · (1 − k (1 − γ)))         schedule linear (the same first cut, then equal cuts)
    p_i  = min(1, max(0, |y_i| − B(t)) / B(t))      over-budget penalty, in [0, 1]; 0 within the budget
    R'_i = R_i − w · p_i                             then GRPO on R': A_i = (R'_i − mean_g R') / (std_g R' + eps)

The step t comes from ``TrainStep``, a batch component that writes the loop's step into ``train_step`` (so the budget
resumes with the run without state of its own). p is the ``length`` reward's linear mode with free_len = B and
max_len = 2B (−w·p = that reward with penalty w, for completions up to 2B tokens; the clamp at 1 keeps it bounded).

Defaults: B_0 = 256 tokens (the paper's starting budget in its GSM8K/MATH500 runs, per third-party summaries), B_min = 1
(the paper's max(1, ·)), schedule exponential (the paper's main schedule; linear is its ablation). Limits: γ = 1 keeps
B = B_0 — the fixed-budget baseline, i.e. GRPO on R + the ``length`` reward (linear, free_len = B_0, max_len = 2B_0,
penalty = w); w = 0 is GRPO bit for bit.

⚠ unchecked: the paper's reward formula could not be read offline (only its abstract and summaries: three terms —
verifier correctness, length efficiency against the budget, format tags). The penalty's shape p, the weight w = 0.5,
γ = 0.7 and T = 25 steps (the paper's overview figure shows γ = 0.7; its interval is not known here) are tokalign's
readings; the linear schedule's form is ours. The paper counts the thinking trace's tokens; here |y| is the whole
completion (the loss mask's tokens).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components.train_step import TrainStep, step_of
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

SCHEDULES = ("exponential", "linear")


def over_budget(lengths: torch.Tensor, budget: torch.Tensor | float) -> torch.Tensor:
    """p = min(1, max(0, |y| − B) / B), [B] from lengths [B] and a budget (a number or per row [B])."""
    b = torch.as_tensor(budget, dtype=lengths.dtype, device=lengths.device)
    return ((lengths - b).clamp(min=0) / b).clamp(max=1)


def budget_at(step: int, start: float, gamma: float, interval: int, minimum: float, schedule: str = "exponential") -> float:
    """B(t): the token budget of step ``step``."""
    k = step // interval
    b = start * gamma ** k if schedule == "exponential" else start * (1 - k * (1 - gamma))
    return max(minimum, b)


@dataclass
class LengthCurriculumConfig(GRPOConfig):
    initial_budget: float = 256.0  # B_0, tokens
    min_budget: float = 1.0  # B_min: the budget never goes below it
    decay_factor: float = 0.7  # γ ∈ (0, 1]; 1 = a fixed budget
    decay_interval: int = 25  # T: steps between two cuts
    schedule: str = "exponential"  # exponential | linear
    length_weight: float = 0.5  # w

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor must be in (0, 1] (1 = a fixed budget), got {self.decay_factor}")
        if isinstance(self.decay_interval, bool) or not isinstance(self.decay_interval, int) or self.decay_interval < 1:
            raise ValueError(f"decay_interval must be a whole number of steps ≥ 1, got {self.decay_interval!r}")
        if not (self.min_budget > 0 and math.isfinite(self.initial_budget) and self.initial_budget >= self.min_budget):
            raise ValueError(f"budgets must satisfy 0 < min_budget ≤ initial_budget, got min_budget={self.min_budget}, "
                             f"initial_budget={self.initial_budget}")
        if self.length_weight < 0:
            raise ValueError(f"length_weight must be ≥ 0 (0 = GRPO), got {self.length_weight}")


class LengthCurriculum(GRPO):
    Config = LengthCurriculumConfig

    def __init__(self, config: LengthCurriculumConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, TrainStep()))
        self.budget = float(config.initial_budget)

    def budget_of(self, step: int) -> float:
        c = self.config
        return budget_at(step, c.initial_budget, c.decay_factor, c.decay_interval, c.min_budget, c.schedule)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        r = f["rewards"]
        self.budget = self.budget_of(step_of(batch))
        p = over_budget(batch.completion_mask.sum(-1).to(r.dtype), self.budget)
        f["raw_rewards"], f["over_budget"] = r, p
        if self.config.length_weight > 0:
            f["rewards"] = r - self.config.length_weight * p
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        result.metrics["curriculum/budget"] = self.budget
        result.metrics["curriculum/over_budget_fraction"] = float((batch.fields["over_budget"] > 0).float().mean())
        return result
