"""cDPO — "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning
Capability", Lin et al. 2024, arXiv:2411.19943. DPO whose rejected tokens are weighted by how
"non-critical" they are, from contrastive estimation between a model fine-tuned on correct
trajectories (``--with positive=PATH``) and one fine-tuned on incorrect ones (``--with negative=PATH``).

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; positive/negative logits [B, T, V] (chunk by chunk).

    p_cd,t = softmax(2 z^pos_t − z^neg_t)[y_t]      s_t = 1 − p_cd,t on rejected tokens, 1 on chosen (only_neg)
    sequence (paper, default):  L = −log σ(β [Σ_t Δ^w_t − Σ_t s_t Δ^l_t])
    position (official code):   h_t = Δ^w_t − s_t Δ^l_t with chosen and rejected tokens paired by index
                                (zero past either's end), L = mean over pairs and positions of −log σ(β h_t)

Defaults β = 0.1 (official ``train_cdpo.py``). s ≡ 1 (the sequence form) is exactly DPO; a rejected
token with p_cd = 1 has zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

FORMS = ("sequence", "position")


@dataclass
class CDPOConfig:
    beta: float = 0.1
    form: str = "sequence"
    chunk_rows: int = 4

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")


@torch.no_grad()
def critical_weights(pos_logits, neg_logits, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """s_t = 1 − softmax(2 z^pos − z^neg)[y_t]: [B, T] from logits given as tensors or HeadLogits."""
    parts = []
    for zp, zn, y in zip(pos_logits.split(chunk_rows), neg_logits.split(chunk_rows), targets.split(chunk_rows)):
        p = torch.softmax(2 * zp.float() - zn.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        parts.append(1 - p)
    return torch.cat(parts)


class CDPO:
    Config = CDPOConfig

    def __init__(self, config: CDPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True, full_vocab=True, models=("positive", "negative"))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        s = critical_weights(out.extra_logits["positive"], out.extra_logits["negative"], batch.input_ids[:, 1:], c.chunk_rows)
        weight = torch.where(f["is_chosen"].unsqueeze(-1) > 0.5, torch.ones_like(s), s)  # only_neg
        delta = (out.logps - f["ref_logps"]) * mask * weight  # [B, T] weighted per-token log-ratios
        groups = batch.totals.get("groups", float(mask.shape[0] // 2))
        if c.form == "sequence":
            d_w, d_l = split_pairs(delta.sum(-1), batch)
            losses = -F.logsigmoid(c.beta * (d_w - d_l))
        else:  # both rows of a pair share the prompt, so their completions start at the same column
            d_w, d_l = split_pairs(delta, batch)
            m_w, m_l = split_pairs(mask, batch)
            present = torch.maximum(m_w, m_l)
            losses = ops.masked_mean(-F.logsigmoid(c.beta * (d_w - d_l)), present, -1)
        metrics = {"critical/rejected_weight_mean": float(ops.masked_mean(s, mask * (1 - f["is_chosen"]).unsqueeze(-1)))}
        return LossOutput(losses.sum() / groups, metrics)
