"""Curry-DPO (arXiv:2403.07230): the curriculum's pairs by hand (loss and gradient of a later stage), one stage ⇒ DPO
bit for bit, the reference refreshed at stage boundaries, the config checks, and a short run through the real CLI on
scored rollouts."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.curry_dpo import (
    CurriculumReference,
    CurryDPO,
    CurryDPOConfig,
    curriculum_pairs,
    stage_of,
)
from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.protocols import PolicyOutput


def _group_batch(rewards, gids, stage=None, t=1):
    fields = {"rewards": torch.tensor(rewards), "group_ids": torch.tensor(gids), "ref_logps": torch.zeros(len(gids), t)}
    if stage is not None:
        fields["curry_stage"] = torch.full((len(gids),), float(stage))
    return token_batch(torch.ones(len(gids), t), fields)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_pairs_are_ordered_by_rating_gap():
    """Ratings [3, 5, 2, 4]: best = row 1; gaps 5−2 = 3 (row 2), 5−3 = 2 (row 0), 5−4 = 1 (row 3)."""
    assert curriculum_pairs([3.0, 5.0, 2.0, 4.0]) == [(1, 2), (1, 0), (1, 3)]
    assert curriculum_pairs([1.0, 1.0, 0.0]) == [(0, 2)]  # first best on ties; equal ratings give no pair
    assert curriculum_pairs([2.0, 2.0]) == []
    assert [stage_of(s, 2, 3) for s in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]


def test_stage_one_hand_loss_and_gradient():
    """Two groups: ratings [3, 5, 2, 4] (rows 0-3) and [1, 0] (rows 4-5), stage 1, β = 0.1, ref = 0.
    Group 0's stage-1 pair is (row 1, row 0): h = ℓ_1 − ℓ_0 = 0.5 − (−1) = 1.5; group 1 has one pair only and sits
    stage 1 out. L = −log σ(0.15) / 1; dL/dℓ_1 = −0.1 σ(−0.15) = −dL/dℓ_0, other rows 0."""
    batch = _group_batch([3.0, 5.0, 2.0, 4.0, 1.0, 0.0], [0, 0, 0, 0, 1, 1], stage=1)
    algo = CurryDPO(CurryDPOConfig())
    algo.prepare(batch)
    assert batch.fields["curry_sign"].tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert batch.totals["curry_pairs"] == 1.0
    pol = leaf([[-1.0], [0.5], [2.0], [0.0], [1.0], [0.0]])
    out = algo.loss(batch, PolicyOutput(pol))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-math.log(_sig(0.15)), rel=1e-6)
    g = -0.1 * _sig(-0.15)
    assert_close(pol.grad, torch.tensor([[-g], [g], [0.0], [0.0], [0.0], [0.0]]), rtol=1e-6, atol=1e-9)
    # stage 0: both groups' easiest pair — group 0 (row 1, row 2), group 1 (row 4, row 5)
    batch0 = algo.prepare(_group_batch([3.0, 5.0, 2.0, 4.0, 1.0, 0.0], [0, 0, 0, 0, 1, 1], stage=0))
    assert batch0.fields["curry_sign"].tolist() == [0.0, 1.0, -1.0, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_one_stage_is_dpo_bit_for_bit(loss_type):
    """Groups of two (one pair each) and one stage: Curry-DPO's loss and gradients are DPO's on the same pairs."""
    torch.manual_seed(0)
    rewards = [1.0, 0.0, 0.5, 0.2, 2.0, -1.0]
    batch = _group_batch(rewards, [0, 0, 1, 1, 2, 2], t=3)
    batch.fields["ref_logps"] = torch.randn(6, 3)
    batch.fields["is_chosen"] = torch.tensor([1.0, 0.0] * 3)
    batch.totals["groups"] = 3.0
    pol = torch.randn(6, 3)
    algo = CurryDPO(CurryDPOConfig(stages=1, loss_type=loss_type))
    a, b = leaf(pol), leaf(pol)
    la = algo.loss(algo.prepare(batch), PolicyOutput(a)).loss
    lb = DPO(DPOConfig(loss_type=loss_type)).loss(batch, PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert torch.equal(a.grad, b.grad)


class _Model(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w]))

    def save_pretrained(self, out):
        Path(out).mkdir(parents=True)
        torch.save(self, Path(out) / "m.pt")


def test_reference_is_refreshed_at_each_stage(tmp_path):
    """stages 3, 2 steps each: the reference is the starting model for steps 0-1, the policy as it was at step 2 for
    steps 2-3, as it was at step 4 afterwards; a checkpoint in stage 2 resumes with stage 2's reference."""
    start = _Model(0.0)
    policy = _Model(0.0)
    ctx = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(max_steps=6), ref_model=None, model="M"),
                          resume_from=None, policy=policy, step=0,
                          load_model=lambda src, trainable=False: copy.deepcopy(start) if src == "M" else torch.load(Path(src) / "m.pt", weights_only=False),
                          frozen_logps=lambda model, batch: model.w.detach().expand(len(batch), 1).clone())
    comp = CurriculumReference(CurryDPOConfig())
    comp.setup(ctx)
    seen = []
    for step in range(6):
        ctx.step = step
        with torch.no_grad():
            policy.w.fill_(float(step + 1))  # the policy moves every step
        batch = _group_batch([1.0, 0.0], [0, 0])
        comp.fill(batch, ctx)
        seen.append((float(batch.fields["ref_logps"][0, 0]), int(batch.fields["curry_stage"][0])))
    assert seen == [(0.0, 0), (0.0, 0), (3.0, 1), (3.0, 1), (5.0, 2), (5.0, 2)]
    comp.save(tmp_path)  # a checkpoint in stage 2: its reference is written; a resumed run reads it back
    resumed = CurriculumReference(CurryDPOConfig())
    ctx.resume_from, ctx.step = tmp_path, 5
    resumed.setup(ctx)
    batch = _group_batch([1.0, 0.0], [0, 0])
    resumed.fill(batch, ctx)
    assert resumed.stage == 2 and float(batch.fields["ref_logps"][0, 0]) == 5.0
    ctx.resume_from = None
    off = CurriculumReference(CurryDPOConfig(refresh_reference=False))
    ctx.reference_model = lambda: start
    off.setup(ctx)
    ctx.step = 4
    b = _group_batch([1.0, 0.0], [0, 0])
    off.fill(b, ctx)
    assert float(b.fields["ref_logps"][0, 0]) == 0.0 and int(b.fields["curry_stage"][0]) == 2


def test_config_checks():
    with pytest.raises(ValueError, match="stages"):
        CurryDPOConfig(stages=0)
    with pytest.raises(ValueError, match="steps_per_stage"):
        CurryDPOConfig(steps_per_stage=-1)
    with pytest.raises(ValueError, match="beta"):
        CurryDPOConfig(beta=-1.0)
    algo = CurryDPO(CurryDPOConfig())
    assert algo.needs.data == ("scored",) and not algo.needs.reference
    assert [c.name for c in algo.needs.components] == ["curry_reference"]


@pytest.mark.slow
def test_cli_curry_dpo_two_stages(tmp_path):
    """Scored rollouts (4 per prompt), then 2 steps of `tokalign train tokalign.algorithms.curry_dpo:CurryDPO` with
    one step per stage (the reference refreshed before step 2)."""
    cli("prepare", "arith", "--limit", "16", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "4", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=tmp_path)
    out = tmp_path / "C"
    cli("train", "tokalign.algorithms.curry_dpo:CurryDPO", "--data", "S", "--set", "algorithm.stages=2", "--set",
        "algorithm.steps_per_stage=1", "--max-steps", "2", "--batch-size", "4", "--out", str(out), "--quiet", cwd=tmp_path)
    metrics = check_run(out)
    assert [m["curry/stage"] for m in metrics] == [0.0, 1.0]
