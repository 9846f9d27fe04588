"""Reinforce-Ada (arXiv:2510.04996): the balanced and positive-focused selection rules, the pool baseline, and a slow run
of its adaptive sampling rounds through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, token_batch
from torch.testing import assert_close

from tokalign.algorithms.reinforce_ada import ReinforceAda, ReinforceAdaConfig, Selection


def _pool(rewards):
    return [{"id": str(i), "reward": r} for i, r in enumerate(rewards)]


def test_reinforce_ada_balanced_selection():
    """n = 4, balanced: needs 2 positives (R ≥ 0.7) and 2 negatives. (1, 1, 1) → keep sampling; (1, 1, 0, 1, 0) →
    2 positives + 2 negatives; at the last round (1, 1, 1) keeps what it has."""
    a = Selection("balanced", 4, 4, 0.7)
    assert a.select(_pool([1, 1, 1]), 4, final=False) is None
    chosen = a.select(_pool([1, 1, 0, 1, 0]), 4, final=False)
    assert [r["reward"] for r in chosen] == [1, 1, 0, 0]
    assert [r["reward"] for r in a.select(_pool([1, 1, 1]), 4, final=True)] == [1, 1, 1]
    assert [r["reward"] for r in a.select(_pool([1, 0, 0, 0, 0]), 4, final=True)] == [1, 0, 0, 0]


def test_reinforce_ada_positive_focused_selection():
    a = Selection("positive_focused", 4, 4, 0.7)
    assert a.select(_pool([0, 0, 0, 0]), 4, final=False) is None
    assert [r["reward"] for r in a.select(_pool([0, 0, 1, 0, 0]), 4, final=False)] == [1, 0, 0, 0]


def test_reinforce_ada_pool_baseline():
    """A = R − mean_pool (scale_rewards none): pool mean 0.25 → (0.75, −0.25); with group scaling ÷ (pool std + 1e-6).
    Without pool fields (offline scored data) it is GRPO's group advantage."""
    f = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "pool_mean": torch.tensor([0.25, 0.25]),
         "pool_std": torch.tensor([0.5, 0.5])}
    batch = ReinforceAda(ReinforceAdaConfig()).prepare(token_batch(torch.ones(2, 1), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([0.75, -0.25]))
    batch = ReinforceAda(ReinforceAdaConfig(scale_rewards="group")).prepare(token_batch(torch.ones(2, 1), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([0.75, -0.25]) / (0.5 + 1e-6))
    del f["pool_mean"], f["pool_std"]
    batch = ReinforceAda(ReinforceAdaConfig()).prepare(token_batch(torch.ones(2, 1), f))
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_reinforce_ada_adaptive_rounds(tmp_path):
    out = tmp_path / "ada"
    cli("train", "reinforce_ada", "--data", "arith", "--n", "4", "--set", "algorithm.round_n=4", "--set", "algorithm.max_rounds=2",
        "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(1 <= m["sampling/rounds"] <= 2 and m["sampling/pool_size_mean"] >= 4 for m in metrics)
