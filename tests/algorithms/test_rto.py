"""RTO (arXiv:2404.18922): PPO with a dense DPO token reward — scale 0 ⇒ exactly PPO, the dense reward by hand and its
clip — and a DPO-then-RTO chain through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import ppo_batch
from conftest import cli
from torch.testing import assert_close

from tokalign.algorithms.ppo import PPO, PPOConfig


def _rto_batch(dpo, ref, mask, rewards):
    batch = ppo_batch(rewards, mask)
    batch.fields.update(dpo_logps=torch.tensor(dpo), ref_logps=torch.tensor(ref))
    return batch


def test_rto_scale_zero_is_ppo_and_dense_reward_by_hand():
    """s = 0 ⇒ exactly PPO's advantages. Unclipped (c = 0), s = 0.05: Σ_t r^dpo_t = s·Δ_dpo(y): with
    ℓ^dpo − ℓ^ref = (1, −2, 0.5) on a 3-token row, r^dpo = (0.05, −0.1, 0.025), sum −0.025 = 0.05·(−0.5).
    With c = 0.05 the middle token is clipped to −0.05."""
    from tokalign.algorithms.rto import RTO, RTOConfig

    args = ([[0.0, -3.0, 1.0]], [[-1.0, -1.0, 0.5]], [[1.0, 1.0, 1.0]], [1.0])
    common = dict(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    rto = RTO(RTOConfig(dpo_reward_scale=0.0, **common)).prepare(_rto_batch(*args))
    ppo = PPO(PPOConfig(**common)).prepare(_rto_batch(*args))
    assert_close(rto.fields["advantages"], ppo.fields["advantages"])
    algo = RTO(RTOConfig(dpo_reward_clip=0.0, **common))
    dense = algo.dense_reward(_rto_batch(*args))
    assert_close(dense, torch.tensor([[0.05, -0.1, 0.025]]))
    assert float(dense.sum()) == pytest.approx(0.05 * -0.5)
    clipped = RTO(RTOConfig(**common)).dense_reward(_rto_batch(*args))
    assert_close(clipped, torch.tensor([[0.05, -0.05, 0.025]]))
    assert RTO(RTOConfig()).needs.models == ("dpo",) and RTO(RTOConfig()).needs.reference


@pytest.mark.slow
def test_dpo_then_rto_through_the_cli(tmp_path):
    cli("prepare", "arith", "--limit", "16", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "4", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=tmp_path)
    cli("train", "dpo", "--data", "S", "--max-steps", "2", "--batch-size", "2", "--out", "D", cwd=tmp_path)
    missing = cli("train", "rto", "--data", "arith", "--out", "X", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "--dpo-model PATH" in missing.stderr
    cli("train", "rto", "--data", "arith", "--dpo-model", "D", "--max-steps", "2", "--batch-size", "2", "--n", "2",
        "--out", "T", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics)
