"""Prioritised prompts: the online source draws each step's prompts with these weights (with replacement only when the
batch is larger than the data) instead of walking a permutation — e.g. SSPO's √(p̂(1−p̂)) priority on uncertain
prompts. ``weights(n_prompts) -> list[float] | None`` is read every step (None: uniform)."""

from __future__ import annotations

from typing import Callable

from tokalign.sampling.base import Hook


class PrioritisedPrompts(Hook):
    name = "prioritised_prompts"

    def __init__(self, weights: Callable[[int], list[float] | None]):
        self.weights = weights

    def prompt_weights(self, n_prompts: int) -> list[float] | None:
        return self.weights(n_prompts)
