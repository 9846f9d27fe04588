"""TDPO (arXiv:2404.11999): hand cases of TDPO1 and TDPO2, and the limiting cases α = 0 ⇒ DPO, π = π_ref ⇒ SeqKL = 0 and
L = ln 2; a slow run through the real CLI. The chunked full-vocabulary KL (ops.position_kl): tests/test_ops.py; the
reference's logits from its hidden states: tests/test_forward.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cli
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.tdpo import TDPO, TDPO1, TDPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def _pair(ref_logits, logits, ids):
    """One pair of 1-token completions: row 0 chosen, row 1 rejected; logps from the logits."""
    mask = torch.ones(2, 1)
    logits = logits.clone().requires_grad_(True)
    logps = logits.log_softmax(-1).gather(-1, ids).squeeze(-1)
    ref_logps = ref_logits.log_softmax(-1).gather(-1, ids).squeeze(-1)
    batch = TokenBatch(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long), mask,
                       {"ref_logps": ref_logps, "is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])},
                       {"groups": 1.0})
    return batch, PolicyOutput(logps, logits=logits, ref_logits=ref_logits), logits


def _hand_case():
    """V = 2. Reference logits (0, 0): p_ref = (½, ½). Chosen: policy logits (ln 3, 0) ⇒ p = (¾, ¼), token 0:
    Δ_w = ln ¾ − ln ½ = 0.4054651, KL_w = ½ ln(½/¾) + ½ ln(½/¼) = 0.1438410.
    Rejected: policy = reference ⇒ Δ_l = 0, KL_l = 0."""
    ref = torch.zeros(2, 1, 2)
    pol = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, 0.0]]])
    return _pair(ref, pol, torch.tensor([[[0]], [[1]]]))


def test_tdpo2_hand_case():
    """TDPO2 (α = ½, β = 0.1): logit = Δ_w − Δ_l − α(KL_l − sg KL_w) = 0.4054651 + ½·0.1438410 = 0.4773856;
    L = log(1 + e^{−0.04773856}) = 0.6695627."""
    batch, out, _ = _hand_case()
    res = TDPO(TDPOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.6695627))
    assert res.metrics["seq_kl/chosen"] == pytest.approx(0.1438410, abs=1e-6)


def test_tdpo1_hand_case():
    """TDPO1 (β = 0.1): logit = Δ_w − Δ_l − (KL_l − KL_w) = 0.4054651 + 0.1438410 = 0.5493061;
    L = log(1 + e^{−0.05493061}) = 0.6660590."""
    batch, out, _ = _hand_case()
    assert_close(TDPO1(TDPO1.Config()).loss(batch, out).loss, torch.tensor(0.6660590))


def test_tdpo2_alpha_zero_is_dpo():
    """α = 0: TDPO2's logit is β·h, so loss and gradients equal DPO's on the same inputs."""
    g = torch.Generator().manual_seed(1)
    ref, pol = torch.randn(2, 1, 7, generator=g), torch.randn(2, 1, 7, generator=g)
    ids = torch.tensor([[[3]], [[5]]])
    b1, o1, l1 = _pair(ref, pol, ids)
    b2, o2, l2 = _pair(ref, pol, ids)
    t = TDPO(TDPOConfig(alpha=0.0)).loss(b1, o1).loss
    d = DPO(DPOConfig()).loss(b2, o2).loss
    assert_close(t, d)
    t.backward()
    d.backward()
    assert_close(l1.grad, l2.grad)


def test_policy_equal_reference_is_ln2():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(2, 1, 7, generator=g)
    batch, out, _ = _pair(ref, ref.clone(), torch.tensor([[[1]], [[2]]]))
    for algo in (TDPO(TDPOConfig()), TDPO1(TDPO1.Config())):
        res = algo.loss(batch, out)
        assert_close(res.loss, torch.tensor(math.log(2)))
        assert res.metrics["seq_kl/chosen"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_tdpo_through_the_cli(tmp_path):
    import json

    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    pairs = [{"prompt": [{"role": "user", "content": f"{a}+1="}], "chosen": [{"role": "assistant", "content": str(a + 1)}],
              "rejected": [{"role": "assistant", "content": str(a + 2)}]} for a in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cli("train", "tdpo", "--data", "pairs.jsonl", "--max-steps", "2", "--batch-size", "2", "--out", "T", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-4 and all(math.isfinite(m["loss"]) for m in metrics)
    before, after = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(tmp_path / "T" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
