"""GRAO — Group Relative Alignment Optimization, "Learning to Align, Aligning to Learn: A Unified Approach for
Self-Optimized Alignment", Wang, Yue, Ye, Zhang, Fan, Liang, Jiang, Wei, Deng, Han, Li, Guo, Wei, Wang and Gu 2025,
arXiv:2508.07750 (eq. 3–4). One loss that imitates the data's reference answer y (SFT), explores the policy's own
samples o_1..o_G (RL) and ties the two together, every term weighted by group-relative advantages: the reference is
imitated hard while the samples are worse than it, and the samples take over once they are better.

Shapes: ``rewards``, ``group_ids``, ``is_reference``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T]. A group
is a prompt's G sampled rows plus (online, ``reference_answers``) one row holding its reference answer y, scored by the
run's rewards like any sample.

    Â_r = (R_r − μ_g) / (σ_g + eps)            over the group's rows, y included; σ_g with 1/n (``population_std``)
    J(o) = (1/|o|) Σ_t log π_θ(o_t | q, o_<t)
    J_g = (1/G) Σ_i [ Â_i J(o_i)  +  β Â_y J(y)  +  λ Â_i (J(o_i) − J(y)) ]          (exploration, imitation, alignment)
        = (1/G) Σ_i (1 + λ) Â_i J(o_i)  +  (β Â_y − λ Ā) J(y),     Ā = (1/G) Σ_i Â_i
    loss ≈ −mean_g J_g

β = ``imitation_coef``, λ = ``alignment_coef`` (the "reference-aware update": the reference log-likelihood enters
against every sample with the sample's own advantage). The loss is written as GRPO's with per-row weights in place of
advantages, c_i = (n_g/G)(1 + λ) Â_i on a sample and c_y = n_g (β Â_y − λ Ā) on the reference (n_g = the group's rows),
aggregated ``seq-mean-token-mean``: (1/B) Σ_r c_r · mean_t(−ρ_t) has, on-policy (ρ = 1), exactly the gradient of
−mean_g J_g (groups of equal size; unequal ones are weighted by their size). Off-policy (``updates_per_batch`` > 1) the
ratio ρ = π_θ/π_old and GRPO's clip (ε 0.2) replace the paper's plain log-likelihood, which its eq. 2 samples from
π_old without correcting. With ``imitation_coef`` = ``alignment_coef`` = 0, no reference rows and ``population_std``
off it is GRPO with ``aggregation="seq-mean-token-mean"`` bit for bit (tested).

Defaults: β = 0.5, λ = 0.6 (the paper's training details), σ with 1/G (its eq. 4), the 1/|o| and 1/G means
(``seq-mean-token-mean``), no KL term (β_KL = 0: the paper's regularisation is the alignment term, not a KL).
⚠ unchecked: the equations were read from an OCR'd copy of the paper with the layout partly lost: whether μ and σ
include the reference answer (the text says Â_y is "computed in one group (o_i, y)"; eq. 4 writes 1/G — here the
reference is in the group), and whether the alignment term's sign and pairing are exactly as above; no official code
was found. Scored (offline) data and runs with ``reference_answers`` off have no reference rows: GRAO is then GRPO with
advantages scaled by (1 + λ). The reference row's completion is the data's ``reference`` (a text or a number) plus the tokenizer's EOS;
it has no sampler log-probs, so ``mismatch_correction`` must stay ``none`` with reference answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.rows import loads
from tokalign.sampling.base import Hook, set_field

REFERENCE_FIELD = "is_reference"


@dataclass
class GRAOConfig(GRPOConfig):
    imitation_coef: float = 0.5  # β of the paper: weight of the reference answer's imitation term
    alignment_coef: float = 0.6  # λ of the paper: weight of the sample-vs-reference alignment term
    reference_answers: bool = True  # online: add each prompt's reference answer to its group as the row y
    population_std: bool = True  # σ with 1/n (the paper's eq. 4); false: GRPO's unbiased std
    aggregation: str = "seq-mean-token-mean"

    def __post_init__(self):
        super().__post_init__()
        if self.imitation_coef < 0 or self.alignment_coef < 0:
            raise ValueError(f"imitation_coef and alignment_coef must be ≥ 0 (0 turns a term off), got "
                             f"{self.imitation_coef} and {self.alignment_coef}")
        if self.reference_answers and self.mismatch_correction != "none":
            raise ValueError("the reference-answer rows have no sampler log-probs: set mismatch_correction=none, or "
                             "reference_answers=false")


class ReferenceAnswers(Hook):
    """One sampling round (as the default's), then each group gets one more row: the prompt's reference answer as a
    completion (its text + EOS), scored by the run's rewards, with ``fields["is_reference"]`` 1 (0 on the samples)."""

    name = "reference_answers"

    def collect(self, ctx):
        picked = ctx.pick(ctx.step, 0)
        prompts = [ctx.rows[i] for i in picked]
        rows = ctx.sample(prompts)
        groups = [[{**r, "prompt_index": picked[g]} for r in rows if r["group_id"] == g] for g in range(len(picked))]
        refs = ctx.score([reference_row(p, g, ctx.tokenizer, group[0]) for g, (p, group) in enumerate(zip(prompts, groups))])
        for group, ref in zip(groups, refs):
            for r in group:
                set_field(r, REFERENCE_FIELD, 0.0)
            set_field(ref, REFERENCE_FIELD, 1.0)
            group.append({**ref, "prompt_index": group[0]["prompt_index"]})
        mean = sum(float(r["reward"]) for r in refs) / max(len(refs), 1)
        return groups, rows, {"grao/reference_reward_mean": mean}


def reference_row(prompt: dict, group_id: int, tokenizer, sample: dict) -> dict:
    """The rollout row of ``prompt``'s reference answer, shaped like its sampled row ``sample``."""
    text = prompt.get("reference")  # the row schema's JSON text (a plain string is taken as it is)
    if isinstance(text, str):
        try:
            text = loads(text)
        except ValueError:
            pass
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text:
        raise UserError(f"grao imitates each prompt's reference answer, but prompt {prompt.get('id')!r} has reference "
                        f"{text!r} (a text answer is needed); set --set algorithm.reference_answers=false to train "
                        "without it")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    drop = ("loss_mask", "episode", "token_rewards", "token_fields", "fields", "reward", "rewards", "verdicts")
    return {**{k: v for k, v in sample.items() if k not in drop}, "id": f"{prompt['id']}#reference", "group_id": group_id,
            "sample_idx": -1, "completion": text, "completion_ids": ids, "sampler_logps": None, "finish_reason": "stop"}


def grao_weights(rewards: torch.Tensor, group_ids: torch.Tensor, is_reference: torch.Tensor, c: GRAOConfig):
    """(per-row weights c_r [B], advantages Â [B]) of the module docstring."""
    if c.population_std and c.scale_rewards == "group":
        mean, std = ops.group_stats(rewards, group_ids)
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        n = counts[inverse].to(rewards.dtype)
        adv = (rewards - mean) / (std * torch.sqrt((n - 1).clamp(min=0) / n) + c.adv_eps)
    else:
        adv = ops.group_advantages(rewards, group_ids, c.scale_rewards, c.adv_eps)
    if not bool(is_reference.any()):
        return (adv if c.alignment_coef == 0 else (1 + c.alignment_coef) * adv), adv
    sampled = (~is_reference).to(adv.dtype)
    frac, _ = ops.group_stats(sampled, group_ids)  # G / n_g
    adv_sum_frac, _ = ops.group_stats(adv * sampled, group_ids)  # (1/n_g) Σ_i Â_i
    mean_sampled = adv_sum_frac / frac.clamp(min=1e-12)  # Ā
    explore = (1 + c.alignment_coef) * adv / frac.clamp(min=1e-12)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts[inverse].to(adv.dtype)
    imitate = n * (c.imitation_coef * adv - c.alignment_coef * mean_sampled)
    return torch.where(is_reference, imitate, explore), adv


class GRAO(GRPO):
    Config = GRAOConfig

    def __init__(self, config: GRAOConfig):
        super().__init__(config)
        if config.reference_answers:
            self.needs = dataclasses.replace(self.needs, hooks=(*self.needs.hooks, ReferenceAnswers()))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        is_ref = f[REFERENCE_FIELD] > 0.5 if REFERENCE_FIELD in f else torch.zeros_like(f["rewards"], dtype=torch.bool)
        f["advantages"], f["grao_advantages"] = grao_weights(f["rewards"], f["group_ids"], is_ref, self.config)
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        f = batch.fields
        if REFERENCE_FIELD in f and "sampler_logps" in f and "old_logps" in f:
            # no sampler drew the reference rows (their sampler_logps are padding): no mismatch there, for the metric
            ref = (f[REFERENCE_FIELD] > 0.5).unsqueeze(-1)
            f["sampler_logps"] = torch.where(ref, f["old_logps"], f["sampler_logps"])
        res = super().loss(batch, out)
        if REFERENCE_FIELD in f and len(batch):
            ref = f[REFERENCE_FIELD] > 0.5
            if bool(ref.any()):
                res.metrics["grao/reference_advantage_mean"] = float(f["grao_advantages"][ref].mean())
                res.metrics["grao/reference_logp_mean"] = float(ops.masked_mean(out.logps.detach()[ref], batch.completion_mask[ref]))
        return res

