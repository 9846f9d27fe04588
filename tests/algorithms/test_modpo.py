"""MODPO (arXiv:2310.03708): a hand case with data margins, the limiting case (no margins, w_0 = 1 ⇒ DPO), the margin
model's implicit reward, the config checks, and a slow run through the real CLI with data and model margins."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.modpo import MODPO, MODPOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def _pair_batch(fields):
    return token_batch(torch.ones(2, 1), {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                          "ref_logps": torch.zeros(2, 1), **fields}, {"groups": 1.0})


def test_modpo_hand_with_data_margins():
    """β = 0.1, w = (0.5, 0.5), Δ_w = 2, Δ_l = −1, m_w = 0.2, m_l = 0: r_w = (0.2 − 0.1)/0.5 = 0.2,
    r_l = (−0.1 − 0)/0.5 = −0.2, L = −log σ(0.4) = 0.513015."""
    algo = MODPO(MODPOConfig(margin_source="data"))
    assert algo.needs.models == () and algo.needs.reference
    batch = algo.prepare(_pair_batch({"margin_0": torch.tensor([0.2, 0.0])}))
    out = algo.loss(batch, PolicyOutput(leaf([[2.0], [-1.0]])))
    assert_close(out.loss, torch.tensor(math.log1p(math.exp(-0.4))))


def test_modpo_no_margins_w0_1_is_dpo():
    """No margin objectives and w_0 = 1: MODPO ≡ DPO (loss and gradients)."""
    torch.manual_seed(0)
    pol = torch.randn(2, 3)
    batch = _pair_batch({"ref_logps": torch.randn(2, 3)})
    batch.completion_mask = torch.ones(2, 3)
    algo = MODPO(MODPOConfig(weights=[1.0], margin_source="data"))
    a, b = leaf(pol), leaf(pol)
    la = algo.loss(algo.prepare(batch), PolicyOutput(a)).loss
    lb = DPO(DPOConfig()).loss(batch, PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert_close(la, lb)
    assert_close(a.grad, b.grad)


def test_modpo_margin_model_is_its_implicit_reward():
    """margin_source model: m(y) = β_m Σ_t (ℓ^margin − ℓ^ref) = 0.1·(3 − 0) = 0.3 for the chosen row, 0.1·(−1) for the
    rejected; the loss then uses those as data margins would."""
    algo = MODPO(MODPOConfig(margin_beta=0.1))
    assert algo.needs.models == ("margin",)
    batch = algo.prepare(_pair_batch({"margin_logps": torch.tensor([[3.0], [-1.0]])}))
    assert_close(batch.fields["margins"], torch.tensor([[0.3], [-0.1]]))
    data = MODPO(MODPOConfig(margin_source="data")).prepare(_pair_batch({"margin_0": torch.tensor([0.3, -0.1])}))
    pol = leaf([[1.0], [0.5]])
    assert_close(algo.loss(batch, PolicyOutput(pol)).loss, MODPO(MODPOConfig(margin_source="data")).loss(data, PolicyOutput(pol)).loss)


def test_modpo_validation():
    with pytest.raises(ValueError, match="w_0"):
        MODPOConfig(weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="one margin objective"):
        MODPOConfig(weights=[0.5, 0.3, 0.2])
    with pytest.raises(UserError, match="chosen_margins"):
        MODPO(MODPOConfig(margin_source="data")).prepare(_pair_batch({}))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_modpo_data_and_model_margins(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r, "chosen_margins": [m], "rejected_margins": 0.0}) + "\n"
                            for (q, c, r), m in zip([("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")], (0.1, 0.2, 0.3))))
    out = tmp_path / "modpo-data"
    cli("train", "modpo", "--data", str(data), "--set", "algorithm.margin_source=data", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    check_run(out)
    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / "modpo-model"
    cli("train", "modpo", "--data", str(data), "--with", f"margin={BUNDLED_MODEL}", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    check_run(out)
