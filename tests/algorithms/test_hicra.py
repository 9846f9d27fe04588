"""HICRA (hierarchy-aware credit assignment; see tokalign/algorithms/hicra.py for the source): the strategic-gram
detector on hand-made text, the amplified advantages and loss by hand, and the limits α = 0 / no gram ⇒ GRPO."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from algo_helpers import random_groups
from conftest import leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.hicra import (
    HICRA,
    HICRAConfig,
    StrategicGrams,
    gram_spans,
    planning_mask,
)
from tokalign.batching import Seq, collate
from tokalign.protocols import PolicyOutput


@pytest.fixture(scope="module")
def tok():
    from tokalign.tiny import build_tokenizer

    return build_tokenizer()


def test_gram_spans_whole_words_case_and_overlaps():
    text = "So we need to add. But WAIT, owe need tons; let's try a different approach"
    grams = ["we need to", "but wait", "let's try", "let's try a different approach"]
    spans = gram_spans(text, grams)
    assert [text[a:b] for a, b in spans] == ["we need to", "But WAIT", "let's try a different approach"]  # not "owe need to…"
    assert gram_spans("3+4=7", ["+"]) == [(1, 2)]  # an edge that is no word character needs no word boundary
    assert gram_spans("12 + 1", ["1"]) == [(5, 6)]  # "1" inside "12" is no whole word
    assert gram_spans("anything", []) == []


def test_planning_mask_marks_the_tokens_of_each_gram(tok):
    """The tiny tokenizer splits "so we need to add. but wait, 3" into
    s|o| w|e| n|e|e|d| to| add|.| b|ut| w|a|i|t|,| |3: the tokens " w" … " to" and " b" … "t" are planning tokens."""
    text = "so we need to add. but wait, 3"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    mask = planning_mask(tok, ids, ["we need to", "but wait"])
    assert [p for p, m in zip(pieces, mask) if m] == [" w", "e", " n", "e", "e", "d", " to", " b", "ut", " w", "a", "i", "t"]
    assert planning_mask(tok, ids, ["let's try"]) == [0.0] * len(ids)
    assert planning_mask(tok, [], ["so"]) == []


def test_component_fills_the_completion_positions(tok):
    """Row 0 (prompt of 2 tokens) completes "we need to 7", row 1 (prompt of 3) "7": the mask sits on row 0's first
    completion tokens, shifted by its prompt (completion token j at column len(prompt) − 1 + j)."""
    ids0 = tok("we need to 7", add_special_tokens=False)["input_ids"]
    ids1 = tok("7", add_special_tokens=False)["input_ids"]
    seqs = [Seq([1, 2], ids0, 0), Seq([1, 2, 3], ids1, 0)]
    batch = collate(seqs, pad_id=0)
    metrics = StrategicGrams(["we need to"]).fill(batch, SimpleNamespace(seqs=seqs, tokenizer=tok))
    m = batch.fields["planning_mask"]
    marked = planning_mask(tok, ids0, ["we need to"])
    assert m[0, 1:1 + len(ids0)].tolist() == marked and m[0].sum() == sum(marked) > 0
    assert m[1].sum() == 0
    assert metrics["hicra/planning_fraction"] == pytest.approx(sum(marked) / (len(ids0) + len(ids1)))


def _case(planning):
    """One group of two 2-token rows, R = (1, 0): GRPO's A = (+0.70711, −0.70711); ρ = 1 (logps = old logps)."""
    mask = torch.ones(2, 2)
    fields = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "old_logps": torch.full((2, 2), -0.5),
              "planning_mask": torch.tensor(planning)}
    return token_batch(mask, fields)


def test_amplified_advantages_and_loss_by_hand():
    """α = 0.2, planning tokens: row 0 token 0 and row 1 token 1.
    A' row 0 = (0.70711·1.2, 0.70711) = (0.848528, 0.707107); row 1 = (−0.707107, −0.70711·0.8) = (−0.707107, −0.565685).
    token-mean loss at ρ = 1: −(0.848528 + 0.707107 − 0.707107 − 0.565685)/4 = −0.0707107; ∂loss/∂ℓ_t = −A'_t/4."""
    algo = HICRA(HICRAConfig(alpha=0.2))
    b = algo.prepare(_case([[1.0, 0.0], [0.0, 1.0]]))
    expected = torch.tensor([[0.848528, 0.707107], [-0.707107, -0.565685]])
    assert_close(b.fields["advantages"], expected)
    lp = leaf(torch.full((2, 2), -0.5))
    out = algo.loss(b, PolicyOutput(lp))
    out.loss.backward()
    assert_close(out.loss, torch.tensor(-0.0707107))
    assert_close(lp.grad, -expected / 4)


@pytest.mark.parametrize("alpha, planning", [(0.0, "random"), (0.2, "none")])
def test_limit_is_grpo_bit_for_bit(alpha, planning):
    """α = 0 (any planning mask), or no gram matched (α = 0.2): GRPO's loss and gradient, bit for bit."""
    def run(algo, b):
        b = algo.prepare(b)
        lp = leaf(b.fields["pol"])
        loss = algo.loss(b, PolicyOutput(lp)).loss
        loss.backward()
        return loss.detach(), lp.grad

    def batch():
        b = random_groups(3, [3, 5, 2, 4], [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0])
        g = torch.Generator().manual_seed(7)
        mask = (torch.rand(b.completion_mask.shape, generator=g) > 0.5).float() if planning == "random" else torch.zeros_like(b.completion_mask)
        b.fields["planning_mask"] = mask * b.completion_mask
        return b

    grpo_loss, grpo_grad = run(GRPO(GRPOConfig()), batch())
    loss, grad = run(HICRA(HICRAConfig(alpha=alpha)), batch())
    assert torch.equal(loss, grpo_loss) and torch.equal(grad, grpo_grad)


def test_micro_batches_add_up():
    algo = HICRA(HICRAConfig(alpha=0.5))
    b = random_groups(4, [3, 5, 2, 4], [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0])
    b.fields["planning_mask"] = (b.fields["pol"] < -1.0).float() * b.completion_mask
    b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 4.0}
    full, summed, g_full, g_parts, n = micro_batch_check(algo, algo.prepare(b), size=1)
    assert n > 1
    assert_close(summed, full)
    assert_close(g_parts, g_full)


def test_config_and_needs():
    algo = HICRA(HICRAConfig())
    assert [c.name for c in algo.needs.components] == ["strategic_grams"] and algo.needs.split_groups
    assert "let's try" in HICRAConfig().grams
    with pytest.raises(ValueError, match="alpha"):
        HICRAConfig(alpha=-0.1)
    with pytest.raises(ValueError, match="grams"):
        HICRAConfig(grams=["we need to", " "])
