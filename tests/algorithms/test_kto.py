"""KTO (arXiv:2402.01306): the initialisation case (π = π_ref), a hand case, z's clamp and detachment,
TRL's unpaired format, and a CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign.algorithms.kto import KTO, KTOConfig
from tokalign.data import formats
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput, TokenBatch


def _batch(logps, ref, labels, is_kl):
    """One-token completions; groups pair each example with its KL row."""
    b = len(logps)
    fields = {"ref_logps": torch.tensor(ref).unsqueeze(-1), "label": torch.tensor(labels), "is_kl": torch.tensor(is_kl),
              "group_ids": torch.tensor([i // 2 for i in range(b)])}
    batch = TokenBatch(torch.zeros(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.long), torch.ones(b, 1), fields,
                       {"groups": b / 2})
    return batch, PolicyOutput(torch.tensor(logps).unsqueeze(-1).requires_grad_(True))


def test_initialisation_every_loss_is_half():
    batch, out = _batch([-1.0, -2.0, -3.0, -0.5], [-1.0, -2.0, -3.0, -0.5], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert_close(KTO(KTOConfig()).loss(batch, out).loss, torch.tensor(0.5))


def test_hand_case():
    """β = 0.1. Desirable Δ = 2, undesirable Δ = −1, KL rows Δ = (0.4, 0.2) ⇒ z = 0.3.
    desirable 1 − σ(0.17) = 0.4576033, undesirable 1 − σ(0.13) = 0.4675458; loss = mean = 0.4625746.
    ∂L/∂ℓ_desirable = −β σ(0.17)(1 − σ(0.17)) / 2 = −0.0124101; the KL rows get no gradient (z is detached)."""
    batch, out = _batch([2.0, 0.4, -1.0, 0.2], [0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    res = KTO(KTOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.4625746))
    assert res.metrics["kl"] == pytest.approx(0.3)
    res.loss.backward()
    s = 1 / (1 + math.exp(-0.17))
    assert float(out.logps.grad[0, 0]) == pytest.approx(-0.1 * s * (1 - s) / 2, abs=1e-7)
    assert float(out.logps.grad[1, 0]) == 0.0 and float(out.logps.grad[3, 0]) == 0.0


def test_negative_kl_estimate_is_clamped_to_zero():
    batch, out = _batch([1.0, -0.5, 1.0, -0.7], [0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert KTO(KTOConfig()).loss(batch, out).metrics["kl"] == 0.0


def test_trl_unpaired_format():
    fmt, rows = formats.normalise([{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}], "x")
    assert fmt == "unpaired" and [r["label"] for r in rows] == [True, False]
    with pytest.raises(UserError, match="'label' must be true"):
        formats.normalise([{"prompt": "q", "completion": "a", "label": "yes"}], "x")


@pytest.mark.slow
def test_kto_through_the_cli(tmp_path):
    recs = [{"prompt": [{"role": "user", "content": f"{a}+1="}], "completion": [{"role": "assistant", "content": str(a + 1 + (a % 2))}],
             "label": a % 2 == 0} for a in range(8)]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cli("prepare", "u.jsonl", "--out", "U", cwd=tmp_path)
    for data in ("u.jsonl", "U"):
        cli("train", "kto", "--data", data, "--max-steps", "2", "--batch-size", "4", "--out", f"K-{data}", cwd=tmp_path)
        metrics = [json.loads(x) for x in (tmp_path / f"K-{data}" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-5) and all(math.isfinite(m["loss"]) for m in metrics)
