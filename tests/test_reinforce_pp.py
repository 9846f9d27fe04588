"""REINFORCE++ (arXiv:2501.03262): discounted token returns with the KL in the reward, whitened over the batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign import ops
from tokalign.algorithms.reinforce_pp import ReinforcePP, ReinforcePPConfig
from tokalign.protocols import TokenBatch


def _batch(rewards, mask, old=None, ref=None):
    mask = torch.tensor(mask)
    fields = {"rewards": torch.tensor(rewards), "group_ids": torch.arange(len(rewards))}
    if old is not None:
        fields.update(old_logps=torch.tensor(old), ref_logps=torch.tensor(ref))
    b, t = mask.shape
    return TokenBatch(torch.zeros(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long), mask, fields, {})


def test_hand_case_without_kl():
    """γ = 1, no KL: every token's return is its row's R. R = (1, 0), lengths (2, 1): token values (1, 1, 0),
    mean 2/3, unbiased variance ((1/3)²·2 + (2/3)²)/2 = 1/3 ⇒ A = (0.5773503, 0.5773503 | −1.1547005)."""
    batch = ReinforcePP(ReinforcePPConfig(kl_coef=0.0)).prepare(_batch([1.0, 0.0], [[1.0, 1.0], [1.0, 0.0]]))
    assert_close(batch.fields["advantages"], torch.tensor([[0.5773503, 0.5773503], [-1.1547005, 0.0]]))


def test_kl_in_the_reward_and_whitening():
    """kl_coef 0.5, γ = 1, R = 1 on a 2-token row with ℓ_old − ℓ_ref = (0.2, −0.4): r = (−0.1, 0.2 + 1) ⇒
    returns (1.1, 1.2); across a random batch the whitened advantages have masked mean 0 and std 1."""
    reward = ops.last_token_mask(torch.ones(1, 2)) * 1.0 - 0.5 * torch.tensor([[0.2, -0.4]])
    returns, _ = ops.gae(reward, torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    assert_close(returns, torch.tensor([[1.1, 1.2]]))
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    old, ref = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    batch = ReinforcePP(ReinforcePPConfig()).prepare(_batch(torch.rand(6, generator=g).tolist(), mask.tolist(), old.tolist(), ref.tolist()))
    a = batch.fields["advantages"]
    n = mask.sum()
    mean = (a * mask).sum() / n
    assert float(mean) == pytest.approx(0.0, abs=1e-6)
    assert float(((a - mean) ** 2 * mask).sum() / (n - 1)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_reinforce_pp_through_the_cli(tmp_path):
    cli("train", "reinforce_pp", "--data", "arith", "--max-steps", "2", "--batch-size", "2", "--n", "4", "--out", "R", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "R" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
