"""TGDPO (arXiv:2506.14574): a hand case and its limiting cases (α = 0 or π_R = π_ref ⇒ DPO),
and the extra-model plumbing through the real CLI (a DPO checkpoint as the teacher)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.tgdpo import TGDPO, TGDPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch


def _pair(logps, ref, teacher, mask):
    """Row 0 chosen, row 1 rejected."""
    fields = {"ref_logps": torch.tensor(ref), "teacher_logps": torch.tensor(teacher),
              "is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    b = TokenBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.tensor(mask), fields, {"groups": 1.0})
    return b, PolicyOutput(torch.tensor(logps, requires_grad=True))


def test_reference_hand_case():
    """β = 0.1, α = 0.5, r̂^w = (2, 0), Δ^w = (1, 1), Δ^l = 0 ⇒ logit = 0.1·(1 + 0.5·0.1·2)·1 + 0.1·1 = 0.21,
    L = log(1 + e^{−0.21}) = 0.5939; ∂L/∂ℓ^w_t = −σ(−0.21)·β(1 + αβ r̂^w_t) = −0.4476900·(0.11, 0.1)."""
    b, out = _pair([[0.0, 0.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[1.0, -1.0], [-1.0, -1.0]], [[1.0, 1.0], [1.0, 1.0]])
    algo = TGDPO(TGDPOConfig())
    res = algo.loss(algo.prepare(b), out)
    assert_close(res.loss, torch.tensor(math.log1p(math.exp(-0.21))))
    res.loss.backward()
    s = 1 / (1 + math.exp(0.21))
    assert_close(out.logps.grad[0], torch.tensor([-s * 0.11, -s * 0.1]))


@pytest.mark.parametrize("case", ["alpha0", "teacher_is_ref"])
def test_limits_equal_dpo(case):
    g = torch.Generator().manual_seed(0)
    lp, ref, teacher = (-torch.rand(2, 4, generator=g) * 3 for _ in range(3))
    if case == "teacher_is_ref":
        teacher = ref.clone()
    mask = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    b1, o1 = _pair(lp.tolist(), ref.tolist(), teacher.tolist(), mask)
    b2, o2 = _pair(lp.tolist(), ref.tolist(), teacher.tolist(), mask)
    algo = TGDPO(TGDPOConfig(alpha=0.0 if case == "alpha0" else 0.5))
    t = algo.loss(algo.prepare(b1), o1).loss
    d = DPO(DPOConfig()).loss(b2, o2).loss
    assert_close(t, d)
    t.backward()
    d.backward()
    assert_close(o1.logps.grad, o2.logps.grad)


@pytest.mark.slow
def test_dpo_then_tgdpo_with_the_dpo_model_as_teacher(tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": f"{a}+2="}], "chosen": [{"role": "assistant", "content": str(a + 2)}],
              "rejected": [{"role": "assistant", "content": str(a + 3)}]} for a in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    missing = cli("train", "tgdpo", "--data", "pairs.jsonl", "--out", "T", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "needs a 'teacher' model: pass --teacher PATH" in missing.stderr
    cli("train", "dpo", "--data", "pairs.jsonl", "--max-steps", "3", "--batch-size", "2", "--out", "D", cwd=tmp_path)
    cli("train", "tgdpo", "--data", "pairs.jsonl", "--teacher", "D", "--max-steps", "2", "--batch-size", "2", "--out", "T", cwd=tmp_path)
    manifest = json.loads((tmp_path / "T" / "manifest.json").read_text())
    assert manifest["config"]["models"] == {"teacher": "D"} and "checkpoint_manifest_sha256" in manifest["models"]["teacher"]
    metrics = [json.loads(x) for x in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[0]["token_beta/mean"] != pytest.approx(0.1, abs=1e-9)
