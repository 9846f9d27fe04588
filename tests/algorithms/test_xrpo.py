"""XRPO (arXiv:2510.06672): novelty-aware advantage sharpening by hand (advantages, loss and gradient), λ = 0 is GRPO
bit for bit, micro-batches add up, the config's checks; a slow run through the real CLI."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import random_groups, train_changes_weights
from conftest import leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.xrpo import XRPO, XRPOConfig
from tokalign.protocols import PolicyOutput


def test_by_hand():
    """One group of three, rewards (1, 1, 0), each row two tokens, behaviour log-probs
    row 0: (−1, −1) → s = −1;  row 1: (−3, −3) → s = −3;  row 2: (−2, −2) → s = −2;  mean s̄ = −2.
    η = (e¹, e⁻¹, 1).  GRPO: mean ⅔, unbiased std √(1/3): A = (a, a, −2a) with a = (⅓)/(√(1/3) + 1e-6).
    λ = 0.5, κ = 1: row 0: λ(1 − e) < 0 → bonus 0;  row 1: λ(1 − e⁻¹) = 0.316 < κa → A⁺ = a + 0.5(1 − e⁻¹);
    row 2: A < 0, unchanged.  On-policy (ρ = 1), token-mean over 6 tokens: loss = −Σ_i 2·A⁺_i / 6, ∂loss/∂ℓ_t = −A⁺_i/6."""
    mask = torch.ones(3, 2)
    old = torch.tensor([[-1.0, -1.0], [-3.0, -3.0], [-2.0, -2.0]])
    algo = XRPO(XRPOConfig(novelty_lambda=0.5, novelty_kappa=1.0))
    batch = algo.prepare(token_batch(mask, {"rewards": torch.tensor([1.0, 1.0, 0.0]), "group_ids": torch.tensor([0, 0, 0]),
                                            "old_logps": old}, {"tokens": 6.0, "seqs": 3.0}))
    a = (1 / 3) / (math.sqrt(1 / 3) + 1e-6)
    want_adv = [a, a + 0.5 * (1 - math.exp(-1)), -2 * a]
    assert batch.fields["advantages"].tolist() == pytest.approx(want_adv, rel=1e-6)
    assert batch.fields["xrpo_novelty"].tolist() == pytest.approx([math.e, math.exp(-1), 1.0], rel=1e-6)
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    assert out.loss.item() == pytest.approx(-sum(2 * x for x in want_adv) / 6, rel=1e-6, abs=1e-7)
    out.loss.backward()
    assert_close(lp.grad, torch.tensor([[-x / 6] * 2 for x in want_adv]), rtol=1e-6, atol=1e-8)
    assert out.metrics["xrpo/boosted_fraction"] == pytest.approx(1 / 3)


def test_bonus_is_capped_at_kappa_a():
    """λ = 10 makes λ(1 − η) of row 1 = 6.32 > κ·A: the bonus is κ·A = 0.5·a, so A⁺ = 1.5·a."""
    algo = XRPO(XRPOConfig(novelty_lambda=10.0, novelty_kappa=0.5))
    batch = algo.prepare(token_batch(torch.ones(3, 2), {"rewards": torch.tensor([1.0, 1.0, 0.0]), "group_ids": torch.tensor([0, 0, 0]),
                                                        "old_logps": torch.tensor([[-1.0, -1.0], [-3.0, -3.0], [-2.0, -2.0]])}))
    a = (1 / 3) / (math.sqrt(1 / 3) + 1e-6)
    assert batch.fields["advantages"].tolist() == pytest.approx([a, 1.5 * a, -2 * a], rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_lambda_zero_is_grpo_bit_for_bit(beta):
    """novelty_lambda = 0: advantages, loss and gradient are GRPO's exactly (off-policy, with and without KL)."""
    def run(algo):
        b = random_groups(5, [3, 5, 2, 4, 3], [0, 0, 1, 1, 1], [1.0, 0.0, 0.0, 1.0, 0.5])
        b.fields["ref_logps"] = b.fields["pol"] + 0.1
        b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 5.0}
        b = algo.prepare(b)
        lp = leaf(b.fields["pol"])
        loss = algo.loss(b, PolicyOutput(lp)).loss
        loss.backward()
        return b.fields["advantages"], loss.detach(), lp.grad

    ref = run(GRPO(GRPOConfig(beta=beta)))
    got = run(XRPO(XRPOConfig(novelty_lambda=0.0, beta=beta)))
    for x, y in zip(got, ref):
        assert torch.equal(x, y)
    assert ref[2].abs().sum() > 0
    assert XRPO(XRPOConfig(novelty_lambda=0.0)).needs == GRPO(GRPOConfig()).needs


def test_sharpening_changes_only_positive_advantages():
    b = random_groups(6, [3, 5, 2, 4, 3, 4], [0, 0, 0, 1, 1, 1], [1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    grpo = GRPO(GRPOConfig()).prepare(random_groups(6, [3, 5, 2, 4, 3, 4], [0, 0, 0, 1, 1, 1], [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    xrpo = XRPO(XRPOConfig()).prepare(b)
    base, sharp = grpo.fields["advantages"], xrpo.fields["advantages"]
    assert torch.equal(sharp[base <= 0], base[base <= 0])
    assert bool((sharp[base > 0] >= base[base > 0]).all()) and bool((sharp <= 2 * base.clamp(min=0) + base.clamp(max=0)).all())


def test_micro_batches_add_up():
    algo = XRPO(XRPOConfig(novelty_lambda=0.7))
    b = random_groups(4, [3, 5, 2, 4], [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0])
    b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 4.0}
    full, summed, g_full, g_parts, n = micro_batch_check(algo, algo.prepare(b), size=1)
    assert n > 1
    assert_close(summed, full)
    assert_close(g_parts, g_full)


def test_config_and_needs():
    assert [type(c).__name__ for c in XRPO(XRPOConfig()).needs.components] == ["BehaviourLogps"]
    assert XRPO(XRPOConfig()).needs.components[0].upfront
    with pytest.raises(ValueError, match="novelty_lambda must be ≥ 0"):
        XRPOConfig(novelty_lambda=-1.0)
    with pytest.raises(ValueError, match="novelty_kappa must be > 0"):
        XRPOConfig(novelty_kappa=0.0)
    with pytest.raises(ValueError, match="aggregation"):
        XRPOConfig(aggregation="sum")


@pytest.mark.slow
def test_cli_two_steps_train_changes_weights(tmp_path):
    """`tokalign train tokalign.algorithms.xrpo:XRPO` for 2 steps on the bundled model (online arith, 2 prompts × 4)."""
    train_changes_weights(tmp_path, "tokalign.algorithms.xrpo:XRPO", "--data", "arith", "--n", "4", grad_norm=False)
