"""INPO — "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning", Zhang,
Yu, Peng, Song, Tian, Huo, Jiang, Mi, Yu 2024 (ICLR 2025), arXiv:2407.00617. Alignment as a two-player game under a
general preference oracle P(y ≻ y' | x) (no Bradley-Terry reward): the policy plays against itself by online mirror
descent, each iteration's update written as an IPO-style squared loss over preference pairs sampled from the last
iterate π_t and labelled by the oracle, so no per-response win rate is ever estimated.

The mirror-descent step with KL regularisation τ toward π_ref and learning rate η,

    π_{t+1}(y|x) ∝ π_t(y|x)^{1−ητ} · π_ref(y|x)^{ητ} · exp(η·P(y ≻ π_t | x)),

is the minimiser of the iteration's loss over pairs (y_w, y_l) from π_t ordered by the oracle:

    h_t(π, y, y') = log π(y)/π(y') − ητ·log π_ref(y)/π_ref(y') − (1 − ητ)·log π_t(y)/π_t(y')
    L_t(π) = E_{x, (y_w, y_l)}[ (h_t(π, y_w, y_l) − η/2)² ]

computed here as differences of per-row log-ratios against π_t (so that π_t = π_ref drops the reference term exactly):

    u(y) = agg_t(ℓ_t − ℓ^prev_t)        v(y) = agg_t(ℓ^ref_t − ℓ^prev_t)        agg = mean over tokens (default) or sum
    h = (u(y_w) − ητ·v(y_w)) − (u(y_l) − ητ·v(y_l))        loss = mean over pairs of (h − η/2)²

Batch: each group is one pair, chosen row (``is_chosen`` = 1) and rejected row, as ``dpo``. Shapes: ``logps``,
``ref_logps``, ``previous_logps``, mask: [B, T]; u, v: [B]; h: [P]. π_ref is the run's reference (``--ref-model``, else
the starting model); π_t is ``--with previous=PATH`` (``models.previous``), and without it the reference — the first
iteration, π_1 = π_ref — whose log-probs are then reused (no second model in memory).

Limiting cases: π_t = π_ref gives h = u(y_w) − u(y_l), IPO's margin, for every τ, and with η = 1/β the loss is
``ipo``'s (β, per-token means) — bit for bit where η/2 and 1/(2β) round alike (β = 0.1, η = 10); ητ = 1 drops π_t (every iteration is IPO against π_ref on π_t's samples);
τ = 0 is unregularised self-play against π_t (no reference term).

The iterations are separate runs chained through the stages: sample pairs from π_t, label them with a pairwise
oracle (``judge_preference``, tokalign/rewards/judge_pairwise.py: a sample's reward is its win rate; with two samples
per prompt the better one by the oracle is chosen), train π_{t+1} from π_t:

    ref=Qwen/Qwen2.5-0.5B-Instruct; prev=$ref; judge=http://localhost:8000/v1
    tokalign prepare PROMPTS --out P
    for t in 1 2 3; do
      tokalign rollout P --model "$prev" --n 2 --out R$t
      tokalign score R$t --reward judge_preference --reward-opt judge_preference.base_url=$judge --out S$t
      tokalign train inpo --model "$prev" --ref-model "$ref" --with previous="$prev" --data S$t --out M$t
      prev=M$t
    done

A scored artifact trains as pairs: each prompt's highest reward vs its lowest, with the sampler's token ids; a prompt
whose samples tie (the oracle could not separate them) gives no pair. ``--set models.previous=PATH`` is the same as
``--with previous=PATH``.

Defaults: η = 10, τ = 0.01 (ητ = 0.1), per-token means: with π_t = π_ref they train as ``ipo`` at its defaults
(β = 0.1 = 1/η); ⚠ unchecked against the paper's experiments, whose η, τ (and whether they are set per iteration)
could not be read offline. ``log_ratio`` = sum uses sequence log-probs, as the paper writes π(y|x).

⚠ unchecked: the paper's text and equation numbers could not be retrieved offline (its HTML and PDF were out of
reach; no official code was found). The loss above is the one the mirror-descent step implies, following IPO's
construction; it agrees with the form in tokalign's reference/algorithms.md and with a third-party INPO trainer in the
index, which write it with 1/η for η (weights τ/η, 1 − τ/η, target 1/(2η)): the same loss with the inverse step size.
The requirement 0 ≤ ητ ≤ 1 (π_{t+1} a geometric mixture of π_t and π_ref) is tokalign's reading.

Departures: per-token means by default (TRL's and tokalign's IPO convention) where the paper uses sequence log-probs;
the oracle's label is its answer (a judge at temperature 0), not a draw y_w, y_l ~ Bernoulli(P(y ≻ y')), and tied pairs
are dropped instead of labelled at random; with more than two samples per prompt the pair is the best vs the worst
by win rate (the paper draws the pair from π_t). Each iteration is one `tokalign train` run — its optimiser, schedule
and steps are the run's own — rather than an exact argmin of L_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.dpo import split_pairs
from tokalign.components.base import Component
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

ROLE = "previous"
LOG_RATIOS = ("mean", "sum")


@dataclass
class INPOConfig:
    eta: float = 10.0  # η, the mirror-descent learning rate: the target of h_t is η/2
    tau: float = 0.01  # τ, the KL regularisation toward π_ref: π_ref's weight in h_t is ητ, π_t's 1 − ητ
    log_ratio: str = "mean"  # mean: per-token means (as ipo) | sum: sequence log-probs (as the paper writes π(y|x))

    def __post_init__(self):
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.tau < 0 or self.eta * self.tau > 1:
            raise ValueError(f"tau must satisfy 0 ≤ eta·tau ≤ 1 (π_ref's weight in the geometric mixture), got "
                             f"eta·tau = {self.eta * self.tau:g}; lower tau or eta")
        if self.log_ratio not in LOG_RATIOS:
            raise ValueError(f"log_ratio must be one of {', '.join(LOG_RATIOS)}, got {self.log_ratio!r}")


class PreviousIterate(Component):
    """The previous iterate π_t's per-token log-probs, ``fields["previous_logps"]`` [B, T]: a frozen model from
    ``--with previous=PATH``, or without it the reference's log-probs (π_t = π_ref, the first iteration)."""

    name = ROLE
    provides = ("previous_logps",)

    def __init__(self):
        self.model = None

    def roles(self) -> dict[str, bool]:
        return {ROLE: False}

    def describe(self) -> str:
        return "previous iterate (frozen; the reference without --with previous)"

    def setup(self, ctx) -> None:
        path = (ctx.cfg.models or {}).get(ROLE)
        self.model = ctx.load_model(path) if path else None

    def models(self) -> list:
        return [self.model] if self.model is not None else []

    def fill(self, batch, ctx) -> dict:
        f = batch.fields
        f["previous_logps"] = ctx.frozen_logps(self.model, batch) if self.model is not None else f["ref_logps"]
        return {}


def margin(batch: TokenBatch, logps: torch.Tensor, config: INPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [P], u(y_w) [P], u(y_l) [P]) of INPO's loss from the policy's per-token log-probs [B, T]."""
    f, mask = batch.fields, batch.completion_mask
    reduce = ops.masked_mean if config.log_ratio == "mean" else ops.masked_sum
    prev = f["previous_logps"]
    u = reduce(logps - prev, mask, -1)  # log π/π_t
    v = reduce(f["ref_logps"] - prev, mask, -1)  # log π_ref/π_t, no grad
    u_w, u_l = split_pairs(u, batch)
    v_w, v_l = split_pairs(v, batch)
    w = config.eta * config.tau
    return (u_w - w * v_w) - (u_l - w * v_l), u_w, u_l


class INPO:
    Config = INPOConfig

    def __init__(self, config: INPOConfig):
        self.config = config
        self.needs = Needs(data=("pairs",), reference=True, components=(PreviousIterate(),))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c = self.config
        h, u_w, u_l = margin(batch, out.logps, c)
        losses = (h - c.eta / 2).square()
        metrics = {
            "inpo/margin": float(h.detach().mean()),  # h_t; its target is η/2
            "inpo/logratio_chosen": float(u_w.detach().mean()),  # log π/π_t of y_w
            "inpo/logratio_rejected": float(u_l.detach().mean()),
            "rewards/accuracy": float((h > 0).float().mean()),
        }
        # this micro-batch's share of the mean over all pairs of the optimiser batch
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)
