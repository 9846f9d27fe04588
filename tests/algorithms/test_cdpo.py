"""cDPO (arXiv:2411.19943): s ≡ 1 ⇒ DPO (sequence form), a rejected token with p_cd = 1 gets no gradient,
the position-wise code form by hand, and positive/negative models through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign.algorithms.cdpo import CDPO, CDPOConfig, critical_weights
from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def _pair(logps, ref, mask, ids, pos, neg):
    fields = {"ref_logps": torch.tensor(ref), "is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    ids = torch.tensor(ids)
    batch = TokenBatch(ids, torch.ones_like(ids), torch.tensor(mask), fields, {"groups": 1.0})
    out = PolicyOutput(torch.tensor(logps, requires_grad=True), extra_logits={"positive": pos, "negative": neg})
    return batch, out


def test_critical_weight_by_hand():
    """V = 2, z^pos = (0, 0), z^neg = (ln 2, 0): 2z^pos − z^neg = (−ln 2, 0) ⇒ softmax = (1/3, 2/3); token 1 ⇒ s = 1/3."""
    zp, zn = torch.zeros(1, 1, 2), torch.tensor([[[math.log(2.0), 0.0]]])
    assert_close(critical_weights(zp, zn, torch.tensor([[1]]), 4), torch.tensor([[1 / 3]]))


def test_uniform_weight_is_dpo_and_certain_tokens_get_no_gradient():
    """Vocabulary of 2, input ids [[0, 0, 0], [0, 1, 1]]: targets are ids[:, 1:]. With a huge positive logit on the
    rejected row's tokens p_cd → 1 ⇒ s → 0 ⇒ zero gradient there; with z^pos = z^neg = very negative on the targets,
    p_cd → 0 ⇒ s = 1 ⇒ exactly DPO."""
    logps, ref, mask = [[-1.0, -2.0], [-0.5, -1.5]], [[-1.2, -1.9], [-0.7, -1.0]], [[1.0, 1.0], [1.0, 1.0]]
    ids = [[0, 0, 0], [0, 1, 1]]
    low = torch.tensor([[[0.0, -40.0]] * 2, [[0.0, -40.0]] * 2])  # softmax(2z − z) = softmax(z) puts ~0 on token 1...
    low[0] = torch.tensor([[-40.0, 0.0]] * 2)  # ...and on token 0 for the chosen row
    b1, o1 = _pair(logps, ref, mask, ids, low, low)
    b2, o2 = _pair(logps, ref, mask, ids, None, None)
    o2.extra_logits = {}
    cdpo = CDPO(CDPOConfig()).loss(b1, o1).loss
    dpo = DPO(DPOConfig()).loss(b2, o2).loss
    assert_close(cdpo, dpo)
    high = torch.tensor([[[0.0, 40.0]] * 2] * 2)
    b3, o3 = _pair(logps, ref, mask, ids, high, torch.zeros(2, 2, 2))
    CDPO(CDPOConfig()).loss(b3, o3).loss.backward()
    assert float(o3.logps.grad[1].abs().max()) < 1e-12 and float(o3.logps.grad[0].abs().max()) > 0


def test_position_form_by_hand():
    """s ≡ 1 (p_cd ≈ 0), β = 0.1, Δ^w = (0.2, −0.1), Δ^l = (0.2, −0.5): h = (0, 0.4) ⇒
    L = ½(ln 2 + log(1 + e^{−0.04})) = ½(0.6931472 + 0.6733401) = 0.6832437."""
    ids = [[0, 0, 0], [0, 1, 1]]
    low = torch.tensor([[[0.0, -40.0]] * 2, [[0.0, -40.0]] * 2])
    low[0] = torch.tensor([[-40.0, 0.0]] * 2)
    b, o = _pair([[0.2, -0.1], [0.2, -0.5]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], ids, low, low)
    assert_close(CDPO(CDPOConfig(form="position")).loss(b, o).loss, torch.tensor(0.6832437))


@pytest.mark.slow
def test_cdpo_through_the_cli(tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": f"{a}+5="}], "chosen": [{"role": "assistant", "content": str(a + 5)}],
              "rejected": [{"role": "assistant", "content": str(a + 6)}]} for a in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft = [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen",)]
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    cli("train", "sft", "--data", "pos.jsonl", "--max-steps", "2", "--batch-size", "2", "--out", "POS", cwd=tmp_path)
    cli("train", "cdpo", "--data", "pairs.jsonl", "--with", "positive=POS", "--with", "negative=POS", "--max-steps", "2",
        "--batch-size", "2", "--out", "C", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "C" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics) and abs(metrics[0]["loss"] - math.log(2)) < 1e-4
