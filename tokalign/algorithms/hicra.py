"""HICRA — Hierarchy-Aware Credit Assignment, "Emergent Hierarchical Reasoning in LLMs through Reinforcement Learning",
Wang, Xu, Liu, Wu, Lin & Chen 2025, arXiv:2509.03646. RL first consolidates low-level execution, then its gains come
from high-level *planning*; GRPO spreads its signal over all tokens alike, so HICRA amplifies the advantage of the
planning tokens — the tokens of "strategic grams" (SGs: short n-grams that steer the reasoning, such as "let's try",
"we can use", "but the problem mentions").

Shapes: ``rewards``, ``group_ids``: [B]; ``planning_mask`` (1 on the tokens of a matched gram), ``advantages`` (after
``prepare``), ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i = GRPO's group advantage                      (scale_rewards="group": (R_i − mean_g R) / (std_g R + eps))
    A'_{i,t} = A_i + α·|A_i|·m_{i,t},   m_{i,t} = 1 if token t of completion i lies in a strategic gram, else 0
    loss = GRPO's PPO-clip surrogate (and β·KL, aggregation) with the per-token A'

So a planning token of a right answer gets (1 + α)·A, one of a wrong answer (1 − α)·A (its push-down is softened);
execution tokens keep A. Defaults: α = 0.2 (the paper's value, per secondary summaries of it), GRPO's otherwise.
α = 0, or a batch where no gram matches, is GRPO bit for bit.

Detection (the ``StrategicGrams`` component, before ``prepare``; metric ``hicra/planning_fraction``): each completion
is decoded (special tokens skipped) and every gram of ``grams`` is matched case-insensitively, as whole words where
the gram begins or ends with a word character (``whole_words=false``: anywhere); a token is a planning token if its
decoded text overlaps a match (character positions to tokens by prefix decodes, ``tokalign.rewards.prm.char_to_token``).
Matches may overlap; the mask is their union. Works on online and scored data alike (it reads the step's sequences).

⚠ Not checked against the paper's method section or code offline. Read: the abstract (seed listing) and secondary
summaries (alphaXiv's overview of 2509.03646v3 and two blog write-ups): HICRA "amplifies the advantage term" of the
planning tokens "by a factor α (0.2 in the paper)"; SGs are 3-5-word n-grams. The exact form A + α·|A| is tokalign's
reading (a plain (1 + α)·A would also amplify the push-down of wrong answers); the official code (project page
tiger-ai-lab.github.io/Hierarchical-Reasoner) is not in the index. The paper builds its SG list per model by clustering
n-grams of successful solutions, partly by hand; that list was not found. The default ``grams`` are the examples the
summaries quote ("let's try", "we can use", "but the problem mentions" and their longer forms) plus a few common
reflection / branching phrases that are tokalign's choice. Pass your own with ``--set 'algorithm.grams=[...]'``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import Component
from tokalign.protocols import TokenBatch
from tokalign.rewards.prm import char_to_token

# the paper's examples, as summaries of it quote them: deduction, branching, backtracing
PAPER_GRAMS = ("we can use the fact that", "let's try a different approach", "but the problem mentions that", "let's try",
               "we can use", "but the problem mentions")
# tokalign's additions: common reflection and planning phrases of reasoning models
EXTRA_GRAMS = ("but wait", "let me check", "let me verify", "we need to", "alternatively", "another approach",
               "let's consider", "on second thought")


@dataclass
class HICRAConfig(GRPOConfig):
    alpha: float = 0.2  # amplification of planning-token advantages: A + α·|A|
    grams: list[str] = field(default_factory=lambda: [*PAPER_GRAMS, *EXTRA_GRAMS])  # strategic grams, case-insensitive
    whole_words: bool = True  # a gram's word-character edges must be word boundaries (False: match inside words too)

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")
        if any(not isinstance(g, str) or not g.strip() for g in self.grams):
            raise ValueError(f"grams must be non-empty strings, got {self.grams!r}")


def gram_pattern(grams, whole_words: bool = True) -> re.Pattern | None:
    """One case-insensitive regex for all ``grams``, longest first; with ``whole_words`` each is bounded as a whole
    word at an edge that is a word character (so "we need to" does not match inside "owe need tons"). None for no
    grams."""
    parts = []
    for g in sorted(set(grams), key=len, reverse=True):
        before = r"(?<!\w)" if whole_words and re.match(r"\w", g) else ""
        after = r"(?!\w)" if whole_words and re.search(r"\w$", g) else ""
        parts.append(before + re.escape(g) + after)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def gram_spans(text: str, grams, whole_words: bool = True) -> list[tuple[int, int]]:
    """Character spans [start, end) of every match of a gram in ``text``, overlapping matches included."""
    pattern, spans = gram_pattern(grams, whole_words), []
    if pattern is None:
        return spans
    pos = 0
    while pos < len(text):  # re.finditer skips overlaps: restart one character after each match's start
        m = pattern.search(text, pos)
        if m is None:
            break
        spans.append(m.span())
        pos = m.start() + 1
    return spans


def planning_mask(tokenizer, ids: list[int], grams, whole_words: bool = True) -> list[float]:
    """1.0 on each token of ``ids`` whose decoded text overlaps a strategic gram of the decoded completion, else 0.0."""
    mask = [0.0] * len(ids)
    if not ids:
        return mask
    spans = [(a, b) for a, b in gram_spans(tokenizer.decode(ids, skip_special_tokens=True), grams, whole_words) if b > a]
    if not spans:
        return mask
    starts = char_to_token(tokenizer, ids, [a for a, _ in spans])
    ends = char_to_token(tokenizer, ids, [b - 1 for _, b in spans])
    for s, e in zip(starts, ends):
        for t in range(s, e + 1):
            mask[t] = 1.0
    return mask


class StrategicGrams(Component):
    """``batch.fields["planning_mask"]`` [B, T]: 1 on the completion tokens inside a strategic gram (the step's
    sequences, ``ctx.seqs``, decoded with ``ctx.tokenizer``)."""

    name = "strategic_grams"
    provides = ("planning_mask",)

    def __init__(self, grams, whole_words: bool = True):
        self.grams, self.whole_words = list(grams), whole_words

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        mask = torch.zeros(batch.completion_mask.shape, dtype=torch.float32)
        for i, s in enumerate(ctx.seqs):
            start = len(s.prompt_ids) - 1
            values = planning_mask(ctx.tokenizer, list(s.completion_ids), self.grams, self.whole_words)
            mask[i, start : start + len(values)] = torch.tensor(values, dtype=torch.float32)
        mask = mask.to(batch.completion_mask.device) * batch.completion_mask
        batch.fields["planning_mask"] = mask
        return {"hicra/planning_fraction": float(mask.sum() / batch.completion_mask.sum().clamp(min=1))}


def amplify(advantages: torch.Tensor, planning: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token advantages [B, T]: A_i + α·|A_i| on planning tokens (``planning`` [B, T] is 1 there), A_i elsewhere."""
    adv = advantages.unsqueeze(-1)
    return adv + alpha * adv.abs() * planning


class HICRA(GRPO):
    Config = HICRAConfig

    def __init__(self, config: HICRAConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, StrategicGrams(config.grams, config.whole_words)))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(batch)
        f = batch.fields
        f["advantages"] = amplify(f["advantages"], f["planning_mask"].to(f["advantages"].dtype), self.config.alpha)
        return batch
