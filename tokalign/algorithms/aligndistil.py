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
from torch.utils.checkpoint import checkpoint

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class AlignDistilConfig:
    beta: float = 0.1
    beta2: float = 10.0
    temperature: float = 1.0
    chunk_rows: int = 4

    def __post_init__(self):
        if self.beta <= 0 or self.beta2 <= 0 or self.temperature <= 0:
            raise ValueError("beta, beta2 and temperature must be > 0")


def token_loss(logits: torch.Tensor, z_dpo: torch.Tensor, z_rev: torch.Tensor, beta: float, beta2: float, tau: float) -> torch.Tensor:
    """Per-position (β/w)·KL(π_θ ‖ teacher) for one chunk of rows: [c, T, V] ×3 -> [c, T]."""
    z_dpo, z_rev = z_dpo.float(), z_rev.float()
    w = beta2 * (z_dpo.softmax(-1) - z_rev.softmax(-1)).abs().sum(-1) + 1e-3
    teacher = torch.log_softmax((z_dpo + w.unsqueeze(-1) * (z_dpo - z_rev)) / tau, -1)
    student = torch.log_softmax(logits.float(), -1)
    return (beta / w) * (student.exp() * (student - teacher)).sum(-1)


class AlignDistil:
    Config = AlignDistilConfig

    def __init__(self, config: AlignDistilConfig):
        self.config = config
        self.needs = Needs(data=("pairs", "completions", "scored", "online"), full_vocab=True, models=("dpo", "reverse"))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, t = self.config, batch.totals
        n = c.chunk_rows
        parts = []
        for lg, zd, zr in zip(out.logits.split(n), out.extra_logits["dpo"].split(n), out.extra_logits["reverse"].split(n)):
            args = (lg, zd.detach(), zr.detach(), c.beta, c.beta2, c.temperature)
            # checkpointed: only one chunk's float32 softmax copies exist, forward and backward
            parts.append(checkpoint(token_loss, *args, use_reentrant=False) if lg.requires_grad else token_loss(*args))
        per_token = torch.cat(parts)
        loss = ops.aggregate(per_token, batch.completion_mask, "seq-mean-token-mean", total_seqs=t.get("seqs"))
        return LossOutput(loss, {"distill/token_loss": float(ops.masked_mean(per_token.detach(), batch.completion_mask))})
