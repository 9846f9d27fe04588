"""Reward ``r3``: DRO's Reasoning Reflection Reward — "Direct Reasoning Optimization: LLMs Can Reward And Refine Their
Own Reasoning for Open-Ended Tasks", Xu, Chakraborty, Sharma, Nunes, Kıcıman, Lu & Chandra 2025, arXiv:2506.13351.

The policy itself scores its reasoning: how sure it is of the *reference* outcome once it has thought. A sample's
chain of thought c_i is its completion up to and including the ``cot_end`` marker (the whole completion when the
marker is absent); the reference outcome y* (the sample's reference, tokenised once) is appended after it, and the
policy being trained (a reward that sees the policy: ``tokalign.rewards.policy``) gives, for the G samples of one
prompt and every reference token j,

    p_ij  = π(y*_j | x, c_i, y*_<j)                         the certainty of reference token j after CoT i
    σ_j   = std_i p_ij                                       (population std over the prompt's samples)
    w_j   = softmax_j(σ_j / τ)                               reasoning-reflective tokens: those the CoT moves
    R3_i  = Σ_j w_j p_ij ∈ [0, 1]

Most reference tokens are fixed by the language, not by the reasoning (σ_j ≈ 0); a plain mean of p_ij dilutes the
few that the CoT decides, which the weights bring forward. Limits (tested): τ → ∞ (or a group of one, or all σ_j
equal) gives the mean certainty (1/|y*|) Σ_j p_ij — the "aggregate certainty" baseline the paper compares against;
τ → 0 puts all the weight on the reference token with the largest σ_j.

Shapes: per sample a scalar (the reward is about the reference's tokens, not the completion's, so it has no
per-token values); ``info`` has ``certainty`` (the plain mean) and ``max_std`` (max_j σ_j: DRO filters out prompts
whose samples barely differ by it — that filter is not built here; ``max_std`` is what it would threshold).

The scorer hands a batched reward up to 64 samples per call: a prompt's samples are compared when they arrive in one
call (groups up to 64 in a fresh run); a group split across calls, or a sample re-scored alone after a failed call,
is weighted by the part it came in (a group of one: the plain mean).

Options (``--reward-opt r3.KEY=VALUE``): cot_end (``</think>``; empty: the whole completion is the CoT),
answer_prefix (text put between the CoT and the reference, e.g. ``"\\n"``; default empty), temperature τ (0.1).

⚠ unchecked: only the abstract and third-party summaries could be read offline (no official code found). They give
p_ij conditioned on the CoT, the cross-rollout variance as the selector of reasoning-reflective tokens and up-weighting
by it; the softmax form of the weights, τ = 0.1, probabilities (not log-probabilities) and the population std are
tokalign's reading. The paper's correction for certainty propagated from earlier reference tokens is not built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards.grouping import groups


@dataclass
class R3Config:
    cot_end: str = "</think>"  # the completion up to and including this marker is the chain of thought
    answer_prefix: str = ""  # text between the chain of thought and the reference outcome
    temperature: float = 0.1  # τ of the token weights softmax(σ / τ)

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0 (large: every reference token alike), got {self.temperature!r}")
        for name in ("cot_end", "answer_prefix"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")


def reference_text(reference: Any) -> str:
    """The reference outcome as text: a string as is, a dict's ``answer``, anything else as JSON."""
    if isinstance(reference, dict) and "answer" in reference:
        reference = reference["answer"]
    if reference is None:
        return ""
    return reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)


def find(ids: list[int], marker: list[int]) -> int:
    """The end (exclusive) of the first occurrence of ``marker`` in ``ids``; -1 if absent (or ``marker`` is empty)."""
    n = len(marker)
    if not n:
        return -1
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == marker:
            return i + n
    return -1


def token_weights(stds: list[float], temperature: float) -> list[float]:
    """w_j = softmax(σ_j / τ), computed stably (the largest σ subtracted)."""
    top = max(stds)
    e = [math.exp((s - top) / temperature) for s in stds]
    total = sum(e)
    return [v / total for v in e]


def reflection_rewards(certainty: list[list[float]], temperature: float) -> tuple[list[float], list[float]]:
    """R3_i = Σ_j w_j p_ij for one prompt's samples, from p [G][J]; and σ [J]."""
    g, j = len(certainty), len(certainty[0])
    means = [sum(row[k] for row in certainty) / g for k in range(j)]
    stds = [math.sqrt(sum((row[k] - means[k]) ** 2 for row in certainty) / g) for k in range(j)]
    w = token_weights(stds, temperature)
    return [sum(wk * pk for wk, pk in zip(w, row)) for row in certainty], stds


class R3:
    Config = R3Config
    batched = True  # a prompt's samples must arrive together to be compared

    def __init__(self, config: R3Config | None = None):
        self.config = config or R3Config()
        self.view = None

    def bind_policy(self, view) -> None:
        self.view = view

    def _encode(self, text: str) -> list[int]:
        return list(self.view.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if self.view is None:
            raise UserError("r3 reads the policy: train online, or score with --policy CHECKPOINT")
        c = self.config
        marker = self._encode(c.cot_end)
        prefixes, conts, cot_found = [], [], []
        for s in samples:
            ids = list(s.completion_ids)
            end = find(ids, marker)
            cot_found.append(end >= 0)
            prompt = list(s.metadata.get("prompt_ids") or [])
            if not prompt:
                raise UserError(f"r3: sample {s.id!r} has no prompt_ids (rows from an older tokalign?): re-run rollout")
            prefixes.append(prompt + (ids[:end] if end >= 0 else ids))
            ref = reference_text(s.reference)
            conts.append(self._encode(c.answer_prefix + ref) if ref else [])
        todo = [i for i, cont in enumerate(conts) if cont]
        logps = dict(zip(todo, self.view.logps([prefixes[i] for i in todo], [conts[i] for i in todo])))
        out: list[Reward | None] = [None] * len(samples)
        for part in groups(samples):
            scored = [i for i in part if i in logps]
            for i in part:
                if i not in logps:
                    out[i] = Reward(0.0, info={"detail": "no reference outcome to score"})
            # one reference per prompt; a group whose references tokenise differently is compared sub-group by length
            by_len: dict[int, list[int]] = {}
            for i in scored:
                by_len.setdefault(len(conts[i]), []).append(i)
            for members in by_len.values():
                p = [[math.exp(v) for v in logps[i].tolist()] for i in members]
                values, stds = reflection_rewards(p, c.temperature)
                for i, v, row in zip(members, values, p):
                    out[i] = Reward(v, info={"certainty": sum(row) / len(row), "max_std": max(stds), "group": len(members),
                                             "cot_end_found": cot_found[i]})
        return out
