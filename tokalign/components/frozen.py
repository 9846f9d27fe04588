"""An extra frozen model named by role (a DPO teacher, a margin model, …): ``fields["<role>_logps"]`` [B, T], and for
full-vocabulary algorithms its logits per training micro-batch in ``PolicyOutput.extra_logits[role]``."""

from __future__ import annotations

from tokalign.components.base import Component
from tokalign.forward import reference_logits


class FrozenModel(Component):
    def __init__(self, role: str, full_vocab: bool = False):
        self.role, self.full_vocab = role, full_vocab
        self.name, self.provides = role, (f"{role}_logps",)
        self.model = None

    def roles(self) -> dict[str, bool]:
        return {self.role: True}

    def describe(self) -> str:
        return f"{self.role} (frozen)"

    def setup(self, ctx) -> None:
        self.model = ctx.load_model(ctx.cfg.models[self.role])

    def models(self) -> list:
        return [self.model]

    def fill(self, batch, ctx) -> dict:
        batch.fields[f"{self.role}_logps"] = ctx.frozen_logps(self.model, batch)
        return {}

    def on_forward(self, batch, out, ctx) -> None:
        if self.full_vocab:
            out.extra_logits[self.role] = reference_logits(self.model, batch)
