"""PAR (arXiv:2502.18770): the shaped reward by hand and its limits, prepare (shaping, then GRPO's group advantages), and
a slow run through the real CLI. The reference-samples hook itself: tests/sampling/test_reference_samples.py."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, token_batch
from torch.testing import assert_close

from tokalign.algorithms.par import PAR, PARConfig, par_reward


def test_par_reward_hand_and_limits():
    """k = 1: r = r_ref ⇒ 0.5; r = 1 against references (0, 1) ⇒ (σ(1) + 0.5)/2 = 0.615529; bounded in (0, 1) and
    monotone in r."""
    assert_close(par_reward(torch.tensor([0.3]), torch.tensor([[0.3, 0.3]]), 1.0), torch.tensor([0.5]))
    assert_close(par_reward(torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]), 1.0), torch.tensor([(1 / (1 + math.exp(-1)) + 0.5) / 2]))
    r = torch.linspace(-10, 10, 101)
    shaped = par_reward(r, torch.zeros(101, 3), 1.0)
    assert bool((shaped > 0).all() and (shaped < 1).all() and (shaped.diff() >= 0).all())


def test_par_prepare_shapes_then_group_advantages():
    """Two samples of one prompt, R = (2, 0), references (1,): shaped (σ(1), σ(−1)) → GRPO's ±0.7071."""
    algo = PAR(PARConfig(num_references=1))
    assert [h.count for h in algo.needs.hooks if h.name == "reference_samples"] == [1]
    assert algo.needs.reference and algo.needs.data == ("online",)
    batch = token_batch(torch.ones(2, 1), {"rewards": torch.tensor([2.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                           "ref_reward_0": torch.tensor([1.0, 1.0])})
    algo.prepare(batch)
    assert_close(batch.fields["rewards"], torch.sigmoid(torch.tensor([1.0, -1.0])))
    assert_close(batch.fields["advantages"], torch.tensor([0.70710, -0.70710]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_par(tmp_path):
    out = tmp_path / "par"
    cli("train", "par", "--data", "arith", "--n", "4", "--set", "algorithm.num_references=2", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(0 <= m["reward/reference_mean"] <= 1 for m in metrics)
