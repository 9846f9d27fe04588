"""AlignDistil — "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
Zhang et al. 2025, arXiv:2503.02832. RLHF with a DPO reward is token-level distillation towards a
teacher built from logits; the contrastive teacher uses a DPO model (``--dpo-model``) and a reverse
DPO model trained with chosen/rejected swapped (``--reverse-model``), with token-adaptive extrapolation.

Shapes: policy ``logits``, ``z^dpo``, ``z^rev``: [B, T, V] (the frozen ones chunk by chunk); mask: [B, T].

    w_t  = β₂ · ‖π_dpo(·|s_t) − π_rev(·|s_t)‖₁ + 1e-3
    z*_t = z^dpo_t + w_t (z^dpo_t − z^rev_t)
    L_t  = (β / w_t) · KL(π_θ(·|s_t) ‖ softmax(z*_t / τ))
    loss = mean over sequences of Σ_t L_t / |y|          (seq-mean-token-mean)

Defaults β = 0.1, β₂ = 10, τ = 1 (official script ``aligndistil_off_policy.sh``; the loss as in the
official trainer's ``reward_boost_type == "aligndistil"`` branch). Trains on any completions it is given:
preference pairs (both sides), prompt-completion rows, scored rollouts or online samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class AlignDistilConfig:
    beta: float = 0.1
    beta2: float = 10.0
    temperature: float = 1.0
    chunk_rows: int = 1  # rows per chunk of the full-vocabulary KL: memory ∝ chunk × T × V (float32, a few copies)

    def __post_init__(self):
        if self.beta <= 0 or self.beta2 <= 0 or self.temperature <= 0:
            raise ValueError("beta, beta2 and temperature must be > 0")


def _teacher_and_weight(z_dpo: torch.Tensor, z_rev: torch.Tensor, beta2: float, tau: float):
    """log softmax(z*/τ) [c, T, V] and w [c, T] for one chunk of rows."""
    z_dpo, z_rev = z_dpo.float(), z_rev.float()
    w = beta2 * (z_dpo.softmax(-1) - z_rev.softmax(-1)).abs().sum(-1) + 1e-3
    return torch.log_softmax((z_dpo + w.unsqueeze(-1) * (z_dpo - z_rev)) / tau, -1), w


def token_loss(logits: torch.Tensor, z_dpo: torch.Tensor, z_rev: torch.Tensor, beta: float, beta2: float, tau: float) -> torch.Tensor:
    """Per-position (β/w)·KL(π_θ ‖ teacher) for one chunk of rows: [c, T, V] ×3 -> [c, T] (reference form)."""
    teacher, w = _teacher_and_weight(z_dpo, z_rev, beta2, tau)
    student = torch.log_softmax(logits.float(), -1)
    return (beta / w) * (student.exp() * (student - teacher)).sum(-1)


def _chunks(src, rows: int):
    return src.split(rows)  # a tensor, or an ops.HeadLogits that computes each chunk from hidden states


class _DistillKL(torch.autograd.Function):
    """The per-token loss [B, T] over the full vocabulary, chunk by chunk of rows, with a hand-written gradient:
    for p = softmax(z), ∂/∂z_k of (β/w) KL(p ‖ q) is (β/w) p_k (log p_k − log q_k − KL). The backward pass writes
    each chunk's gradient into one [B, T, V] buffer, so no more than one chunk's float32 temporaries ever exist —
    the loss path then costs about what DPO's does (one logits-sized gradient)."""

    @staticmethod
    def forward(ctx, logits, dpo, rev, beta, beta2, tau, rows):
        out = []
        with torch.no_grad():
            for lg, zd, zr in zip(logits.split(rows), _chunks(dpo, rows), _chunks(rev, rows)):
                out.append(token_loss(lg, zd, zr, beta, beta2, tau))
        ctx.save_for_backward(logits)
        ctx.extra = (dpo, rev, beta, beta2, tau, rows)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        dpo, rev, beta, beta2, tau, rows = ctx.extra
        grad = torch.empty_like(logits)
        start = 0
        with torch.no_grad():
            for lg, zd, zr in zip(logits.split(rows), _chunks(dpo, rows), _chunks(rev, rows)):
                teacher, w = _teacher_and_weight(zd, zr, beta2, tau)
                student = torch.log_softmax(lg.float(), -1)
                p = student.exp()
                diff = student - teacher
                kl = (p * diff).sum(-1, keepdim=True)
                scale = (grad_out[start : start + len(lg)] * beta / w).unsqueeze(-1)
                grad[start : start + len(lg)] = (scale * p * (diff - kl)).to(grad.dtype)
                start += len(lg)
        return grad, None, None, None, None, None, None


class AlignDistil:
    Config = AlignDistilConfig

    def __init__(self, config: AlignDistilConfig):
        self.config = config
        self.needs = Needs(data=("pairs", "completions", "scored", "online"), full_vocab=True, models=("dpo", "reverse"))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, t = self.config, batch.totals
        per_token = _DistillKL.apply(out.logits, out.extra_logits["dpo"], out.extra_logits["reverse"], c.beta, c.beta2,
                                     c.temperature, c.chunk_rows)
        loss = ops.aggregate(per_token, batch.completion_mask, "seq-mean-token-mean", total_seqs=t.get("seqs"))
        return LossOutput(loss, {"distill/token_loss": float(ops.masked_mean(per_token.detach(), batch.completion_mask))})
