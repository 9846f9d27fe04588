"""Rewards that break the reward contract, for the bad-input corpus (``-r bad_rewards:NAME``, this folder on PYTHONPATH)."""

from __future__ import annotations

from tokalign.protocols import Reward


def nan(samples):
    return [float("nan") for _ in samples]


def inf(samples):
    return [float("-inf") for _ in samples]


def none(samples):
    return [None for _ in samples]


def text(samples):
    return ["good" for _ in samples]


def long_tokens(samples):
    """One token value too many."""
    return [Reward(1.0, [0.5] * (len(s.completion_ids) + 1)) for s in samples]


def nan_tokens(samples):
    return [Reward(1.0, [float("nan")] * len(s.completion_ids)) for s in samples]
