"""Sequences -> padded TokenBatch, and micro-batches that keep groups whole (or split only those too large, for
algorithms whose loss allows it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tokalign.protocols import TokenBatch


@dataclass
class Seq:
    prompt_ids: list[int]
    completion_ids: list[int]
    group_id: int
    row: dict[str, float] = field(default_factory=dict)  # per-sequence scalars (reward, is_chosen, ...)
    token: dict[str, list[float]] = field(default_factory=dict)  # per completion token (sampler_logps, ...)
    prompt_index: int = -1  # stable across steps: which prompt of the data this is (state keyed by prompt)
    prompt: Any = None  # the raw prompt (text or messages), where the source has it (prompt variants re-render it)


def truncate(seq: Seq, max_length: int) -> Seq:
    """Keep at most ``max_length`` tokens: cut the completion's end first, then the prompt's start."""
    p, c = seq.prompt_ids, seq.completion_ids
    if len(p) + len(c) <= max_length:
        return seq
    p = p[-max(1, max_length // 2):] if len(p) >= max_length else p
    keep = max_length - len(p)
    token = {k: v[:keep] for k, v in seq.token.items() if v is not None}
    return Seq(p, c[:keep], seq.group_id, seq.row, token, seq.prompt_index, seq.prompt)


def collate(seqs: list[Seq], pad_id: int, max_completion_len: float | None = None) -> TokenBatch:
    """Right-padded ``input_ids = prompt + completion``. Per-token tensors are ``[B, L-1]`` aligned
    with the predicted token: completion token j of row i sits at column ``len(prompt_i) - 1 + j``."""
    length = max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    token_keys = sorted({k for s in seqs for k, v in s.token.items() if v is not None})
    token_fields = {k: torch.zeros((b, length - 1)) for k in token_keys}
    for i, s in enumerate(seqs):
        ids = s.prompt_ids + s.completion_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        start, end = len(s.prompt_ids) - 1, len(ids) - 1
        # a multi-turn episode's environment tokens are not the model's: mask 0 (no loss, no gradient)
        mask[i, start:end] = 1 if s.token.get("loss_mask") is None else torch.tensor(s.token["loss_mask"], dtype=torch.float32)
        for k in token_keys:
            if s.token.get(k) is not None:
                token_fields[k][i, start:end] = torch.tensor(s.token[k], dtype=torch.float32)
    fields = {k: torch.tensor([float(s.row.get(k, 0.0)) for s in seqs]) for k in sorted({k for s in seqs for k in s.row})}
    fields["group_ids"] = torch.tensor([s.group_id for s in seqs], dtype=torch.long)
    fields["prompt_index"] = torch.tensor([s.prompt_index for s in seqs], dtype=torch.long)
    fields.update(token_fields)
    totals = {
        "tokens": float(mask.sum()),
        "seqs": float(b),
        "groups": float(len(set(s.group_id for s in seqs))),
        "max_completion_len": float(max_completion_len or max(len(s.completion_ids) for s in seqs)),
    }
    return TokenBatch(input_ids, attention, mask, fields, totals)


def micro_batches(batch: TokenBatch, size: int, max_tokens: int = 0, packed: bool = False,
                  split_groups: bool = False) -> list[TokenBatch]:
    """Split into micro-batches of about ``size`` rows (0 = one batch), never splitting a group (with
    ``split_groups``: only a group larger than a micro-batch is split, into parts that fit), and trim each to its
    own longest sequence.

    With ``max_tokens`` > 0 the split is by size in tokens instead: groups are taken longest first and added while
    the micro-batch stays within ``max_tokens`` (a group larger than that is a micro-batch of its own), so sequences
    of similar length share a micro-batch. The size is rows × longest sequence (what a padded forward computes), or
    with ``packed`` the sequences' own tokens (a packed forward computes little more)."""
    members: dict[int, list[int]] = {}  # rows of each group, groups in order of first appearance
    for i, g in enumerate(batch.fields["group_ids"].tolist()):
        members.setdefault(g, []).append(i)
    if max_tokens > 0:
        lengths = batch.attention_mask.sum(-1).tolist()
        size_of = (lambda idx: sum(lengths[i] for i in idx)) if packed else (lambda idx: len(idx) * max(lengths[i] for i in idx))
        units = list(members.values())
        if split_groups:  # a group over the budget: its rows, longest first, in parts within it
            units = [part for rows in units for part in _parts(sorted(rows, key=lambda i: -lengths[i]), size_of, max_tokens)]
        groups = sorted(units, key=lambda rows: -max(lengths[i] for i in rows))
        chunks, current = [], []
        for rows in groups:
            if current and size_of(current + rows) > max_tokens:
                chunks.append(current)
                current = []
            current = current + rows
        chunks.append(current)
    elif size <= 0 or size >= len(batch):
        return [batch]
    else:
        chunks, current = [], []
        units = list(members.values())
        if split_groups:
            units = [rows[k : k + size] for rows in units for k in range(0, len(rows), size)]
        for rows in units:
            if current and len(current) >= size:
                chunks.append(current)
                current = []
            current.extend(rows)
        chunks.append(current)
    return [select_trimmed(batch, idx) for idx in chunks]


def select_trimmed(batch: TokenBatch, rows: list[int]) -> TokenBatch:
    """Rows ``rows`` of a right-padded batch, trimmed to their own longest sequence (totals kept)."""
    mb = batch.select(torch.tensor(rows, dtype=torch.long))
    width = int(mb.attention_mask.sum(-1).max())
    mb.input_ids, mb.attention_mask = mb.input_ids[:, :width], mb.attention_mask[:, :width]
    mb.completion_mask = mb.completion_mask[:, : width - 1]
    mb.fields = {k: (v[:, : width - 1] if v.dim() == 2 else v) for k, v in mb.fields.items()}
    return mb


def _parts(rows: list[int], size_of, budget: int) -> list[list[int]]:
    """``rows`` in consecutive parts, each within ``budget`` by ``size_of`` (a row over it alone is a part)."""
    parts, current = [], []
    for i in rows:
        if current and size_of(current + [i]) > budget:
            parts.append(current)
            current = []
        current.append(i)
    return parts + [current]


def with_prompt(seq: Seq, prompt_ids: list[int]) -> Seq:
    """The same completion after another prompt (token fields dropped, but for the loss mask: it is the completion's)."""
    return replace(seq, prompt_ids=list(prompt_ids), token={k: v for k, v in seq.token.items() if k == "loss_mask"})


def move_completion_values(values: "torch.Tensor", src: list[Seq], dst: list[Seq], width: int) -> "torch.Tensor":
    """Per-token values [B, L'-1] of the completions in ``src`` (collated) re-placed at the completion positions of
    ``dst`` (same completions, other prompts) in a [B, width] tensor."""
    out = torch.zeros(values.shape[0], width, dtype=values.dtype)
    for i, (a, b) in enumerate(zip(src, dst)):
        n = min(len(a.completion_ids), len(b.completion_ids))
        out[i, len(b.prompt_ids) - 1 : len(b.prompt_ids) - 1 + n] = values[i, len(a.prompt_ids) - 1 : len(a.prompt_ids) - 1 + n]
    return out


def padding_fraction(parts: list[TokenBatch], packed: bool = False) -> float:
    """Share of the computed positions that are padding, over these (trimmed) micro-batches, padded or ``packed``."""
    from tokalign.packing import layout

    real = sum(float(mb.attention_mask.sum()) for mb in parts)
    if packed:
        total = sum(math.prod(layout(mb.attention_mask.sum(-1).tolist())) for mb in parts)
    else:
        total = sum(mb.attention_mask.numel() for mb in parts)
    return 1 - real / total if total else 0.0
