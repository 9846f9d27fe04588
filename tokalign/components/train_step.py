"""The train loop's step as a batch field, for algorithms whose loss follows a schedule over steps or seeds its own
draws by step (the loop's step is restored on resume, so such an algorithm needs no state of its own), and the run's
total steps T for schedules that end with the run."""

from __future__ import annotations

import torch

from tokalign.components.base import Component
from tokalign.protocols import TokenBatch

STEP_FIELD = "train_step"
TOTAL_FIELD = "train_total_steps"


class TrainStep(Component):
    """Writes the train loop's step (0-based) into ``batch.fields["train_step"]`` [B]."""

    name = "train_step"
    provides = (STEP_FIELD,)

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        ids = batch.input_ids
        batch.fields[STEP_FIELD] = torch.full((ids.shape[0],), float(ctx.step), device=ids.device)
        return {}


def step_of(batch: TokenBatch) -> int:
    """The step that ``TrainStep`` wrote (0 when the batch has none: a hand-made batch)."""
    f = batch.fields.get(STEP_FIELD)
    return int(f[0]) if f is not None and f.numel() else 0


class TotalSteps(Component):
    """Writes T into ``batch.fields["train_total_steps"]`` [B]: ``total`` if set, else (0) the run's ``train.max_steps``."""

    name = "total_steps"
    provides = (TOTAL_FIELD,)

    def __init__(self, total: int = 0):
        self.total = total

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        total = self.total or int(ctx.cfg.train.max_steps)
        ids = batch.input_ids
        batch.fields[TOTAL_FIELD] = torch.full((ids.shape[0],), float(total), device=ids.device)
        return {}


def total_of(batch: TokenBatch, configured: int = 0) -> int:
    """T: ``configured`` if set, else what ``TotalSteps`` wrote (0 when neither: a hand-made batch)."""
    f = batch.fields.get(TOTAL_FIELD)
    return configured or (int(f[0]) if f is not None and f.numel() else 0)
