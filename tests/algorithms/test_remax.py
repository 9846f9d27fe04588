"""ReMax (arXiv:2310.10505): greedy baseline, γ^{T−t} discount, per-token KL; the limit (sampled ==
greedy ⇒ A = −β·k1 only); the greedy baseline in the online loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign.algorithms.remax import ReMax, ReMaxConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def _batch(rewards, baseline, mask, old=None, ref=None):
    mask = torch.tensor(mask)
    f = {"rewards": torch.tensor(rewards), "baseline": torch.tensor(baseline), "group_ids": torch.arange(len(rewards))}
    if old is not None:
        f.update(old_logps=torch.tensor(old), ref_logps=torch.tensor(ref))
    b, t = mask.shape
    return TokenBatch(torch.zeros(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long), mask, f,
                      {"tokens": float(mask.sum()), "seqs": float(b)})


def test_advantage_and_gradient_by_hand():
    """R = 1, greedy 0, γ = 0.5, no KL, 3 tokens: A = (0.25, 0.5, 1); L = −Σ A ℓ / 3 ⇒ ∂L/∂ℓ = −A/3."""
    algo = ReMax(ReMaxConfig(kl_coef=0.0, gamma=0.5))
    batch = algo.prepare(_batch([1.0], [0.0], [[1.0, 1.0, 1.0]]))
    assert_close(batch.fields["advantages"], torch.tensor([[0.25, 0.5, 1.0]]))
    logps = torch.zeros(1, 3, requires_grad=True)
    algo.loss(batch, PolicyOutput(logps)).loss.backward()
    assert_close(logps.grad, -torch.tensor([[0.25, 0.5, 1.0]]) / 3)


def test_sampled_equal_to_greedy_leaves_only_the_kl():
    """R = R(greedy) ⇒ A_t = −β·k1_t = −0.1·(ℓ_old − ℓ_ref) = (−0.02, 0.05)."""
    batch = ReMax(ReMaxConfig()).prepare(_batch([0.7], [0.7], [[1.0, 1.0]], [[-1.0, -2.0]], [[-1.2, -1.5]]))
    assert_close(batch.fields["advantages"], torch.tensor([[-0.02, 0.05]]))


@pytest.mark.slow
def test_remax_online_with_greedy_baseline(tmp_path):
    cli("train", "remax", "--data", "arith", "--max-steps", "2", "--batch-size", "4", "--n", "2", "--out", "R", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "R" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and 0.0 <= m["reward/greedy_baseline"] <= 1.0 for m in metrics)
    proc = cli("train", "remax", "--data", "S-does-not-exist", "--out", "X", cwd=tmp_path, check=False)
    assert proc.returncode == 2
