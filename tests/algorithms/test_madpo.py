"""MADPO (arXiv:2510.05342): a hand case (loss and gradient), constant weight ⇒ DPO bit for bit, the weight's fixed
points, the config checks, and a short run through the real CLI with reward-model scores in the pairs data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.madpo import MADPO, MADPOConfig, margin_weight
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def _pairs(scores, ref, n_pairs):
    """n_pairs pairs (chosen row then rejected row per group) of one token each."""
    return token_batch(torch.ones(2 * n_pairs, 1), {"is_chosen": torch.tensor([1.0, 0.0] * n_pairs),
                                                    "group_ids": torch.arange(n_pairs).repeat_interleave(2),
                                                    "margin_0": torch.tensor(scores), "ref_logps": torch.tensor(ref).reshape(-1, 1)},
                       {"groups": float(n_pairs)})


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_madpo_hand_loss_and_gradient():
    """β = 0.1, defaults c_max = 2, c_min = 0.5, λ = 1, τ = 2, k = (2 − 1)/(1 − 0.5) = 2.
    Pair 0: RM scores 1.5 / 1.0 → m = 0.5, c = 0.5 + 1.5/(1 + 2e^{−1.5}); Δ_w = 2 − 0 = 2, Δ_l = −1 − 0 = −1, h = 3.
    Pair 1: m = 4 − 0 = 4 → c = 0.5 + 1.5/(1 + 2e^{2}); Δ_w = 0.5, Δ_l = 1, h = −0.5.
    Pair 2: m = −3 ≤ −τ → w = 1; h = 1 − 0 = 1.
    w = σ(c m)/σ(m); L = (1/3) Σ w·(−log σ(β h)); dL/dℓ_w = −w β σ(−β h)/3 = −dL/dℓ_l."""
    batch = _pairs([1.5, 1.0, 4.0, 0.0, -3.0, 0.0], [0.0] * 6, 3)
    algo = MADPO(MADPOConfig())
    algo.prepare(batch)
    pol = leaf([[2.0], [-1.0], [0.5], [1.0], [1.0], [0.0]])
    out = algo.loss(batch, PolicyOutput(pol))
    out.loss.backward()
    ws, hs = [], [3.0, -0.5, 1.0]
    for m in (0.5, 4.0):
        c = 0.5 + 1.5 / (1 + 2 * math.exp(m - 2))
        ws.append(_sig(c * m) / _sig(m))
    ws.append(1.0)
    loss = sum(w * -math.log(_sig(0.1 * h)) for w, h in zip(ws, hs)) / 3
    assert ws[0] > 1 > ws[1]  # the hard pair amplified, the easy one damped
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    grad = []
    for w, h in zip(ws, hs):
        g = -w * 0.1 * _sig(-0.1 * h) / 3
        grad += [[g], [-g]]
    assert_close(pol.grad, torch.tensor(grad), rtol=1e-6, atol=1e-9)
    assert_close(batch.fields["madpo_weight"], torch.tensor(ws).repeat_interleave(2))


def test_weight_fixed_points():
    """c(τ) = 1 so w(τ) = 1; m ≤ −τ gives 1; c_max = 1 (or c_min = 1) gives w ≡ 1."""
    cfg = MADPOConfig()
    assert_close(margin_weight(torch.tensor([2.0, -2.0, -5.0]), cfg), torch.ones(3))
    m = torch.linspace(-6, 6, 13)
    assert torch.equal(margin_weight(m, MADPOConfig(c_max=1.0)), torch.ones(13))
    assert torch.equal(margin_weight(m, MADPOConfig(c_min=1.0, c_max=3.0)), torch.ones(13))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_constant_weight_is_dpo_bit_for_bit(loss_type):
    """c_max = c_min = 1 (w ≡ 1): MADPO's loss and gradients are DPO's, bit for bit."""
    torch.manual_seed(0)
    batch = _pairs(torch.randn(8).tolist(), torch.randn(8).tolist(), 4)
    batch.fields["ref_logps"] = torch.randn(8, 3)
    batch.completion_mask = torch.ones(8, 3)
    pol = torch.randn(8, 3)
    algo = MADPO(MADPOConfig(c_max=1.0, c_min=1.0, loss_type=loss_type))
    a, b = leaf(pol), leaf(pol)
    la = algo.loss(algo.prepare(batch), PolicyOutput(a)).loss
    lb = DPO(DPOConfig(loss_type=loss_type)).loss(batch, PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert torch.equal(a.grad, b.grad)


def test_micro_batches_keep_their_weights():
    """prepare puts each pair's weight on both its rows, so two micro-batches of one pair each sum to the full loss."""
    batch = _pairs([1.5, 1.0, 4.0, 0.0], [0.0] * 4, 2)
    algo = MADPO(MADPOConfig())
    algo.prepare(batch)
    pol = torch.tensor([[2.0], [-1.0], [0.5], [1.0]])
    full = algo.loss(batch, PolicyOutput(pol)).loss
    parts = sum(algo.loss(batch.select(torch.tensor(i)), PolicyOutput(pol[i])).loss for i in ([0, 1], [2, 3]))
    assert_close(parts, full)


def test_config_and_data_checks():
    with pytest.raises(ValueError, match="c_min ≤ 1 ≤ c_max"):
        MADPOConfig(c_max=0.8)
    with pytest.raises(ValueError, match="c_min ≤ 1 ≤ c_max"):
        MADPOConfig(c_min=0.0)
    with pytest.raises(ValueError, match="lam"):
        MADPOConfig(lam=0.0)
    with pytest.raises(ValueError, match="tau"):
        MADPOConfig(tau=-1.0)
    with pytest.raises(ValueError, match="beta"):
        MADPOConfig(beta=0.0)
    batch = _pairs([0.0, 0.0], [0.0, 0.0], 1)
    del batch.fields["margin_0"]
    with pytest.raises(UserError, match="chosen_margins"):
        MADPO(MADPOConfig()).prepare(batch)


@pytest.mark.slow
def test_cli_madpo_two_steps(tmp_path):
    """Two steps of `tokalign train tokalign.algorithms.madpo:MADPO` on pairs carrying reward-model scores."""
    data = tmp_path / "prefs.jsonl"
    rows = [("1+1=", "2", "3", 2.0, -1.0), ("2+3=", "5", "6", 0.3, 0.1), ("4+4=", "8", "9", 1.0, -4.0)]
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r, "chosen_margins": [sw], "rejected_margins": [sl]}) + "\n"
                            for q, c, r, sw, sl in rows))
    out = tmp_path / "madpo"
    cli("train", "tokalign.algorithms.madpo:MADPO", "--data", str(data), "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(m["madpo/weight_mean"] > 0 for m in metrics)
