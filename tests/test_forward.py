"""Forward passes (tokalign/forward.py): frozen log-probs micro-batched by a token budget equal the whole batch's, and a
frozen reference's logits kept as its final hidden states (HeadLogits) give the same position KL as its full logits."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from tokalign import ops


def test_frozen_logps_by_tokens_equal_whole_batch(tiny_model):
    from tokalign import models
    from tokalign.batching import Seq, collate
    from tokalign.forward import frozen_logps

    model = models.load_model(str(tiny_model))
    torch.manual_seed(0)
    seqs = [Seq(torch.randint(5, 200, (3,)).tolist(), torch.randint(5, 200, (n,)).tolist(), g) for g, n in enumerate([7, 1, 6, 2, 5])]
    batch = collate(seqs, 0)
    whole = frozen_logps(model, batch, 0)
    torch.testing.assert_close(frozen_logps(model, batch, 0, tokens=16) * batch.completion_mask, whole * batch.completion_mask,
                               atol=1e-5, rtol=1e-5)


def test_reference_logits_chunked_from_hidden_states_equal_full_logits(tiny_model):
    """The loop keeps a frozen reference's final hidden states (HeadLogits) instead of its [B, T, V] logits;
    the position KL and its gradient are the same as with the full logits tensor."""
    from transformers import AutoModelForCausalLM

    from tokalign.batching import Seq, collate
    from tokalign.forward import forward, reference_logits

    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval().requires_grad_(False)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(3)
    batch = collate([Seq(torch.randint(10, 300, (4,), generator=g).tolist(), torch.randint(10, 300, (n,), generator=g).tolist(), i)
                     for i, n in enumerate((3, 6, 1, 5, 2))], 0)
    lazy = reference_logits(ref, batch)
    assert isinstance(lazy, ops.HeadLogits)
    full = forward(ref, batch, keep_logits=True).logits
    a = forward(policy, batch, keep_logits=True).logits
    kl_lazy, kl_full = ops.position_kl(lazy, a, chunk_rows=2), ops.position_kl(full, a, chunk_rows=2)
    assert_close(kl_lazy, kl_full)
    (ga,) = torch.autograd.grad(kl_lazy.sum(), a, retain_graph=True)
    (gf,) = torch.autograd.grad(kl_full.sum(), a)
    assert_close(ga, gf)
