"""The base class of batch components: every method of ``tokalign.protocols.BatchComponent`` as a no-op."""

from __future__ import annotations

from typing import Any

from tokalign.protocols import PolicyOutput, TokenBatch


class Component:
    name: str = "component"
    provides: tuple[str, ...] = ()
    forward_outputs: tuple[str, ...] = ()

    def roles(self) -> dict[str, bool]:
        return {}

    def describe(self) -> str:
        return ""

    def setup(self, ctx: Any) -> None:
        pass

    def parameters(self) -> list:
        return []

    def models(self) -> list:
        return []

    def fill(self, batch: TokenBatch, ctx: Any) -> dict[str, float]:
        return {}

    def on_forward(self, batch: TokenBatch, out: PolicyOutput, ctx: Any) -> None:
        pass

    def save(self, directory: Any) -> None:
        pass
