"""PURE (arXiv:2504.15275): the min-form credit assignment (a soft minimum over step rewards), step lengths, the step and
token baselines on hand cases (expected numbers worked out in each docstring), the missing-token-reward error, and slow
runs through the real CLI with a per-token reward."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from algo_helpers import check_run
from conftest import CLI_ENV, ROOT, cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.pure import PURE, PUREConfig, min_form_weights, step_lengths
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def test_pure_min_form_is_soft_minimum():
    """r = (0.9, −0.5, 0.8) on three step ends: as T → 0, Σ_k softmax(−r/T)_k r_k → min r = −0.5. At T = 1 the
    weights are softmax(−0.9, 0.5, −0.8) = (0.1673, 0.6784, 0.1849)/…, worked out below."""
    r = torch.tensor([[0.9, 0.0, -0.5, 0.8]])
    steps = r != 0
    assert_close((min_form_weights(r, steps, 1e-3) * r).sum(), torch.tensor(-0.5))
    e = [math.exp(-0.9), math.exp(0.5), math.exp(-0.8)]
    w = [x / sum(e) for x in e]
    assert_close(min_form_weights(r, steps, 1.0), torch.tensor([[w[0], 0.0, w[1], w[2]]]))
    assert_close(min_form_weights(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.1), torch.zeros(1, 3))


def test_pure_step_lengths():
    """Completion tokens per step: steps end at t = 1 and 4 of a 5-token completion that starts at t = 0 → 2 and 3."""
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    steps = torch.tensor([[False, True, False, False, True, False]])
    assert_close(step_lengths(steps, mask), torch.tensor([[0.0, 2, 0, 0, 3, 0]]))


def _pure_batch():
    """G = 2, two tokens each. Row 0: one step (score 0.5 at t = 1), verifiable 1 → R = 1.5. Row 1: two steps (0.2,
    −0.4), verifiable 0 → R = −0.2."""
    return token_batch(torch.ones(2, 2), {"token_rewards": torch.tensor([[0.0, 0.5], [0.2, -0.4]]),
                                          "rewards": torch.tensor([1.5, -0.2]), "group_ids": torch.tensor([0, 0])})


def test_pure_step_baseline_hand():
    """Summation (min_form false), step baseline: per-step means (0.5, −0.1), leave-one-out → baselines (−0.1, 0.5):
    row 0 (0, 0.6), row 1 (−0.3, −0.9); verifiable v = (1, 0) → LOO (1, −1) on the last token: (0, 1.6), (−0.3, −1.9);
    returns (1.6, 1.6), (−2.2, −1.9)."""
    batch = PURE(PUREConfig(min_form=False, baseline="step")).prepare(_pure_batch())
    assert_close(batch.fields["advantages"], torch.tensor([[1.6, 1.6], [-2.2, -1.9]]))


def test_pure_token_baseline_hand():
    """Token baseline: the others' reward per token, row 0: −0.2/2 = −0.1, row 1: 0.5/2 = 0.25, times the step's length
    (row 0: one step of 2 tokens; row 1: two of 1): row 0 (0, 0.7), row 1 (−0.05, −0.65); plus v: (0, 1.7),
    (−0.05, −1.65); returns (1.7, 1.7), (−1.7, −1.65)."""
    batch = PURE(PUREConfig(min_form=False)).prepare(_pure_batch())
    assert_close(batch.fields["advantages"], torch.tensor([[1.7, 1.7], [-1.7, -1.65]]))


def test_pure_min_form_changes_only_the_process_part():
    """Min-form with T = 0.1 on row 1's steps (0.2, −0.4): w ∝ (e^−2, e^4) → r' ≈ (0.2·0.00247, −0.4·0.99753); row 0's
    single step keeps weight 1. The verifiable remainder v = R − Σ raw token values is unchanged, and a loss step is
    finite with gradient −A_t/… (GRPO's surrogate)."""
    algo = PURE(PUREConfig(baseline="step", verifiable_coef=0.0))
    batch = algo.prepare(_pure_batch())
    w = torch.softmax(torch.tensor([-2.0, 4.0]), 0)
    r1 = torch.tensor([0.2, -0.4]) * w
    per_step = torch.tensor([0.5, float(r1.sum()) / 2])
    expected_row1 = r1 - per_step[0]
    returns1 = torch.tensor([expected_row1.sum(), expected_row1[1]])
    assert_close(batch.fields["advantages"][1], returns1)
    batch.fields["old_logps"] = torch.zeros(2, 2)
    lp = leaf(torch.zeros(2, 2))
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert_close(lp.grad, -batch.fields["advantages"] / 4)


def test_pure_without_token_rewards_is_a_user_error():
    batch = token_batch(torch.ones(2, 2), {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])})
    with pytest.raises(UserError, match="per-token process reward"):
        PURE(PUREConfig()).prepare(batch)


# ---------------------------------------------------------------------------------------------------
# the real CLI


STEP_REWARD = '''
from tokalign.protocols import Reward

class Steps:
    """A per-token test reward: +0.5 on even completion tokens after the first, -0.25 on odd ones, 0 on token 0."""
    def __call__(self, samples):
        out = []
        for s in samples:
            vals = [0.0] + [0.5 if i % 2 == 0 else -0.25 for i in range(1, len(s.completion_ids))]
            out.append(Reward(sum(vals), vals))
        return out
'''


@pytest.mark.slow
def test_cli_pure_with_a_token_level_reward(tmp_path):
    (tmp_path / "steps_reward.py").write_text(STEP_REWARD)
    out = tmp_path / "pure"
    env = {**CLI_ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{CLI_ENV.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "tokalign", "train", "pure", "--data", "arith", "--n", "4", "--reward", "exact_match",
                           "--reward", "steps_reward:Steps", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    check_run(out)


@pytest.mark.slow
def test_cli_pure_without_token_reward_is_one_line(tmp_path):
    proc = cli("train", "pure", "--data", "arith", "--n", "2", "--max-steps", "1", "--batch-size", "1",
               "--out", str(tmp_path / "p"), "--quiet", check=False)
    assert proc.returncode == 2 and "per-token process reward" in proc.stderr and "Traceback" not in proc.stderr
