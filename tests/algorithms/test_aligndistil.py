"""AlignDistil (arXiv:2503.02832): the limiting cases (loss 0 iff π_θ = teacher; π_dpo = π_rev ⇒
w = 1e-3 and the teacher is the DPO model), a V = 2 hand case, and the DPO + reverse-DPO chain through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import cli
from tokalign import ops
from tokalign.algorithms.aligndistil import AlignDistil, AlignDistilConfig, token_loss


def test_zero_iff_student_is_the_teacher():
    g = torch.Generator().manual_seed(0)
    z_dpo, z_rev = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    w = 10 * (z_dpo.softmax(-1) - z_rev.softmax(-1)).abs().sum(-1, keepdim=True) + 1e-3
    teacher_logits = z_dpo + w * (z_dpo - z_rev)
    assert_close(token_loss(teacher_logits, z_dpo, z_rev, 0.1, 10.0, 1.0), torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert bool((token_loss(torch.randn(2, 3, 7, generator=g), z_dpo, z_rev, 0.1, 10.0, 1.0) > 0).all())


def test_equal_dpo_and_reverse_models_distil_towards_the_dpo_model():
    """π_dpo = π_rev ⇒ w = 1e-3, z* = z_dpo ⇒ L = (β/1e-3)·KL(π_θ ‖ π_dpo)."""
    g = torch.Generator().manual_seed(1)
    z, student = torch.randn(1, 2, 5, generator=g), torch.randn(1, 2, 5, generator=g)
    s, t = student.log_softmax(-1), z.log_softmax(-1)
    assert_close(token_loss(student, z, z.clone(), 0.1, 10.0, 1.0), (0.1 / 1e-3) * (s.exp() * (s - t)).sum(-1))


def test_hand_case_two_tokens_vocabulary():
    """V = 2. z_dpo = (0, 0): p = (½, ½); z_rev = (ln 3, 0): p = (¾, ¼) ⇒ ‖Δp‖₁ = ½, w = 10·½ + 1e-3 = 5.001;
    z* = (−5.001·ln 3, 0) ⇒ teacher p* = (1/(1 + 3^5.001), 3^5.001/(1 + 3^5.001)); student logits (0, 0):
    L = (0.1/5.001)·Σ ½(ln ½ − ln p*)."""
    p1 = 1 / (1 + 3 ** 5.001)
    expected = (0.1 / 5.001) * 0.5 * ((math.log(0.5) - math.log(p1)) + (math.log(0.5) - math.log(1 - p1)))
    got = token_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.tensor([[[math.log(3.0), 0.0]]]), 0.1, 10.0, 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_loss_chunks_and_lazy_teachers_match_the_direct_computation(tiny_model):
    """The loss takes HeadLogits (final hidden states + LM head) for the frozen models and chunks rows under
    checkpointing; value and gradient equal the direct full-tensor computation."""
    from transformers import AutoModelForCausalLM

    from tokalign.batching import Seq, collate
    from tokalign.forward import forward, reference_logits

    dpo = AlignDistil(AlignDistilConfig(chunk_rows=2))
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    batch = collate([Seq([5, 6, 7], torch.randint(10, 300, (n,), generator=g).tolist(), i) for i, n in enumerate((3, 1, 4))], 0)
    out = forward(policy, batch, keep_logits=True)
    out.extra_logits = {"dpo": reference_logits(frozen, batch), "reverse": reference_logits(policy.eval(), batch)}
    res = dpo.loss(batch, out)
    full_rev = forward(policy, batch, keep_logits=True).logits.detach()
    direct = ops.aggregate(token_loss(out.logits, forward(frozen, batch, keep_logits=True).logits, full_rev, 0.1, 10.0, 1.0),
                           batch.completion_mask, "seq-mean-token-mean")
    assert_close(res.loss, direct)
    (g1,) = torch.autograd.grad(res.loss, out.logits, retain_graph=True)
    (g2,) = torch.autograd.grad(direct, out.logits)
    assert_close(g1, g2)


@pytest.mark.slow
def test_dpo_and_reverse_dpo_then_aligndistil(tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": f"{a}+3="}], "chosen": [{"role": "assistant", "content": str(a + 3)}],
              "rejected": [{"role": "assistant", "content": str(a + 4)}]} for a in range(6)]
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    for name, rows in (("pairs.jsonl", pairs), ("swapped.jsonl", swapped)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("train", "dpo", "--data", "pairs.jsonl", "--max-steps", "3", "--batch-size", "2", "--out", "D", cwd=tmp_path)
    cli("train", "dpo", "--data", "swapped.jsonl", "--max-steps", "3", "--batch-size", "2", "--out", "Rv", cwd=tmp_path)
    cli("train", "aligndistil", "--data", "pairs.jsonl", "--dpo-model", "D", "--reverse-model", "Rv", "--max-steps", "2",
        "--batch-size", "2", "--out", "A", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert json.loads((tmp_path / "A" / "manifest.json").read_text())["config"]["models"] == {"dpo": "D", "reverse": "Rv"}


def test_hand_written_gradient_equals_autograd():
    """The chunked loss with its hand-written backward equals autograd through the reference token_loss (values and
    gradients), also when the frozen logits come as an ops.HeadLogits and chunks do not divide the rows."""
    import torch

    from tokalign import ops
    from tokalign.algorithms.aligndistil import _DistillKL, token_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 11, generator=g)
    hidden, head = torch.randn(5, 3, 4, generator=g), torch.nn.Linear(4, 11, bias=False)
    z_dpo, z_rev = head(hidden).detach(), torch.randn(5, 3, 11, generator=g)
    weights = torch.randn(5, 3, generator=g)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = _DistillKL.apply(a, ops.HeadLogits(hidden, head), z_rev, 0.1, 10.0, 1.0, 2)
    ref = token_loss(b, z_dpo, z_rev, 0.1, 10.0, 1.0)
    torch.testing.assert_close(ours, ref)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
