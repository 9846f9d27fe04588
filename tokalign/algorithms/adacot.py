"""AdaCoT — "AdaCoT: Pareto-Optimal Adaptive Chain-of-Thought Triggering via Reinforcement Learning", Lou, Sun, Liang,
Qu, Shen, Wang, Li, Yang, Wu (ByteDance Seed) 2025, arXiv:2505.11896 (no official code found). The model decides at
the start of its answer whether to think: a non-empty ``<think>…</think>`` block, or an empty one, then the answer. RL
moves that decision boundary with penalties for thinking when it was not needed and for skipping it when it was; the
penalty coefficients trace the accuracy / CoT-rate Pareto front. Selective Loss Masking (SLM) keeps the *decision
token* out of the loss in the RL stages where the decision must not drift (e.g. a maths stage, where every query
rewards thinking and the boundary would collapse to "always think").

Shapes: ``rewards`` (R_base: the run's ``--reward`` total), ``group_ids``, ``needs_cot`` (optional, per row: +1 CoT
needed, −1 not needed, 0 or absent: no label), ``cot_triggered``, ``cot_format_ok``: [B]; ``cot_decision`` (1 on the
decision token), ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    τ_i      = 1[the think block holds non-whitespace text]                 (CoT triggered; a block never closed counts)
    P_miss,i = 1[needs_cot_i = +1 ∧ ¬τ_i],   P_over,i = 1[needs_cot_i = −1 ∧ τ_i]      (0 for unlabelled rows)
    P_fmt,i  = 1[no well-formed think block: opening tag first, closing tag after it]
    R'_i     = R_i − α₁ P_miss,i − α₂ P_over,i − γ P_fmt,i
    A_i      = (R'_i − mean_g R') / (std_g R' + eps),   then GRPO's clipped surrogate, β·KL and aggregation
    SLM:     m_{i,k_i} ← 0 at the decision token k_i,   L = aggregate(L_t, m) = Σ_{t ≠ k} L_t / N',   N' = N − #masked

Detection (the ``ThinkDecision`` component, before ``prepare``, with the run's tokenizer): each completion is decoded
(special tokens dropped, unless a tag is one); the think block opens where the completion, after leading whitespace,
starts with ``think_open`` — or at the completion's first token when the prompt ends with it (chat templates that
open the block for the model) — and closes at the first ``think_close`` after that. The decision token is the
completion token holding the first character after the opening tag (where that character shares a token with the
tag, that token). With a tokenizer that spells the tags as several tokens (the bundled tiny model's), an empty block's
decision token is the first token of ``</think>``; with single-token tags (Qwen3-style templates) it is typically
the whitespace token after ``<think>`` (one newline before a thought, a double newline before an empty block's
``</think>``). A completion without a think block has no decision token (nothing is masked), is not triggered and
gets P_fmt = 1.

SLM removes the decision token from the loss mask in ``prepare`` (policy surrogate and β·KL alike) and from
``batch.totals["tokens"]`` (the whole batch's token count, so token-mean stays micro-batch invariant: every micro-batch
divides by the same N'); ``seqs`` and ``max_completion_len`` (Dr.GRPO's constant normaliser) are unchanged, and
seq-mean-token-mean averages each row over its remaining tokens.

Labels (the seam): the paper labels each query offline (an auxiliary model judges, by principles, whether it needs
CoT). Here the label is the per-row ``needs_cot`` field: a ``fields`` column of scored data, or a sampling hook that
copies the record's label into the row (``set_field(row, "needs_cot", ±1)``). Fallback: a row without a label (0,
also collate's default where other rows of the batch have one) gets no miss/over penalty — only the format penalty and
SLM apply to it. Other values are refused.

Defaults: α₁ = α₂ = 0.3, γ = 1.0, SLM off, tags ``<think>`` / ``</think>`` (tokalign's; the paper sweeps α₁, α₂ to
trace its Pareto front). Stages, one ``tokalign train`` each, the next from the previous one's output: the paper
first fine-tunes on data where easy queries have an empty block (not offered here: start from a model that writes
both), then runs RL stages; a stage whose queries would all reward thinking (maths) runs with
``selective_loss_masking=true``, so its reward cannot move the trigger rate through the decision token, and the
general stage runs with the penalties and SLM off. Limits: α₁ = α₂ = γ = 0 is GRPO bit for bit with SLM off, and
with SLM on where no decision token is found (the bundled tiny model writes no think tags: nothing is masked).

The paper trains with PPO; the same reward and masking sit on ``ppo`` through ``AdaCoTMixin``: ``AdaCoTPPO`` shapes
R before PPO's GAE and masks the decision token after it (its policy and value losses skip it; GAE and the whitening
still see the position).

⚠ unchecked: only the abstract and third-party summaries were readable offline. Read there: R(x, r) = R_base(x, r) −
α₁·P_miss(x, r) − α₂·P_over(x, r) − γ·P_fmt(r) with α₁, α₂ the Pareto knobs; labels from a 15B auxiliary model; PPO
with a critic; SLM as L_SLM = Σ_{k ≠ k_decision} ℓ_k, masking "the pivotal decision token" against "decision boundary
collapse" in multi-stage RL. tokalign's readings: the penalties as binary indicators, P_fmt's definition (a
well-formed block at the start), the decision token as the first token after the opening tag, which stages use SLM,
dropping the masked token from the token-mean normaliser, and every default value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.components import Component
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

LABEL_FIELD = "needs_cot"
PROMPT_TAIL = 16  # prompt tokens decoded to see whether the prompt opens the think block


@dataclass
class AdaCoTOptions:
    """AdaCoT's options, shared by ``AdaCoTConfig`` (GRPO) and ``AdaCoTPPOConfig`` (PPO)."""

    miss_penalty: float = 0.3  # α₁: CoT needed (needs_cot = +1) but the think block is empty
    over_penalty: float = 0.3  # α₂: CoT not needed (needs_cot = −1) but the model thought
    format_penalty: float = 1.0  # γ: no well-formed think block
    selective_loss_masking: bool = False  # SLM: the decision token leaves the loss (and the token count)
    think_open: str = "<think>"
    think_close: str = "</think>"

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        for name in ("miss_penalty", "over_penalty", "format_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0 (0 turns that penalty off), got {v!r}")
        for name in ("think_open", "think_close"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip() or v != v.strip():
                raise ValueError(f"{name} must be a non-empty tag without surrounding whitespace, got {v!r}")
        if self.think_open == self.think_close:
            raise ValueError(f"think_open and think_close must differ, both are {self.think_open!r}")


@dataclass
class AdaCoTConfig(AdaCoTOptions, GRPOConfig):
    pass


@dataclass
class AdaCoTPPOConfig(AdaCoTOptions, PPOConfig):
    pass


class ThinkRead(NamedTuple):
    triggered: bool  # the think block holds text
    format_ok: bool  # a think block opens first and closes
    decision: int | None  # index into the completion of the decision token, None without a think block


class ThinkReader:
    """Reads a completion's think block through ``tokenizer`` (see the module's docstring: detection)."""

    def __init__(self, tokenizer, think_open: str = "<think>", think_close: str = "</think>"):
        self.tokenizer, self.open, self.close = tokenizer, think_open, think_close
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        tags = {vocab[t] for t in (think_open, think_close) if t in vocab}
        self.drop = set(getattr(tokenizer, "all_special_ids", None) or ()) - tags  # EOS and the like; not the tags

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.drop], skip_special_tokens=False)

    def opened_by(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends with the opening tag (the model writes the block's content first)."""
        return self.text(list(prompt_ids[-PROMPT_TAIL:])).rstrip().endswith(self.open)

    def read(self, prompt_ids: list[int], completion_ids: list[int]) -> ThinkRead:
        kept = [j for j, t in enumerate(completion_ids) if t not in self.drop]
        ids = [completion_ids[j] for j in kept]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        lead = len(text) - len(text.lstrip())
        if text.startswith(self.open, lead):
            start = lead + len(self.open)
        elif self.opened_by(prompt_ids):
            start = 0
        else:
            return ThinkRead(False, False, None)
        end = text.find(self.close, start)
        content = text[start:] if end < 0 else text[start:end]
        decision = kept[self.token_at(ids, start)] if start < len(text) else None
        return ThinkRead(bool(content.strip()), end >= 0, decision)

    def token_at(self, ids: list[int], pos: int) -> int:
        """The index of the token of ``ids`` whose decoded text holds character ``pos`` (binary search over prefix
        decodes: O(log n) decodes)."""
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[: mid + 1], skip_special_tokens=False)) > pos:
                hi = mid
            else:
                lo = mid + 1
        return lo


class ThinkDecision(Component):
    """``cot_triggered``, ``cot_format_ok`` [B] and ``cot_decision`` [B, T] (1 on the decision token) of the step's
    sequences (``ctx.seqs``, read with ``ctx.tokenizer``)."""

    name = "adacot_think"
    provides = ("cot_triggered", "cot_format_ok", "cot_decision")

    def __init__(self, think_open: str = "<think>", think_close: str = "</think>"):
        self.think_open, self.think_close = think_open, think_close

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        reader = ThinkReader(ctx.tokenizer, self.think_open, self.think_close)
        fill_think_fields(batch, [reader.read(s.prompt_ids, s.completion_ids) for s in ctx.seqs],
                          [len(s.prompt_ids) for s in ctx.seqs])
        f = batch.fields
        return {"adacot/trigger_rate": float(f["cot_triggered"].mean()), "adacot/format_ok": float(f["cot_format_ok"].mean()),
                "adacot/decision_found": float(f["cot_decision"].sum(-1).clamp(max=1).mean())}


def fill_think_fields(batch: TokenBatch, reads: list[ThinkRead], prompt_lengths: list[int]) -> None:
    """Write the component's fields from one ``ThinkRead`` per row (completion token j of row i sits at column
    ``prompt_lengths[i] − 1 + j``)."""
    mask = batch.completion_mask
    decision = torch.zeros(mask.shape, dtype=mask.dtype)
    for i, (r, p) in enumerate(zip(reads, prompt_lengths)):
        if r.decision is not None and p - 1 + r.decision < mask.shape[1]:
            decision[i, p - 1 + r.decision] = 1.0
    f = batch.fields
    f["cot_decision"] = decision.to(mask.device) * mask
    f["cot_triggered"] = torch.tensor([float(r.triggered) for r in reads], device=mask.device)
    f["cot_format_ok"] = torch.tensor([float(r.format_ok) for r in reads], device=mask.device)


def labels(batch: TokenBatch) -> torch.Tensor:
    """needs_cot per row [B] (long): +1, −1, or 0 for no label (all 0 when the batch has no such field)."""
    f = batch.fields
    if LABEL_FIELD not in f:
        return torch.zeros_like(f["group_ids"], dtype=torch.long)
    raw = f[LABEL_FIELD]
    bad = sorted({float(v) for v in raw.tolist() if v not in (-1.0, 0.0, 1.0)})
    if bad:
        raise UserError(f"adacot: the '{LABEL_FIELD}' field must be +1 (CoT needed), −1 (not needed) or 0 (no label), got {bad}")
    return raw.long()


def penalties(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P_miss, P_over, P_fmt) per row [B], in the rewards' dtype."""
    f = batch.fields
    dtype = f["rewards"].dtype
    label, triggered = labels(batch), f["cot_triggered"] > 0
    miss = ((label > 0) & ~triggered).to(dtype)
    over = ((label < 0) & triggered).to(dtype)
    fmt = (f["cot_format_ok"] <= 0).to(dtype)
    return miss, over, fmt


class AdaCoTMixin:
    """AdaCoT on a base algorithm whose ``prepare`` turns ``rewards`` into advantages (GRPO, PPO): the trigger
    penalties before it, SLM after it. Its config needs ``AdaCoTOptions``."""

    def __init__(self, config):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components,
                                                                 ThinkDecision(config.think_open, config.think_close)))
        self.used: dict[str, float] = {}

    def shape_rewards(self, batch: TokenBatch) -> TokenBatch:
        """R' = R − α₁ P_miss − α₂ P_over − γ P_fmt (``rewards`` untouched when every coefficient is 0)."""
        c, f = self.config, batch.fields
        miss, over, fmt = penalties(batch)
        penalty = c.miss_penalty * miss + c.over_penalty * over + c.format_penalty * fmt
        labelled = (labels(batch) != 0).double()
        self.used = {"adacot/miss_rate": float(miss.double().mean()), "adacot/over_rate": float(over.double().mean()),
                     "adacot/labelled": float(labelled.mean()), "adacot/penalty_mean": float(penalty.double().mean())}
        if c.miss_penalty or c.over_penalty or c.format_penalty:
            f["raw_rewards"], f["adacot_penalty"] = f["rewards"], penalty
            f["rewards"] = f["rewards"] - penalty
        return batch

    def mask_decision(self, batch: TokenBatch) -> TokenBatch:
        """SLM: the decision tokens out of ``completion_mask`` and out of ``totals["tokens"]``."""
        decision = batch.fields["cot_decision"] * batch.completion_mask
        masked = float(decision.sum())
        self.used["adacot/decision_masked"] = masked if self.config.selective_loss_masking else 0.0
        if self.config.selective_loss_masking and masked > 0:
            batch.completion_mask = batch.completion_mask * (1 - decision)
            if "tokens" in batch.totals:
                batch.totals["tokens"] = batch.totals["tokens"] - masked
        return batch

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(self.shape_rewards(batch))
        return self.mask_decision(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **self.used})


class AdaCoT(AdaCoTMixin, GRPO):
    Config = AdaCoTConfig


class AdaCoTPPO(AdaCoTMixin, PPO):
    """The paper's optimiser: AdaCoT's reward and SLM on tokalign's ``ppo`` (value head, GAE)."""

    Config = AdaCoTPPOConfig
