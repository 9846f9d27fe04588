"""D³S — "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy Optimization",
Wang, Yang, Tian, Shi, Ma, Liu, Yao, Ding 2025 (ICLR 2026), arXiv:2509.22115 (no official code found: the paper's
code is "in the supplementary materials"). GRPO trained on a down-sampled batch: at the sample level the subset of
rollouts whose advantages have the largest variance, at the token level, among those rollouts, the tokens with the
largest |A|·H (the policy uncertain where the signal is strong); a curriculum relaxes both over training.

Shapes: ``rewards``, ``group_ids``, ``train_step``, ``train_total_steps``: [B]; ``advantages``: [B]; ``old_entropy`` (the
policy's per-token entropy before this step's updates, no grad), ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    A_i    = GRPO's group advantage, over the whole group (before any down-sampling)
    p(t)   = min(1, t / T)                                    (t: the step, 0-based; T: relax_steps, 0 = train.max_steps)
    ρ(t)   = ρ_0 + (ρ_end − ρ_0) · f(p),   f = p (linear) | (1 − cos πp) / 2 (cosine) | 0 (constant)
             one ρ_s(t) for rollouts, one ρ_t(t) for tokens
    sample level, per group g of n_g rollouts (sample_scope="batch": the whole batch is one pool):
             m_g = min(n_g, max(2, ⌈ρ_s n_g⌉)),   S_g = argmax_{S ⊂ g, |S| = m_g} Var_{i∈S}(A_i)
             solved exactly: S_g is the k largest and the m_g − k smallest A for the best k ∈ [0, m_g]
             (the extremes; ties: the smallest k, then the row order)
    token level, over the completion tokens N of the kept rollouts of the whole batch:
             s_it = |A_i| · H_it,   keep the ⌈ρ_t N⌉ tokens of largest s (ties: the row-major order)
    mask'  = mask · 1[kept];   totals' = the kept tokens and the kept sequences (rows with a kept token)
    loss   = GRPO's clipped surrogate (+ β·KL) aggregated over mask' with totals'

Dropped rows and tokens are dropped, not zero-weighted: their mask is 0, so they count in no normaliser (token-mean
divides by the kept tokens, the seq-means by the kept rows) and get no KL term either; the advantages stay those of
the full group. Both levels are decided in ``prepare`` on the whole batch, so the loss is a sum over rows given the
batch's fields and totals: exact under any micro-batching, groups split or not. H comes from a frozen pass of the
policy over the whole batch before ``prepare`` (the batch component ``D3SComponent``, ``ctx.map_micro_batches``): the
training forward's entropies exist only per micro-batch, and |A_i|·H ranks tokens *across* rollouts (within one
rollout |A_i| is constant and only H would rank) — so the top fraction is over the batch's tokens, not per sequence.
That pass costs one no-grad forward per step, and runs only at steps whose ρ_t < 1. The rows stay in the batch (mask
0; ``d3s_kept_rows`` [B] marks the rest): the loss is the down-sampled batch's, but its forward still computes every
row, and the loop's ``entropy`` metric is the kept tokens'. ``totals["groups"]`` is left as it was (GRPO's loss never
reads it).

Defaults (tokalign's): ρ_s,0 = ρ_t,0 = 0.5, both relaxing linearly to 1 over the run (T = 0: train.max_steps), per
group. Limits: ρ = 1 at a step (sample_keep = token_keep = 1, or any step t ≥ T while the ends are 1) is GRPO bit for
bit; schedule "constant" is static dual-level down-sampling.

⚠ unchecked: only the abstract and third-party summaries were readable offline ("selects a subset of rollouts to
maximize advantage variance Var(A)", "prioritizes tokens with a high product of advantage magnitude and policy entropy
|A_{i,t}| × H_{i,t}", "a dynamic down-sampling schedule … starts with aggressive down-sampling … and gradually
relaxes"; summaries name intra-group (D3S-I) and cross-group variants). Tokalign's readings: the exact max-variance
subset (top-k ∪ bottom-(m−k), as PODS's max-variance down-sampling, arXiv:2504.13818), advantages kept from the full
group rather than recomputed on the subset, the per-group default (``sample_scope="group"``, the D3S-I reading; the
abstract's "across groups" may make the cross-group pool, ``"batch"``, the paper's main variant), at least 2 rollouts
kept per group, token selection over the whole batch, H of the policy before the step's updates, the dropped tokens
leaving the normalisers, the schedule's shapes (linear/cosine in p = t/T towards ρ_end = 1) and every default
fraction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import Component
from tokalign.components.train_step import TotalSteps, TrainStep, step_of, total_of
from tokalign.forward import forward
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

SCHEDULES = ("linear", "cosine", "constant")
SCOPES = ("group", "batch")
ENTROPY_FIELD = "old_entropy"


@dataclass
class D3SConfig(GRPOConfig):
    sample_keep: float = 0.5  # ρ_s,0: share of each group's rollouts kept at step 0
    token_keep: float = 0.5  # ρ_t,0: share of the kept rollouts' tokens kept at step 0
    sample_keep_end: float = 1.0  # ρ_s at step T and after (1: GRPO's rollouts)
    token_keep_end: float = 1.0  # ρ_t at step T and after (1: every token)
    schedule: str = "linear"  # linear | cosine | constant (no relaxation: ρ_0 throughout)
    relax_steps: int = 0  # T: steps from ρ_0 to ρ_end; 0 = the run's train.max_steps
    sample_scope: str = "group"  # group: the max-variance subset of each group | batch: of the whole batch's rollouts

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_keep", "token_keep", "sample_keep_end", "token_keep_end"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"{name} must be a fraction in (0, 1] (1 = no down-sampling), got {v!r}")
        if self.sample_keep_end < self.sample_keep or self.token_keep_end < self.token_keep:
            raise ValueError("the schedule relaxes: sample_keep_end ≥ sample_keep and token_keep_end ≥ token_keep are needed")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.relax_steps, bool) or not isinstance(self.relax_steps, int) or self.relax_steps < 0:
            raise ValueError(f"relax_steps must be a whole number of steps ≥ 0 (0 = train.max_steps), got {self.relax_steps!r}")
        if self.sample_scope not in SCOPES:
            raise ValueError(f"sample_scope must be one of {', '.join(SCOPES)}, got {self.sample_scope!r}")


def keep_at(step: int, start: float, end: float, horizon: int, schedule: str = "linear") -> float:
    """ρ(t): the kept fraction at step ``step`` (0-based), relaxing from ``start`` to ``end`` over ``horizon`` steps
    (horizon ≤ 0: no horizon known, ``start``)."""
    if schedule == "constant" or horizon <= 0:
        return float(start)
    p = min(1.0, max(0, step) / horizon)
    if p >= 1:
        return float(end)
    f = p if schedule == "linear" else (1 - math.cos(math.pi * p)) / 2
    return float(start + (end - start) * f)


def keep_count(fraction: float, n: int, minimum: int = 1) -> int:
    """How many of ``n`` items a kept ``fraction`` keeps: ⌈fraction·n⌉ (a hair of float error below an integer is
    that integer), at least ``minimum``, at most n."""
    if n <= 0:
        return 0
    return min(n, max(minimum, math.ceil(fraction * n - 1e-9)))


def max_variance_subset(values: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (ascending) of the ``m`` entries of ``values`` [n] whose variance is largest: the k largest and the
    m − k smallest for the best k. The optimum has this form (PODS's max-variance down-sampling, arXiv:2504.13818):
    with y₁ < s < y₂, s chosen and y₁, y₂ not, swapping s for y₁ or for y₂ changes m²·Var = Σ_{i<j}(x_i − x_j)² by
    (m − 1)(y − s)(y + s − 2μ₋) (μ₋: the mean of the others), and the two factors (y₂ + s − 2μ₋), (2μ₋ − y₁ − s) sum
    to y₂ − y₁ > 0, so one swap never lowers it. Ties between k: the smallest; between equal values: the row order."""
    n = int(values.numel())
    if m >= n:
        return torch.arange(n, device=values.device)
    x = values.detach().double().cpu()
    x = x - x.mean()  # variance is shift-invariant; centring keeps the prefix sums' cancellation small
    order = torch.sort(x, stable=True).indices
    s = x[order]
    zero = torch.zeros(1, dtype=s.dtype)
    c1, c2 = torch.cat([zero, s.cumsum(0)]), torch.cat([zero, s.square().cumsum(0)])
    k = torch.arange(m + 1)
    total = c1[m - k] + c1[n] - c1[n - k]
    square = c2[m - k] + c2[n] - c2[n - k]
    var = square / m - (total / m).square()
    best = float(var.max())
    k_star = int(torch.nonzero(var >= best - 1e-12 * max(1.0, abs(best)))[0])
    keep = torch.cat([order[: m - k_star], order[n - k_star:]])
    return keep.sort().values.to(values.device)


def sample_mask(adv: torch.Tensor, group_ids: torch.Tensor, fraction: float, scope: str = "group") -> torch.Tensor:
    """1 on the rows kept at the sample level, [B] bool, from per-row advantages [B]."""
    keep = torch.zeros(adv.shape[0], dtype=torch.bool, device=adv.device)
    if scope == "batch":
        pools = [torch.arange(adv.shape[0], device=adv.device)]
    else:
        pools = [torch.nonzero(group_ids == g).squeeze(-1) for g in torch.unique(group_ids, sorted=True)]
    for rows in pools:
        keep[rows[max_variance_subset(adv[rows], keep_count(fraction, len(rows), minimum=2))]] = True
    return keep


def token_mask(score: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the kept tokens, [B, T] bool: the ⌈fraction·N⌉ largest ``score`` among the N tokens where mask > 0."""
    valid = (mask > 0).reshape(-1)
    where = torch.nonzero(valid).squeeze(-1)
    kept = torch.zeros_like(valid)
    if where.numel():
        s = score.detach().reshape(-1)[where].double()
        top = torch.sort(-s, stable=True).indices[: keep_count(fraction, int(where.numel()))]
        kept[where[top]] = True
    return kept.reshape(mask.shape)


class D3SComponent(Component):
    """At the steps whose token-level fraction is below 1, fills ``old_entropy``: the policy's per-token entropy over
    the whole batch (a frozen pass). T (relax_steps, or the run's train.max_steps) decides which steps those are."""

    name = "d3s"
    provides = (ENTROPY_FIELD,)

    def __init__(self, config: D3SConfig):
        self.config = config
        self.horizon = config.relax_steps

    def setup(self, ctx) -> None:
        self.horizon = self.config.relax_steps or max(1, int(ctx.cfg.train.max_steps))

    def token_keep(self, step: int) -> float:
        c = self.config
        return keep_at(step, c.token_keep, c.token_keep_end, self.horizon, c.schedule)

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        if self.token_keep(int(ctx.step)) < 1 and ENTROPY_FIELD not in batch.fields:
            policy = ctx.policy
            with torch.no_grad():
                got = ctx.map_micro_batches(batch, lambda mb: {"h": forward(policy, mb, with_entropy=True).entropy}, policy)
            batch.fields[ENTROPY_FIELD] = got["h"].float()
        return {}


class D3S(GRPO):
    Config = D3SConfig

    def __init__(self, config: D3SConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, TrainStep(), TotalSteps(config.relax_steps), D3SComponent(config)))
        self.used: dict[str, float] = {}

    def keeps(self, batch: TokenBatch) -> tuple[float, float]:
        """(ρ_s, ρ_t) of the batch's step."""
        c = self.config
        horizon = total_of(batch, c.relax_steps)
        step = step_of(batch)
        return (keep_at(step, c.sample_keep, c.sample_keep_end, horizon, c.schedule),
                keep_at(step, c.token_keep, c.token_keep_end, horizon, c.schedule))

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(batch)
        f, mask = batch.fields, batch.completion_mask
        rho_s, rho_t = self.keeps(batch)
        self.used = {"d3s/sample_keep": rho_s, "d3s/token_keep": rho_t, "d3s/rows_kept_fraction": 1.0,
                     "d3s/tokens_kept_fraction": 1.0}
        if rho_s >= 1 and rho_t >= 1:
            return batch  # GRPO's batch, untouched
        adv = f["advantages"]
        per_token = adv if adv.dim() == 2 else adv.unsqueeze(-1).expand_as(mask)
        has_tokens = (mask > 0).any(-1)
        rows = torch.ones(len(batch), dtype=torch.bool, device=mask.device)
        if rho_s < 1:
            row_adv = adv if adv.dim() == 1 else (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            rows = sample_mask(row_adv, f["group_ids"], rho_s, self.config.sample_scope)
        kept = (mask > 0) & rows.unsqueeze(-1)
        if rho_t < 1:
            if ENTROPY_FIELD not in f:
                raise ValueError(f"D3S's token level needs the policy's per-token entropies in batch.fields[{ENTROPY_FIELD!r}] "
                                 "(its batch component D3SComponent fills them)")
            score = per_token.abs() * f[ENTROPY_FIELD].to(per_token.dtype)
            kept = token_mask(score, kept.to(mask.dtype), rho_t)
        new_mask = mask * kept.to(mask.dtype)
        lost = (~rows) | (has_tokens & ~kept.any(-1))  # rows out of the batch: dropped, or left without a token
        before = float((mask > 0).sum())
        batch.completion_mask = new_mask
        t = batch.totals
        if "tokens" in t:
            t["tokens"] = float(new_mask.sum())
        if "seqs" in t:
            t["seqs"] = float(t["seqs"]) - float(lost.sum())
        f["d3s_kept_rows"] = (~lost).to(mask.dtype)
        self.used.update({"d3s/rows_kept_fraction": float((~lost).double().mean()),
                          "d3s/tokens_kept_fraction": float((new_mask > 0).sum()) / before if before else 1.0})
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **self.used})
