"""AnytimeReasoner / BRPO — "Optimizing Anytime Reasoning via Budget Relative Policy Optimization", Qi, Liu, Pang, Du,
Lee, Lin 2025, arXiv:2505.13438. The completion (the thinking) is cut at token budgets b_1 < … < b_S drawn from a prior
p; at each budget it is made to answer (a *summary*, after a text that closes the thinking), and the summaries' verified
rewards are dense rewards on the thinking. The thinking and the summary policies are trained apart: the thinking tokens
of each budget segment get a budget-relative advantage (BRPO, a variance-reduced baseline that mixes the row's own
rewards at earlier budgets with the group's average return), the summaries get their own group-relative advantage.

Shapes: ``rewards``, ``group_ids``, ``brpo_summary`` (1 on a summary row, 0 on a thinking row), ``brpo_row_advantage``
(a summary's advantage) [B]; ``brpo_token_advantage`` (each thinking token's segment advantage), ``old_logps``, mask:
[B, T]; ``advantages``: [B, T].

    segments  s = 1..S of the thinking y: tokens [b_{s−1}, min(b_s, |y|)),  b_0 = 0, b_S ≥ |y| (every token in one)
    R_s       = (1/A) Σ_a r(x, y_{<b_s} ⊕ τ ⊕ z_a),  z_a ∼ π(· | x, y_{<b_s} ⊕ τ)   when b_s < |y|      (A = ``summaries``)
              = R, the row's own reward,                                           when b_s ≥ |y| (it answered already)
    G_s       = Σ_{j ≥ s} p_j R_j                         (the return from segment s: the anytime objective's tail)
    V2_s      = mean over the group's rows of their G_s                (0 for a group of one)
    V1_s      = (Σ_{j < s} d^j R_j / Σ_{j < s} d^j) · Σ_{j ≥ s} p_j    (0 for s = 1; d = ``discount``, j counted from 0)
    baseline  = ((s−1)·V1_s + (S−s+1)·V2_s) / S   (brpo; ``variance_reduction`` v1only: V1, v2only: V2, none: 0)
    A^think_t = G_{s(t)} − baseline_{s(t)}        on the thinking tokens of segment s(t)
    A^sum_a   = r_a − mean of the A summaries at that budget (A > 1), or of the group's R_s (A = 1)   on summary tokens
    loss      = GRPO's PPO-clip surrogate on the thinking and summary rows with these advantages, + β·KL, aggregated

Official code: sail-sg/AnytimeReasoner, ``verl/trainer/ppo/brpo.py`` (read in a fork's copy, wjurayj/AnytimeReasoner):
``compute_cot_advantage`` (G, V1 with discount 2.0, V2, the (s·V1 + (S−s)·V2)/S mix and the v1only / v2only / none
ablations), ``compute_summary_advantage`` (A = 1: the group's mean at that split; A > 1: the row's own summaries' mean at
that split; "brpo" trains every summary, "grpo" only the last budget's), ``set_training_split_plan`` (budgets
max_len/S · j, S ∈ {1, 2, 4, 8}; prior uniform, linear p_j ∝ b_j, or base = all mass on the last), ``sample_partial_cot``
(a truncated prefix gets "...\\n\\n...\\n\\n</think>" and the final-answer delimiter appended; summaries of at most
118 tokens), and the training script (n_summary 1, the thinking's advantages not normalised by a standard deviation).

Defaults and their source: ``splits`` 4 budgets of ``rollout.max_new_tokens`` (the official plan; its 8k script uses 1
with prior base, i.e. GRPO on the summary), ``prior`` uniform (the paper's main setting ⚠), ``summaries`` 1 (n_summary),
``discount`` 2.0, ``variance_reduction`` brpo, ``train_summaries`` true ("brpo" summary method), ``scale_rewards`` none
(no std normalisation, as the official advantages), ``terminate`` "" (see departures), ``answer_tokens`` 0 (= what the
prefix leaves of ``rollout.max_new_tokens``; the official 118). GRPO's other defaults are kept.

Limits: one budget (``splits`` 1, or ``budgets`` [b] with b ≥ ``rollout.max_new_tokens``) has no truncation, so no
summary and A^think = R − mean_g R: that is GRPO with ``scale_rewards`` none, and tokalign then runs GRPO itself (no
hook, bit for bit; tested). ``prior`` base (all mass on the last budget, which covers the whole completion) gives
every segment G_s = R and V2_s = mean_g R, so the first segment's advantage is GRPO's (``scale_rewards`` none) and later
ones subtract part of the row's own discounted earlier rewards. Online only; single-turn completions (a multi-turn episode's environment tokens would be cut like the model's).

⚠ unchecked: the paper's prior in its headline runs (the official 8k script's base prior is the GRPO baseline's
setting); the summary count; that the paper's Eq. for V1 is the 2^j-discounted mean the official code uses (its own
comment lists a weighted mean and a max as alternatives).

Departures: a completion that ends before a budget counts its own reward there (the official model always thinks, ends
with "</think>" and answers in a sampled summary; in a task without a thinking block the completion's answer is its
summary). ``terminate`` defaults to "" because the official text is specific to "<think>" models: set it (a YAML config
holds a multi-line text). Summary rows are separate rows of prompt + y_{<b} ⊕ τ (the official packs them into one
tree-attention sequence with the thinking; the sums are the same, a token-mean's denominator counts the same tokens).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.sampling import Hook, set_field, set_token_field
from tokalign.sampling.segments import prefix_answers

SUMMARY, ROW_ADV, TOKEN_ADV = "brpo_summary", "brpo_row_advantage", "brpo_token_advantage"
PRIORS = ("uniform", "linear", "base")
REDUCTIONS = ("brpo", "v1only", "v2only", "none")


@dataclass
class BRPOConfig(GRPOConfig):
    scale_rewards: str = "none"  # the official advantages are not divided by a standard deviation
    budgets: list[int] = field(default_factory=list)  # token budgets b_1 < … < b_S; empty: ``splits`` equal parts
    splits: int = 4  # S when ``budgets`` is empty: b_s = rollout.max_new_tokens · s / S
    prior: str = "uniform"  # uniform | linear (p_s ∝ b_s) | base (all on the last budget)
    summaries: int = 1  # A, answers sampled at each truncating budget
    discount: float = 2.0  # d, V1's weights d^j over the earlier budgets
    variance_reduction: str = "brpo"  # brpo | v1only | v2only | none
    train_summaries: bool = True  # the summary rows join the batch (the official "brpo" summary method)
    terminate: str = ""  # τ, appended to a truncated prefix before its summary
    answer_tokens: int = 0  # the summaries' budget; 0 = what the prefix leaves of rollout.max_new_tokens

    def __post_init__(self):
        super().__post_init__()
        if self.budgets and (any(b < 1 for b in self.budgets) or sorted(set(self.budgets)) != list(self.budgets)):
            raise ValueError(f"budgets must be increasing token counts ≥ 1, got {self.budgets}")
        if self.splits < 1 or self.summaries < 1 or self.answer_tokens < 0:
            raise ValueError(f"splits and summaries must be ≥ 1 and answer_tokens ≥ 0, got {self.splits}, {self.summaries}, "
                             f"{self.answer_tokens}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.variance_reduction not in REDUCTIONS:
            raise ValueError(f"variance_reduction must be one of {', '.join(REDUCTIONS)}, got {self.variance_reduction!r}")
        if not (math.isfinite(self.discount) and self.discount > 0):
            raise ValueError(f"discount must be a finite number > 0, got {self.discount}")

    @property
    def segments(self) -> int:
        return len(self.budgets) if self.budgets else self.splits


def budgets_for(c: BRPOConfig, max_new_tokens: int) -> list[int]:
    """b_1 < … < b_S; the last must cover the rollout's budget, so every token lies in a segment."""
    budgets = list(c.budgets) or [max_new_tokens * s // c.splits for s in range(1, c.splits + 1)]
    if budgets[-1] < max_new_tokens:
        raise UserError(f"brpo's last budget ({budgets[-1]}) must be ≥ rollout.max_new_tokens ({max_new_tokens}): every "
                        "token needs a segment; raise it or lower rollout.max_new_tokens")
    if budgets[0] < 1 or len(set(budgets)) < len(budgets):
        raise UserError(f"brpo's budgets {budgets} repeat or start at 0: use fewer splits (rollout.max_new_tokens "
                        f"{max_new_tokens} over {c.splits})")
    return budgets


def prior_probs(budgets: list[int], prior: str) -> list[float]:
    if prior == "linear":
        return [b / sum(budgets) for b in budgets]
    if prior == "base":
        return [0.0] * (len(budgets) - 1) + [1.0]
    return [1.0 / len(budgets)] * len(budgets)


def budget_advantages(rewards: torch.Tensor, probs: torch.Tensor, mode: str = "brpo", discount: float = 2.0) -> torch.Tensor:
    """[G, S] rewards R of a group's rows at each budget → [G, S] segment advantages G_s − baseline_s (see the module)."""
    g, s_count = rewards.shape
    weighted = rewards * probs
    ret = weighted.flip(-1).cumsum(-1).flip(-1)  # G_s = Σ_{j≥s} p_j R_j
    v2 = ret.mean(0, keepdim=True).expand_as(ret) if g > 1 else torch.zeros_like(ret)
    tail = probs.flip(-1).cumsum(-1).flip(-1)  # Σ_{j≥s} p_j
    w = discount ** torch.arange(s_count, dtype=rewards.dtype)
    prev = (rewards * w).cumsum(-1) / w.cumsum(-1)  # discounted mean of R_0..R_j
    v1 = torch.zeros_like(ret)
    v1[:, 1:] = prev[:, :-1] * tail[1:]
    s = torch.arange(s_count, dtype=rewards.dtype)
    baseline = {"brpo": (s * v1 + (s_count - s) * v2) / s_count, "v1only": v1, "v2only": v2, "none": torch.zeros_like(ret)}[mode]
    return ret - baseline


class BudgetSummaries(Hook):
    """Summaries at every truncating budget of every completion, scored by the run's rewards; sets each thinking row's
    per-token segment advantage and appends the summary rows (their prompt = prompt + y_{<b} ⊕ τ) to the batch."""

    name = "brpo_summaries"

    def __init__(self, config: BRPOConfig):
        self.config = config

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        c, tok = self.config, ctx.tokenizer
        if any(r.get("episode") for r in rows):
            raise UserError("brpo cuts single-turn completions at token budgets; multi-turn episodes are not supported")
        budgets = budgets_for(c, ctx.spec.max_new_tokens)
        probs = torch.tensor(prior_probs(budgets, c.prior), dtype=torch.float64)
        tail = list(tok(c.terminate, add_special_tokens=False)["input_ids"]) if c.terminate else []
        jobs = [(i, b) for i, r in enumerate(rows) for b in budgets if b < len(r["completion_ids"])]
        answers = dict(zip(jobs, prefix_answers(rows, jobs, ctx, c.summaries, tail, c.answer_tokens)))
        R = torch.tensor([[answers[(i, b)].value if (i, b) in answers else float(r["reward"]) for b in budgets]
                          for i, r in enumerate(rows)], dtype=torch.float64)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(int(r["group_id"]), []).append(i)
        adv = torch.zeros_like(R)
        for members in groups.values():
            adv[members] = budget_advantages(R[members], probs, c.variance_reduction, c.discount)
        summaries = []
        for i, r in enumerate(rows):
            n = len(r["completion_ids"])
            set_token_field(r, TOKEN_ADV, [float(adv[i, next(s for s in range(len(budgets)) if t < budgets[s])]) for t in range(n)])
            set_field(r, SUMMARY, 0.0)
            for s, b in enumerate(budgets):
                if (i, b) not in answers or not c.train_summaries:
                    continue
                job = answers[(i, b)]
                scores = [float(m["reward"]) for m in job.rows]
                base = sum(scores) / len(scores) if c.summaries > 1 else float(R[groups[int(r["group_id"])], s].mean())
                for a, (ids, logps, score) in enumerate(zip(job.answers, job.logps, scores)):
                    summaries.append(summary_row(r, job, a, tok.decode(ids, skip_special_tokens=True), score - base, b))
        thinking = len(rows)
        rows.extend(summaries)  # the summary rows join the batch (and their prompt's group)
        return {"brpo/summaries_per_completion": len(jobs) * c.summaries / thinking,
                **{f"brpo/reward_at_budget_{s + 1}": float(R[:, s].mean()) for s in range(len(budgets))},
                "brpo/thinking_advantage_abs_mean": float(adv.abs().mean())}


def summary_row(r: dict, job, a: int, text: str, advantage: float, b: int) -> dict:
    """Thinking row r's a-th summary at budget b as a row of its own: prompt + y_{<b} ⊕ τ, the answer, its sampler
    log-probs and reward, and its advantage (``brpo_row_advantage``)."""
    row = {k: v for k, v in r.items() if k not in ("token_fields", "fields", "token_rewards", "loss_mask")}
    row.update({"id": f"{r['id']}#b{b}.{a}", "prompt_ids": list(r["prompt_ids"]) + job.head, "completion_ids": list(job.answers[a]),
                "completion": text, "sampler_logps": list(job.logps[a]), "reward": float(job.rows[a]["reward"]),
                "finish_reason": job.rows[a]["finish_reason"]})
    set_field(row, SUMMARY, 1.0)
    set_field(row, ROW_ADV, advantage)
    set_token_field(row, TOKEN_ADV, [0.0] * len(job.answers[a]))
    return row


class BRPO(GRPO):
    Config = BRPOConfig

    def __init__(self, config: BRPOConfig):
        super().__init__(config)
        if config.segments > 1:  # one budget: GRPO (scale_rewards none by default), no hook
            self.needs = dataclasses.replace(self.needs, data=("online",), hooks=(*self.needs.hooks, BudgetSummaries(config)))

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch = super().prepare(batch)
        f, mask = batch.fields, batch.completion_mask
        if self.config.segments == 1:
            return batch
        missing = [k for k in (SUMMARY, TOKEN_ADV) if k not in f]
        if missing:
            raise UserError(f"brpo needs the budget summaries of its online hook (missing {', '.join(missing)}): train it "
                            "online, or set --set algorithm.splits=1 for GRPO")
        token = f[TOKEN_ADV].to(f["rewards"].dtype)
        row = f.get(ROW_ADV, torch.zeros_like(f["rewards"])).to(token.dtype)
        summary = f[SUMMARY] > 0
        f["advantages"] = torch.where(summary.unsqueeze(-1), row.unsqueeze(-1).expand_as(token), token) * mask
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        if SUMMARY in batch.fields:
            summary = batch.fields[SUMMARY] > 0
            result.metrics["brpo/summary_token_fraction"] = float(
                (batch.completion_mask[summary].sum() / batch.completion_mask.sum().clamp_min(1)))
        return result
