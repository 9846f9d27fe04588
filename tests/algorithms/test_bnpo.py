"""BNPO (arXiv:2506.02864) on hand cases (expected numbers worked out in each docstring): the Beta normalisation with
fixed and fitted parameters, α = β = 1 ⇒ REINFORCE with a mean baseline, the fitted 3/2 case ∝ GRPO, its defaults;
micro-batches adding up to the full batch, and a slow run through the real CLI (module:attr name). CPU only.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask, G = group size."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import rewards_batch, micro_batches_add_up, train_changes_weights
from torch.testing import assert_close

from tokalign.algorithms.bnpo import BNPO, BNPOConfig, beta_pdf, fit_beta
from tokalign.algorithms.grpo import GRPO, GRPOConfig


def test_bnpo_alpha_beta_one_is_reinforce_with_mean_baseline():
    """α = β = 1 ⇒ Beta_pdf ≡ 1 ⇒ A = R − p̂.  Groups (1, 0, 0, 0 | 1, 1, 0.5, 0): p̂ = 0.25, 0.625 ⇒
    A = (0.75, −0.25, −0.25, −0.25 | 0.375, 0.375, −0.125, −0.625). Fixed by norm_alpha/norm_beta, and also what the fit
    gives for a single group (no spread to fit: the official code's α = β = 1 too)."""
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.375, 0.375, -0.125, -0.625])
    batch = rewards_batch([1, 0, 0, 0, 1, 1, 0.5, 0], [0] * 4 + [1] * 4)
    BNPO(BNPOConfig(norm_alpha=1.0, norm_beta=1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], expected)
    single = rewards_batch([1, 1, 0.5, 0], [3] * 4)
    algo = BNPO(BNPOConfig())
    algo.prepare(single)
    assert algo.fitted == (1.0, 1.0)
    assert_close(single.fields["advantages"], expected[4:])


def test_bnpo_fitted_three_halves_is_proportional_to_grpo():
    """Binary rewards, G = 4, group means p̂ = (0.25, 0.5, 0.75): m = 0.5, unbiased v = (0.0625 + 0 + 0.0625)/2 = 1/16,
    m(1−m)/v − 1 = 4 − 1 = 3 ⇒ a = b = 1.5 ⇒ α = β = 1 + 1.5/3 = 3/2. Beta(3/2, 3/2) = (8/π)√(p(1−p)):
    p = 0.25: √0.1875 = 0.4330127, 1/pdf = π/(8·0.4330127) = 0.9068997 ⇒ A = 0.75·0.9068997 = 0.6801748, −0.25·… = −0.2267249;
    p = 0.5:  1/pdf = π/4 = 0.7853982 ⇒ A = ±0.3926991;   p = 0.75 mirrors p = 0.25.
    GRPO: std_g = √(4/3·p(1−p)) ⇒ A_BNPO / A_GRPO = π/8·√(4/3) = 0.4534498 for every row."""
    rewards = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    groups = [0] * 4 + [1] * 4 + [2] * 4
    batch = rewards_batch(rewards, groups)
    algo = BNPO(BNPOConfig())
    algo.prepare(batch)
    assert algo.fitted == pytest.approx((1.5, 1.5))
    a, b = 0.6801748, 0.2267249
    assert_close(batch.fields["advantages"], torch.tensor([a, -b, -b, -b, 0.3926991, 0.3926991, -0.3926991, -0.3926991,
                                                           b, b, b, -a]))
    grpo = rewards_batch(rewards, groups)
    GRPO(GRPOConfig()).prepare(grpo)
    assert_close(batch.fields["advantages"], math.pi / 8 * math.sqrt(4 / 3) * grpo.fields["advantages"], rtol=1e-5, atol=1e-6)


def test_bnpo_asymmetric_fit_and_fixed_parameters():
    """Fit on p̂ = (0.25, 0.25, 0.5): m = 1/3, v = ((1/12)²·2 + (1/6)²)/2 = 1/48, m(1−m)/v − 1 = (2/9)·48 − 1 = 29/3
    ⇒ a = 29/9, b = 58/9 ⇒ α = 1 + 29/27 = 2.0740741, β = 1 + 58/27 = 3.1481481.
    Fixed α = 2, β = 1: pdf = 2p; group (1, 0, 0, 0): p = 0.25, 1/pdf = 2 ⇒ A = 2(R − 0.25) = (1.5, −0.5, −0.5, −0.5)."""
    assert fit_beta(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)) == pytest.approx((56 / 27, 85 / 27))
    assert_close(beta_pdf(torch.tensor([0.0, 0.25, 1.0]), 2.0, 1.0), torch.tensor([0.0, 0.5, 2.0]))
    batch = rewards_batch([1, 0, 0, 0], [0] * 4)
    BNPO(BNPOConfig(norm_alpha=2.0, norm_beta=1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_bnpo_defaults_and_validation():
    """Official run.sh: ε = (0.2, 0.28), seq-mean-token-sum, no KL; rewards outside [reward_min, reward_max] name the fix;
    rewards in [−1, 1] with reward_min = −1 map onto [0, 1]: (1, −1) ⇒ s = (1, 0), p = 0.5, α = β = 1 ⇒ A = (0.5, −0.5)."""
    c = BNPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.aggregation, c.beta) == (0.2, 0.28, "seq-mean-token-sum", 0.0)
    assert not BNPO(c).needs.reference and BNPO(c).needs.groups
    with pytest.raises(ValueError, match="reward_min/reward_max"):
        BNPO(c).prepare(rewards_batch([2.0, 1.0], [0, 0]))
    batch = rewards_batch([1.0, -1.0], [0, 0])
    BNPO(BNPOConfig(reward_min=-1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))
    for bad in ({"scale_rewards": "group"}, {"reward_max": 0.0}, {"norm_alpha": 0.0}):
        with pytest.raises(ValueError):
            BNPOConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


@pytest.mark.parametrize("name", ["bnpo"])
def test_micro_batches_sum_to_full_batch(name):
    """BNPO: three groups of random completions over a 4-token vocabulary, run whole and as micro-batches of 2
    rows — the micro-batch losses and gradients add up to the full-batch ones (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(BNPO(BNPOConfig()))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.bnpo:BNPO"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train package.module:Class` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the
    run prints its checkpoint path, every logged loss is finite and the saved weights differ from the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", grad_norm=False)
