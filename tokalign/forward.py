"""The one forward path: training, ``eval``'s token statistics and ``inspect`` all take per-token log-probs (and
entropies, logits, final hidden states) from here, so the numbers they report are the numbers training sees."""

from __future__ import annotations

import contextvars
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from tokalign import ops
from tokalign.batching import micro_batches
from tokalign.head import confirm, head_weight, linear_logps, unwrapped, why_not_fused
from tokalign.packing import Packed, honours_packing, pack
from tokalign.protocols import PolicyOutput, TokenBatch


# the dtype models compute in under mixed precision (torch.autocast around every model call); None: their own dtype
_COMPUTE = contextvars.ContextVar("tokalign_compute_dtype", default=None)


@contextmanager
def compute_in(dtype: "torch.dtype | None"):
    """Within the block every model call of this module (and HF sampling) runs under ``torch.autocast(dtype)``;
    what is computed from its outputs — log-softmax, ratios, losses — stays outside it, in float32."""
    token = _COMPUTE.set(dtype)
    try:
        yield
    finally:
        _COMPUTE.reset(token)


# when forward() takes log-probs through the fused head: "auto" (when a batch's logits would exceed FUSE_ABOVE
# values), "always", "never" (train.fused_head)
_FUSED = contextvars.ContextVar("tokalign_fused_head", default="auto")
FUSE_ABOVE = 1 << 26  # 64M logits = 256 MiB in fp32: below it the logits cost less than the fused head's recompute


@contextmanager
def fused_head(mode: str):
    """Within the block ``forward`` uses the fused head per ``mode`` (auto | always | never)."""
    token = _FUSED.set(mode)
    try:
        yield
    finally:
        _FUSED.reset(token)


def _use_fused(model, batch: TokenBatch) -> bool:
    mode = _FUSED.get()
    if mode == "never" or why_not_fused(model):
        return False
    return mode == "always" or batch.input_ids.numel() * head_weight(model).shape[0] > FUSE_ABOVE


def autocast(device: "torch.device"):
    """The autocast context of the current compute dtype on ``device`` (a no-op without one)."""
    dtype = _COMPUTE.get()
    return nullcontext() if dtype is None else torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def forward(model, batch: TokenBatch, with_entropy: bool = False, keep_logits: bool = False, keep_hidden: bool = False) -> PolicyOutput:
    """Per-token log-probs of each next token, [B, L-1]; with ``with_entropy`` their entropies (no grad); with
    ``keep_logits`` the logits [B, L-1, V]; with ``keep_hidden`` the final hidden states [B, L-1, H] (with grad:
    a value head trains through them; detach them to read them).

    Without ``keep_logits`` the log-probs come from the fused head (``tokalign.head``: no [B, L-1, V] logits held)
    when ``fused_head`` says so (by default for batches whose logits would be large) and the model's logits are a
    plain linear map of its hidden states (else a note says why); otherwise from the model's logits. Within
    ``packing(True)`` the sequences run packed (``tokalign.packing``: no compute on padding). Positions whose next
    token is padding get log-prob and entropy 0 on the fused and packed paths."""
    packed = _packed(model, batch)
    if not keep_logits and _use_fused(model, batch):
        out = _fused(model, batch, packed, with_entropy, keep_hidden)
        if out is not None:
            return out
    elif not keep_logits and _FUSED.get() != "never":
        _note_once(model)
    res = _call(model, batch, packed, output_hidden_states=keep_hidden)
    ids, _, back = _layout(batch, packed)
    logits = res.logits[:, :-1]
    logps = ops.selective_log_softmax(logits, ids[:, 1:])
    entropy = back(ops.entropy_from_logits(logits.detach())) if with_entropy else None
    hidden = back(res.hidden_states[-1][:, :-1]) if keep_hidden else None
    return PolicyOutput(logps=back(logps), entropy=entropy, logits=back(logits) if keep_logits else None, hidden=hidden)


def _layout(batch: TokenBatch, packed: "Packed | None"):
    """(the ids the model ran on, the positions whose next token is real, a map of per-position outputs back to the
    batch's [B, L-1]) for the padded or the packed layout."""
    if packed is not None:
        return packed.input_ids, packed.valid, packed.unpack
    return batch.input_ids, batch.attention_mask[:, 1:].bool(), lambda x: x


def _call(model, batch: TokenBatch, packed: "Packed | None", **kwargs):
    """The model on the batch, padded (attention mask) or packed (position ids restarting at each sequence)."""
    # no cache: transformers reads packed sequences from the position ids only without one (and a forward needs none)
    inputs = ({"input_ids": packed.input_ids, "position_ids": packed.position_ids, "attention_mask": None, "use_cache": False}
              if packed is not None
              else {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    with autocast(batch.input_ids.device):
        return model(**inputs, **kwargs)


def _fused(model, batch: TokenBatch, packed: "Packed | None", with_entropy: bool, keep_hidden: bool) -> PolicyOutput | None:
    """``forward`` through the fused head; None when the model's logits turn out not to be hidden @ W."""
    with warnings.catch_warnings():
        # FSDP2 warns that the hidden states it returns are views (in-place ops on them would skip its hooks): none here
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        res = _call(model, batch, packed, output_hidden_states=True, logits_to_keep=1)
    hidden = res.hidden_states[-1]
    compute = _COMPUTE.get()
    tol = 1e-4 if compute is None and hidden.dtype == torch.float32 else 3e-2  # bf16 compute: the head's own rounding
    if confirm(model, hidden[:, -1], res.logits[:, -1], tol):
        _note_once(model)
        return None
    ids, valid, back = _layout(batch, packed)
    rows = hidden[:, :-1][valid]
    logps, entropy = linear_logps(rows.to(compute) if compute is not None else rows, head_weight(model), ids[:, 1:][valid])
    full_logps = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    full_logps[valid] = logps
    full_entropy = None
    if with_entropy:
        full_entropy = torch.zeros_like(full_logps)
        full_entropy[valid] = entropy
        full_entropy = back(full_entropy)
    return PolicyOutput(logps=back(full_logps), entropy=full_entropy, hidden=back(hidden[:, :-1]) if keep_hidden else None)


# whether forward packs sequences (train.packing); off: the padded layout
_PACK = contextvars.ContextVar("tokalign_packing", default=False)


@contextmanager
def packing(on: bool):
    """Within the block ``forward`` (and so every frozen pass) runs batches packed, for models that keep packed
    sequences apart (``tokalign.packing.honours_packing``)."""
    token = _PACK.set(bool(on))
    try:
        yield
    finally:
        _PACK.reset(token)


def _packed(model, batch: TokenBatch) -> "Packed | None":
    """The packed layout of ``batch`` when packing is on, the model keeps packed sequences apart, and packing saves
    positions; else None (padded)."""
    if not _PACK.get():
        return None
    inner = unwrapped(model)

    def call(ids, pos):
        with autocast(ids.device):
            logits = inner(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[:, :-1]
        return ops.selective_log_softmax(logits, ids[:, 1:])

    if not honours_packing(inner, batch, call):  # checked once per model, on every process alike (FSDP: collectives)
        _note_packing_once(inner)
        return None
    packed = pack(batch)
    return packed if packed.input_ids.numel() < batch.input_ids.numel() else None


def _note_packing_once(model) -> None:
    reason = f"{type(model).__name__}'s attention does not keep sequences packed in one row apart"
    if reason not in _NOTED:
        _NOTED.add(reason)
        sys.stderr.write(f"note: batches run padded (train.packing is off for this model: {reason}).\n")


_NOTED: set[str] = set()


def _note_once(model) -> None:
    """One stderr line per reason and process: why log-probs come from the model's full logits."""
    reason = why_not_fused(model)
    if reason and reason not in _NOTED:
        _NOTED.add(reason)
        sys.stderr.write(f"note: per-token log-probs from the model's full logits (the fused log-prob head is off: {reason}).\n")


@torch.no_grad()
def reference_logits(model, batch: TokenBatch):
    """A frozen model's [B, L-1, V] logits as a HeadLogits (final hidden states + LM head, computed chunk by chunk
    later), or as a tensor when the head alone does not reproduce the model's logits (models that scale or soft-cap
    logits after the head)."""
    packed = _packed(model, batch)
    res = _call(model, batch, packed, output_hidden_states=True, logits_to_keep=1)
    hidden, head = res.hidden_states[-1], model.get_output_embeddings()
    last = head(hidden[:, -1:].to(head.weight.dtype)).float() if head is not None else None
    tol = 1e-5 if hidden.dtype == torch.float32 else 2e-2  # bf16 compute: the head's own rounding
    if head is not None and torch.allclose(last, res.logits[:, -1:].float(), atol=tol, rtol=tol):
        return ops.HeadLogits(packed.unpack(hidden[:, :-1]) if packed is not None else hidden[:, :-1], head)
    return forward(model, batch, keep_logits=True).logits


def with_row_index(batch: TokenBatch) -> TokenBatch:
    """The batch with a ``_row`` field (each row's position), so micro-batch results can be put back in order."""
    out = TokenBatch(batch.input_ids, batch.attention_mask, batch.completion_mask, dict(batch.fields), batch.totals)
    out.fields["_row"] = torch.arange(len(batch), device=batch.input_ids.device)
    return out


def map_micro_batches(batch: TokenBatch, micro: int, tokens: int, fn: Callable[[TokenBatch], dict],
                      calls: int = 0, split_groups: bool = False) -> dict[str, torch.Tensor]:
    """``fn(micro_batch) -> {name: [b, l-1] tensor}`` over the run's micro-batches (by rows, or by ``tokens``),
    the results back in the batch's row order and width. ``calls``: call ``fn`` at least this often (the extra calls
    on one row, their results dropped) — processes sharing an FSDP-sharded model must make as many calls.
    ``split_groups``: a group larger than a micro-batch is split (``fn`` computes row by row)."""
    width = batch.completion_mask.shape[1]
    parts = micro_batches(with_row_index(batch), micro, tokens, _PACK.get(), split_groups)
    outs = [fn(mb) for mb in parts]
    for _ in range(calls - len(parts)):
        fn(parts[0].select(torch.tensor([0])))
    order = torch.argsort(torch.cat([mb.fields["_row"] for mb in parts]))
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return {k: torch.cat([pad(o[k]) for o in outs])[order] for k in outs[0]}


@torch.no_grad()
def frozen_logps(model, batch: TokenBatch, micro: int = 0, tokens: int = 0, calls: int = 0) -> torch.Tensor:
    """A model's per-token log-probs [B, L-1] without gradients, micro-batched."""
    return map_micro_batches(batch, micro, tokens, lambda mb: {"logps": forward(model, mb).logps}, calls)["logps"]


def to_device(batch: TokenBatch, device) -> TokenBatch:
    batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    batch.completion_mask = batch.completion_mask.to(device)
    batch.fields = {k: v.to(device) for k, v in batch.fields.items()}
    return batch
