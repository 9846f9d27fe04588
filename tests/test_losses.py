"""Algorithm losses (GRPO / Dr.GRPO / DAPO, DPO, SFT) on hand cases: TokenBatch and PolicyOutput are built
directly, the expected numbers are worked out in each docstring. CPU only, seeded.

Reference: /work/shared/reference/algorithms.md §0–2.
Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.dpo import DPO, DPOConfig, sigmoid_loss
from tokalign.algorithms.grpo import DAPO, GRPO, DAPOConfig, DrGRPO, DrGRPOConfig, GRPOConfig
from tokalign.algorithms.sft import SFT, SFTConfig
from tokalign.protocols import PolicyOutput
from tokalign.batching import Seq, collate, micro_batches
from conftest import leaf as _leaf, token_batch as _batch, micro_batch_check



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
# DPO


def _dpo_batch(chosen, ref_chosen, rejected, ref_rejected, mask_c, mask_r, totals=None):
    """One pair: row 0 chosen, row 1 rejected (the layout DPO.loss expects)."""
    fields = {"ref_logps": torch.tensor([ref_chosen, ref_rejected]), "is_chosen": torch.tensor([1.0, 0.0]),
              "group_ids": torch.tensor([0, 0])}
    return _batch([mask_c, mask_r], fields, totals), PolicyOutput(_leaf([chosen, rejected]))


def test_dpo_policy_equals_reference_is_ln2():
    """ℓ = ℓ_ref ⇒ h = 0 ⇒ L = −log σ(0) = ln 2 = 0.693147, and dL/dh = −β σ(−βh) = −β/2:
    β = 0.1 ⇒ ∂L/∂ℓ = −0.05 on each chosen token, +0.05 on each rejected token (h = Δ_w − Δ_l), 0 on padding;
    β = 0.5 ⇒ ∓0.25."""
    for beta in (0.1, 0.5):
        lp_c, lp_r = [-1.0, -2.0, 0.0], [-0.5, -3.0, -1.0]
        batch, out = _dpo_batch(lp_c, lp_c, lp_r, lp_r, [1, 1, 0], [1, 1, 1])
        res = DPO(DPOConfig(beta=beta)).loss(batch, out)
        assert_close(res.loss, torch.tensor(math.log(2)))
        res.loss.backward()
        assert_close(out.logps.grad, torch.tensor([[-beta / 2, -beta / 2, 0.0], [beta / 2, beta / 2, beta / 2]]))


def test_dpo_hand_margin():
    """β = 0.1. chosen ℓ = (−1, −2), ℓ_ref = (−1.5, −2.5) ⇒ Δ_w = −3 − (−4) = 1;
    rejected ℓ = (−2, −2, −1), ℓ_ref = (−1, −1.5, −0.5) ⇒ Δ_l = −5 − (−3) = −2;  h = 1 − (−2) = 3, βh = 0.3.
    L = −log σ(0.3) = log(1 + e^{−0.3}) = log 1.7408182 = 0.5543552
    dL/dh = −β σ(−0.3) = −0.1 · 0.4255575 = −0.0425557 (per chosen token; +0.0425557 per rejected token)
    metrics: rewards/chosen = βΔ_w = 0.1, rewards/rejected = −0.2, margin 0.3, accuracy 1."""
    batch, out = _dpo_batch([-1.0, -2.0, 0.0], [-1.5, -2.5, 0.0], [-2.0, -2.0, -1.0], [-1.0, -1.5, -0.5],
                            [1, 1, 0], [1, 1, 1])
    res = DPO(DPOConfig(beta=0.1)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.5543552))
    res.loss.backward()
    g = 0.0425557
    assert_close(out.logps.grad, torch.tensor([[-g, -g, 0.0], [g, g, g]]))
    assert res.metrics["rewards/chosen"] == pytest.approx(0.1)
    assert res.metrics["rewards/rejected"] == pytest.approx(-0.2)
    assert res.metrics["rewards/margin"] == pytest.approx(0.3)
    assert res.metrics["rewards/accuracy"] == 1.0


def test_dpo_label_smoothing_hand():
    """Same pair (βh = 0.3), label smoothing s = 0.1 (conservative DPO):
    L = −0.9 log σ(0.3) − 0.1 log σ(−0.3);  −log σ(−x) = −log σ(x) + x ⇒
    L = 0.9·0.5543552 + 0.1·(0.5543552 + 0.3) = 0.5543552 + 0.03 = 0.5843552
    dL/dh = −β[(1 − s)σ(−βh) − s σ(βh)] = −β(σ(−βh) − s) = −0.1·(0.4255575 − 0.1) = −0.0325557"""
    batch, out = _dpo_batch([-1.0, -2.0, 0.0], [-1.5, -2.5, 0.0], [-2.0, -2.0, -1.0], [-1.0, -1.5, -0.5],
                            [1, 1, 0], [1, 1, 1])
    res = DPO(DPOConfig(beta=0.1, label_smoothing=0.1)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.5843552))
    res.loss.backward()
    g = 0.0325557
    assert_close(out.logps.grad, torch.tensor([[-g, -g, 0.0], [g, g, g]]))


def test_dpo_sigmoid_loss_function():
    """sigmoid_loss(h) per pair: h = (0, 3, −3), β = 0.1 ⇒ (ln 2, 0.5543552, 0.5543552 + 0.3 = 0.8543552)."""
    assert_close(sigmoid_loss(torch.tensor([0.0, 3.0, -3.0]), 0.1), torch.tensor([math.log(2), 0.5543552, 0.8543552]))


def test_dpo_pairs_average_and_micro_batches():
    """Three pairs with random log-probs: the loss is the mean over pairs of −log σ(β h_p); with totals["groups"] = 3,
    micro-batches of one pair each give losses (and gradients) that sum to the full-batch mean."""
    g = torch.Generator().manual_seed(3)
    seqs = []
    for p, (n_c, n_r) in enumerate([(2, 3), (1, 1), (4, 2)]):
        for n, chosen in ((n_c, 1.0), (n_r, 0.0)):
            seqs.append(Seq([1, 2], list(range(5, 5 + n)), p, row={"is_chosen": chosen},
                            token={"pol": (-torch.rand(n, generator=g) * 3).tolist(),
                                   "ref_logps": (-torch.rand(n, generator=g) * 3).tolist()}))
    batch = collate(seqs, pad_id=0)
    algo = DPO(DPOConfig(beta=0.3))
    delta = ((batch.fields["pol"] - batch.fields["ref_logps"]) * batch.completion_mask).sum(-1)
    h = delta[0::2] - delta[1::2]
    assert all(len(mb) == 2 and mb.fields["is_chosen"].tolist() == [1.0, 0.0] for mb in micro_batches(batch, 2))
    full, summed, full_grad, mb_grad, _ = micro_batch_check(algo, batch)
    assert_close(full, (-torch.nn.functional.logsigmoid(0.3 * h)).mean())
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)


def test_dpo_config_validation():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)
    assert DPO(DPOConfig()).needs.reference is True


# ---------------------------------------------------------------------------------------------------
# SFT


def test_sft_nll_hand():
    """ℓ = [[−1, −2, −3], [−0.5, −4, −9]], mask = [[1, 1, 0], [1, 0, 0]]
    token-mean NLL = (1 + 2 + 0.5)/3 = 1.1666667, ∂L/∂ℓ = −1/3 on each completion token, 0 elsewhere;
    seq-mean-token-mean NLL = ((1 + 2)/2 + 0.5/1)/2 = (1.5 + 0.5)/2 = 1.0."""
    mask = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    lp = _leaf([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    res = SFT(SFTConfig()).loss(_batch(mask), PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(3.5 / 3))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))
    res = SFT(SFTConfig(aggregation="seq-mean-token-mean")).loss(_batch(mask), PolicyOutput(_leaf(lp.detach())))
    assert_close(res.loss, torch.tensor(1.0))


def test_sft_micro_batches_with_totals():
    """token-mean over micro-batches with totals["tokens"] sums to the batch NLL."""
    seqs = [Seq([1], [2, 3, 4], 0, token={"pol": [-1.0, -2.0, -3.0]}), Seq([1, 1], [5], 1, token={"pol": [-4.0]}),
            Seq([1], [6, 7], 2, token={"pol": [-0.5, -0.25]})]
    batch = collate(seqs, pad_id=0)
    algo = SFT(SFTConfig())
    full = algo.loss(batch, PolicyOutput(batch.fields["pol"])).loss
    assert_close(full, torch.tensor((1 + 2 + 3 + 4 + 0.5 + 0.25) / 6))
    parts = [algo.loss(mb, PolicyOutput(mb.fields["pol"])).loss for mb in micro_batches(batch, 1)]
    assert_close(sum(parts), full)


def test_ipo_hand_and_minimum():
    """IPO uses per-token means: same pair as test_dpo_hand_margin, Δ̄_w = (0.5 + 0.5)/2 = 0.5,
    Δ̄_l = (−1 − 0.5 − 0.5)/3 = −2/3 ⇒ h̄ = 7/6. β = 0.1 ⇒ target 1/(2β) = 5:
    L = (7/6 − 5)² = (−23/6)² = 14.694444;  ∂L/∂ℓ_chosen,t = 2(h̄ − 5)·(1/2) = −23/6 = −3.833333,
    ∂L/∂ℓ_rejected,t = −2(h̄ − 5)·(1/3) = 23/9 = 2.555556.  Limiting case: h̄ = 1/(2β) ⇒ L = 0, zero gradient."""
    batch, out = _dpo_batch([-1.0, -2.0, 0.0], [-1.5, -2.5, 0.0], [-2.0, -2.0, -1.0], [-1.0, -1.5, -0.5],
                            [1, 1, 0], [1, 1, 1])
    res = DPO(DPOConfig(beta=0.1, loss_type="ipo")).loss(batch, out)
    assert_close(res.loss, torch.tensor((7 / 6 - 5) ** 2))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-23 / 6, -23 / 6, 0.0], [23 / 9, 23 / 9, 23 / 9]]))
    # β = 1/(2·(7/6)) = 3/7 puts h̄ exactly on the target
    batch, out = _dpo_batch([-1.0, -2.0, 0.0], [-1.5, -2.5, 0.0], [-2.0, -2.0, -1.0], [-1.0, -1.5, -0.5],
                            [1, 1, 0], [1, 1, 1])
    res = DPO(DPOConfig(beta=3 / 7, loss_type="ipo")).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.0), atol=1e-10, rtol=0)
    res.loss.backward()
    assert_close(out.logps.grad, torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_hinge_hand_and_saturation():
    """Hinge (SLiC/RSO): h = 3 (test_dpo_hand_margin). β = 0.1 ⇒ L = max(0, 1 − 0.3) = 0.7, ∂L/∂h = −β = −0.1
    (−0.1 per chosen token, +0.1 per rejected). β = 0.5 ⇒ βh = 1.5 ≥ 1 ⇒ L = 0 and zero gradient."""
    args = ([-1.0, -2.0, 0.0], [-1.5, -2.5, 0.0], [-2.0, -2.0, -1.0], [-1.0, -1.5, -0.5], [1, 1, 0], [1, 1, 1])
    batch, out = _dpo_batch(*args)
    res = DPO(DPOConfig(beta=0.1, loss_type="hinge")).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.7))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.1, -0.1, 0.0], [0.1, 0.1, 0.1]]))
    batch, out = _dpo_batch(*args)
    res = DPO(DPOConfig(beta=0.5, loss_type="hinge")).loss(batch, out)
    assert float(res.loss.detach()) == 0.0
    res.loss.backward()
    assert float(out.logps.grad.abs().max()) == 0.0


def test_ipo_and_hinge_presets():
    from tokalign.algorithms.dpo import IPO, Hinge

    assert IPO.Config().loss_type == "ipo" and Hinge.Config().loss_type == "hinge"
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type sigmoid only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
