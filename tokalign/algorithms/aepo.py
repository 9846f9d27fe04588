"""AEPO — "Arbitrary Entropy Policy Optimization: Entropy Is Controllable in Reinforcement Fine-tuning", 2025,
arXiv:2510.08141 (authors ⚠ unchecked: only the abstract and the official README were readable offline). GRPO's
entropy collapse is countered without an entropy bonus: each step some of the batch's prompts are sampled again at a
temperature chosen from the policy's entropy — T_high while the entropy is at or below a target H*, T_low above it —
and the correct ones among those extra samples are trained on with a plain REINFORCE term (advantage 1). A hotter
(cooler) sampling distribution is a higher (lower) entropy target distribution, so pulling the policy toward its good
samples raises (lowers) its entropy, and the entropy settles near an arbitrary H*.

Shapes: ``rewards``, ``group_ids``, ``aepo_extra`` (1 on an extra row, 0 on the GRPO batch's): [B]; ``advantages``:
[B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T]. The extra rows join their prompt's group (so micro-batches
keep them with it) but not its advantage statistics.

    H_{s−1} = mean entropy of π_θ over the completion tokens trained on at step s − 1 (all updates; extra rows included)
    T_s     = T_high if H_{s−1} ≤ H*  else  T_low                        (step 1: H_0 := 0, so T_high — as the official)
    P_s     = the first max(1, ⌊f·|batch prompts|⌋) prompts of the step; o_{p,1..n} ∼ π_θ^{T_s}(· | p), scored by the run
    Â_{p,j} = GRPO's group advantage of o_{p,j} among o_{p,1..n}          (``scale_rewards``, ``adv_eps``)
    E_s     = the first m of {o : Â_o > τ} (batch order),  m = min(M, |·|),  halved (⌊m/2⌋) when H_{s−1} > H*
    A_i     = GRPO's group advantage of R_i over the GRPO rows only;   A_o = α for o ∈ E_s
    loss    = GRPO's clipped surrogate on all rows with these advantages (ρ against the trainer's T = 1 log-probs:
              on-policy ρ = 1 and the extra rows' gradient is α ∇ log π_θ(o)), + β·KL, aggregated

i.e. ∇J_AEPO = ∇J_GRPO + α E_{o ∼ π^T}[∇ log π_θ(o|q) · R(q, o)] (the official README), with R the selection above.

Official code: 597358816/AEPO (EasyR1-based). ``verl/trainer/ray_trainer.py`` ``fit`` (``trainer.algorithm=AEPO``):
temperature = ``temperature_high`` if entropy ≤ ``entropy_base`` else ``temperature_low``, ``entropy`` being the last
step's ``actor/entropy_loss`` (0 before the first update); the first quarter of the step's prompts is re-generated at
that temperature with ``rollout.n`` samples each, rewarded, given GRPO advantages; ``_select_by_advantage(threshold=0.05,
absolute=False)`` keeps those with advantage > 0.05, whose advantages are set to 1; ``sample_num`` =
min(``reinforce_sample_num``, kept), halved when entropy > ``entropy_base``; the update batch is those rows followed
by the GRPO batch without its first ``sample_num`` rows; old log-probs are recomputed at temperature 1 and the PPO
update runs as for GRPO. ``verl/trainer/config.py``: ``temperature_high`` 1.2, ``temperature_low`` 0.8,
``entropy_base`` 0.5, ``reinforce_sample_num`` 60.

Defaults and their source: H* = 0.5, T_high = 1.2, T_low = 0.8, M = 60 (``verl/trainer/config.py`` and the example
script ``examples/qwen-math-7b-AEPO.sh``; the README's best result uses H* = 0.75), f = 1/4, τ = 0.05, advantage 1
(``ray_trainer.py``), α = 1 (the official code has no weight: its extra rows carry advantage 1), n = the run's
``rollout.n`` (``samples`` 0). GRPO's other defaults are kept.

Limits: α = 0 is GRPO bit for bit (no hook, no extra sampling; tested); a batch without extra rows (none selected —
e.g. every extra sample of a prompt scored alike) is GRPO bit for bit too (tested). T_high = T_low = 1 makes the extra
rows ordinary on-policy samples: the term is then a REINFORCE push toward the policy's own better-than-group samples.
Online only; ``mismatch_correction`` must be ``none`` (the extra rows were sampled at T ≠ 1 on purpose: an importance
correction toward π_θ^{T=1} would undo the target distribution).

State: the entropy H_{s−1} and its running sum over the current step's loss calls (``state_dict``), so a resumed run
picks the same temperature.

⚠ unchecked: the paper's own text (equations, its α if any, whether the temperature rule is exactly the code's hard
switch); the authors' names; that EasyR1's ``actor/entropy_loss`` is the mean token entropy at temperature 1 (it may be
computed on temperature-scaled logits); whether the halving above H* is the intended asymmetry or a tuning detail.

Departures: the extra rows are *added* to the batch (the GRPO batch stays whole) instead of replacing its first
``sample_num`` rows — the GRPO signal of the replaced rows' prompts is not lost, and α = 0 is exactly GRPO; the
entropy is tokalign's own masked mean of the training forward's token entropies over the step's loss calls (the
official's is the actor's logged metric); at least one prompt is re-sampled when f > 0 (⌊B/4⌋ is 0 for a batch of
fewer than 4 prompts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.sampling import Hook, set_field

EXTRA_FIELD = "aepo_extra"


@dataclass
class AEPOConfig(GRPOConfig):
    coef: float = 1.0  # α, the advantage of a selected extra sample (the REINFORCE term's weight); 0 = GRPO
    target_entropy: float = 0.5  # H* (official entropy_base)
    temperature_high: float = 1.2  # T while H ≤ H*
    temperature_low: float = 0.8  # T while H > H*
    prompt_fraction: float = 0.25  # f, share of the step's prompts sampled again (at least one)
    samples: int = 0  # n, extra samples per prompt; 0 = the run's rollout.n
    max_samples: int = 60  # M (official reinforce_sample_num), extra rows trained per step at most
    adv_threshold: float = 0.05  # τ, an extra sample is kept if its group advantage exceeds this

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.coef) and self.coef >= 0):
            raise ValueError(f"coef must be a finite number ≥ 0 (0 = GRPO), got {self.coef}")
        if not math.isfinite(self.target_entropy) or self.target_entropy < 0:
            raise ValueError(f"target_entropy must be a finite number ≥ 0, got {self.target_entropy}")
        if not (self.temperature_high > 0 and self.temperature_low > 0):
            raise ValueError(f"temperature_high and temperature_low must be > 0, got {self.temperature_high} and {self.temperature_low}")
        if not 0 < self.prompt_fraction <= 1:
            raise ValueError(f"prompt_fraction must be in (0, 1], got {self.prompt_fraction}")
        if self.samples < 0 or self.max_samples < 1:
            raise ValueError(f"samples must be ≥ 0 and max_samples ≥ 1, got {self.samples} and {self.max_samples}")
        if not math.isfinite(self.adv_threshold):
            raise ValueError(f"adv_threshold must be finite, got {self.adv_threshold}")
        if self.coef > 0 and self.mismatch_correction != "none":
            raise ValueError("the extra rows are sampled at T ≠ 1 on purpose: set mismatch_correction=none (or coef=0)")


def choose_temperature(entropy: float | None, c: AEPOConfig) -> float:
    """T_s from the last step's entropy (None before the first update: 0, as the official's)."""
    return c.temperature_high if (entropy or 0.0) <= c.target_entropy else c.temperature_low


def select_extra(rewards: torch.Tensor, group_ids: torch.Tensor, entropy: float | None, c: AEPOConfig) -> list[int]:
    """Indices (in order) of the extra samples trained on: group advantage > τ, the first min(M, ·), halved above H*."""
    adv = ops.group_advantages(rewards, group_ids, c.scale_rewards, c.adv_eps)
    kept = [i for i in range(len(rewards)) if float(adv[i]) > c.adv_threshold]
    m = min(c.max_samples, len(kept))
    if (entropy or 0.0) > c.target_entropy:
        m //= 2
    return kept[:m]


class EntropySamples(Hook):
    """One sampling round (as the default's), then the first prompts again at the entropy-chosen temperature; the
    selected extra samples join their prompt's group with ``fields["aepo_extra"]`` 1 (0 on the round's rows)."""

    name = "aepo_samples"

    def __init__(self, algorithm: AEPO):
        self.algorithm = algorithm

    def collect(self, ctx):
        c = self.algorithm.config
        picked = ctx.pick(ctx.step, 0)
        prompts = [ctx.rows[i] for i in picked]
        rows = ctx.sample(prompts)
        groups = [[{**r, "prompt_index": picked[g]} for r in rows if r["group_id"] == g] for g in range(len(picked))]
        entropy = self.algorithm.step_entropy()
        temperature = choose_temperature(entropy, c)
        k = max(1, int(len(prompts) * c.prompt_fraction))
        extra = ctx.sample(prompts[:k], n=c.samples or ctx.spec.n, temperature=temperature)
        rewards = torch.tensor([float(r["reward"]) for r in extra], dtype=torch.float64)
        chosen = select_extra(rewards, torch.tensor([int(r["group_id"]) for r in extra]), entropy, c) if extra else []
        for group in groups:
            for r in group:
                set_field(r, EXTRA_FIELD, 0.0)
        for j in chosen:
            r = extra[j]
            g = int(r["group_id"])
            row = {**r, "id": f"{r['id']}#aepo", "group_id": g, "prompt_index": picked[g]}
            set_field(row, EXTRA_FIELD, 1.0)
            groups[g].append(row)
        return groups, rows, {"aepo/temperature": temperature, "aepo/entropy": entropy if entropy is not None else 0.0,
                              "aepo/extra_rows": float(len(chosen)),
                              "aepo/extra_reward_mean": float(rewards.mean()) if len(rewards) else 0.0}


class AEPO(GRPO):
    Config = AEPOConfig

    def __init__(self, config: AEPOConfig):
        super().__init__(config)
        self.entropy: float | None = None  # H_{s−1}; None before the first update
        self._sum, self._count = 0.0, 0.0  # the current step's entropy over its loss calls
        if config.coef > 0:  # α = 0: GRPO's needs, no extra sampling
            self.needs = dataclasses.replace(self.needs, data=("online",), hooks=(*self.needs.hooks, EntropySamples(self)))

    def state_dict(self) -> dict:
        return {"entropy": self.entropy, "sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self.entropy = None if state["entropy"] is None else float(state["entropy"])
        self._sum, self._count = float(state["sum"]), float(state["count"])

    def step_entropy(self) -> float | None:
        """Close the last step's entropy (the mean over its loss calls' completion tokens) and return it."""
        if self._count > 0:
            self.entropy = self._sum / self._count
        self._sum, self._count = 0.0, 0.0
        return self.entropy

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        if c.coef == 0:
            return super().prepare(batch)
        if EXTRA_FIELD not in f:
            raise UserError("aepo needs the extra samples of its online hook (missing aepo_extra): train it online, "
                            "or set --set algorithm.coef=0 for GRPO")
        extra = f[EXTRA_FIELD] > 0
        r, gids = f["rewards"], f["group_ids"]
        if not bool(extra.any()):
            f["advantages"] = ops.group_advantages(r, gids, c.scale_rewards, c.adv_eps)
            return batch
        base = ~extra
        adv = torch.full_like(r, c.coef)
        adv[base] = ops.group_advantages(r[base], gids[base], c.scale_rewards, c.adv_eps)
        f["advantages"] = adv
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        mask = batch.completion_mask
        if out.entropy is not None:
            self._sum += float((out.entropy.detach().float() * mask).sum())
            self._count += float(mask.sum())
        if EXTRA_FIELD in batch.fields:
            result.metrics["aepo/extra_fraction"] = float(batch.fields[EXTRA_FIELD].float().mean())
        return result
