"""Single-stream PO (arXiv:2509.13232): the per-prompt success tracker and its advantages by hand, its limit (a constant
reward drives p̂ to R), and a slow single-stream run through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, token_batch
from torch.testing import assert_close

from tokalign.algorithms.sspo import SSPO, SSPOConfig


def test_sspo_hand_advantages_and_tracker():
    """Unseen prompts: p̂ = 0.5. R = (1, 0, 1) for prompts (0, 1, 0): A = (0.5, −0.5, 0.5) → batch-normalised
    (unbiased std 1/√3 of deviations (1/3, −2/3, 1/3)) = (0.57735, −1.15470, 0.57735). Tracker, ρ = 0.96, row by row:
    prompt 0: (0.96·0.5 + 1, 0.96·0.5) = (1.48, 0.48) then (0.96·1.48 + 1, 0.96·0.48) = (2.4208, 0.4608);
    prompt 1: (0.48, 1.48)."""
    algo = SSPO(SSPOConfig())
    assert not algo.needs.groups
    batch = token_batch(torch.ones(3, 1), {"rewards": torch.tensor([1.0, 0.0, 1.0]), "prompt_index": torch.tensor([0, 1, 0]),
                                           "group_ids": torch.tensor([0, 1, 2])})
    algo.prepare(batch)
    s = 1 / math.sqrt(3)
    assert_close(batch.fields["advantages"], torch.tensor([(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s]))
    assert algo.tracker[0] == pytest.approx((2.4208, 0.4608))
    assert algo.tracker[1] == pytest.approx((0.48, 1.48))
    assert algo.prompt_weights(3)[2] == pytest.approx(0.55)  # unseen: √(0.25) + 0.05
    clone = SSPO(SSPOConfig())
    clone.load_state_dict(json.loads(json.dumps(algo.state_dict())))
    assert clone.tracker == algo.tracker


def test_sspo_constant_reward_drives_p_hat_to_r():
    """Constant R = 1 and ρ: α → 1/(1 − ρ), β → 0, so p̂ → 1 and the raw advantage R − p̂ → 0."""
    algo = SSPO(SSPOConfig())
    for _ in range(400):
        algo.prepare(token_batch(torch.ones(1, 1), {"rewards": torch.tensor([1.0]), "prompt_index": torch.tensor([0]),
                                                    "group_ids": torch.tensor([0])}))
    assert 1 - algo.p_hat(0) < 1e-6


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_sspo_single_stream(tmp_path):
    out = tmp_path / "sspo"
    cli("train", "sspo", "--data", "arith", "--n", "1", "--max-steps", "2", "--batch-size", "4", "--out", str(out), "--quiet")
    check_run(out)
