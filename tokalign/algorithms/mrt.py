"""MRT — "Optimizing Test-Time Compute via Meta Reinforcement Fine-Tuning", Qu, Yang, Setlur, Tunstall, Beeching,
Salakhutdinov, Kumar 2025, arXiv:2503.07572 (the RL variant). The thinking trace is a sequence of episodes; an
episode's *progress* is how much it raises the likelihood of eventual success, J, estimated by Monte-Carlo: from the
prefix ending at each episode boundary the model is made to answer (optionally after a text that closes its thinking,
the paper's meta-prover μ) several times and the answers are scored. The dense progress bonus is added, with weight α,
to GRPO's outcome advantage.

Shapes: ``rewards``, ``group_ids``, ``episode_value_root`` [B]; ``episode_value_start`` / ``_end`` (the J at the start
and the end of each token's episode, from the online hook), ``old_logps``, mask: [B, T]; ``advantages``: [B, T]
(``bonus`` to_go / episode) or [B] (``bonus`` sum).

    boundaries 0 = b_0 < b_1 < … < b_m < |y| cut the completion y into episodes e_k = y[b_k : b_{k+1}], b_{m+1} = |y|
    J_k = (1/M) Σ_{s=1..M} r(x, y_{<b_k} ⊕ τ ⊕ a_s),   a_s ∼ π_old(· | x, y_{<b_k} ⊕ τ)      (k ≤ m; τ = ``terminate``)
    J_{m+1} = R                                                 (the row's own outcome reward)
    progress_k = J_{k+1} − J_k                                  (the paper's Definition 6.1, r^μ_prg)
    bonus  to_go:   b_t = Σ_{j ≥ k(t)} progress_j = R − J_{k(t)}    (progress still to come from t's episode; default)
           episode: b_t = progress_{k(t)}                           (t's own episode's progress)
           sum:     R'_i = R_i + α Σ_k progress_k = R_i + α (R_i − J_0)        (per row, before group normalisation)
    A_t = Â_i + α b_t,   Â_i = GRPO's group advantage of R (``scale_rewards``)   (sum: A_i = GRPO's advantage of R')
    loss = GRPO's PPO-clip surrogate with these advantages, + β·KL, aggregated

Episode boundaries (``boundary``): ``delimiter`` (default, the paper's): the completion's text is split into
paragraphs at ``delimiter`` ("\\n\\n"); a paragraph that starts with one of ``markers`` ("Wait", "But wait",
"Alternatively", …; empty: any paragraph) and lies at least ``min_paragraphs`` (3) paragraphs after the previous episode
start opens a new episode; the first ``max_cuts`` (49) such starts are kept and every ``group_size`` (5) consecutive
episodes merge into one. The cut falls after the token that completes the delimiter (a token that runs on into the
next paragraph carries the cut with it). ``tokens``: every ``episode_tokens`` tokens. ``low_prob``: SPO's cut points
(tokalign/algorithms/spo.py ``cut_points``, tokens with π_old < ``p_threshold``, every ``interval``-th). ``max_cuts``
caps the cuts of every kind (MC cost: ``rollouts`` × (cuts + 1) forced answers per completion).

Official code: CMU-AIRe/MRT. ``analysis/code/break_into_meta_steps.ipynb`` (episodes: split at "\\n\\n", the six
reflection markers, a new episode at least 3 paragraphs after the last, at most 49, merged 5 at a time on Omni-MATH —
3 on AIME); ``analysis/code/pass_at_k_given_prefix.py`` + ``scripts/r1/pass_at_k_given_prefix.sh`` (J: from every
episode prefix — the empty one included — append a "Time is up. … </think>" text and sample K = 8 answers, temperature
0.7; the full trace is closed with "</think>" alone); ``train/rl/README.md`` (the RL variant: replace GRPO's group
baseline by the termination reward, A = R − R_termination — the reward of stopping to think at the prefix and
answering). The RL training code itself is not released. The paper's Figure 6 (read from a page that reproduces its
captions): "generates m on-policy rollouts that terminate reasoning at the prefix and immediately produce final
solutions as well as rollouts that continue reasoning … update the policy with an aggregation of this dense reward and
the final 0/1 outcome reward".

Defaults and their source: boundary ``delimiter`` with "\\n\\n", the six markers, ``min_paragraphs`` 3, ``max_cuts``
49, ``group_size`` 5 (the official episode splitter, Omni-MATH settings); ``rollouts`` 8 (K of the official prefix
script); ``bonus`` to_go (the README's A = R − R_termination is this reward-to-go of progress: R − J at the prefix);
``terminate`` "" (see departures); α = 1 (⚠ unchecked). GRPO's other defaults are kept.

Limits: α = 0 is GRPO bit for bit (no hook, no Monte-Carlo rollouts; tested). One cut-less completion gives every token
b_t = R − J_0 (to_go) = progress_0 (episode). ``bonus`` sum telescopes to R − J_0: with rows of one prompt sharing J_0
in expectation it mostly rescales GRPO's advantage — the per-token modes carry the credit assignment. Online only (the
values come from prefix rollouts of the live policy); single-turn completions (a multi-turn episode's environment
tokens would be cut like the model's).

⚠ unchecked: α's value in the paper; that its RL variant's dense reward is exactly the reward-to-go R − J(prefix)
(from the official README and the Figure 6 caption, not from training code); whether and how it normalises the mixed
set of terminated and continued traces (tokalign adds α·b to GRPO's standardised Â and does not normalise b); the
episode settings used in training (the official splitter is analysis code, which the paper says training follows).

Departures: J is estimated at every episode boundary of every sampled completion, and a prefix's continuation is that
completion's own rest (one sample), where the paper samples one random prefix per query and m fresh continuations; the
forced answers only estimate J and are not trained on. ``terminate`` defaults to "" — J is then the value of the
policy's own continuation from the prefix (an SPO-style Monte-Carlo value) — because the paper's text is specific to
"<think>" models: set it (a YAML config holds the multi-line text) for the meta-prover μ. The forced answers share the
rollout's token budget (``answer_tokens`` 0; > 0: their own budget, as the official script's 4096) and are sampled at
the run's temperature. The STaR variant and the backtracking-search parameterisation are not implemented.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.spo import cut_points
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.sampling import Hook, set_field, set_token_field
from tokalign.sampling.segments import prefix_answers, segment_values

START, END, ROOT = "episode_value_start", "episode_value_end", "episode_value_root"
# the paragraph openings at which the official splitter starts an episode (break_into_meta_steps.ipynb)
PAPER_MARKERS = ("Wait", "But wait", "Alternatively", "Is there another way to think about this?", "But let me double-check",
                 "But hold on")
BONUSES = ("to_go", "episode", "sum")
BOUNDARIES = ("delimiter", "tokens", "low_prob")


@dataclass
class MRTConfig(GRPOConfig):
    alpha: float = 1.0  # α, the progress bonus's weight; 0 = GRPO
    bonus: str = "to_go"  # to_go | episode | sum
    boundary: str = "delimiter"  # delimiter | tokens | low_prob
    delimiter: str = "\n\n"
    markers: list[str] = field(default_factory=lambda: list(PAPER_MARKERS))  # empty: every paragraph may open an episode
    min_paragraphs: int = 3
    group_size: int = 5  # delimiter: merge this many consecutive episodes
    episode_tokens: int = 16  # tokens: the episode length
    p_threshold: float = 0.9  # low_prob: SPO's
    interval: int = 5  # low_prob: SPO's
    max_cuts: int = 49
    rollouts: int = 8  # M, forced answers per boundary
    terminate: str = ""  # τ, the text appended to a prefix before its forced answers ("" = plain continuation)
    answer_tokens: int = 0  # the forced answers' budget; 0 = what the prefix leaves of rollout.max_new_tokens

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number ≥ 0 (0 = GRPO), got {self.alpha}")
        if self.bonus not in BONUSES:
            raise ValueError(f"bonus must be one of {', '.join(BONUSES)}, got {self.bonus!r}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {self.boundary!r}")
        if self.boundary == "delimiter" and not self.delimiter:
            raise ValueError("delimiter must be a non-empty string with boundary=delimiter")
        for name in ("min_paragraphs", "group_size", "episode_tokens", "interval", "rollouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_cuts < 0 or self.answer_tokens < 0:
            raise ValueError(f"max_cuts and answer_tokens must be ≥ 0, got {self.max_cuts} and {self.answer_tokens}")
        if not 0 < self.p_threshold <= 1:
            raise ValueError(f"p_threshold must be in (0, 1], got {self.p_threshold}")


def delimiter_cuts(pieces: list[str], delimiter: str, markers, min_paragraphs: int) -> list[int]:
    """Episode starts of a completion whose tokens decode to ``pieces``, as token counts (the prefix y_{<cut}): the
    paragraphs (split at ``delimiter``) that start with one of ``markers`` (any, when empty) and lie ≥ ``min_paragraphs``
    after the previous start (paragraph 0 is the first); a cut at the completion's end is dropped."""
    text = "".join(pieces)
    ends = list(itertools.accumulate(len(p) for p in pieces))  # characters covered by the first j + 1 tokens
    cuts: list[int] = []
    prev, at, i = 0, text.find(delimiter), 0
    while at >= 0:
        start, i = at + len(delimiter), i + 1  # paragraph i begins at ``start``
        at = text.find(delimiter, start)
        paragraph = text[start: at if at >= 0 else len(text)]
        if i - prev < min_paragraphs or (markers and not paragraph.startswith(tuple(markers))):
            continue
        prev, cut = i, bisect.bisect_left(ends, start) + 1
        if cut < len(pieces) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    return cuts


def episode_cuts(row: dict, tokenizer, c: MRTConfig) -> list[int]:
    """The boundaries b_1 < … < b_m (0 < b < |y|) of a rollout row's completion under ``c.boundary``."""
    ids = row["completion_ids"]
    n = len(ids)
    if c.boundary == "tokens":
        cuts = list(range(c.episode_tokens, n, c.episode_tokens))
    elif c.boundary == "low_prob":
        cuts = [t for t in cut_points(row["sampler_logps"], c.p_threshold, c.interval) if 0 < t < n]
    else:
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        cuts = delimiter_cuts(pieces, c.delimiter, c.markers, c.min_paragraphs)
    cuts = cuts[: c.max_cuts]
    return cuts[c.group_size - 1 :: c.group_size] if c.boundary == "delimiter" else cuts


class EpisodeRollouts(Hook):
    """J at each episode boundary of every completion: ``rollouts`` answers sampled from prompt + y_{<b} + τ, scored by
    the run's rewards, averaged; J at the end is the row's reward. Token fields ``episode_value_start`` / ``_end`` (J
    at the start / end of the token's episode) and the row field ``episode_value_root`` (J_0)."""

    name = "episode_rollouts"

    def __init__(self, config: MRTConfig):
        self.config = config

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        c, tok = self.config, ctx.tokenizer
        tail = list(tok(c.terminate, add_special_tokens=False)["input_ids"]) if c.terminate else []
        cuts = [[0, *episode_cuts(r, tok, c)] for r in rows]
        jobs = [(i, b) for i, bs in enumerate(cuts) for b in bs]
        answers = prefix_answers(rows, jobs, ctx, c.rollouts, tail, c.answer_tokens)
        value = {job: a.value for job, a in zip(jobs, answers)}
        progress, roots = [], []
        for i, r in enumerate(rows):
            n = len(r["completion_ids"])
            values = [value[(i, b)] for b in cuts[i]] + [float(r["reward"])]
            start, end = segment_values(n, cuts[i] + [n], values)
            progress += [v1 - v0 for v0, v1 in zip(values[:-1], values[1:])]
            set_token_field(r, START, start)
            set_token_field(r, END, end)
            set_field(r, ROOT, values[0])
            roots.append(values[0])
        return {"mrt/episodes_per_completion": len(jobs) / len(rows), "mrt/value_root_mean": sum(roots) / len(roots),
                "mrt/progress_mean": sum(progress) / len(progress)}


class MRT(GRPO):
    Config = MRTConfig

    def __init__(self, config: MRTConfig):
        super().__init__(config)
        if config.alpha > 0:  # α = 0: GRPO's needs, no Monte-Carlo rollouts
            self.needs = dataclasses.replace(self.needs, data=("online",), hooks=(*self.needs.hooks, EpisodeRollouts(config)))

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(batch)
        c, f, mask = self.config, batch.fields, batch.completion_mask
        if c.alpha == 0:
            return batch
        missing = [k for k in (START, END, ROOT) if k not in f]
        if missing:
            raise UserError(f"mrt needs the episode values of its online hook (missing {', '.join(missing)}): train it "
                            "online, or set --set algorithm.alpha=0 for GRPO")
        r = f["rewards"]
        if c.bonus == "sum":
            f["mrt_bonus"] = r - f[ROOT].to(r.dtype)
            f["advantages"] = ops.group_advantages(r + c.alpha * f["mrt_bonus"], f["group_ids"], c.scale_rewards, c.adv_eps)
            return batch
        start = f[START].to(r.dtype)
        bonus = (r.unsqueeze(-1) - start) if c.bonus == "to_go" else (f[END].to(r.dtype) - start)
        f["mrt_bonus"] = bonus * mask
        f["advantages"] = (f["advantages"].unsqueeze(-1) + c.alpha * bonus) * mask
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        bonus = batch.fields.get("mrt_bonus")
        if bonus is not None:
            mask = batch.completion_mask
            result.metrics["mrt/bonus_abs_mean"] = float(ops.masked_mean(bonus.abs(), mask) if bonus.dim() == 2 else bonus.abs().mean())
        return result
