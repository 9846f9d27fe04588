"""Shared tensor maths. Every algorithm takes these from here; none re-implements them.

Shapes: ``values``/``mask`` are ``[B, T]`` (per token, mask 1 on completion tokens).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    max_len: float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses ``values [B, T]`` to a scalar.

    - ``token-mean``: Σ m·L / Σ m over the batch (DAPO; TRL's "dapo"; verl's default)
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original GRPO)
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum
    - ``seq-mean-token-sum-norm``: Σ m·L / (B · max_len) (Dr.GRPO; TRL's "dr_grpo")

    ``total_tokens``/``total_seqs`` are the denominators of the *whole* optimiser batch: pass them
    when ``values`` is one micro-batch so that the micro-batch results sum to the full-batch value.
    """
    num_seqs = float(values.shape[0]) if total_seqs is None else float(total_seqs)
    if mode == "token-mean":
        denom = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=values.dtype)
        return masked_sum(values, mask) / denom.clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(values, mask, -1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return masked_sum(values, mask, -1).sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the maximum completion length)")
        return masked_sum(values, mask) / (num_seqs * float(max_len))
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled-token log-probs.

    k1 = ℓ − ℓ_ref;  k2 = ½(ℓ − ℓ_ref)²;  k3 = exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1, clamped to [−10, 10].
    """
    diff = logps - ref_logps
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        log_ratio = (-diff).clamp(-20.0, 20.0)
        return (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of ``values [B]`` over the rows sharing its group id.

    A group of one has std 0 (not NaN).
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    v = values.to(torch.float64)
    sums = torch.zeros(len(counts), dtype=v.dtype, device=v.device).index_add_(0, inverse, v)
    means = sums / counts
    sq = torch.zeros(len(counts), dtype=v.dtype, device=v.device).index_add_(0, inverse, (v - means[inverse]).square())
    var = sq / (counts - 1).clamp(min=1)
    return means[inverse].to(values.dtype), var.sqrt()[inverse].to(values.dtype)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage. scale="group": (R − mean_g)/(std_g + eps) with unbiased std;
    scale="batch": divide by the batch std; scale="none": R − mean_g (Dr.GRPO)."""
    mean, std = group_stats(rewards, group_ids)
    centred = rewards - mean
    if scale == "group":
        return centred / (std + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")


CHUNK_ELEMENTS = 1 << 23  # vocabulary-sized temporaries are made in blocks of at most this many elements (32 MiB float32)


def _blocks(shape: torch.Size, chunk_rows: int, max_elements: int):
    """(rows, positions) slices covering a [B, T, V] tensor in blocks of at most ``chunk_rows`` rows and, where a
    whole row is larger than ``max_elements``, of about ``max_elements // V`` positions."""
    b, t, v = shape
    rows = max(1, min(chunk_rows, max_elements // max(t * v, 1)))
    cols = t if t * v <= max_elements else max(1, max_elements // max(v, 1))
    for r in range(0, b, rows):
        for c in range(0, t, cols):
            yield slice(r, r + rows), slice(c, c + cols)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(x)[index] block by block; saves the logits (no copy) and their log-sum-exp [B, T] and writes the
    gradient (onehot − softmax)·g block by block into one [B, T, V] buffer: no other vocabulary-sized tensor."""

    @staticmethod
    def forward(ctx, logits, index, chunk_rows, max_elements):
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for r, c in _blocks(logits.shape, chunk_rows, max_elements):
            x = logits[r, c].float()
            lse[r, c] = torch.logsumexp(x, dim=-1)
            out[r, c] = x.gather(-1, index[r, c].unsqueeze(-1)).squeeze(-1) - lse[r, c]
        ctx.save_for_backward(logits, index, lse)
        ctx.blocks = (chunk_rows, max_elements)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for r, c in _blocks(logits.shape, *ctx.blocks):
            g = grad_out[r, c].float().unsqueeze(-1)
            block = (logits[r, c].float() - lse[r, c].unsqueeze(-1)).exp_().mul_(-g)  # −g·softmax
            grad[r, c] = block.scatter_add_(-1, index[r, c].unsqueeze(-1), g)  # + g at the picked token
        return grad, None, None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 8,
                          max_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log softmax(logits)[..., index] without materialising the full log-softmax of the batch.

    logits: [B, T, V]; index: [B, T] -> [B, T] float32. Blocks of at most ``chunk_rows`` sequences and
    ``max_elements`` logits are processed at a time, in the forward and in the backward pass, so the extra
    memory is one block's float32 temporaries plus, in the backward, the [B, T, V] gradient itself."""
    if logits.dim() == 2:  # [T, V] with index [T]
        return _SelectiveLogSoftmax.apply(logits.unsqueeze(0), index.unsqueeze(0), chunk_rows, max_elements).squeeze(0)
    return _SelectiveLogSoftmax.apply(logits, index, chunk_rows, max_elements)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 8, max_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Token entropy H = −Σ p log p of each position: [B, T, V] -> [B, T] (no grad), in the blocks of
    ``selective_log_softmax``."""
    if logits.dim() == 2:  # [T, V]
        return entropy_from_logits(logits.unsqueeze(0), chunk_rows, max_elements).squeeze(0)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for r, c in _blocks(logits.shape, chunk_rows, max_elements):
        logp = torch.log_softmax(logits[r, c].float(), dim=-1)
        out[r, c] = -(logp.exp() * logp).sum(-1)
    return out


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip per-token loss max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ρ = exp(ℓ − ℓ_old);
    ε_low/ε_high are floats or per-token [B, T] tensors (DCPO, HAPO).

    Returns (loss [B, T], clipped [B, T] bool — where the clipped branch is active)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def leave_one_out_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values [B]`` over the *other* rows of its group: (Σ_g v − v_i)/(G − 1) = the RLOO baseline.

    A group of one has no other rows; its baseline is its own value (so R − baseline = 0, as TRL's RLOO)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    v = values.to(torch.float64)
    sums = torch.zeros(len(counts), dtype=v.dtype, device=v.device).index_add_(0, inverse, v)
    n = counts[inverse].to(v.dtype)
    loo = torch.where(n > 1, (sums[inverse] - v) / (n - 1).clamp(min=1), v)
    return loo.to(values.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ)/√(σ² + eps) with μ, σ² the ``mask``-weighted mean and Bessel-corrected variance over *all*
    elements (verl ``masked_whiten``; σ² uses N/(N − 1), N = Σ mask, and no correction when N ≤ 1).

    ``values`` and ``mask`` share a shape: ``[B, T]`` per-token values with a 0/1 mask, or ``[B]`` per-row values
    with weights ``[B]`` — e.g. token counts, which whitens a per-row value as if broadcast to each of its tokens.
    The result is not masked."""
    n = mask.sum()
    mean = masked_sum(values, mask) / n.clamp(min=1e-12)
    var = masked_sum((values - mean).square(), mask) / n.clamp(min=1e-12)
    if n > 1:
        var = var * n / (n - 1)
    return (values - mean) * torch.rsqrt(var + eps)


def _position_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - torch.log_softmax(logits.float(), -1))).sum(-1)


class HeadLogits:
    """[B, T, V] logits that exist only chunk by chunk: ``head(hidden[rows])`` (no grad).

    Keeps a frozen model's final hidden states [B, T, H] instead of its logits, so a full-vocabulary
    loss holds one chunk of reference logits at a time."""

    def __init__(self, hidden: torch.Tensor, head):
        self.hidden, self.head = hidden, head

    def split(self, rows: int):
        for h in self.hidden.split(rows):
            with torch.no_grad():  # hidden states computed under autocast meet the head in its own dtype
                chunk = self.head(h.to(self.head.weight.dtype))
            yield chunk  # outside no_grad: a yield inside it would switch gradients off for the caller


def position_kl(ref_logits, logits: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """KL(π_ref(·|s_t) ‖ π_θ(·|s_t)) over the full vocabulary at every position -> [B, T].

    ``logits``: [B, T, V]; ``ref_logits``: [B, T, V] or a HeadLogits. Rows are processed in chunks
    under activation checkpointing, so the float32 softmax copies of only one chunk exist at a time,
    in the forward and in the backward pass (the gradient flows to ``logits``; the reference is a
    constant)."""
    from torch.utils.checkpoint import checkpoint

    parts = []
    for r, lg in zip(ref_logits.split(chunk_rows), logits.split(chunk_rows)):
        r = r.detach()
        parts.append(checkpoint(_position_kl, r, lg, use_reentrant=False) if lg.requires_grad else _position_kl(r, lg))
    return torch.cat(parts)


def dual_clip_surrogate(logps, old_logps, advantages, eps_low, eps_high, clip_c: float):
    """Dual-clip PPO per-token loss; ``eps_low``/``eps_high`` are floats or [B, T] tensors.

    L = max(−Aρ, −A clip(ρ, 1 − ε_low, 1 + ε_high)); where A < 0, L = min(L, −C·A).
    Returns (loss [B, T], clipped [B, T] bool — the clip branch is active, lower [B, T] bool — the dual clip is)."""
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, eps_low, eps_high)
    cap = -advantages * clip_c
    lower = (advantages < 0) & (per_token > cap)
    return torch.where(advantages < 0, torch.minimum(per_token, cap), per_token), clipped, lower


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float | torch.Tensor,
        lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's masked positions (the model's tokens), in order, whether or
    not they are contiguous.

    rewards, values, mask: [B, T]; gamma, lam: floats or [B, T] (γ_t, λ_t: the discount and λ between position t and
    n(t), the row's next position with mask > 0). With V_{n(t)} = A_{n(t)} = 0 after the row's last masked position:

        δ_t = r_t + γ_t V_{n(t)} − V_t,   A_t = δ_t + γ_t λ_t A_{n(t)}

    so a contiguous mask and constant γ, λ give A_t = Σ_k (γλ)^k δ_{t+k}. Positions with mask 0 (prompt, padding, an
    environment's reply inside a multi-turn completion) are skipped without breaking the chain: they get A = 0 and
    return 0, and their rewards, values, γ and λ are ignored (rewards there are 0 by construction). Returns
    (advantages, returns = A + V), both 0 outside the mask."""
    on = mask > 0
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[:1])  # V and A at each row's next masked position (0 past the last one)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        g, lm = _column(gamma, t), _column(lam, t)
        delta = rewards[:, t] + g * next_value - values[:, t]
        adv = torch.where(on[:, t], delta + g * lm * next_adv, 0.0)
        advantages[:, t] = adv
        next_value = torch.where(on[:, t], values[:, t], next_value)
        next_adv = torch.where(on[:, t], adv, next_adv)
    return advantages, torch.where(on, advantages + values, 0.0)


def _column(x: float | torch.Tensor, t: int):
    """Column t of a [B, T] tensor; a float (or 0-d tensor) as it is."""
    return x[:, t] if isinstance(x, torch.Tensor) and x.dim() == 2 else x


def placed_rewards(rewards: torch.Tensor, mask: torch.Tensor, token_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token rewards [B, T] of a reward-to-go algorithm: each row's total R [B] split into its per-token part
    (a scored artifact's ``token_rewards``, whose sum is already in R: a process reward's value is the sum of its token
    values) and the rest, R − Σ_t token_rewards_t, on the row's last masked token. Σ_t r_t = R either way."""
    last = last_token_mask(mask)
    if token_rewards is None:
        return last * rewards.unsqueeze(-1)
    per_token = token_rewards * mask
    return last * (rewards - per_token.sum(-1)).unsqueeze(-1) + per_token


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 at each row's last masked position (where an outcome reward lands): [B, T] -> [B, T]."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * (mask > 0)).amax(-1, keepdim=True)
    return ((positions == last) & (mask > 0)).to(mask.dtype)


def truncated_is_weights(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, level: str,
                         cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights [B, T] (no grad) that correct for the sampler (e.g. vLLM) and the trainer
    disagreeing on the same tokens: token level w_t = min(π_trainer/π_sampler, C); sequence level one weight per row,
    min(Π_t π_trainer/π_sampler, C), on every token of it. Zero outside the mask."""
    log_ratio = ((trainer_logps - sampler_logps) * mask).detach()
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
    return torch.exp(log_ratio).clamp(max=cap) * mask
