"""Padding-free packing (tokalign/packing.py): the layout, unpacking, a packed forward equal to the padded one,
and the fallback for a model whose attention ignores the packing."""

from __future__ import annotations

import random

import pytest
import torch

from tokalign import forward as F
from tokalign import packing
from tokalign.batching import Seq, collate, micro_batches, padding_fraction


def test_first_fit_decreasing_by_hand():
    # longest first: 5 opens row 0 (room 1), 4 opens row 1 (room 2), 3 opens row 2 (room 3), 2 goes to row 1, 1 to row 0
    assert packing.rows([3, 5, 1, 4, 2], 6) == [[1, 2], [3, 4], [0]]


def test_plan_widens_rows_until_the_last_one_is_full():
    # width 5 (the longest): [5] [4] [3] = 15 positions; 6: 18; 7: [5] [4, 3] = 14; 8: [5, 3] [4] = 16; 9, 10: 18, 20
    placed, width = packing.plan([5, 4, 3])
    assert width == 7 and placed == [[0], [1, 2]]
    # the limiting case: sequences of one length gain nothing; the layout is the padded one
    assert packing.layout([7, 7, 7]) == (3, 7)
    # all of them fit in one row no wider than twice the longest: one row, exactly as long as them
    assert packing.layout([4, 2, 1]) == (1, 7)


def _batch(seed: int = 0, rows: int = 10):
    rng = random.Random(seed)
    seqs = [Seq([rng.randrange(5, 300) for _ in range(rng.randrange(2, 9))],
                [rng.randrange(5, 300) for _ in range(rng.choice([1, 2, 3, 30]))], i // 2) for i in range(rows)]
    return collate(seqs, 0)


def test_unpack_puts_every_position_back():
    b = _batch()
    p = packing.pack(b)
    assert p.input_ids.numel() < b.input_ids.numel()
    valid = b.attention_mask[:, 1:].bool()
    # position c of a packed row predicts packed token c+1: unpacked, the targets are the batch's own next tokens
    targets = p.unpack(p.input_ids[:, 1:])
    assert torch.equal(targets[valid], b.input_ids[:, 1:][valid]) and not targets[~valid].any()
    assert int(p.valid.sum()) == int(valid.sum())
    # every real token appears exactly once, and positions restart at each sequence
    assert int((p.position_ids == 0).sum()) >= len(b)
    assert sorted(p.input_ids[p.input_ids != 0].tolist()) == sorted(b.input_ids[b.attention_mask.bool()].tolist())


@pytest.fixture(scope="module")
def model(tiny_model):
    from tokalign import models

    return models.load_model(str(tiny_model), "float32")


def test_packed_forward_equals_padded(model):
    b = _batch()
    valid = b.attention_mask[:, 1:].bool()
    pad = F.forward(model, b, with_entropy=True, keep_hidden=True)
    logits = F.forward(model, b, keep_logits=True).logits
    with F.packing(True):
        packed = F.forward(model, b, with_entropy=True, keep_hidden=True)
        packed_logits = F.forward(model, b, keep_logits=True).logits
        with F.fused_head("always"):
            fused = F.forward(model, b, with_entropy=True)
    for got in (packed, fused):
        torch.testing.assert_close(got.logps[valid], pad.logps[valid], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.entropy[valid], pad.entropy[valid], atol=1e-5, rtol=0)
        assert not got.logps[~valid].any()  # padding positions come back 0
    torch.testing.assert_close(packed.hidden[valid], pad.hidden[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logits[valid], logits[valid], atol=1e-5, rtol=0)
    ref = F.reference_logits(model, b)
    with F.packing(True):
        packed_ref = F.reference_logits(model, b)
    torch.testing.assert_close(packed_ref.hidden[valid], ref.hidden[valid], atol=1e-5, rtol=0)


def test_packed_gradients_equal_padded(model):
    b = _batch(1)
    grads = []
    for on in (False, True):
        model.zero_grad()
        with F.packing(on):
            out = F.forward(model, b)
        (out.logps * b.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention ignores position ids: packed, a sequence would see the one before it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_a_model_that_mixes_packed_sequences_runs_padded(model, capsys):
    b = _batch(2)
    wrapped = _IgnoresPositions(model)
    pad = F.forward(wrapped, b)
    with F.packing(True):
        out = F.forward(wrapped, b)
    assert torch.equal(out.logps, pad.logps)  # the padded path, exactly
    assert "batches run padded (train.packing is off for this model: _IgnoresPositions's attention" in capsys.readouterr().err
    with F.packing(True):
        F.forward(model, b)
    assert packing.honours_packing(model, b, None)  # the real model passed (a cached verdict: no call made)


def test_token_budget_counts_real_tokens_when_packed():
    b = _batch(3, rows=12)
    lengths = b.attention_mask.sum(-1)
    budget = int(lengths.sum()) // 2
    packed_parts = micro_batches(b, 0, budget, packed=True)
    padded_parts = micro_batches(b, 0, budget)
    for mb in packed_parts:  # whole groups, each within the budget of real tokens (unless a single group exceeds it)
        groups = set(mb.fields["group_ids"].tolist())
        assert int(mb.attention_mask.sum()) <= budget or len(groups) == 1
    assert len(packed_parts) < len(padded_parts)
    assert padding_fraction(packed_parts, packed=True) < 0.05 < padding_fraction(padded_parts)
