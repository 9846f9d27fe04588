"""SPO (arXiv:2505.23564): the segment cut points by hand, one segment ⇒ R − V(root) with the probability mask, and a slow
run through the real CLI. The segment-rollouts hook itself: tests/sampling/test_segments.py."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, token_batch
from torch.testing import assert_close

from tokalign.algorithms.spo import SPO, SPOConfig, cut_points


def test_spo_cut_points_hand():
    """p = (0.95, 0.5, 0.99, 0.3, 0.2), threshold 0.9: low-probability tokens 1, 3, 4; every 2nd from the first → 1, 4."""
    logps = [math.log(p) for p in (0.95, 0.5, 0.99, 0.3, 0.2)]
    assert cut_points(logps, 0.9, 2) == [1, 4]
    assert cut_points(logps, 0.9, 1) == [1, 3, 4]


def test_spo_one_segment_is_r_minus_root_value_with_probability_mask():
    """No cut: every token gets R − V(root) = 1 − 0.25; a token with π_old = 0.95 > 0.9 gets 0 (probability mask off:
    it keeps 0.75)."""
    f = {"segment_value_start": torch.full((1, 3), 0.25), "segment_value_end": torch.ones(1, 3),
         "sampler_logps": torch.log(torch.tensor([[0.5, 0.95, 0.2]])), "rewards": torch.ones(1), "group_ids": torch.zeros(1)}
    batch = SPO(SPOConfig()).prepare(token_batch(torch.ones(1, 3), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([[0.75, 0.0, 0.75]]))
    batch = SPO(SPOConfig(probability_mask=False)).prepare(token_batch(torch.ones(1, 3), dict(f)))
    assert_close(batch.fields["advantages"], torch.full((1, 3), 0.75))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_spo(tmp_path):
    out = tmp_path / "spo"
    cli("train", "spo", "--data", "arith", "--n", "2", "--set", "algorithm.rollouts=2", "--max-steps", "2", "--batch-size", "4",
        "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(m["segments/per_completion"] >= 1 for m in metrics)
