"""GRPO-λ (arXiv:2505.18086): the length reward of the groups of highest correct ratio by hand, the threshold switch,
and the limit where no group is penalised, which is GRPO bit for bit; a slow run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.grpo_lambda import (
    GRPOLambda,
    GRPOLambdaConfig,
    length_reward,
    penalised,
)
from tokalign.protocols import PolicyOutput

# three groups of three: rewards and completion lengths (the mask's row sums)
REWARDS = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
LENGTHS = [2, 4, 6, 3, 3, 5, 4, 4, 4]
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _batch(old=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in LENGTHS])
    fields = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS)}
    if old is not None:
        fields["old_logps"] = old
    return token_batch(mask, fields, {"tokens": float(mask.sum()), "seqs": float(len(REWARDS))})


def test_length_reward_by_hand():
    """ℓ = ½ − (|y| − min) / (max − min); a wrong answer keeps only min(0, ℓ).
    group 0: lengths 2, 4, 6 (span 4): ℓ = ½, 0, −½; correct, correct, wrong → ½, 0, −½.
    group 1: lengths 3, 3, 5 (span 2): ℓ = ½, ½, −½; correct, wrong, wrong → ½, min(0, ½) = 0, −½.
    group 2: lengths all 4: ℓ = 0."""
    got = length_reward(torch.tensor(LENGTHS, dtype=torch.float32), torch.tensor(REWARDS) >= 0.5, torch.tensor(GROUPS))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, -0.5, 0.5, 0.0, -0.5, 0.0, 0.0, 0.0]))


def test_top_lambda_by_hand():
    """Correct ratios 2/3, 1/3, 1. λ = ½ of Q = 3 groups: ⌈1.5⌉ = 2, the groups of ratio 1 and 2/3 (2 and 0); group 1
    keeps its 0/1 rewards. R' = R + ℓ there: group 0 (1.5, 1, −0.5), group 1 (1, 0, 0), group 2 (1, 1, 1).
    scale_rewards none: A = R' − mean_g R' — group 0 (mean 2/3): 5/6, 1/3, −7/6; group 1 (mean 1/3): 2/3, −1/3, −1/3;
    group 2: 0."""
    batch = GRPOLambda(GRPOLambdaConfig(scale_rewards="none")).prepare(_batch())
    f = batch.fields
    torch.testing.assert_close(f["rewards"], torch.tensor([1.5, 1.0, -0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(f["advantages"], torch.tensor([5 / 6, 1 / 3, -7 / 6, 2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(f["length_penalised"], torch.tensor([1.0] * 3 + [0.0] * 3 + [1.0] * 3))
    torch.testing.assert_close(f["raw_rewards"], torch.tensor(REWARDS))


def test_selection_rules():
    """top: ties go to the lower group id (ratios ½, ½, 0: λ = ⅓ picks group 0); λ = 1 picks all.
    threshold λ = 0.3: ratios 2/3, 1/3, 1 are all ≥ 0.3; group 1 then gets ½, 0, −½ (R' = 1.5, 0, −0.5)."""
    correct, gids = torch.tensor([1, 0, 1, 0, 0, 0]).bool(), torch.tensor([0, 0, 1, 1, 2, 2])
    assert penalised(correct, gids, 1 / 3).tolist() == [True, True, False, False, False, False]
    assert penalised(correct, gids, 1.0).all() and not penalised(correct, gids, 0.0).any()
    assert penalised(correct, gids, 0.5, "threshold").tolist() == [True] * 4 + [False] * 2
    batch = GRPOLambda(GRPOLambdaConfig(selection="threshold", lam=0.3)).prepare(_batch())
    torch.testing.assert_close(batch.fields["rewards"][3:6], torch.tensor([1.5, 0.0, -0.5]))


@pytest.mark.parametrize("cfg", [{"lam": 0.0}, {"selection": "threshold", "lam": 1.01}], ids=["top-0", "threshold-above-1"])
def test_no_group_penalised_is_grpo_bit_for_bit(cfg):
    torch.manual_seed(0)
    values = -torch.rand(9, 6) * 3
    old = values + 0.3 * torch.randn(9, 6)
    results = []
    for algo in (GRPOLambda(GRPOLambdaConfig(beta=0.04, **cfg)), GRPO(GRPOConfig(beta=0.04))):
        batch = algo.prepare(_batch(old))
        batch.fields["ref_logps"] = values + 0.1
        logps = leaf(values)
        out = algo.loss(batch, PolicyOutput(logps))
        out.loss.backward()
        results.append((batch.fields["rewards"], batch.fields["advantages"], out.loss.detach(), logps.grad))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    assert results[0][3].abs().sum() > 0


def test_config():
    with pytest.raises(ValueError, match="selection must be"):
        GRPOLambdaConfig(selection="bottom")
    with pytest.raises(ValueError, match="lam must be in"):
        GRPOLambdaConfig(lam=1.5)
    assert GRPOLambdaConfig(selection="threshold", lam=1.5).lam == 1.5
    with pytest.raises(ValueError, match="length_weight"):
        GRPOLambdaConfig(length_weight=-1)


@pytest.mark.slow
def test_cli_grpo_lambda(tmp_path):
    out = tmp_path / "grpo_lambda"
    cli("train", "grpo_lambda", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(0 <= m["length_penalised_fraction"] <= 1 for m in metrics)
