"""TPO (arXiv:2405.16681): preference term + α·gold NLL, α = 0 ⇒ reference-free DPO; triples through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import cli
from tokalign.algorithms.tpo import TPO, TPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def _triple(logps, mask):
    """Rows: chosen, rejected, gold (one group)."""
    f = {"is_chosen": torch.tensor([1.0, 0.0, 0.0]), "is_gold": torch.tensor([0.0, 0.0, 1.0]), "group_ids": torch.zeros(3, dtype=torch.long)}
    b = TokenBatch(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long), torch.tensor(mask), f, {"groups": 1.0})
    return b, PolicyOutput(torch.tensor(logps, requires_grad=True))


def test_hand_case():
    """β = 0.1, α = 0.5: ℓ(y_w) = −1 − 2 = −3, ℓ(y_l) = −4 ⇒ −log σ(0.1) = 0.6443967; gold token-mean NLL =
    (0.5 + 1.5)/2 = 1 ⇒ L = 0.6443967 + 0.5 = 1.1443967."""
    b, o = _triple([[-1.0, -2.0], [-4.0, 0.0], [-0.5, -1.5]], [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert_close(TPO(TPOConfig()).loss(b, o).loss, torch.tensor(-F.logsigmoid(torch.tensor(0.1)).item() + 0.5))


def test_alpha_zero_is_reference_free_dpo():
    b, o = _triple([[-1.0, -2.0], [-4.0, 0.0], [-0.5, -1.5]], [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    res = TPO(TPOConfig(alpha=0.0)).loss(b, o)
    assert_close(res.loss, -F.logsigmoid(torch.tensor(0.1)))
    res.loss.backward()
    assert float(o.logps.grad[2].abs().max()) == 0.0  # the gold row only enters through α


@pytest.mark.slow
def test_tpo_on_triples_through_the_cli(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"{a}+7="}], "chosen": [{"role": "assistant", "content": str(a + 7)}],
             "rejected": [{"role": "assistant", "content": str(a + 8)}], "reference": str(a + 7)} for a in range(4)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dry = cli("train", "tpo", "--data", "t.jsonl", "--batch-size", "2", "--dry-run", cwd=tmp_path).stdout
    assert "-> triples" in dry and "sequences per step: 6" in dry
    cli("train", "tpo", "--data", "t.jsonl", "--max-steps", "2", "--batch-size", "2", "--out", "T", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and m["gold_nll"] > 0 for m in metrics)
    no_gold = [{k: v for k, v in r.items() if k != "reference"} for r in rows]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_gold))
    proc = cli("train", "tpo", "--data", "p.jsonl", "--out", "X", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "'tpo' trains on triples data" in proc.stderr
