"""PPO (RLHF form; arXiv:1707.06347, arXiv:2203.02155): the limiting case γ = λ = 1, V = 0, no KL ⇒ A_t = R, the clipped
losses' gradients, the dual clip, and a real CLI run (the value head learns and is saved). GAE by hand:
tests/test_ops.py; the value head component: tests/components/test_value_head.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import ppo_batch
from conftest import cli
from torch.testing import assert_close

from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.protocols import PolicyOutput


def test_reference_limit_every_token_gets_R():
    """γ = λ = 1, V = 0, no KL, no whitening ⇒ A_t = R at every completion token, returns = R."""
    batch = ppo_batch([1.0, -2.0], [[1.0, 1, 1, 0], [0, 1, 1, 1]])
    PPO(PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)).prepare(batch)
    expected = torch.tensor([[1.0, 1, 1, 0], [0, -2, -2, -2]])
    assert_close(batch.fields["advantages"], expected)
    assert_close(batch.fields["returns"], expected)


def test_loss_gradients_at_ratio_one():
    """ρ = 1 and V = V_old: ∂L/∂ℓ_t = −A_t/N and ∂L/∂V_t = vf_coef·(V_t − G_t)/N (token-mean, N = 5 tokens)."""
    algo = PPO(PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False, vf_coef=0.1))
    batch = algo.prepare(ppo_batch([1.0, -2.0], [[1.0, 1, 1, 0], [0, 0, 1, 1]]))
    logps = torch.zeros(2, 4, requires_grad=True)
    values = torch.zeros(2, 4, requires_grad=True)
    res = algo.loss(batch, PolicyOutput(logps, values=values))
    res.loss.backward()
    adv, ret, mask = batch.fields["advantages"], batch.fields["returns"], batch.completion_mask
    assert_close(logps.grad, -adv * mask / 5)
    assert_close(values.grad, 0.1 * (0 - ret) * mask / 5)
    assert res.metrics["vf_loss"] == pytest.approx(0.5 * (3 * 1 + 2 * 4) / 5)


def test_dual_clip_caps_negative_advantages():
    """A = −1 on one token, ρ = e² ≫ 1 + ε: PPO-clip gives −A·ρ = e² = 7.389; the dual clip caps it at −c·A = 3
    with zero gradient."""
    algo = PPO(PPOConfig(kl_coef=0.0, whiten_advantages=False, vf_coef=0.0, gamma=1.0, lam=1.0))
    batch = algo.prepare(ppo_batch([-1.0], [[1.0]]))
    logps = torch.full((1, 1), 2.0, requires_grad=True)
    res = algo.loss(batch, PolicyOutput(logps, values=torch.zeros(1, 1, requires_grad=True)))
    assert float(res.loss.detach()) == pytest.approx(3.0)
    res.loss.backward()
    assert float(logps.grad.abs().max()) == 0.0


@pytest.mark.slow
def test_ppo_through_the_cli(tmp_path):
    cli("train", "ppo", "--data", "arith", "--max-steps", "3", "--batch-size", "4", "--n", "2", "--out", "P", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "P" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and "vf_loss" in m and "kl" not in m for m in metrics)
    assert metrics[-1]["values/mean"] != 0.0  # the critic learned something
    assert (tmp_path / "P" / "value_head.safetensors").is_file()
