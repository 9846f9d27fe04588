"""Shared tensor maths (tokalign/ops.py) on hand-made examples whose expected numbers are worked out in each docstring:
aggregation modes, KL estimators, group statistics, log-probs and entropy from logits, the PPO-clip surrogate, GAE,
the full-vocabulary position KL and truncated importance-sampling weights. CPU only, seeded.

The formulas are the papers': GRPO (arXiv:2402.03300; group advantages, k3 KL), Dr.GRPO (arXiv:2503.20783; aggregation
modes), PPO (arXiv:1707.06347; clipped surrogate, GAE), TDPO (arXiv:2404.11999; position KL)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tokalign import ops


# ---------------------------------------------------------------------------------------------------
# aggregation modes


def _hand_23():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return values, mask


def test_aggregate_token_mean_hand():
    """values = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [1, 0, 0]]
    token-mean = (1 + 2 + 4) / 3 = 7/3 = 2.33333"""
    values, mask = _hand_23()
    assert_close(ops.aggregate(values, mask, "token-mean"), torch.tensor(7.0 / 3.0))


def test_aggregate_seq_mean_token_mean_hand():
    """row means: (1 + 2)/2 = 1.5 and 4/1 = 4;  seq-mean-token-mean = (1.5 + 4)/2 = 2.75"""
    values, mask = _hand_23()
    assert_close(ops.aggregate(values, mask, "seq-mean-token-mean"), torch.tensor(2.75))


def test_aggregate_seq_mean_token_sum_hand():
    """row sums: 1 + 2 = 3 and 4;  seq-mean-token-sum = (3 + 4)/2 = 3.5"""
    values, mask = _hand_23()
    assert_close(ops.aggregate(values, mask, "seq-mean-token-sum"), torch.tensor(3.5))


def test_aggregate_seq_mean_token_sum_norm_hand():
    """Σ m·L = 7, B = 2, T_max = 3 (and T_max = 10, a constant larger than any row):
    7 / (2·3) = 1.16667;  7 / (2·10) = 0.35"""
    values, mask = _hand_23()
    assert_close(ops.aggregate(values, mask, "seq-mean-token-sum-norm", max_len=3), torch.tensor(7.0 / 6.0))
    assert_close(ops.aggregate(values, mask, "seq-mean-token-sum-norm", max_len=10), torch.tensor(0.35))


def test_aggregate_masked_values_are_ignored():
    """Changing the values under mask = 0 (3, 5, 6 → 1e6) changes no mode's result."""
    values, mask = _hand_23()
    poisoned = torch.where(mask > 0, values, torch.full_like(values, 1e6))
    for mode in ops.AGGREGATIONS:
        assert_close(ops.aggregate(poisoned, mask, mode, max_len=3), ops.aggregate(values, mask, mode, max_len=3))


def test_aggregate_rejects_bad_arguments():
    values, mask = _hand_23()
    with pytest.raises(ValueError, match="max_len"):
        ops.aggregate(values, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        ops.aggregate(values, mask, "mean")


@pytest.mark.parametrize("mode", ops.AGGREGATIONS)
@pytest.mark.parametrize("split", [[2, 2], [1, 3], [3, 1]])
def test_aggregate_micro_batches_sum_to_full_batch(mode, split):
    """Rows split into two micro-batches; each is aggregated with the *global* denominators
    (total_tokens = Σ m over all rows, total_seqs = B) and the two results add up to the full-batch value."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 5, generator=g)
    lengths = torch.tensor([5, 1, 3, 2])
    mask = (torch.arange(5) < lengths[:, None]).float()
    full = ops.aggregate(values, mask, mode, max_len=7)
    parts = [
        ops.aggregate(v, m, mode, total_tokens=float(mask.sum()), total_seqs=4, max_len=7)
        for v, m in zip(values.split(split), mask.split(split))
    ]
    assert_close(parts[0] + parts[1], full)


def test_aggregate_micro_batch_without_totals_is_not_the_full_batch():
    """Sanity of the previous test: without the totals, token-mean of the halves is a mean of means
    (row 0: 3 tokens, row 1: 1 token) and does not add up to the batch value."""
    values = torch.tensor([[1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    full = ops.aggregate(values, mask, "token-mean")  # (1+1+1+5)/4 = 2
    halves = ops.aggregate(values[:1], mask[:1], "token-mean") + ops.aggregate(values[1:], mask[1:], "token-mean")  # 1 + 5
    assert_close(full, torch.tensor(2.0))
    assert_close(halves, torch.tensor(6.0))


# ---------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_hand_values():
    """ℓ = (−1, −2), ℓ_ref = (−1.5, −1)  ⇒  ℓ − ℓ_ref = (0.5, −1), ℓ_ref − ℓ = (−0.5, 1)
    k1 = (0.5, −1)
    k2 = ½(0.25, 1) = (0.125, 0.5)
    k3 = e^{−0.5} + 0.5 − 1 = 0.6065307 − 0.5 = 0.1065307;  e^{1} − 1 − 1 = 0.7182818"""
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert_close(ops.kl_penalty(logps, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert_close(ops.kl_penalty(logps, ref, "k2"), torch.tensor([0.125, 0.5]))
    assert_close(ops.kl_penalty(logps, ref, "k3"), torch.tensor([0.1065307, 0.7182818]))


def test_kl_estimators_zero_when_policy_equals_reference():
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(3, 7, generator=g) * 5
    for est in ops.KL_ESTIMATORS:
        assert_close(ops.kl_penalty(logps, logps.clone(), est), torch.zeros(3, 7))


def test_kl_k3_nonnegative_and_clamped():
    """k3 = e^x − x − 1 ≥ 0 for every x; with ℓ_ref − ℓ = 5 it would be e^5 − 6 = 142.4, clamped to 10."""
    g = torch.Generator().manual_seed(2)
    logps, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (ops.kl_penalty(logps, ref, "k3") >= 0).all()
    assert_close(ops.kl_penalty(torch.tensor([0.0]), torch.tensor([5.0]), "k3"), torch.tensor([10.0]))


def test_kl_k3_gradient_zero_at_reference():
    """∂k3/∂ℓ = 1 − e^{ℓ_ref − ℓ} = 0 at ℓ = ℓ_ref (so a KL term never moves a policy equal to its reference)."""
    logps = torch.tensor([-1.0, -3.0], requires_grad=True)
    ops.kl_penalty(logps, logps.detach().clone(), "k3").sum().backward()
    assert_close(logps.grad, torch.zeros(2))


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ops.kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------------------------------------------
# group statistics and GRPO advantages


def test_group_advantages_one_zero_group():
    """R = (1, 0) in one group: mean 0.5, unbiased std √((0.25 + 0.25)/1) = 0.70711
    ⇒ A = ±0.5/0.70711 = ±0.70711"""
    adv = ops.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert_close(adv, torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0)


def test_group_advantages_all_equal_group_is_zero():
    """R = (0.3, 0.3, 0.3): centred values are 0 and std 0 ⇒ A = 0/(0 + eps) = 0, not NaN."""
    adv = ops.group_advantages(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([4, 4, 4]))
    assert_close(adv, torch.zeros(3))


def test_group_advantages_several_groups_and_singleton():
    """groups (by id, rows interleaved): id 7 → R = (1, 3): mean 2, std √2 ⇒ A = ∓1/√2 = ∓0.70711;
    id 2 → R = (2, 2, 5): mean 3, std √((1+1+4)/2) = √3 ⇒ A = (−1, −1, 2)/√3 = (−0.57735, −0.57735, 1.15470);
    id 9 → R = (8) alone: std 0 (not NaN) ⇒ A = 0."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 8.0, 5.0])
    gids = torch.tensor([7, 2, 7, 2, 9, 2])
    adv = ops.group_advantages(rewards, gids)
    expected = torch.tensor([-0.70711, -0.57735, 0.70711, -0.57735, 0.0, 1.15470])
    assert_close(adv, expected, atol=1e-5, rtol=0)
    mean, std = ops.group_stats(rewards, gids)
    assert_close(mean, torch.tensor([2.0, 3.0, 2.0, 3.0, 8.0, 3.0]))
    assert_close(std, torch.tensor([math.sqrt(2), math.sqrt(3), math.sqrt(2), math.sqrt(3), 0.0, math.sqrt(3)]))


def test_group_advantages_scale_none_is_centred_reward():
    """scale="none" (Dr.GRPO): A = R − mean_g. Group 0: R = (1, 0, 0, 0), mean 0.25 ⇒ (0.75, −0.25, −0.25, −0.25);
    group 1: R = (2, 4), mean 3 ⇒ (−1, 1)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    gids = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = ops.group_advantages(rewards, gids, scale="none")
    assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0]))


def test_group_advantages_scale_batch():
    """scale="batch": (R − mean_g)/std_batch. R = (1, 0, 3, 3), groups (0,0,1,1): centred (0.5, −0.5, 0, 0);
    batch mean 1.75, unbiased batch std √((0.5625+3.0625+1.5625+1.5625)/3) = √2.25 = 1.5 ⇒ (1/3, −1/3, 0, 0)."""
    adv = ops.group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.tensor([0, 0, 1, 1]), scale="batch")
    assert_close(adv, torch.tensor([1 / 3, -1 / 3, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_group_advantages_unknown_scale():
    with pytest.raises(ValueError, match="unknown advantage scale"):
        ops.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), scale="rank")


# ---------------------------------------------------------------------------------------------------
# log-probs and entropy from logits


@pytest.mark.parametrize("chunk_rows", [1, 2, 8])
def test_selective_log_softmax_matches_log_softmax_gather(chunk_rows):
    """B = 5 rows; chunk_rows 1 and 2 are smaller than the batch (2 does not divide 5)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 11, generator=g) * 3
    index = torch.randint(0, 11, (5, 4), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert_close(ops.selective_log_softmax(logits, index, chunk_rows=chunk_rows), expected)


def test_selective_log_softmax_gradient_matches():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 2, 7, generator=g)
    index = torch.randint(0, 7, (3, 2), generator=g)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ops.selective_log_softmax(a, index, chunk_rows=2).sum().backward()
    torch.log_softmax(b, -1).gather(-1, index.unsqueeze(-1)).sum().backward()
    assert_close(a.grad, b.grad)


def test_selective_log_softmax_upcasts_low_precision():
    """bf16 logits are computed in float32 (output dtype float32)."""
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    index = torch.zeros(2, 3, dtype=torch.long)
    out = ops.selective_log_softmax(logits, index)
    assert out.dtype == torch.float32
    assert_close(out, torch.log_softmax(logits.float(), -1)[..., 0])


def test_entropy_of_uniform_logits_is_ln_v():
    """Uniform p = 1/V ⇒ H = −Σ (1/V) ln(1/V) = ln V; V = 13 ⇒ 2.564949. Any constant logit row is uniform."""
    v = 13
    logits = torch.zeros(2, 3, v)
    logits[1] = 7.5
    assert_close(ops.entropy_from_logits(logits, chunk_rows=1), torch.full((2, 3), math.log(v)))


def test_entropy_matches_definition_and_has_no_grad():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 3, 9, generator=g) * 2).requires_grad_(True)
    h = ops.entropy_from_logits(logits, chunk_rows=3)
    p = torch.softmax(logits.detach(), -1)
    assert_close(h, -(p * p.log()).sum(-1))
    assert not h.requires_grad


# ---------------------------------------------------------------------------------------------------
# PPO-clip surrogate


def test_clipped_surrogate_ratio_one_gradient_is_minus_advantage():
    """ℓ = ℓ_old ⇒ ρ = 1, L = max(−A·1, −A·clip(1)) = −A, and ∂L/∂ℓ = −A·ρ = −A.
    A = (2, −0.5, 0) ⇒ L = (−2, 0.5, 0), grad = (−2, 0.5, 0)."""
    old = torch.tensor([[-1.0, -2.5, -0.3]])
    logps = old.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, -0.5, 0.0]])
    loss, clipped = ops.clipped_surrogate(logps, old, adv, 0.2, 0.28)
    assert_close(loss, torch.tensor([[-2.0, 0.5, 0.0]]))
    loss.sum().backward()
    assert_close(logps.grad, -adv)
    assert not clipped.any()


def test_clipped_surrogate_positive_advantage_above_clip_has_zero_gradient():
    """A = 1.5 > 0, ρ = 1.5 > 1 + ε_high = 1.28:  L = max(−1.5·1.5, −1.5·1.28) = −1.92 (clipped branch, constant)
    ⇒ ∂L/∂ℓ = 0."""
    old = torch.tensor([-1.0])
    logps = (old + math.log(1.5)).requires_grad_(True)
    loss, clipped = ops.clipped_surrogate(logps, old, torch.tensor([1.5]), 0.2, 0.28)
    assert_close(loss, torch.tensor([-1.92]))
    loss.sum().backward()
    assert_close(logps.grad, torch.zeros(1))
    assert clipped.all()


def test_clipped_surrogate_negative_advantage_below_clip_has_zero_gradient():
    """A = −2 < 0, ρ = 0.5 < 1 − ε_low = 0.8:  L = max(2·0.5, 2·0.8) = 1.6 (clipped branch) ⇒ ∂L/∂ℓ = 0."""
    old = torch.tensor([-0.7])
    logps = (old + math.log(0.5)).requires_grad_(True)
    loss, clipped = ops.clipped_surrogate(logps, old, torch.tensor([-2.0]), 0.2, 0.28)
    assert_close(loss, torch.tensor([1.6]))
    loss.sum().backward()
    assert_close(logps.grad, torch.zeros(1))
    assert clipped.all()


def test_clipped_surrogate_unclipped_side_keeps_gradient():
    """The pessimistic max keeps the unclipped branch on the 'wrong' side of the trust region:
    A = 1, ρ = 0.5:  max(−0.5, −0.8) = −0.5, ∂L/∂ℓ = −A·ρ = −0.5;
    A = −1, ρ = 1.5: max(1.5, 1.2) = 1.5,  ∂L/∂ℓ = −A·ρ = 1.5."""
    old = torch.tensor([-1.0, -1.0])
    logps = (old + torch.tensor([math.log(0.5), math.log(1.5)])).requires_grad_(True)
    loss, clipped = ops.clipped_surrogate(logps, old, torch.tensor([1.0, -1.0]), 0.2, 0.2)
    assert_close(loss, torch.tensor([-0.5, 1.5]))
    loss.sum().backward()
    assert_close(logps.grad, torch.tensor([-0.5, 1.5]))
    assert not clipped.any()


# ---------------------------------------------------------------------------------------------------
# GAE


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


# ---------------------------------------------------------------------------------------------------
# full-vocabulary position KL


def test_position_kl_matches_direct_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    ref, pol = torch.randn(5, 3, 11, generator=g), torch.randn(5, 3, 11, generator=g)
    a = pol.clone().requires_grad_(True)
    b = pol.clone().requires_grad_(True)
    chunked = ops.position_kl(ref, a, chunk_rows=2)
    p_ref = ref.softmax(-1)
    direct = (p_ref * (p_ref.log() - b.log_softmax(-1))).sum(-1)
    assert_close(chunked, direct)
    chunked.sum().backward()
    direct.sum().backward()
    assert_close(a.grad, b.grad)
    assert bool((chunked >= -1e-7).all())
    assert_close(ops.position_kl(ref, ref.clone()), torch.zeros(5, 3), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# truncated importance-sampling weights (sampler/trainer mismatch)


def test_truncated_is_weights_hand():
    """trainer (−1, −2), sampler (−1.5, −1): token ratios (e^0.5, e^−1) = (1.6487, 0.3679), capped at 1.5 → (1.5, 0.3679);
    sequence level one weight e^(0.5 − 1) = 0.6065 on both tokens; masked positions get 0."""
    trainer, sampler = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "token", 2.0), torch.tensor([[math.exp(0.5), math.exp(-1), 0.0]]))
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "token", 1.5), torch.tensor([[1.5, math.exp(-1), 0.0]]))
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "sequence", 2.0), torch.tensor([[math.exp(-0.5)] * 2 + [0.0]]))
