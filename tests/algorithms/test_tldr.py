"""TLDR (arXiv:2505.07961): per-prompt length levels and the shaped reward by hand, loss and gradient by hand, zero
weights = GRPO bit for bit, one level = the fixed-budget curriculum, the level field, config errors, and a short run
through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run, same_as_base
from conftest import cli, leaf, token_batch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.length_curriculum import (
    LengthCurriculum,
    LengthCurriculumConfig,
)
from tokalign.algorithms.tldr import TLDR, TLDRConfig
from tokalign.protocols import PolicyOutput

LENGTHS = [2, 6, 3, 6, 4, 8]
REWARDS = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
GROUPS = [0, 0, 1, 1, 2, 2]
PROMPTS = [3, 3, 4, 4, 5, 5]  # mod 3: levels short, medium, long
CFG = {"budgets": [2.0, 4.0, 8.0], "weights": [1.0, 0.5, 1.0]}


def _batch(old=None, extra=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (8 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS), "prompt_index": torch.tensor(PROMPTS)}
    if old is not None:
        f["old_logps"] = old
    f.update(extra or {})
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 6.0})


def test_levels_reward_loss_and_gradient_by_hand():
    """cycle: prompt 3 → short (B 2, w 1), 4 → medium (B 4, w ½), 5 → long (B 8, w 1).
    p = min(1, max(0, ℓ − B)/B): (2, 6) vs 2 → 0, 1; (3, 6) vs 4 → 0, ½; (4, 8) vs 8 → 0, 0.
    R' = R − w p: 1, 0 | 1, −¼ | 1, 1. scale none: A = R' − mean_g: ½, −½ | ⅝, −⅝ | 0, 0.
    On policy, token-mean over N = 29: loss = −Σ A_i ℓ_i / N, ∂loss/∂logp_it = −A_i / N."""
    algo = TLDR(TLDRConfig(scale_rewards="none", **CFG))
    old = -torch.rand(6, 8, generator=torch.Generator().manual_seed(2))
    batch = algo.prepare(_batch(old=old))
    f = batch.fields
    assert f["level"].tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(f["over_budget"], torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(f["rewards"], torch.tensor([1.0, 0.0, 1.0, -0.25, 1.0, 1.0]))
    adv = [0.5, -0.5, 0.625, -0.625, 0.0, 0.0]
    torch.testing.assert_close(f["advantages"], torch.tensor(adv))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    n = sum(LENGTHS)
    assert float(out.loss.detach()) == pytest.approx(-sum(a * ln for a, ln in zip(adv, LENGTHS)) / n, rel=1e-6)
    grad = torch.tensor([[-a / n] * ln + [0.0] * (8 - ln) for a, ln in zip(adv, LENGTHS)])
    torch.testing.assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["tldr/short_over_budget_fraction"] == 0.5 and out.metrics["tldr/long_over_budget_fraction"] == 0.0


def test_level_field_and_fixed_assignment():
    """A ``length_level`` field (1-based, 0 = not given) overrides the assignment; ``assign: long`` puts every prompt
    at the long level."""
    algo = TLDR(TLDRConfig(**CFG))
    f = algo.prepare(_batch(extra={"length_level": torch.tensor([3.0, 3.0, 0.0, 0.0, 1.0, 1.0])})).fields
    assert f["level"].tolist() == [2, 2, 1, 1, 0, 0]
    assert TLDR(TLDRConfig(assign="long", **CFG)).prepare(_batch()).fields["level"].tolist() == [2] * 6
    with pytest.raises(ValueError, match="length_level must be 1"):
        algo.prepare(_batch(extra={"length_level": torch.tensor([4.0] * 6)}))


def test_zero_weights_is_grpo_bit_for_bit():
    torch.manual_seed(0)
    values = -torch.rand(6, 8) * 3
    old = values + 0.3 * torch.randn(6, 8)
    same_as_base((TLDR(TLDRConfig(weights=[0.0, 0.0, 0.0], beta=0.04)), GRPO(GRPOConfig(beta=0.04))),
                 lambda: _batch(old=old), values)


def test_one_level_is_the_fixed_budget_curriculum():
    one = TLDR(TLDRConfig(levels=["only"], budgets=[4.0], weights=[0.7])).prepare(_batch()).fields
    fixed = LengthCurriculum(LengthCurriculumConfig(initial_budget=4, decay_factor=1.0, length_weight=0.7)).prepare(_batch()).fields
    assert torch.equal(one["rewards"], fixed["rewards"]) and torch.equal(one["advantages"], fixed["advantages"])


def test_config():
    for bad, msg in [({"levels": []}, "levels must be"), ({"levels": ["a", "a", "b"]}, "levels must be"),
                     ({"budgets": [1.0]}, "budgets and weights need"), ({"budgets": [0.0, 1.0, 2.0]}, "budgets must be > 0"),
                     ({"weights": [-1.0, 0.0, 0.0]}, "weights ≥ 0"), ({"assign": "tiny"}, "assign must be")]:
        with pytest.raises(ValueError, match=msg):
            TLDRConfig(**bad)


@pytest.mark.slow
def test_cli_tldr(tmp_path):
    out = tmp_path / "tldr"
    cli("train", "tokalign.algorithms.tldr:TLDR", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--set", "algorithm.budgets=[1,2,4]", "--out", str(out), "--quiet")
    check_run(out)
