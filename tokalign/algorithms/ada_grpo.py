"""Ada-GRPO — "ARM: Adaptive Reasoning Model", Wu, Xie, Zhang, Chen, Zhang, Su, Xiao 2025 (NeurIPS 2025),
arXiv:2505.20258 (official code TEAM-ARM/ARM: ``compute_ada_grpo_outcome_advantage`` in
verl/verl/trainer/ppo/core_algos.py). ARM answers in one of four reasoning formats — Direct Answer, Short CoT, Code
and Long CoT, each opened by its tag — and GRPO on accuracy alone collapses onto the most accurate one (Long CoT,
"format collapse"). Ada-GRPO scales each sample's reward by how rare its format is within its group, a boost that
decays to nothing over training (cosine), so the cheap formats survive long enough to be learnt where they suffice.

Shapes: ``rewards``, ``group_ids``, ``reasoning_format`` (the format's index k_i: 0 … K−1 for the K tags, K for
"other"), ``train_step``, ``train_total_steps``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    t      = step + 1,  T = total steps                  (the loop's 0-based step; the official trainer counts from 1)
    d(t)   = ½ · (1 + cos(π · min(t, T) / T))            (1 → 0 over the run; d(T) = 0 exactly)
    G_i    = |group of i|,   F(o_i) = #{j ∈ group of i : k_j = k_i}
    α_i(t) = 1 + (G_i / F(o_i) − 1) · d(t)               (= (G/F) · decay_i(t), decay_i = F/G + (1 − F/G) · d(t))
    r'_i   = α_i(t) · r_i
    A_i    = (r'_i − mean_g r') / (std_g r' + eps),  then GRPO's clipped surrogate, β·KL and aggregation

so α falls from G/F (a format sampled once in a group of 8 has its reward × 8) to 1 at the run's last step.

Formats (the ``ReasoningFormats`` component, before ``prepare``; metrics ``ada_grpo/format/<name>``, the batch's
fraction of each): each completion of the step's sequences (``ctx.seqs``) is decoded with ``ctx.tokenizer``, special
tokens kept (a tag added as a special token still shows), leading whitespace stripped; its format is the first of
``format_tags`` it starts with (longest tag first), matched case-sensitively, else "other" (index K). "other" is one
more format of its own: it is counted in F like any other and its rows are scaled alike (the official code's
"UNKNOWN", whose rows it asserts have reward 0). T is ``total_steps``, or 0 = the run's ``train.max_steps`` (the
``TotalSteps`` component writes it into ``train_total_steps``; the step comes from ``TrainStep``, so the schedule
resumes with the run). A hand-made batch without ``reasoning_format`` counts every row as "other".

Defaults: the tags ``<ANSWER>``, ``<COT>``, ``<CODE>``, ``<LONG_COT>`` (direct, short_cot, code, long_cot) and the
cosine schedule with t counted from 1 are the official code's; GRPO's otherwise (token-mean aggregation, as the paper's
objective, eq. 6). The official run also uses a k3 KL *loss* with β = 0.001, 8 samples per prompt and lr 1e-6
(verl/stage2_scripts/trainer/run.sh): ``--set algorithm.beta=0.001 --n 8 --lr 1e-6``. Limits: every group
single-format (F = G), or the run's last step (t = T, d = 0), is GRPO bit for bit; so is a batch without formats.

Read: the paper's §3.2 (eqs. 2-6) and the official ``compute_ada_grpo_outcome_advantage`` / ``get_reasoning_format``
(both agree: α = 1 + ½ (G/F − 1)(1 + cos(π t / T)), applied to the reward before the group standardisation; G is the
group's size). ⚠ unchecked: the paper's Appendix A (the decay's details) was not readable; the official code labels a
format by the substring "Assistant:<TAG>" in the decoded prompt + completion (its template ends in "Assistant:"), and
how it decodes (special tokens kept or not) was not read — starting the completion with the tag after optional
whitespace is tokalign's reading. Departures: the paper's rewards are binary (r ∈ {0, 1}); with negative rewards α
also amplifies a rare format's penalty. The SFT stage that teaches the formats is a separate ``sft`` run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components.base import Component
from tokalign.components.train_step import TotalSteps, TrainStep, step_of, total_of
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

FORMAT_FIELD = "reasoning_format"
OTHER = "other"
# the official code's tags and what they mark (get_reasoning_format: COT, CODE, DIRECT, LONG_COT)
PAPER_FORMATS = (("direct", "<ANSWER>"), ("short_cot", "<COT>"), ("code", "<CODE>"), ("long_cot", "<LONG_COT>"))


@dataclass
class AdaGRPOConfig(GRPOConfig):
    format_names: list[str] = field(default_factory=lambda: [n for n, _ in PAPER_FORMATS])  # one per tag; "other" is reserved
    format_tags: list[str] = field(default_factory=lambda: [t for _, t in PAPER_FORMATS])  # a completion's opening tag
    total_steps: int = 0  # T of the decay; 0 = the run's train.max_steps

    def __post_init__(self):
        super().__post_init__()
        names, tags = list(self.format_names), list(self.format_tags)
        if not names or len(names) != len(tags):
            raise ValueError(f"format_names and format_tags need one name per tag, at least one; got {len(names)} names, {len(tags)} tags")
        if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names) or OTHER in names:
            raise ValueError(f"format_names must be distinct non-empty names (not {OTHER!r}), got {names!r}")
        if any(not isinstance(t, str) or not t.strip() for t in tags) or len(set(tags)) != len(tags):
            raise ValueError(f"format_tags must be distinct non-empty strings, got {tags!r}")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 0:
            raise ValueError(f"total_steps must be a whole number ≥ 0 (0 = train.max_steps), got {self.total_steps!r}")


def format_of(text: str, tags) -> int:
    """The index of the tag ``text`` starts with (leading whitespace stripped; the longest matching tag), else
    ``len(tags)`` ("other")."""
    head = text.lstrip()
    best = len(tags)
    for k, tag in enumerate(tags):
        if head.startswith(tag) and (best == len(tags) or len(tag) > len(tags[best])):
            best = k
    return best


def decay_at(step: int, total: int) -> float:
    """d(t) = ½ (1 + cos(π min(t, T) / T)) with t = step + 1 (``step`` 0-based): 0 at the last step and after it."""
    if total < 1:
        raise ValueError(f"the total number of steps T must be ≥ 1, got {total}")
    return 0.5 * (1 + math.cos(math.pi * min(step + 1, total) / total))


def format_scales(formats: torch.Tensor, group_ids: torch.Tensor, decay: float) -> torch.Tensor:
    """α_i = 1 + (G_i / F(o_i) − 1) · d per row [B] (float64), from format indices and group ids [B]."""
    _, g_inv, g_counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    _, f_inv, f_counts = torch.unique(torch.stack([g_inv, formats.long().to(g_inv.device)]), dim=1, return_inverse=True,
                                      return_counts=True)
    ratio = g_counts[g_inv].double() / f_counts[f_inv].double()
    return 1 + (ratio - 1) * decay


class ReasoningFormats(Component):
    """``batch.fields["reasoning_format"]`` [B]: the index of the tag each completion opens with (the step's
    sequences, ``ctx.seqs``, decoded with ``ctx.tokenizer``), ``len(tags)`` for "other"."""

    name = "reasoning_formats"
    provides = (FORMAT_FIELD,)

    def __init__(self, names, tags):
        self.names, self.tags = list(names), list(tags)

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        ks = [format_of(ctx.tokenizer.decode(list(s.completion_ids), skip_special_tokens=False), self.tags) for s in ctx.seqs]
        batch.fields[FORMAT_FIELD] = torch.tensor(ks, dtype=torch.float32, device=batch.completion_mask.device)
        n = max(len(ks), 1)
        return {f"ada_grpo/format/{name}": ks.count(k) / n for k, name in enumerate([*self.names, OTHER])}


class AdaGRPO(GRPO):
    Config = AdaGRPOConfig

    def __init__(self, config: AdaGRPOConfig):
        super().__init__(config)
        extra = (TrainStep(), TotalSteps(config.total_steps), ReasoningFormats(config.format_names, config.format_tags))
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, *extra))
        self.used: dict[str, float] = {}

    def steps_total(self, batch: TokenBatch) -> int:
        """T: ``total_steps``, else the ``train_total_steps`` field."""
        total = total_of(batch, self.config.total_steps)
        if total < 1:
            raise ValueError("Ada-GRPO needs the run's total steps T: set algorithm.total_steps or fill train_total_steps "
                             "(the TotalSteps component does in a run)")
        return total

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        r, gids = f["rewards"], f["group_ids"]
        k = len(self.config.format_tags)
        formats = f[FORMAT_FIELD].round().long() if FORMAT_FIELD in f else torch.full_like(gids, k, dtype=torch.long)
        if bool(((formats < 0) | (formats > k)).any()):
            raise ValueError(f"reasoning_format must be 0 … {k} ({k}: other), got {sorted(set(formats.tolist()))}")
        d = decay_at(step_of(batch), self.steps_total(batch))
        alpha = format_scales(formats, gids, d)
        f["raw_rewards"], f["format_alpha"] = r, alpha.to(r.dtype)
        if not bool((alpha == 1).all()):  # α = 1 everywhere (single-format groups, d = 0): the rewards stay as they are
            f["rewards"] = (r.double() * alpha).to(r.dtype)
        self.used = {"ada_grpo/decay": d, "ada_grpo/alpha_mean": float(alpha.mean()), "ada_grpo/alpha_max": float(alpha.max())}
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **self.used})
