"""Batching (tokalign/batching.py): collate's layout and alignment, micro-batches that never split a group (by rows and
by a padded-token budget). CPU only."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tokalign.batching import Seq, collate, micro_batches


# ---------------------------------------------------------------------------------------------------
# collate and micro_batches


def _seqs():
    return [
        Seq([5, 6, 7], [8, 9], 0, row={"rewards": 1.0}, token={"old_logps": [-0.1, -0.2]}),
        Seq([5, 6], [10, 11, 12], 0, row={"rewards": 0.0}, token={"old_logps": [-0.3, -0.4, -0.5]}),
        Seq([20], [21], 1, row={"rewards": 0.5}, token={"old_logps": [-0.6]}),
        Seq([22, 23, 24, 25], [26, 27, 28], 1, row={"rewards": 0.5}, token={"old_logps": [-0.7, -0.8, -0.9]}),
        Seq([30, 31], [32], 2, row={"rewards": 0.0}, token={"old_logps": [-1.0]}),
        Seq([30, 31], [33, 34], 2, row={"rewards": 1.0}, token={"old_logps": [-1.1, -1.2]}),
        Seq([30, 31], [35], 2, row={"rewards": 1.0}, token={"old_logps": [-1.3]}),
    ]


def test_collate_layout_and_alignment():
    """Row 0: prompt (5,6,7), completion (8,9) ⇒ input_ids = 5 6 7 8 9 0 0 (pad 0, L = 7);
    per-token column t predicts input_ids[t+1], so completion token j sits at column len(prompt) − 1 + j:
    completion_mask row 0 = 0 0 1 1 0 0 and old_logps row 0 = 0 0 −0.1 −0.2 0 0."""
    batch = collate(_seqs(), pad_id=0)
    assert batch.input_ids.shape == (7, 7) and batch.completion_mask.shape == (7, 6)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 0, 0]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch.completion_mask[0].tolist() == [0, 0, 1, 1, 0, 0]
    assert_close(batch.fields["old_logps"][0], torch.tensor([0, 0, -0.1, -0.2, 0, 0]))
    for i, s in enumerate(_seqs()):
        m = batch.completion_mask[i].bool()
        # the masked *predicted* tokens are exactly the completion, in order
        assert batch.input_ids[i, 1:][m].tolist() == s.completion_ids
        assert_close(batch.fields["old_logps"][i][m], torch.tensor(s.token["old_logps"]))
        assert int(batch.attention_mask[i].sum()) == len(s.prompt_ids) + len(s.completion_ids)
    assert_close(batch.fields["rewards"], torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 1.0]))
    assert batch.fields["group_ids"].tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert batch.totals == {"tokens": 13.0, "seqs": 7.0, "groups": 3.0, "max_completion_len": 3.0}
    assert collate(_seqs(), pad_id=0, max_completion_len=16).totals["max_completion_len"] == 16.0


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_micro_batches_never_split_groups(size):
    """Groups (0,0 | 1,1 | 2,2,2): every micro-batch holds whole groups, rows keep their order, totals stay
    global, and each micro-batch is trimmed to its own longest sequence."""
    batch = collate(_seqs(), pad_id=0)
    mbs = micro_batches(batch, size)
    seen = []
    for mb in mbs:
        gids = mb.fields["group_ids"].tolist()
        for g in set(gids):
            assert gids.count(g) == batch.fields["group_ids"].tolist().count(g), f"group {g} split at size {size}"
        assert mb.totals == batch.totals
        width = int(mb.attention_mask.sum(-1).max())
        assert mb.input_ids.shape[1] == width and mb.completion_mask.shape[1] == width - 1
        assert mb.fields["old_logps"].shape[1] == width - 1
        seen += gids
    assert seen == batch.fields["group_ids"].tolist()
    # the trimmed per-token tensors still line up: same completion tokens and old_logps
    rows = iter(range(len(batch)))
    for mb in mbs:
        for j in range(len(mb)):
            i = next(rows)
            m_full, m_mb = batch.completion_mask[i].bool(), mb.completion_mask[j].bool()
            assert batch.input_ids[i, 1:][m_full].tolist() == mb.input_ids[j, 1:][m_mb].tolist()
            assert_close(batch.fields["old_logps"][i][m_full], mb.fields["old_logps"][j][m_mb])


def test_micro_batches_size_zero_or_large_is_one_batch():
    batch = collate(_seqs(), pad_id=0)
    for size in (0, 7, 50):
        (only,) = micro_batches(batch, size)
        assert only is batch


def test_micro_batches_group_sizes():
    """size 2: (0,0) closes at 2 rows, (1,1) at 2 rows, (2,2,2) is kept whole ⇒ chunk sizes 2, 2, 3.
    size 3: (0,0) has 2 < 3 rows so group 1 joins it ⇒ 4, then 3."""
    batch = collate(_seqs(), pad_id=0)
    assert [len(mb) for mb in micro_batches(batch, 2)] == [2, 2, 3]
    assert [len(mb) for mb in micro_batches(batch, 3)] == [4, 3]


# ---------------------------------------------------------------------------------------------------
# micro-batches by tokens


def test_micro_batches_by_tokens_pack_similar_lengths_and_keep_groups():
    """Groups of lengths (prompt 2 + completion) 9, 3, 8, 4 tokens, 2 rows each, budget 20 padded tokens: longest first
    → [9, 8] would be 4 × 9 = 36 > 20, so {9}, {8}, then {4, 3} = 4 × 4 = 16 ≤ 20. Padding drops against row-count
    micro-batches, and frozen log-probs come back in the batch's row order whatever the grouping."""
    from tokalign.batching import Seq, collate, micro_batches, padding_fraction

    seqs = [Seq([1, 2], [5] * n, g) for g, n in enumerate([7, 1, 6, 2]) for _ in range(2)]
    batch = collate(seqs, 0)
    parts = micro_batches(batch, 0, max_tokens=20)
    assert [sorted(set(mb.fields["group_ids"].tolist())) for mb in parts] == [[0], [2], [1, 3]]
    assert all(mb.attention_mask.numel() <= 20 for mb in parts[1:]) and parts[0].attention_mask.shape == (2, 9)
    assert padding_fraction(parts) < padding_fraction(micro_batches(batch, 4))


def test_split_groups_splits_only_groups_larger_than_a_micro_batch():
    from tokalign.batching import Seq, collate, micro_batches

    # groups 0 (4 rows of 5 tokens) and 1 (2 rows of 3 tokens)
    seqs = [Seq([1, 2], [3, 4, 5], 0) for _ in range(4)] + [Seq([1], [2, 3], 1) for _ in range(2)]
    b = collate(seqs, 0)
    groups = lambda parts: [sorted(set(mb.fields["group_ids"].tolist())) for mb in parts]  # noqa: E731
    assert [len(mb) for mb in micro_batches(b, 2)] == [4, 2]  # whole groups
    assert [len(mb) for mb in micro_batches(b, 2, split_groups=True)] == [2, 2, 2]
    assert groups(micro_batches(b, 2, split_groups=True)) == [[0], [0], [1]]
    # by tokens (packed: real tokens): group 0 has 20 > 12, split into parts of 2 rows (10); group 1 (6) fits whole
    parts = micro_batches(b, 0, 12, packed=True, split_groups=True)
    assert [len(mb) for mb in parts] == [2, 2, 2] and all(int(mb.attention_mask.sum()) <= 12 for mb in parts)
    assert [len(mb) for mb in micro_batches(b, 0, 12, packed=True)] == [4, 2]  # without: the big group stays whole
