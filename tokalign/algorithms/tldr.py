"""TLDR — "Making Small Language Models Efficient Reasoners: Intervention, Supervision, Reinforcement" (first titled
"Efficient Small Reasoning Models via Response Length Control" and variants), Zhang, Huang, Ni, Xiong, Chen, Oymak
2025, arXiv:2505.07961 (no official code found). A length-regularised GRPO with several length levels (short,
medium, long): each prompt is trained under one level's budget, so one model learns to reason at the level asked.

Shapes: ``rewards`` (the run's ``--reward`` total, a correctness reward), ``group_ids``, ``prompt_index``,
``length_level`` (optional): [B]; mask: [B, T] (|y_i| is its row sum); ``logps``, ``old_logps``, ``ref_logps``: [B, T].

With K levels, budgets B_1..B_K and weights w_1..w_K, row i's level k_i is

    the row's ``length_level`` field (1-based: 1 … K; 0 = not given)        when the data or a hook set it
    else ``assign``: a level name for every prompt, or ``cycle``: prompt_index mod K (group id for rows without one),
         so each prompt keeps its level across steps and the levels share the data evenly

    p_i  = min(1, max(0, |y_i| − B_k) / B_k)          (``length_curriculum.over_budget``: 0 within the level's budget)
    R'_i = R_i − w_k · p_i                              then GRPO on R': A_i = (R'_i − mean_g R') / (std_g R' + eps)

Limits: every w_k = 0 is GRPO bit for bit; one level is ``length_curriculum`` with a fixed budget (γ = 1).

⚠ unchecked: the paper's penalty form, its levels' budgets and weights were not readable offline (abstract and
summaries only: "length-regularised GRPO … multi-level trace length control (short, medium, long)"). The levels'
budgets 1024 / 2048 / 4096 tokens, w = 1 and the over-budget penalty p are tokalign's readings. Departure (the seam):
the paper tells the model its level in the prompt; here the level is a per-row field, so a run that wants the model to
*follow* a level must render the level's instruction into the prompt (a data field or a sampling hook that rewrites
the prompt and calls ``set_field(row, "length_level", k)``); with ``cycle`` and unchanged prompts the model sees no cue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.length_curriculum import over_budget
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

LEVEL_FIELD = "length_level"


@dataclass
class TLDRConfig(GRPOConfig):
    levels: list[str] = field(default_factory=lambda: ["short", "medium", "long"])
    budgets: list[float] = field(default_factory=lambda: [1024.0, 2048.0, 4096.0])  # B_k, tokens, one per level
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # w_k, one per level
    assign: str = "cycle"  # cycle (prompt_index mod K) | a level name (every prompt)

    def __post_init__(self):
        super().__post_init__()
        k = len(self.levels)
        if not k or len(set(self.levels)) != k or "cycle" in self.levels:
            raise ValueError(f"levels must be distinct names (not 'cycle'), at least one, got {self.levels!r}")
        if len(self.budgets) != k or len(self.weights) != k:
            raise ValueError(f"budgets and weights need one value per level ({k}: {', '.join(self.levels)}); "
                             f"got {len(self.budgets)} budgets, {len(self.weights)} weights")
        if any(not b > 0 for b in self.budgets) or any(w < 0 for w in self.weights):
            raise ValueError(f"budgets must be > 0 and weights ≥ 0, got budgets={self.budgets}, weights={self.weights}")
        if self.assign != "cycle" and self.assign not in self.levels:
            raise ValueError(f"assign must be 'cycle' or one of the levels ({', '.join(self.levels)}), got {self.assign!r}")


class TLDR(GRPO):
    Config = TLDRConfig

    def levels_of(self, batch: TokenBatch) -> torch.Tensor:
        """k_i − 1 per row [B] (long), from the ``length_level`` field, else ``assign``."""
        c, f = self.config, batch.fields
        k, gids = len(c.levels), f["group_ids"]
        if c.assign == "cycle":
            prompts = f.get("prompt_index", torch.full_like(gids, -1))
            level = torch.where(prompts >= 0, prompts, gids).long() % k
        else:
            level = torch.full_like(gids, c.levels.index(c.assign), dtype=torch.long)
        if LEVEL_FIELD in f:
            given = f[LEVEL_FIELD].round().long()
            if bool(((given < 0) | (given > k)).any()):
                raise ValueError(f"length_level must be 1 … {k} (0: not given), got {sorted(set(given.tolist()))}")
            level = torch.where(given > 0, given - 1, level)
        return level

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        r = f["rewards"]
        level = self.levels_of(batch)
        budgets = torch.tensor(c.budgets, dtype=r.dtype, device=r.device)[level]
        weights = torch.tensor(c.weights, dtype=r.dtype, device=r.device)[level]
        p = over_budget(batch.completion_mask.sum(-1).to(r.dtype), budgets)
        f["raw_rewards"], f["over_budget"], f["level"] = r, p, level.to(r.dtype)
        if any(w > 0 for w in c.weights):
            f["rewards"] = r - weights * p
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        f = batch.fields
        for k, name in enumerate(self.config.levels):
            rows = f["level"] == k
            if bool(rows.any()):
                result.metrics[f"tldr/{name}_over_budget_fraction"] = float((f["over_budget"][rows] > 0).float().mean())
        return result
