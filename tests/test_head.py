"""The fused linear log-prob head (tokalign/head.py): log-probs and entropies from hidden states and the head weight
chunk by chunk, with its own backward; and ``forward`` through it, equal to the path through the model's logits."""

from __future__ import annotations

import math

import pytest
import torch

from tokalign.head import linear_logps, why_not_fused


def _reference(hidden, weight, index):
    logp = torch.log_softmax((hidden @ weight.t()).double(), -1)
    return logp.gather(-1, index[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_hand_computed_case():
    """h = [1, 0], W rows [1, 0], [0, 1], [0, 0]: logits [1, 0, 0]; log p(token 0) = 1 − log(e + 2)."""
    hidden, weight = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logps, entropy = linear_logps(hidden, weight, torch.tensor([0]))
    z = math.e + 2
    assert logps.item() == pytest.approx(1 - math.log(z), abs=1e-6)
    p = [math.e / z, 1 / z, 1 / z]
    assert entropy.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)


def test_limiting_case_zero_head_is_uniform():
    """W = 0: every token has probability 1/V, whatever the hidden state: log-prob −log V, entropy log V."""
    logps, entropy = linear_logps(torch.randn(5, 4), torch.zeros(7, 4), torch.tensor([0, 1, 2, 3, 6]))
    assert torch.allclose(logps, torch.full((5,), -math.log(7))) and torch.allclose(entropy, torch.full((5,), math.log(7)))


@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_values_and_gradients_equal_autograd_through_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 6, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g, dtype=torch.float64)
    logps, entropy = linear_logps(hidden, weight, index, chunk)
    want_logps, want_entropy = _reference(hidden, weight, index)
    assert torch.allclose(logps.double(), want_logps, atol=1e-6) and torch.allclose(entropy.double(), want_entropy, atol=1e-6)
    gh, gw = torch.autograd.grad((logps.double() * upstream).sum(), (hidden, weight))
    wh, ww = torch.autograd.grad((want_logps * upstream).sum(), (hidden, weight))
    assert torch.allclose(gh, wh, atol=1e-6) and torch.allclose(gw, ww, atol=1e-6)
    assert not entropy.requires_grad


def _batch():
    from tokalign.batching import Seq, collate

    return collate([Seq([1, 5, 9], [14, 3, 7, 2], 0), Seq([4, 4], [8, 2], 0), Seq([3, 1, 2, 6], [11], 1)], 0)


def test_forward_through_the_fused_head_equals_the_logits_path(tiny_model):
    """Same log-probs and entropies (on real positions) and the same gradients, as the model's own logits give."""
    from transformers import AutoModelForCausalLM

    from tokalign.forward import forward, fused_head

    batch = _batch()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert why_not_fused(model) == ""
    with fused_head("always"):
        fused = forward(model, batch, with_entropy=True)
    (fused.logps * batch.completion_mask).sum().backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = forward(model, batch, with_entropy=True, keep_logits=True)
    (plain.logps * batch.completion_mask).sum().backward()
    real = batch.attention_mask[:, 1:].bool()
    assert torch.allclose(fused.logps[real], plain.logps[real], atol=1e-5)
    assert torch.allclose(fused.entropy[real], plain.entropy[real], atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_fused[n], p.grad, atol=1e-5), n


def test_auto_fuses_only_batches_with_large_logits(tiny_model, monkeypatch):
    """auto: the model's logits for a batch below FUSE_ABOVE values (cheaper than the fused head's recompute), the
    fused head above it; never: never."""
    from transformers import AutoModelForCausalLM

    from tokalign import forward as fwd

    model, batch = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), _batch()
    calls = []
    monkeypatch.setattr(fwd, "linear_logps", lambda *a: calls.append(1) or linear_logps(*a))
    fwd.forward(model, batch)
    assert calls == []
    monkeypatch.setattr(fwd, "FUSE_ABOVE", batch.input_ids.numel() * model.config.vocab_size - 1)
    fwd.forward(model, batch)
    assert calls == [1]
    with fwd.fused_head("never"):
        fwd.forward(model, batch)
    assert calls == [1]


def test_a_model_that_rescales_its_logits_falls_back_with_a_note(tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    from tokalign import forward as fwd

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    inner_forward = model.forward

    def scaled(*args, **kwargs):  # a model that soft-caps its logits after the head
        out = inner_forward(*args, **kwargs)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out

    model.forward = scaled
    batch = _batch()
    with fwd.fused_head("always"):
        got = fwd.forward(model, batch)
    want = torch.log_softmax(scaled(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
    want = want.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(got.logps, want, atol=1e-6)
    assert "fused log-prob head is off: its logits are not hidden @ W" in capsys.readouterr().err
    assert why_not_fused(model).startswith("its logits are not hidden @ W")
