"""RMT — "Reinforcement Mid-Training", Tian, Chen, Xu, Wang, Bi, Han and Wang 2025, arXiv:2509.24375 (ICLR 2026; no
official code found). RL on raw pretraining text: the policy reads a context, reasons, predicts the next token(s) and
is rewarded when the prediction matches (the ``next_token`` reward, on the ``next_token:PATH`` task). Three parts on
top of GRPO: a dynamic token budget (a length reward around a budget that decays over training), a curriculum that
feeds easy targets first and hard ones later (difficulty = entropy), and a dual loss: RL on the sampled predictions plus
λ · next-token prediction (NTP) on the gold continuation.

Shapes: ``rewards``, ``group_ids``, ``is_reference``, ``train_step``, ``train_total_steps``, ``ntp_tokens``: [B];
``logps``, ``old_logps``, ``ref_logps``, mask, ``ntp_mask``: [B, T]. A group is a prompt's G sampled rows plus (online,
λ > 0) one gold row: the prompt followed by the reference continuation (+ EOS), ``is_reference`` = 1 (GRAO's
``ReferenceAnswers`` hook).

    budget   B_t = max(B_min, B_0 · γ^((t/T)^k))          (t: the step, 0-based; T: budget_steps, 0 = train.max_steps)
    length   r_len(ℓ; B) = ℓ/B for ℓ ≤ B, max(0, 2 − ℓ/B) above (a triangle peaking at the budget; ℓ = |y_i|)
    reward   R'_i = R_i + w · r_len(|y_i|; B_t)           (R_i: the run's ``--reward``, e.g. next_token)
    RL       A_i = GRPO's group advantage of R' over the group's *sampled* rows; GRPO's clipped surrogate (+ β·KL)
             aggregated over the sampled rows' tokens only (the gold rows leave the RL mask and its totals)
    NTP      L_ntp = −(1/N_gold) Σ_{gold rows r, t} ℓ_{r,t}    (N_gold: the batch's gold tokens; teacher forcing)
    loss     = L_RL + λ · L_ntp

Curriculum (sampling hook ``DifficultyCurriculum``): each step draws a candidate pool of m = ``curriculum_pool`` ×
batch_size prompts (a seeded permutation of (seed, step)), ranks them by difficulty d_i and trains on the window of
batch_size consecutive ranks that starts at ⌊p · (m − batch_size)⌉, p = min(1, t / T_c): the pool's easiest at the
start, its hardest at T_c (``curriculum_steps``, 0 = train.max_steps) and after. d_i = the mean entropy of the
*reference model*'s next-token distribution at the gold continuation's positions (teacher-forced after the prompt;
no textual reference: the entropy after the prompt), cached per prompt. The reference is the frozen initial policy,
so d — and with it every step's prompts — is a function of (seed, step, data) only: a resumed run picks the same ones.

Defaults: λ = 1 (⚠ ours), w = 0.5 (⚠ ours, as ``length_curriculum``), B_0 = 256, B_min = 1, γ = 0.5, k = 1 (⚠ ours),
curriculum on, pool ×4 (⚠ ours). Limits: λ = 0, curriculum off and w = 0 is GRPO bit for bit (tested); γ = 1 is a
fixed budget; λ > 0 with scored (offline) data has no gold rows, so no NTP term (RL only).

⚠ unchecked (only the abstract and third-party summaries were readable offline): the budget rule is the summaries'
"B_t = max(B_min, B_0·γ^{t/T^k})", read here as γ^((t/T)^k); r_len is said to be "triangular" — its exact shape, its
peak at B_t, and the additive mixing with the matching reward (and w) are tokalign's readings. The curriculum is said to
sample "easier tokens during early stages and challenging tokens as capabilities strengthen", difficulty = token
entropy: the pool/moving-window schedule, the entropy of the (frozen) reference rather than of the live policy, and the
entropy at the gold positions are ours. The dual loss is "token-selective RL + token-inclusive NTP" with a unified
objective whose weight λ is not known here.
Departures: the paper's NTP runs on all tokens of the raw text; here it is the gold continuation (its word(s) + EOS)
after the RL prompt, i.e. the tokens the RL predicts, teacher-forced — the context's own tokens are not trained on
(the prompt row does not carry the raw context). The paper's RL covers selected (high-entropy) tokens; here the
curriculum selects targets (prompts), and every sampled target is trained by RL and by NTP. ℓ is the whole completion
(reasoning + answer), not the reasoning trace alone; the budget shapes the reward only — generation is still cut at
the sampler's ``max_new_tokens``. The gold rows have no sampler log-probs, so ``mismatch_correction`` must stay
``none`` with λ > 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grao import REFERENCE_FIELD, ReferenceAnswers
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import Component
from tokalign.components.train_step import TotalSteps, TrainStep, step_of, total_of
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.rows import loads
from tokalign.sampling.base import Hook

NTP_MASK, NTP_TOKENS = "ntp_mask", "ntp_tokens"


@dataclass
class RMTConfig(GRPOConfig):
    ntp_coef: float = 1.0  # λ: weight of the NTP loss on the gold continuation; 0 = no gold rows, no NTP
    length_weight: float = 0.5  # w: weight of the budget's length reward; 0 = no budget
    initial_budget: float = 256.0  # B_0, tokens
    min_budget: float = 1.0  # B_min
    decay_factor: float = 0.5  # γ ∈ (0, 1]; 1 = a fixed budget
    decay_power: float = 1.0  # k
    budget_steps: int = 0  # T of the budget; 0 = train.max_steps
    curriculum: bool = True  # easy → hard prompts by the reference model's entropy
    curriculum_pool: int = 4  # candidates per prompt of the batch
    curriculum_steps: int = 0  # T_c: steps to reach the hardest window; 0 = train.max_steps

    def __post_init__(self):
        super().__post_init__()
        if self.ntp_coef < 0 or self.length_weight < 0:
            raise ValueError(f"ntp_coef and length_weight must be ≥ 0 (0 turns a part off), got {self.ntp_coef}, {self.length_weight}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor must be in (0, 1] (1 = a fixed budget), got {self.decay_factor}")
        if not 0 < self.min_budget <= self.initial_budget:
            raise ValueError(f"budgets must satisfy 0 < min_budget ≤ initial_budget, got {self.min_budget}, {self.initial_budget}")
        if self.decay_power <= 0:
            raise ValueError(f"decay_power must be > 0, got {self.decay_power}")
        for name in ("budget_steps", "curriculum_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number of steps ≥ 0 (0 = train.max_steps), got {v!r}")
        if isinstance(self.curriculum_pool, bool) or not isinstance(self.curriculum_pool, int) or self.curriculum_pool < 1:
            raise ValueError(f"curriculum_pool must be a whole number ≥ 1, got {self.curriculum_pool!r}")
        if self.ntp_coef > 0 and self.mismatch_correction != "none":
            raise ValueError("the gold rows have no sampler log-probs: set mismatch_correction=none, or ntp_coef=0")


def budget_at(step: int, total: int, start: float, gamma: float, power: float, minimum: float) -> float:
    """B_t = max(B_min, B_0 · γ^((t/T)^k)); T ≤ 0 (unknown): B_0."""
    if total <= 0:
        return float(max(minimum, start))
    return float(max(minimum, start * gamma ** ((min(max(step, 0), total) / total) ** power)))


def length_reward(lengths: torch.Tensor, budget: float) -> torch.Tensor:
    """r_len(ℓ; B) = ℓ/B up to B, then max(0, 2 − ℓ/B): [B] from lengths [B]."""
    x = lengths / budget
    return torch.where(x <= 1, x, (2 - x).clamp(min=0))


def window(difficulties: list[float], size: int, progress: float) -> list[int]:
    """Positions (into ``difficulties``) of the ``size`` consecutive ranks, easiest first, that start at rank
    round(progress · (m − size)); ties in difficulty keep the pool's order."""
    m = len(difficulties)
    order = sorted(range(m), key=lambda i: difficulties[i])
    start = round(min(1.0, max(0.0, progress)) * max(0, m - size))
    return order[start:start + size]


def reference_entropy(model, tokenizer, row: dict) -> float:
    """d: the mean entropy of ``model``'s next-token distribution at the gold continuation's positions after the
    prompt (teacher-forced), or after the prompt alone when the row has no textual reference."""
    prompt = list(row["prompt_ids"])
    gold = row.get("reference")
    if isinstance(gold, str):
        try:
            gold = loads(gold)
        except ValueError:
            pass
    gold_ids = list(tokenizer(str(gold), add_special_tokens=False)["input_ids"]) if isinstance(gold, (str, int, float)) and str(gold) else []
    ids = torch.tensor([prompt + gold_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + max(1, len(gold_ids))].float()
    return float(ops.entropy_from_logits(logits).mean())


class DifficultyCurriculum(Hook):
    """Sets each step's prompt weights: 1 on the curriculum's window of a seeded candidate pool, 0 elsewhere (then the
    online source's draw returns exactly that window); None (the source's own walk) when the data is no larger than
    the batch. Must come before any hook whose ``collect`` returns rows (it sets the weights there and returns None)."""

    name = "rmt_curriculum"

    def __init__(self, pool: int, steps: int = 0):
        self.pool, self.steps = pool, steps
        self.horizon = steps  # set from train.max_steps by RMTSchedule.setup when steps = 0
        self.cache: dict[int, float] = {}
        self.weights: list[float] | None = None
        self.used: dict[str, float] = {}

    def difficulty(self, ctx, index: int) -> float:
        if index not in self.cache:
            self.cache[index] = reference_entropy(ctx.reference_engine().model, ctx.tokenizer, ctx.rows[index])
        return self.cache[index]

    def progress(self, step: int) -> float:
        return min(1.0, step / self.horizon) if self.horizon > 0 else 0.0

    def choose(self, ctx) -> list[int] | None:
        """The step's prompt indices (None: no curriculum this step)."""
        n, b = len(ctx.rows), ctx.batch_size
        if n <= b:
            return None
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_033 + ctx.step * 7919 + 17)
        pool = torch.randperm(n, generator=gen)[: min(n, self.pool * b)].tolist()
        d = [self.difficulty(ctx, i) for i in pool]
        picked = [pool[j] for j in window(d, b, self.progress(ctx.step))]
        self.used = {"rmt/curriculum_progress": self.progress(ctx.step),
                     "rmt/difficulty_mean": sum(self.cache[i] for i in picked) / len(picked)}
        return picked

    def collect(self, ctx):
        picked = self.choose(ctx)
        self.weights = None
        if picked is not None:
            w = [0.0] * len(ctx.rows)
            for i in picked:
                w[i] = 1.0
            self.weights = w
        return None

    def prompt_weights(self, n_prompts: int) -> list[float] | None:
        return self.weights if self.weights is not None and len(self.weights) == n_prompts else None

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        return dict(self.used)


class RMTSchedule(Component):
    """Gives the curriculum hook its horizon: ``curriculum_steps``, or the run's train.max_steps."""

    name = "rmt_schedule"
    provides = ()

    def __init__(self, hook: DifficultyCurriculum):
        self.hook = hook

    def setup(self, ctx) -> None:
        self.hook.horizon = self.hook.steps or max(1, int(ctx.cfg.train.max_steps))


class RMT(GRPO):
    Config = RMTConfig

    def __init__(self, config: RMTConfig):
        super().__init__(config)
        hooks, components = list(self.needs.hooks), list(self.needs.components)
        if config.curriculum:
            self.curriculum = DifficultyCurriculum(config.curriculum_pool, config.curriculum_steps)
            hooks.insert(0, self.curriculum)  # first: it sets the weights the gold-row hook's draw reads
            components.append(RMTSchedule(self.curriculum))
        if config.ntp_coef > 0:
            hooks.append(ReferenceAnswers())
        if config.length_weight > 0:
            components += [TrainStep(), TotalSteps(config.budget_steps)]
        self.needs = dataclasses.replace(self.needs, hooks=tuple(hooks), components=tuple(components))
        self.used: dict[str, float] = {}

    def budget_of(self, batch: TokenBatch) -> float:
        c = self.config
        return budget_at(step_of(batch), total_of(batch, c.budget_steps), c.initial_budget, c.decay_factor,
                         c.decay_power, c.min_budget)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        self.used = {}
        if c.length_weight > 0:
            budget = self.budget_of(batch)
            r_len = length_reward(mask.sum(-1).to(f["rewards"].dtype), budget)
            f["raw_rewards"], f["length_reward"] = f["rewards"], r_len
            f["rewards"] = f["rewards"] + c.length_weight * r_len
            self.used.update({"rmt/budget": budget})
        gold = f[REFERENCE_FIELD] > 0.5 if REFERENCE_FIELD in f else None
        if gold is None or not bool(gold.any()):
            return super().prepare(batch)
        sampled = ~gold
        adv = torch.zeros_like(f["rewards"])
        adv[sampled] = ops.group_advantages(f["rewards"][sampled], f["group_ids"][sampled], c.scale_rewards, c.adv_eps)
        f["advantages"] = adv
        ntp = mask * gold.unsqueeze(-1).to(mask.dtype)
        f[NTP_MASK] = ntp
        f[NTP_TOKENS] = torch.full_like(f["rewards"], float(ntp.sum()))
        batch.completion_mask = mask * sampled.unsqueeze(-1).to(mask.dtype)
        t = batch.totals
        if "tokens" in t:
            t["tokens"] = float(batch.completion_mask.sum())
        if "seqs" in t:
            t["seqs"] = float(t["seqs"]) - float(gold.sum())
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        f = batch.fields
        res = super().loss(batch, out)
        res.metrics.update(self.used)
        if NTP_MASK in f and self.config.ntp_coef > 0:
            nll = -ops.masked_sum(out.logps, f[NTP_MASK]) / f[NTP_TOKENS][0].clamp(min=1)
            res = LossOutput(res.loss + self.config.ntp_coef * nll, res.metrics)
            res.metrics["rmt/ntp_loss"] = float(nll.detach())
        if "length_reward" in f:
            res.metrics["rmt/length_reward_mean"] = float(f["length_reward"].mean())
        return res
