"""GRPO-S (DR-IRL, arXiv:2503.18991): the hardness × reward-gap scale by hand, loss and gradient by hand, α = β = 0 =
GRPO bit for bit, config errors, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.grpo_s import GRPOS, GRPOSConfig, group_max
from tokalign.protocols import PolicyOutput

LENGTHS = [2, 3, 1, 4, 2]
REWARDS = [1.0, 0.0, 0.0, 0.5, 1.0]
GROUPS = [0, 0, 1, 1, 1]


def _batch(old=None, hardness=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS)}
    if old is not None:
        f["old_logps"] = old
    if hardness is not None:
        f["hardness"] = torch.tensor(hardness)
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 5.0})


def test_scale_loss_and_gradient_by_hand():
    """Group 0: R = 1, 0 → mean ½, gap Δ = 1 − ½ = ½; hardness 0.2, 0.4 → h = 0.3. Group 1: R = 0, ½, 1 → mean ½,
    Δ = ½; hardness 1 → h = 1. α = 1, β = 2: s_0 = 1.3 · 2 = 2.6, s_1 = 2 · 2 = 4.
    scale none: A = R − mean_g = ½, −½ | −½, 0, ½ → A^S = 1.3, −1.3 | −2, 0, 2.
    On policy, token-mean over N = 12: loss = −Σ A^S_i ℓ_i / N, ∂loss/∂logp_it = −A^S_i / N."""
    algo = GRPOS(GRPOSConfig(hardness_weight=1.0, gap_weight=2.0, scale_rewards="none"))
    old = -torch.rand(5, 4, generator=torch.Generator().manual_seed(3))
    batch = algo.prepare(_batch(old=old, hardness=[0.2, 0.4, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(batch.fields["grpo_s_scale"], torch.tensor([2.6, 2.6, 4.0, 4.0, 4.0]))
    adv = [1.3, -1.3, -2.0, 0.0, 2.0]
    torch.testing.assert_close(batch.fields["advantages"], torch.tensor(adv))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    n = sum(LENGTHS)
    assert float(out.loss.detach()) == pytest.approx(-sum(a * ln for a, ln in zip(adv, LENGTHS)) / n, rel=1e-6)
    grad = torch.tensor([[-a / n] * ln + [0.0] * (4 - ln) for a, ln in zip(adv, LENGTHS)])
    torch.testing.assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["grpo_s/scale_mean"] == pytest.approx((2 * 2.6 + 3 * 4) / 5)


def test_without_hardness_only_the_gap_scales():
    """No hardness field: h = 0, s = 1 + β Δ = 1.5 in both groups (β = 1)."""
    batch = GRPOS(GRPOSConfig()).prepare(_batch())
    torch.testing.assert_close(batch.fields["grpo_s_scale"], torch.full((5,), 1.5))
    assert group_max(torch.tensor(REWARDS), torch.tensor(GROUPS)).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("hardness", [None, [0.2, 0.4, 1.0, 1.0, 1.0]], ids=["no-hardness", "hardness"])
def test_zero_weights_is_grpo_bit_for_bit(hardness):
    torch.manual_seed(0)
    values = -torch.rand(5, 4) * 3
    old = values + 0.3 * torch.randn(5, 4)
    results = []
    for algo in (GRPOS(GRPOSConfig(hardness_weight=0.0, gap_weight=0.0, beta=0.04)), GRPO(GRPOConfig(beta=0.04))):
        batch = algo.prepare(_batch(old=old, hardness=hardness))
        batch.fields["ref_logps"] = values + 0.1
        lp = leaf(values)
        out = algo.loss(batch, PolicyOutput(lp))
        out.loss.backward()
        results.append((batch.fields["advantages"], out.loss.detach(), lp.grad))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    assert results[0][2].abs().sum() > 0


def test_config():
    for name in ("hardness_weight", "gap_weight"):
        with pytest.raises(ValueError, match=f"{name} must be"):
            GRPOSConfig(**{name: -0.1})


@pytest.mark.slow
def test_cli_grpo_s(tmp_path):
    out = tmp_path / "grpo_s"
    cli("train", "tokalign.algorithms.grpo_s:GRPOS", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(m["grpo_s/scale_mean"] >= 1 for m in metrics)
