"""Curriculum GRPO (Train Long, Think Short, arXiv:2508.08940): the budget schedule and the shaped reward by hand, the
loss and gradient by hand, γ = 1 = GRPO on R + the ``length`` reward, w = 0 = GRPO bit for bit, the step component,
config errors, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run, same_as_base
from conftest import cli, leaf, token_batch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.length_curriculum import (
    LengthCurriculum,
    LengthCurriculumConfig,
    TrainStep,
    budget_at,
)
from tokalign.protocols import PolicyOutput, Sample
from tokalign.rewards.length import Length, LengthConfig

REWARDS = [1.0, 1.0, 0.0, 1.0]
LENGTHS = [2, 5, 7, 3]
GROUPS = [0, 0, 1, 1]


def _batch(step=None, old=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (8 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS)}
    if step is not None:
        f["train_step"] = torch.full((4,), float(step))
    if old is not None:
        f["old_logps"] = old
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 4.0})


def test_budget_schedules_by_hand():
    """B_0 = 8, γ = 0.5, T = 2: steps 0-1 → 8, 2-3 → 4, 4-5 → 2, then B_min = 1.5. Linear: cuts of 8·0.5 = 4 → 8, 4, 1.5."""
    assert [budget_at(t, 8, 0.5, 2, 1.5) for t in range(8)] == [8, 8, 4, 4, 2, 2, 1.5, 1.5]
    assert [budget_at(t, 8, 0.5, 2, 1.5, "linear") for t in (0, 2, 4, 6)] == [8, 4, 1.5, 1.5]


def test_reward_loss_and_gradient_by_hand():
    """Step 2 with B_0 = 8, γ = 0.5, T = 2: B = 4. p = min(1, max(0, ℓ − 4)/4): ℓ = 2, 5, 7, 3 → 0, ¼, ¾, 0.
    w = 1: R' = 1, ¾, −¾, 1. scale none: A = R' − mean_g: group 0 (mean 7/8): ⅛, −⅛; group 1 (mean ⅛): −⅞, ⅞.
    On policy (ρ = 1), token-mean over N = 17 tokens: loss = −Σ A_i ℓ_i / N, ∂loss/∂logp_it = −A_i / N."""
    algo = LengthCurriculum(LengthCurriculumConfig(initial_budget=8, decay_factor=0.5, decay_interval=2, length_weight=1.0,
                                                   scale_rewards="none"))
    old = -torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    batch = algo.prepare(_batch(step=2, old=old))
    f = batch.fields
    torch.testing.assert_close(f["over_budget"], torch.tensor([0.0, 0.25, 0.75, 0.0]))
    torch.testing.assert_close(f["rewards"], torch.tensor([1.0, 0.75, -0.75, 1.0]))
    adv = [0.125, -0.125, -0.875, 0.875]
    torch.testing.assert_close(f["advantages"], torch.tensor(adv))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    n = sum(LENGTHS)
    expected = -sum(a * ln for a, ln in zip(adv, LENGTHS)) / n
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    grad = torch.tensor([[-a / n] * ln + [0.0] * (8 - ln) for a, ln in zip(adv, LENGTHS)])
    torch.testing.assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["curriculum/budget"] == 4.0 and out.metrics["curriculum/over_budget_fraction"] == 0.5


def test_fixed_budget_is_grpo_on_the_length_reward():
    """γ = 1: the budget stays B_0 = 4 at every step, and R' is R plus the ``length`` reward in linear mode with
    free_len = B_0, max_len = 2 B_0 and penalty w (every completion here is ≤ 2 B_0 long)."""
    algo = LengthCurriculum(LengthCurriculumConfig(initial_budget=4, decay_factor=1.0, length_weight=0.3))
    length = Length(LengthConfig(mode="linear", free_len=4, max_len=8, penalty=0.3))
    samples = [Sample(str(i), "p", "", list(range(n))) for i, n in enumerate(LENGTHS)]
    plain = torch.tensor(REWARDS) + torch.tensor([r.value for r in length(samples)])
    for step in (0, 100, 10_000):
        got = algo.prepare(_batch(step=step)).fields
        torch.testing.assert_close(got["rewards"], plain)
        ref = GRPO(GRPOConfig()).prepare(token_batch(_batch().completion_mask, {"rewards": plain, "group_ids": torch.tensor(GROUPS)}))
        torch.testing.assert_close(got["advantages"], ref.fields["advantages"])


def test_zero_weight_is_grpo_bit_for_bit():
    torch.manual_seed(0)
    values = -torch.rand(4, 8) * 3
    old = values + 0.3 * torch.randn(4, 8)
    same_as_base((LengthCurriculum(LengthCurriculumConfig(length_weight=0.0, beta=0.04)), GRPO(GRPOConfig(beta=0.04))),
                 lambda: _batch(step=3, old=old), values)


def test_train_step_component_and_needs():
    class Ctx:
        step = 7

    batch = _batch()
    TrainStep().fill(batch, Ctx())
    assert batch.fields["train_step"].tolist() == [7.0] * 4
    assert any(isinstance(c, TrainStep) for c in LengthCurriculum(LengthCurriculumConfig()).needs.components)


def test_config():
    for bad, msg in [({"schedule": "cosine"}, "schedule must be"), ({"decay_factor": 0.0}, "decay_factor must be"),
                     ({"decay_factor": 1.5}, "decay_factor must be"), ({"decay_interval": 0}, "decay_interval must be"),
                     ({"min_budget": 0.0}, "budgets must satisfy"), ({"initial_budget": 1, "min_budget": 2}, "budgets must satisfy"),
                     ({"length_weight": -1}, "length_weight must be")]:
        with pytest.raises(ValueError, match=msg):
            LengthCurriculumConfig(**bad)


@pytest.mark.slow
def test_cli_length_curriculum(tmp_path):
    out = tmp_path / "curriculum"
    cli("train", "tokalign.algorithms.length_curriculum:LengthCurriculum", "--data", "arith", "--n", "4", "--max-steps", "2",
        "--batch-size", "2", "--set", "algorithm.initial_budget=4", "--set", "algorithm.decay_interval=1",
        "--set", "algorithm.decay_factor=0.5", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert [m["curriculum/budget"] for m in metrics] == [4.0, 2.0]
