"""GRPO (arXiv:2402.03300) and its Dr.GRPO (arXiv:2503.20783) and DAPO (arXiv:2503.14476) configurations on hand cases:
TokenBatch and PolicyOutput are built directly, the expected numbers are worked out in each docstring; micro-batches
adding up to the full batch; the sampler/trainer mismatch correction (truncated importance sampling) of the GRPO
family's shared loss tail. CPU only, seeded. TRL parity: tests/algorithms/test_trl_parity.py.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.grpo import DAPO, GRPO, DAPOConfig, DrGRPO, DrGRPOConfig, GRPOConfig
from tokalign.batching import Seq, collate
from tokalign.protocols import PolicyOutput


# ---------------------------------------------------------------------------------------------------
# GRPO


def _grpo_hand():
    """mask = [[1,1,1],[1,1,0]], A = (+1, −1), ρ = [[1, 1.5, 0.5], [1, 1.5, ·]], ℓ_old given."""
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, -0.7, 0.0]])
    ratio = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 1.0]])
    logps = _leaf(old + ratio.log())
    batch = _batch(mask, {"advantages": torch.tensor([1.0, -1.0]), "old_logps": old})
    return batch, PolicyOutput(logps=logps)


def test_grpo_loss_hand_token_mean():
    """ε_low = ε_high = 0.2, L_t = max(−Aρ, −A·clip(ρ, 0.8, 1.2)):
    row 0 (A = +1): ρ=1 → −1;  ρ=1.5 → max(−1.5, −1.2) = −1.2 (clipped);  ρ=0.5 → max(−0.5, −0.8) = −0.5
    row 1 (A = −1): ρ=1 → 1;   ρ=1.5 → max(1.5, 1.2) = 1.5;  third token masked
    token-mean = (−1 − 1.2 − 0.5 + 1 + 1.5)/5 = −0.2/5 = −0.04
    ∂L/∂ℓ_t = −Aρ/5 on unclipped tokens, 0 on the clipped one:
    row 0: (−1/5, 0, −0.5/5) = (−0.2, 0, −0.1);  row 1: (1/5, 1.5/5, 0) = (0.2, 0.3, 0)
    clip_fraction = 1 clipped / 5 tokens = 0.2"""
    batch, out = _grpo_hand()
    res = GRPO(GRPOConfig(epsilon_low=0.2, epsilon_high=0.2, aggregation="token-mean")).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.04))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.2, 0.0, -0.1], [0.2, 0.3, 0.0]]))
    assert res.metrics["clip_fraction"] == pytest.approx(0.2)
    assert res.metrics["advantage/abs_mean"] == pytest.approx(1.0)


def test_grpo_loss_hand_seq_mean_token_mean():
    """Same per-token losses. Row means: (−1 − 1.2 − 0.5)/3 = −0.9 and (1 + 1.5)/2 = 1.25;
    seq-mean-token-mean = (−0.9 + 1.25)/2 = 0.175.
    ∂L/∂ℓ_t = −Aρ/(B·|y_i|): row 0: (−1/6, 0, −0.5/6) = (−0.166667, 0, −0.083333); row 1: (1/4, 1.5/4, 0)."""
    batch, out = _grpo_hand()
    res = GRPO(GRPOConfig(aggregation="seq-mean-token-mean")).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.175))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-1 / 6, 0.0, -0.5 / 6], [0.25, 0.375, 0.0]]))


def test_grpo_loss_hand_sum_norm_and_kl():
    """seq-mean-token-sum-norm with T_max = 3: Σ m·L / (B·T_max) = −0.2/(2·3) = −0.0333333.
    KL term, β = 0.1, k3: ℓ_ref = ℓ except ℓ_ref − ℓ = ln 2 on token (0, 0):
    k3 = e^{ln 2} − ln 2 − 1 = 2 − 0.6931472 − 1 = 0.3068528;  token-mean loss = −0.04 + 0.1·0.3068528/5 = −0.0338629."""
    batch, out = _grpo_hand()
    batch.totals["max_completion_len"] = 3.0
    res = GRPO(GRPOConfig(aggregation="seq-mean-token-sum-norm")).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.2 / 6))

    batch, out = _grpo_hand()
    shift = torch.zeros(2, 3)
    shift[0, 0] = math.log(2)
    batch.fields["ref_logps"] = out.logps.detach() + shift
    res = GRPO(GRPOConfig(beta=0.1, kl_estimator="k3")).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.04 + 0.1 * 0.3068528 / 5))
    assert res.metrics["kl"] == pytest.approx(0.3068528 / 5, rel=1e-5)


def test_grpo_prepare_group_advantages():
    """rewards (1, 0 | 2, 2 | 3, 1): A = (+0.7071, −0.7071 | 0, 0 | +0.7071, −0.7071)."""
    batch = _batch(torch.ones(6, 2), {"rewards": torch.tensor([1.0, 0.0, 2.0, 2.0, 3.0, 1.0]),
                                       "group_ids": torch.tensor([0, 0, 1, 1, 2, 2])})
    GRPO(GRPOConfig()).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.7071, -0.7071, 0, 0, 0.7071, -0.7071]), atol=1e-4, rtol=0)


def test_grpo_all_equal_group_rewards_zero_loss_and_gradient():
    """Every group has equal rewards ⇒ A ≡ 0 ⇒ L_t = max(−0·ρ, −0·clip ρ) = 0 and ∂L/∂ℓ = 0, whatever ρ."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    batch = _batch(mask, {"rewards": torch.tensor([1.0, 1.0, 0.0, 0.0]), "group_ids": torch.tensor([0, 0, 1, 1]),
                          "old_logps": -torch.rand(4, 4, generator=g) * 3})
    out = PolicyOutput(logps=_leaf(-torch.rand(4, 4, generator=g) * 3))
    for aggregation in ops.AGGREGATIONS:
        algo = GRPO(GRPOConfig(aggregation=aggregation))
        algo.prepare(batch)
        assert_close(batch.fields["advantages"], torch.zeros(4))
        batch.totals["max_completion_len"] = 4.0
        res = algo.loss(batch, out)
        assert_close(res.loss, torch.tensor(0.0))
        out.logps.grad = None
        res.loss.backward()
        assert_close(out.logps.grad, torch.zeros(4, 4))


@pytest.mark.parametrize("aggregation", ops.AGGREGATIONS)
def test_grpo_kl_with_reference_equal_policy_changes_nothing(aggregation):
    """ℓ_ref = ℓ ⇒ k3 = e^0 − 0 − 1 = 0 and ∂k3/∂ℓ = 1 − e^0 = 0: the β = 0.04 loss and gradient equal β = 0."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    logps = -torch.rand(3, 3, generator=g) * 2
    fields = {"advantages": torch.tensor([0.5, -1.0, 2.0]), "old_logps": logps + 0.3 * torch.randn(3, 3, generator=g),
              "ref_logps": logps.clone()}
    totals = {"max_completion_len": 3.0}
    results = []
    for beta in (0.0, 0.04):
        out = PolicyOutput(logps=_leaf(logps))
        res = GRPO(GRPOConfig(beta=beta, aggregation=aggregation)).loss(_batch(mask, fields, totals), out)
        res.loss.backward()
        results.append((res.loss.detach(), out.logps.grad))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


def test_grpo_needs_reference_only_with_kl():
    assert GRPO(GRPOConfig()).needs.reference is False
    assert GRPO(GRPOConfig(beta=0.04)).needs.reference is True
    assert GRPO(GRPOConfig()).needs.groups and GRPO(GRPOConfig()).needs.old_logps


def test_grpo_config_validation():
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k9")
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="rank")
    with pytest.raises(ValueError, match="≥ 0"):
        GRPOConfig(beta=-1.0)


@pytest.mark.parametrize("aggregation", ops.AGGREGATIONS)
def test_grpo_micro_batches_sum_to_full_batch(aggregation):
    """A collated batch of 3 groups (7 rows, lengths 1–4), run whole and as micro-batches of 2 rows (groups kept
    whole, each micro-batch trimmed to its width): the micro-batch losses and gradients add up to the full-batch ones,
    because the loss divides by the batch totals (tokens, seqs, max_completion_len)."""
    g = torch.Generator().manual_seed(2)
    lengths = [2, 3, 1, 4, 1, 2, 1]
    gids = [0, 0, 1, 1, 2, 2, 2]
    seqs = [Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(r)},
                token={"old_logps": (-torch.rand(n, generator=g)).tolist(), "pol": (-torch.rand(n, generator=g)).tolist()})
            for i, (n, gid, r) in enumerate(zip(lengths, gids, [1, 0, 0.5, 0.2, 1, 1, 0]))]
    batch = collate(seqs, pad_id=0, max_completion_len=6)
    algo = GRPO(GRPOConfig(aggregation=aggregation, beta=0.1, epsilon_high=0.28))
    algo.prepare(batch)
    batch.fields["ref_logps"] = batch.fields["old_logps"].flip(0) * batch.completion_mask  # arbitrary, fixed

    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)  # per completion token


# ---------------------------------------------------------------------------------------------------
# Dr.GRPO and DAPO


def test_drgrpo_per_token_weight_independent_of_length():
    """Dr.GRPO: A = R − mean_g (no std): R = (1, 0) ⇒ A = (0.5, −0.5). On-policy (ρ = 1) the loss is
    Σ_{i,t} m·(−A_i) / (B·T_max) with T_max = 6 (the configured max completion length, not the longest row = 4), so
    ∂L/∂ℓ_t = −A_i/(B·T_max) = ∓0.5/12 = ∓0.0416667 for *every* token of row i, whether |y_1| = 1 or |y_2| = 4.
    (Contrast seq-mean-token-mean: −A_i/(B·|y_i|) = −0.25 for the 1-token row, +0.0625 for the 4-token row.)
    Loss value: (−0.5·1 + 0.5·4)/12 = 1.5/12 = 0.125."""
    batch = collate([Seq([1, 2], [3], 0, row={"rewards": 1.0}), Seq([1, 2], [4, 5, 6, 7], 0, row={"rewards": 0.0})],
                    pad_id=0, max_completion_len=6)
    algo = DrGRPO(DrGRPOConfig())
    algo.prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))
    logps = _leaf(-torch.ones(2, 5))
    batch.fields["old_logps"] = logps.detach().clone()
    res = algo.loss(batch, PolicyOutput(logps))
    assert_close(res.loss, torch.tensor(0.125))
    res.loss.backward()
    mask = batch.completion_mask.bool()
    weights = logps.grad / -batch.fields["advantages"][:, None]
    assert_close(weights[mask], torch.full((5,), 1 / 12))
    assert_close(logps.grad[~mask], torch.zeros(int((~mask).sum())))

    contrast = _leaf(-torch.ones(2, 5))
    GRPO(GRPOConfig(aggregation="seq-mean-token-mean")).loss(batch, PolicyOutput(contrast)).loss.backward()
    assert_close(contrast.grad[mask], torch.tensor([-0.25, 0.0625, 0.0625, 0.0625, 0.0625]))


def test_drgrpo_config_defaults():
    c = DrGRPOConfig()
    assert (c.scale_rewards, c.aggregation, c.beta) == ("none", "seq-mean-token-sum-norm", 0.0)


def test_dapo_config_defaults():
    """DAPO (arXiv:2503.14476): ε_low 0.2, ε_high 0.28 (clip-higher), token-mean, no KL, group-std advantages."""
    c = DAPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.aggregation, c.beta, c.scale_rewards) == (0.2, 0.28, "token-mean", 0.0, "group")
    assert DAPO.Config is DAPOConfig and isinstance(DAPO(c), GRPO)


def test_dapo_clip_higher():
    """A = +1, ρ = 1.25: GRPO (ε_high 0.2) clips at 1.2 ⇒ L = −1.2, ∂L/∂ℓ = 0;
    DAPO (ε_high 0.28) does not ⇒ L = −1.25, ∂L/∂ℓ = −Aρ = −1.25."""
    old = torch.tensor([[-1.0]])
    batch = _batch([[1.0]], {"advantages": torch.tensor([1.0]), "old_logps": old})
    for algo, loss, grad in ((GRPO(GRPOConfig()), -1.2, 0.0), (DAPO(DAPOConfig()), -1.25, -1.25)):
        lp = _leaf(old + math.log(1.25))
        res = algo.loss(batch, PolicyOutput(lp))
        res.loss.backward()
        assert_close(res.loss, torch.tensor(loss))
        assert_close(lp.grad, torch.tensor([[grad]]))


# ---------------------------------------------------------------------------------------------------
# sampler/trainer mismatch: truncated importance-sampling weights on the policy term, the logged log-prob gap


def test_grpo_mismatch_correction_weights_the_policy_term():
    """On-policy (ρ = 1), R = (1, 0) → A = ±0.7071; token-level TIS multiplies each token's −A·ρ by its weight, so
    ∂L/∂ℓ_t = −A_i w_t / N; with no correction the gap is still logged and nothing changes."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]])
    sampler = torch.tensor([[-1.5, -1.0], [-0.5, -0.7]])
    fields = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "old_logps": old, "sampler_logps": sampler}
    grads, metrics = {}, {}
    for level in ("none", "token"):
        algo = GRPO(GRPOConfig(mismatch_correction=level))
        batch = algo.prepare(_batch(torch.ones(2, 2), dict(fields), {"tokens": 4.0}))
        lp = _leaf(old)
        out = algo.loss(batch, PolicyOutput(lp))
        out.loss.backward()
        grads[level], metrics[level] = lp.grad, out.metrics
    a = 2 ** -0.5
    w = torch.tensor([[math.exp(0.5), math.exp(-1)], [1.0, 1.0]])
    assert_close(grads["none"], torch.tensor([[-a, -a], [a, a]]) / 4)
    assert_close(grads["token"], torch.tensor([[-a, -a], [a, a]]) * w / 4)
    assert metrics["none"]["mismatch/logp_gap_abs"] == pytest.approx((0.5 + 1.0) / 4)
    assert "mismatch/is_weight_mean" in metrics["token"] and "mismatch/is_weight_mean" not in metrics["none"]
    with pytest.raises(ValueError, match="mismatch_correction"):
        GRPOConfig(mismatch_correction="tokens")
