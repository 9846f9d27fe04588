"""Dynamic sampling (DAPO, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476): keep
only groups whose rewards differ — a group of equal rewards has zero advantages and teaches nothing relative — and
resample fresh prompts, up to ``rollout.max_sampling_rounds`` rounds, to refill the batch. On scored data the same
filter drops such groups."""

from __future__ import annotations

from tokalign.sampling.base import Hook


def informative(group: list[dict]) -> bool:
    """A group teaches something relative only if its rewards differ."""
    return len({float(r["reward"]) for r in group}) > 1


class DynamicSampling(Hook):
    name = "dynamic_sampling"

    def accept(self, group: list[dict]) -> bool:
        return informative(group)

    def rounds(self, rollout_config) -> int:
        return rollout_config.max_sampling_rounds

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        return {"sampling/rounds": ctx.rounds_used, "sampling/informative_groups": ctx.accepted_groups}
