"""PPO (RLHF form): GAE by hand, the reference's limiting case (γ = λ = 1, V = 0, no KL ⇒ A_t = R), the clipped
losses' gradients, the value head through the loop, and a real CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign import ops
from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def test_gae_by_hand():
    """r = (0, 0, 1), V = (0.5, 0.2, 0.1), γ = 1, λ = 0.5, after one prompt position (mask 0):
    δ = (0.2 − 0.5, 0.1 − 0.2, 1 − 0.1) = (−0.3, −0.1, 0.9); A_2 = 0.9, A_1 = −0.1 + 0.45 = 0.35,
    A_0 = −0.3 + 0.175 = −0.125; returns = A + V = (0.375, 0.55, 1.0)."""
    mask = torch.tensor([[0.0, 1, 1, 1]])
    rewards = torch.tensor([[0.0, 0, 0, 1]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.1]])  # the prompt position's value is ignored
    adv, ret = ops.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(adv, torch.tensor([[0.0, -0.125, 0.35, 0.9]]))
    assert_close(ret, torch.tensor([[0.0, 0.375, 0.55, 1.0]]))


def _batch(rewards, mask, old_values=None, logps=None):
    mask = torch.tensor(mask)
    b = len(rewards)
    fields = {"rewards": torch.tensor(rewards), "old_logps": torch.zeros_like(mask) if logps is None else torch.tensor(logps),
              "old_values": torch.zeros_like(mask) if old_values is None else torch.tensor(old_values),
              "group_ids": torch.arange(b)}
    return TokenBatch(torch.zeros(b, mask.shape[1] + 1, dtype=torch.long), torch.ones(b, mask.shape[1] + 1, dtype=torch.long),
                      mask, fields, {"tokens": float(mask.sum()), "seqs": float(b)})


def test_reference_limit_every_token_gets_R():
    """γ = λ = 1, V = 0, no KL, no whitening ⇒ A_t = R at every completion token, returns = R."""
    batch = _batch([1.0, -2.0], [[1.0, 1, 1, 0], [0, 1, 1, 1]])
    PPO(PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)).prepare(batch)
    expected = torch.tensor([[1.0, 1, 1, 0], [0, -2, -2, -2]])
    assert_close(batch.fields["advantages"], expected)
    assert_close(batch.fields["returns"], expected)


def test_loss_gradients_at_ratio_one():
    """ρ = 1 and V = V_old: ∂L/∂ℓ_t = −A_t/N and ∂L/∂V_t = vf_coef·(V_t − G_t)/N (token-mean, N = 5 tokens)."""
    algo = PPO(PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False, vf_coef=0.1))
    batch = algo.prepare(_batch([1.0, -2.0], [[1.0, 1, 1, 0], [0, 0, 1, 1]]))
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
    batch = algo.prepare(_batch([-1.0], [[1.0]]))
    logps = torch.full((1, 1), 2.0, requires_grad=True)
    res = algo.loss(batch, PolicyOutput(logps, values=torch.zeros(1, 1, requires_grad=True)))
    assert float(res.loss.detach()) == pytest.approx(3.0)
    res.loss.backward()
    assert float(logps.grad.abs().max()) == 0.0


def test_value_head_is_restored_from_a_checkpoint(tmp_path, tiny_model):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tokalign.components import value_head

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    head = value_head.build(policy, None)
    assert float(head.weight.detach().abs().sum()) == 0.0  # zero-initialised: first values are 0
    state = {"weight": torch.full_like(head.weight, 0.5), "bias": torch.tensor([1.5])}
    save_file(state, tmp_path / value_head.FILE)
    restored = value_head.build(policy, tmp_path)
    assert_close(restored.weight.detach(), state["weight"])
    assert float(restored.bias.detach()) == 1.5


@pytest.mark.slow
def test_ppo_through_the_cli(tmp_path):
    cli("train", "ppo", "--data", "arith", "--max-steps", "3", "--batch-size", "4", "--n", "2", "--out", "P", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "P" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and "vf_loss" in m and "kl" not in m for m in metrics)
    assert metrics[-1]["values/mean"] != 0.0  # the critic learned something
    assert (tmp_path / "P" / "value_head.safetensors").is_file()


def _rto_batch(dpo, ref, mask, rewards):
    batch = _batch(rewards, mask)
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
