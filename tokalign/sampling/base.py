"""The base class of sampling hooks: every method of ``tokalign.protocols.SamplingHook`` with its neutral default."""

from __future__ import annotations

from typing import Any


class Hook:
    name: str = "hook"

    def prompt_weights(self, n_prompts: int) -> list[float] | None:
        return None

    def accept(self, group: list[dict]) -> bool:
        return True

    def rounds(self, rollout_config: Any) -> int:
        return 1

    def collect(self, ctx: Any) -> tuple[list[list[dict]], list[dict], dict] | None:
        return None

    def after_batch(self, rows: list[dict], ctx: Any) -> dict[str, float]:
        return {}


def set_field(row: dict, name: str, value: float) -> None:
    """A per-row number for the algorithm: ``batch.fields[name]`` [B]."""
    row["fields"] = {**row.get("fields", {}), name: float(value)}


def set_token_field(row: dict, name: str, values: list[float]) -> None:
    """Per-completion-token numbers for the algorithm: ``batch.fields[name]`` [B, T] at the completion's positions."""
    row["token_fields"] = {**row.get("token_fields", {}), name: list(values)}
