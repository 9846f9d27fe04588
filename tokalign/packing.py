"""Padding-free packing: a right-padded micro-batch's sequences laid end to end in a few rows, attention kept
within each sequence.

``pack(batch)`` places the sequences first-fit, longest first, into rows 1× to 2× as wide as the longest one (the
width with the fewest positions; attention never spans more than twice the padded batch's width) and gives every token its position within its own sequence. The
model is called with those ``position_ids`` and no attention mask: transformers then reads the sequence boundaries
from where the positions restart — flash-attention's varlen kernels on CUDA, a block-diagonal causal mask with SDPA
or eager attention elsewhere. ``Packed.unpack`` puts per-token outputs ([R, W-1, ...], position ``c`` predicting
packed token ``c+1``) back at the batch's [B, L-1] positions, with gradients; the positions of padding come back 0.

``honours_packing(model)`` checks once per model that its attention really is cut at the restarts (a model whose
attention ignores ``position_ids`` would let a sequence see the one before it): the same sequence packed twice in
one row must give the same log-probs as on its own; ``tokalign.forward`` falls back to the padded layout with a note
for a model that fails it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from tokalign.protocols import TokenBatch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, W] long
    position_ids: torch.Tensor  # [R, W] long: each token's position in its own sequence (a row's padding restarts at 0)
    valid: torch.Tensor  # [R, W-1] bool: position predicts the next token of the same sequence
    source: torch.Tensor  # [B, L-1] long: the flat index into [R * (W-1)] each batch position comes from (-1: none)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[R, W-1, ...] per packed position -> [B, L-1, ...] per batch position (0 where the batch has padding)."""
        flat = values.reshape(-1, *values.shape[2:])
        taken = flat[self.source.clamp(min=0)]
        keep = (self.source >= 0).reshape(*self.source.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, taken, torch.zeros((), dtype=taken.dtype, device=taken.device))


def rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of sequences per row, no row longer than ``width`` tokens."""
    out: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                out[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            out.append([i])
            free.append(width - lengths[i])
    return out


WIDTHS = 64  # row widths tried, from the longest sequence to twice it


def plan(lengths: list[int]) -> tuple[list[list[int]], int]:
    """(sequences per row, row width): the layout with the fewest positions among rows 1× to 2× as wide as the longest
    sequence (rows all as wide as the longest leave most of a last row empty; wider ones fill it)."""
    longest = int(max(lengths))
    step = max(1, longest // WIDTHS)
    best = None
    for width in range(longest, 2 * longest + 1, step):
        placed = rows(lengths, width)
        if best is None or len(placed) * width < len(best[0]) * best[1]:
            best = (placed, width)
        if len(placed) == 1:  # one row: wider ones only add padding
            break
    return best


def layout(lengths: list[int]) -> tuple[int, int]:
    """(rows, width) of the packed layout of sequences of these lengths."""
    placed, width = plan(lengths)
    return len(placed), width


def pack(batch: TokenBatch, pad_id: int = 0) -> Packed:
    """The packed layout of a right-padded batch (see the module docstring)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    placed, width = plan(lengths)
    device = batch.input_ids.device
    ids = torch.full((len(placed), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(placed), width), dtype=torch.long)
    valid = torch.zeros((len(placed), width - 1), dtype=torch.bool)
    source = torch.full(tuple(batch.completion_mask.shape), -1, dtype=torch.long)
    src_ids = batch.input_ids.cpu()
    for r, members in enumerate(placed):
        start = 0
        for i in members:
            n = int(lengths[i])
            ids[r, start : start + n] = src_ids[i, :n]
            pos[r, start : start + n] = torch.arange(n)
            valid[r, start : start + n - 1] = True
            source[i, : n - 1] = r * (width - 1) + start + torch.arange(n - 1)
            start += n
        pos[r, start:] = torch.arange(width - start)  # the row's padding: a sequence of its own, never read
    return Packed(ids.to(device), pos.to(device), valid.to(device), source.to(device))


_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
PROBE_TOKENS = 16


@torch.no_grad()
def honours_packing(model, batch: TokenBatch, call) -> bool:
    """Whether ``model`` keeps packed sequences apart (checked once per model, on the shortest sequence of ``batch``,
    at most ``PROBE_TOKENS`` tokens of it, packed twice in one row against once on its own). ``call(ids, pos)``
    runs the model and returns its log-probs [R, W-1] (so the check sees exactly the path training takes)."""
    if model in _VERDICTS:
        return _VERDICTS[model]
    lengths = batch.attention_mask.sum(-1)
    i = int(torch.argmin(lengths))
    n = max(2, min(int(lengths[i]), PROBE_TOKENS))
    seq = batch.input_ids[i : i + 1, :n]
    if seq.shape[1] < 2:  # batches of 1 token: nothing to compare; decide on a later batch
        return True
    pos = torch.arange(n, device=seq.device)[None]
    alone = call(seq, pos)
    twice = call(torch.cat([seq, seq], 1), torch.cat([pos, pos], 1))[:, n:]
    low = torch.is_autocast_enabled(seq.device.type) or next(model.parameters()).dtype != torch.float32
    tol = 5e-2 if low else 1e-3  # bf16: the kernels' own rounding; a sequence seeing another moves far more
    _VERDICTS[model] = ok = bool(torch.allclose(alone.float(), twice.float(), atol=tol, rtol=0))
    return ok
