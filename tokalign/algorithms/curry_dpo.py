"""Curry-DPO — "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences", Pattnaik,
Maheshwary, Ogueji, Yadav, Madhusudhan 2024, arXiv:2403.07230. Unchanged DPO loss over several preference pairs per
prompt, presented easy → hard: the pairs of a prompt's rated responses are ranked by their rating gap, curriculum
stage s trains on every prompt's s-th easiest pair, and the model at the end of stage s becomes the reference of
stage s + 1.

Data: a ``scored`` artifact (``tokalign rollout`` + ``tokalign score``, or any scored rows): one group per prompt,
its rows the rated responses, ``reward`` the rating. Per group (rewards r_i, rows sorted stably):

    best = argmax_i r_i (first on ties);  the others with r_j < r_best, sorted by the gap r_best − r_j, largest first
    stage s pair: (y_w, y_l) = (best, s-th of those)       a group with fewer pairs sits stage s out
    s = min(step // steps_per_stage, stages − 1)
    L = mean over this batch's pairs of ℓ(β h),  h = Δ(y_w) − Δ(y_l),  Δ(y) = Σ_t m_t (ℓ_t − ℓ^ref,s_t)    (DPO's ℓ)

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; ``rewards``, ``group_ids``, ``curry_sign`` (+1 chosen, −1 rejected,
0 unused this stage): [B]. π_ref,0 is the run's reference (``--ref-model``, else the starting model); at the first
step of each later stage the curriculum's reference component copies the policy's weights into its own frozen copy
(``refresh_reference``; off: the reference stays π_ref,0).

Defaults: β = 0.1 (DPO's); ``stages`` = 3 — the paper's four rated responses per prompt (UltraFeedback-style
ratings) give the pairs (R1,R4), (R1,R3), (R1,R2), trained in that order, each iteration from the last one's model
with it as reference; ``steps_per_stage`` 0 = ``train.max_steps`` // ``stages``. Departures: the paper runs each
iteration as a full DPO training over all prompts (epochs, its own schedule); here a stage is a number of steps of one
run, drawing groups as the scored source does (seeded, resumable), and the optimiser/LR schedule continue across
stages. Only the paper's "best vs each other" pairing, ordered by rating gap, is offered (its other orderings,
e.g. by the reference's log-prob margin, are not). ⚠ unchecked: the paper's exact tie rule for equal gaps (here: the
row order of the group).

With ``stages`` = 1 (or groups of two distinct rewards) there is one pair per group, the scored data's best vs worst
— what ``dpo`` trains on the same scored data — and the loss is DPO's bit for bit.

Resuming inside a later stage: the refreshed reference is written into each checkpoint (``curry_reference/``, a
``save_pretrained`` copy, also left in the final artifact) and read back; tested with DDP-style ``.module`` unwrapping
only — under FSDP (sharded state dicts) or LoRA (the reference is the adapter-off policy) the refresh is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokalign import ops
from tokalign.algorithms.dpo import DPO, DPOConfig, pair_loss
from tokalign.components.base import Component
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class CurryDPOConfig(DPOConfig):
    stages: int = 3  # curriculum stages: the s-th easiest pair of every prompt in stage s
    steps_per_stage: int = 0  # 0: train.max_steps // stages
    refresh_reference: bool = True  # the model at the end of a stage is the next stage's reference (the paper)

    def __post_init__(self):
        super().__post_init__()
        if self.stages < 1:
            raise ValueError(f"stages must be ≥ 1, got {self.stages} (1 = plain DPO on each group's best vs worst)")
        if self.steps_per_stage < 0:
            raise ValueError(f"steps_per_stage must be ≥ 0 (0: train.max_steps // stages), got {self.steps_per_stage}")


def stage_of(step: int, steps_per_stage: int, stages: int) -> int:
    return min(step // max(steps_per_stage, 1), stages - 1)


def curriculum_pairs(rewards: list[float]) -> list[tuple[int, int]]:
    """A group's pairs in curriculum order (easy → hard): (best, j) for every j rated below the best, largest gap
    first; indices into ``rewards``; ties keep the row order."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    lower = [j for j in range(len(rewards)) if rewards[j] < rewards[best]]
    return [(best, j) for j in sorted(lower, key=lambda j: (rewards[j], j))]


class CurriculumReference(Component):
    """The reference log-probs of the current curriculum stage (``ref_logps``) and the stage itself (``curry_stage``):
    a frozen copy of the reference that takes the policy's weights at the first step of every later stage."""

    name = "curry_reference"
    provides = ("ref_logps", "curry_stage")
    SAVED = "curry_reference"

    def __init__(self, config: CurryDPOConfig):
        self.config = config
        self.model, self.stage, self.steps = None, 0, 1

    def describe(self) -> str:
        return "reference (refreshed every curriculum stage)" if self.config.refresh_reference else "reference"

    def setup(self, ctx) -> None:
        c = self.config
        self.steps = c.steps_per_stage or max(1, int(ctx.cfg.train.max_steps) // c.stages)
        if not c.refresh_reference:
            self.model = ctx.reference_model()
            return
        saved = Path(ctx.resume_from) / self.SAVED if ctx.resume_from is not None else None
        if saved is not None and saved.exists():  # resumed inside a later stage: that stage's reference
            self.model = ctx.load_model(str(saved))
            self.stage = int((saved / "stage.txt").read_text())
        else:  # our own copy: it will be overwritten, so not the run's shared reference
            self.model = ctx.load_model(ctx.cfg.ref_model or ctx.cfg.model)

    def models(self) -> list:
        return [self.model]

    def fill(self, batch, ctx) -> dict:
        stage = stage_of(ctx.step, self.steps, self.config.stages)
        if self.config.refresh_reference and stage > self.stage:
            policy = getattr(ctx.policy, "module", ctx.policy)  # DDP wraps it
            with torch.no_grad():
                self.model.load_state_dict(policy.state_dict())
        self.stage = stage
        batch.fields["ref_logps"] = ctx.frozen_logps(self.model, batch)
        batch.fields["curry_stage"] = torch.full_like(batch.fields["group_ids"], stage, dtype=torch.float32)
        return {"curry/stage": float(stage)}

    def save(self, directory) -> None:
        if self.config.refresh_reference and self.stage > 0:
            out = Path(directory) / self.SAVED
            self.model.save_pretrained(out)
            (out / "stage.txt").write_text(str(self.stage))


class CurryDPO(DPO):
    Config = CurryDPOConfig

    def __init__(self, config: CurryDPOConfig):
        self.config = config
        self.needs = Needs(data=("scored",), components=(CurriculumReference(config),))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        stage = int(f["curry_stage"][0]) if "curry_stage" in f else 0
        gids, rewards = f["group_ids"].tolist(), f["rewards"].tolist()
        members: dict[int, list[int]] = {}
        for i, g in enumerate(gids):
            members.setdefault(g, []).append(i)
        sign = torch.zeros(len(gids))
        for rows in members.values():
            pairs = curriculum_pairs([rewards[i] for i in rows])
            if stage < len(pairs):
                w, l = pairs[stage]
                sign[rows[w]], sign[rows[l]] = 1.0, -1.0
        f["curry_sign"] = sign.to(f["group_ids"].device)
        batch.totals["curry_pairs"] = float((sign > 0).sum())
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c = self.config
        reduce = ops.masked_mean if c.loss_type == "ipo" else ops.masked_sum
        ratio = reduce(out.logps - batch.fields["ref_logps"], batch.completion_mask, -1)  # [B] Δ(y)
        sign, gid = batch.fields["curry_sign"], batch.fields["group_ids"]
        win, lose = sign > 0, sign < 0
        r_w = ratio[win][torch.argsort(gid[win], stable=True)]
        r_l = ratio[lose][torch.argsort(gid[lose], stable=True)]
        total = batch.totals.get("curry_pairs", float(r_w.numel()))
        if r_w.numel() == 0 or total == 0:  # no pair in this micro-batch at this stage
            return LossOutput(out.logps.sum() * 0.0, {"curry/pairs": 0.0})
        losses = pair_loss(r_w - r_l, c)
        metrics = {
            "rewards/accuracy": float((r_w > r_l).float().mean()),
            "rewards/margin": float(c.beta * (r_w - r_l).detach().mean()),
            "curry/pairs": float(r_w.numel()),
        }
        return LossOutput(losses.sum() / total, metrics)
