"""DPO (arXiv:2305.18290) and the losses of the same module that differ from it only in the function of the margin — IPO
(arXiv:2310.12036) and hinge (SLiC / RSO, arXiv:2309.06657) — on hand cases: TokenBatch and PolicyOutput are built
directly, the expected numbers are worked out in each docstring. CPU only, seeded. TRL parity:
tests/algorithms/test_trl_parity.py.

Notation: ℓ = policy log-prob, ℓ_ref = reference log-prob, Δ = Σ_t (ℓ − ℓ_ref), h = Δ_w − Δ_l, m = mask."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig, sigmoid_loss
from tokalign.batching import Seq, collate, micro_batches
from tokalign.protocols import PolicyOutput


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
# IPO and hinge


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
