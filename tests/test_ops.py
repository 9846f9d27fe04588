"""Shared tensor maths (tokalign/ops.py) and batching (tokalign/train/batching.py), on hand-made
examples whose expected numbers are worked out in each docstring. CPU only, seeded.

Reference: /work/shared/reference/algorithms.md §0 (aggregation modes, KL estimators), §1 (GRPO, PPO tests).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tokalign import ops
from tokalign.batching import Seq, collate, micro_batches

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
# collate and micro_batches


def _seqs():
    return [
        Seq([5, 6, 7], [8, 9], 0, row={"rewards": 1.0}, token={"old_logps": [-0.1, -0.2]}),
        Seq([5, 6], [10, 11, 12], 0, row={"rewards": 0.0}, token={"old_logps": [-0.3, -0.4, -0.5]}),
        Seq([20], [21], 1, row={"rewards": 0.5}, token={"old_logps": [-0.6]}),
        Seq([22, 23, 24, 25], [26, 27, 28], 1, row={"rewards": 0.5}, token={"old_logps": [-0.7, -0.8, -0.9]}),
        Seq([30, 31], [32], 2, row={"rewards": 0.0}, token={"old_logps": [-1.0]}),
        Seq([30, 31], [33, 34], 2, row={"rewards": 1.0}, token={"old_logps": [-1.1, -1.2]}),
        Seq([30, 31], [35], 2, row={"rewards": 1.0}, token={"old_logps": [-1.3]}),
    ]


def test_collate_layout_and_alignment():
    """Row 0: prompt (5,6,7), completion (8,9) ⇒ input_ids = 5 6 7 8 9 0 0 (pad 0, L = 7);
    per-token column t predicts input_ids[t+1], so completion token j sits at column len(prompt) − 1 + j:
    completion_mask row 0 = 0 0 1 1 0 0 and old_logps row 0 = 0 0 −0.1 −0.2 0 0."""
    batch = collate(_seqs(), pad_id=0)
    assert batch.input_ids.shape == (7, 7) and batch.completion_mask.shape == (7, 6)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 0, 0]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch.completion_mask[0].tolist() == [0, 0, 1, 1, 0, 0]
    assert_close(batch.fields["old_logps"][0], torch.tensor([0, 0, -0.1, -0.2, 0, 0]))
    for i, s in enumerate(_seqs()):
        m = batch.completion_mask[i].bool()
        # the masked *predicted* tokens are exactly the completion, in order
        assert batch.input_ids[i, 1:][m].tolist() == s.completion_ids
        assert_close(batch.fields["old_logps"][i][m], torch.tensor(s.token["old_logps"]))
        assert int(batch.attention_mask[i].sum()) == len(s.prompt_ids) + len(s.completion_ids)
    assert_close(batch.fields["rewards"], torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 1.0]))
    assert batch.fields["group_ids"].tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert batch.totals == {"tokens": 13.0, "seqs": 7.0, "groups": 3.0, "max_completion_len": 3.0}
    assert collate(_seqs(), pad_id=0, max_completion_len=16).totals["max_completion_len"] == 16.0


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_micro_batches_never_split_groups(size):
    """Groups (0,0 | 1,1 | 2,2,2): every micro-batch holds whole groups, rows keep their order, totals stay
    global, and each micro-batch is trimmed to its own longest sequence."""
    batch = collate(_seqs(), pad_id=0)
    mbs = micro_batches(batch, size)
    seen = []
    for mb in mbs:
        gids = mb.fields["group_ids"].tolist()
        for g in set(gids):
            assert gids.count(g) == batch.fields["group_ids"].tolist().count(g), f"group {g} split at size {size}"
        assert mb.totals == batch.totals
        width = int(mb.attention_mask.sum(-1).max())
        assert mb.input_ids.shape[1] == width and mb.completion_mask.shape[1] == width - 1
        assert mb.fields["old_logps"].shape[1] == width - 1
        seen += gids
    assert seen == batch.fields["group_ids"].tolist()
    # the trimmed per-token tensors still line up: same completion tokens and old_logps
    rows = iter(range(len(batch)))
    for mb in mbs:
        for j in range(len(mb)):
            i = next(rows)
            m_full, m_mb = batch.completion_mask[i].bool(), mb.completion_mask[j].bool()
            assert batch.input_ids[i, 1:][m_full].tolist() == mb.input_ids[j, 1:][m_mb].tolist()
            assert_close(batch.fields["old_logps"][i][m_full], mb.fields["old_logps"][j][m_mb])


def test_micro_batches_size_zero_or_large_is_one_batch():
    batch = collate(_seqs(), pad_id=0)
    for size in (0, 7, 50):
        (only,) = micro_batches(batch, size)
        assert only is batch


def test_micro_batches_group_sizes():
    """size 2: (0,0) closes at 2 rows, (1,1) at 2 rows, (2,2,2) is kept whole ⇒ chunk sizes 2, 2, 3.
    size 3: (0,0) has 2 < 3 rows so group 1 joins it ⇒ 4, then 3."""
    batch = collate(_seqs(), pad_id=0)
    assert [len(mb) for mb in micro_batches(batch, 2)] == [2, 2, 3]
    assert [len(mb) for mb in micro_batches(batch, 3)] == [4, 3]
