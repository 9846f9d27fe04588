"""e1 / Adaptive Effort Control (AEC) — "e1: Learning Adaptive Control of Reasoning Effort", Kleinman, Trager,
Achille, Xia, Soatto 2025, arXiv:2510.27042 (no official code found). The policy learns to answer with a user-set
fraction r of the *current average* chain-of-thought length of each query, instead of an absolute token budget, so
the budget adapts to the query's difficulty and to the training phase.

Shapes: ``rewards`` (the run's ``--reward`` total, a correctness reward), ``group_ids``, ``prompt_index`` (stable
across steps), ``effort`` (optional, r per row): [B]; mask: [B, T] (ℓ_i = |y_i| is its row sum); ``logps``,
``old_logps``, ``ref_logps``: [B, T].

Per prompt x (keyed by ``prompt_index``), a running average of its completions' lengths, updated at every step that
samples it, then the reward, then GRPO:

    T_avg(x) ← m · T_avg(x) + (1 − m) · mean_{i∈x} ℓ_i        (first visit: T_avg(x) = mean_{i∈x} ℓ_i)
    R'_i     = R_i · 1[ℓ_i / T_avg(x_i) ≤ r_i]                (reward only when within the fraction r of the average)
    A_i      = (R'_i − mean_g R') / (std_g R' + eps)           (GRPO's)

r_i is the row's ``effort`` field where the batch has one (> 0), else ``effort``. Rows without a prompt index (−1) use
their group's mean length of this step and leave no state. T_avg is the algorithm's state: it resumes with the run
(``state_dict``). Limit: r → ∞ (any r ≥ the largest ℓ/T_avg) is GRPO bit for bit.

Defaults: r = 0.5 and m = 0.9 are tokalign's. ⚠ unchecked: the paper's reward was read from its abstract and a
third-party summary ("reward only when ℓ(h)/T_avg(x_r) stays below r"); how T_avg is maintained (running mean, EMA,
per epoch), the distribution r is drawn from in training and the prompt template that states it were not readable
offline. Departures: the paper appends r to the prompt (x_r) and samples it per query; here r is fixed by
``effort`` unless a sampling hook or the data writes a per-row ``effort`` field (the seam: a hook that renders the
prompt with its r and ``set_field(row, "effort", r)``); ℓ counts the whole completion, not only the thinking trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class E1Config(GRPOConfig):
    effort: float = 0.5  # r: the fraction of the prompt's running average length that still earns the reward
    avg_momentum: float = 0.9  # m: T_avg ← m T_avg + (1 − m) · this step's mean (0 = this step's mean only)

    def __post_init__(self):
        super().__post_init__()
        if not self.effort > 0:
            raise ValueError(f"effort must be > 0 (a fraction of the average length; large = no length pressure), got {self.effort}")
        if not 0 <= self.avg_momentum < 1:
            raise ValueError(f"avg_momentum must be in [0, 1), got {self.avg_momentum}")


class E1(GRPO):
    Config = E1Config

    def __init__(self, config: E1Config):
        super().__init__(config)
        self.averages: dict[int, float] = {}  # prompt index -> T_avg
        self.used: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"averages": {str(k): v for k, v in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.averages = {int(k): float(v) for k, v in state["averages"].items()}

    def update_averages(self, lengths: torch.Tensor, prompt_index: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """T_avg per row [B] (float64) after this step's update; rows of index −1 get their group's mean, unstored."""
        m = self.config.avg_momentum
        out = torch.empty(len(lengths), dtype=torch.float64)
        rows: dict[tuple, list[int]] = {}
        for i, (p, g) in enumerate(zip(prompt_index.tolist(), group_ids.tolist())):
            rows.setdefault(("p", p) if p >= 0 else ("g", g), []).append(i)
        x = lengths.double().cpu()
        for (kind, key), idx in rows.items():
            mean = float(x[idx].mean())
            if kind == "p":
                old = self.averages.get(key)
                mean = mean if old is None else m * old + (1 - m) * mean
                self.averages[key] = mean
            out[idx] = mean
        return out.to(lengths.device)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        r = f["rewards"]
        lengths = batch.completion_mask.sum(-1).to(torch.float64)
        prompts = f.get("prompt_index", torch.full_like(f["group_ids"], -1))
        avg = self.update_averages(lengths, prompts, f["group_ids"])
        effort = torch.full_like(avg, self.config.effort)
        if "effort" in f:  # a row without its own r has 0 there (collate's default): it keeps the configured one
            effort = torch.where(f["effort"].double() > 0, f["effort"].double(), effort)
        within = lengths / avg.clamp(min=1e-12) <= effort
        f["raw_rewards"], f["effort_average"], f["within_effort"] = r, avg.to(r.dtype), within.to(r.dtype)
        if not bool(within.all()):
            f["rewards"] = torch.where(within, r, torch.zeros_like(r))
        self.used = {"e1/within_fraction": float(within.double().mean()), "e1/average_length": float(avg.mean()),
                     "e1/prompts_tracked": float(len(self.averages))}
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **{k: v for k, v in self.used.items() if math.isfinite(v)}})
