"""A fused linear log-prob head: per-token log-probs and entropies straight from the final hidden states and the
LM-head weight, chunk by chunk, with a hand-written backward — no [N, V] logits or logit gradients are ever held.

At the vocabularies users train on (Qwen2.5: 151,936; Llama 3: 128,256) the model's logits and their gradient
dominate a micro-batch's memory. Here only ``chunk`` rows of logits exist at a time: the forward keeps each
token's log-sum-exp, the backward recomputes one chunk's logits, turns them into (onehot − softmax)·g and adds
that chunk's share to the hidden states' gradient and to the head weight's (an fp32 [V, H] accumulator: the size
of the weight's own gradient). Compute follows the hidden states' dtype (bf16 under mixed precision); the softmax
maths is fp32.

``why_not_fused(model)`` says whether a model's logits are exactly ``hidden @ W.T`` (a plain bias-free linear head, no
logit scaling or soft-capping) and, if not, why; ``tokalign.forward`` then falls back to the model's logits.
"""

from __future__ import annotations

import inspect
import weakref

import torch

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M (32 MiB in fp32); at V = 152k that is 55 tokens


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, index, chunk):
        w = weight.to(hidden.dtype)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.empty_like(logps), torch.empty_like(logps)
        for s in range(0, n, chunk):
            x = (hidden[s : s + chunk] @ w.t()).float()
            m = torch.logsumexp(x, dim=-1)
            logps[s : s + chunk] = x.gather(-1, index[s : s + chunk, None]).squeeze(-1) - m
            p = (x - m[:, None]).exp_()
            entropy[s : s + chunk] = m - (p * x).sum(-1)  # H = −Σ p log p = lse − Σ p x
            lse[s : s + chunk] = m
        ctx.save_for_backward(hidden, weight, index, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, index, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad_logps[s : s + ctx.chunk].float()[:, None]
            d = (h @ w.t()).float().sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g)  # −g·softmax
            d = d.scatter_add_(-1, index[s : s + ctx.chunk, None], g).to(hidden.dtype)  # + g at the picked token
            if grad_hidden is not None:
                grad_hidden[s : s + ctx.chunk] = d @ w
            if grad_weight is not None:
                grad_weight.addmm_(d.t().float(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                 chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T)[index] and the entropy of each row: hidden [N, H], weight [V, H], index [N]
    -> ([N] fp32 with gradients to hidden and weight, [N] fp32 without). ``chunk``: rows at a time (0: as many as
    make ``CHUNK_ELEMENTS`` logits)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearLogps.apply(hidden, weight, index, chunk)


_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def unwrapped(model):
    """The transformers model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def why_not_fused(model) -> str:
    """'' when ``model``'s logits are its final hidden states times its LM-head weight, so ``linear_logps`` can
    replace them; else the reason it cannot (checked once per model: by its structure, then on real logits by
    ``confirm``)."""
    inner = unwrapped(model)
    if inner not in _VERDICTS:
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        params = inspect.signature(inner.forward).parameters
        if type(head) is not torch.nn.Linear:
            reason = f"its output layer is a {type(head).__name__}, not a plain linear map"
        elif head.bias is not None:
            reason = "its output layer has a bias"
        elif "logits_to_keep" not in params and "kwargs" not in params:
            reason = "its forward takes no logits_to_keep"
        else:
            reason = ""
        _VERDICTS[inner] = reason
    return _VERDICTS[inner]


_CONFIRMED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def confirm(model, hidden_last: torch.Tensor, logits_last: torch.Tensor, tol: float) -> str:
    """Check once, on the model's own last-position logits, that the head reproduces them (models that scale or
    soft-cap logits after the head do not); records and returns the reason when it does not."""
    from torch.distributed.tensor import DTensor

    inner = unwrapped(model)
    if isinstance(head_weight(model), DTensor):  # FSDP2 keeps the root's parameters gathered after its forward
        _VERDICTS[inner] = "its output layer is still sharded after the forward (FSDP)"
        return _VERDICTS[inner]
    if inner in _CONFIRMED:
        return ""
    with torch.no_grad():
        mine = (hidden_last @ head_weight(model).to(hidden_last.dtype).t()).float()
    if not torch.allclose(mine, logits_last.float(), atol=tol, rtol=tol):
        _VERDICTS[inner] = "its logits are not hidden @ W (scaled or soft-capped after the head)"
        return _VERDICTS[inner]
    _CONFIRMED.add(inner)
    return ""


def head_weight(model) -> torch.Tensor:
    return unwrapped(model).get_output_embeddings().weight
