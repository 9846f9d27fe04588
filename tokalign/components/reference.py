"""The frozen reference model's per-token log-probs, ``fields["ref_logps"]`` [B, T] (and, for full-vocabulary
algorithms, its logits per training micro-batch in ``PolicyOutput.ref_logits``)."""

from __future__ import annotations

from tokalign.components.base import Component
from tokalign.forward import reference_logits


class Reference(Component):
    name = "reference"
    provides = ("ref_logps",)

    def __init__(self, full_vocab: bool = False):
        self.full_vocab = full_vocab
        self.model = None

    def describe(self) -> str:
        return "reference"

    def setup(self, ctx) -> None:
        self.model = ctx.reference_model()

    def models(self) -> list:
        return [self.model]

    def fill(self, batch, ctx) -> dict:
        batch.fields["ref_logps"] = ctx.frozen_logps(self.model, batch)
        return {}

    def on_forward(self, batch, out, ctx) -> None:
        if self.full_vocab:  # per micro-batch, chunk by chunk where the head allows
            out.ref_logits = reference_logits(self.model, batch)
