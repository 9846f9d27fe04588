"""P3O (arXiv:2310.00212): separate and joint clipping of sequence ratios by hand (loss and gradient), on-policy the
pairwise gradient ½Δ(∇log π(y_1) − ∇log π(y_2)) = RLOO's with G = 2, invariance to a shift of both rewards, groups
other than pairs refused, micro-batches add up, the config's checks; a slow run through the real CLI."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import random_groups, train_changes_weights
from conftest import leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.p3o import P3O, P3OConfig
from tokalign.algorithms.rloo import RLOO, RLOOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput

MASK = [[1, 1], [1, 0], [1, 1], [1, 1]]
DIFF = [[0.1, 0.2], [-0.05, 0.0], [-0.3, -0.2], [0.05, 0.05]]  # ℓ − ℓ_old on each token (row 1's second is padding)


def _batch(algo, rewards):
    old = -torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    b = algo.prepare(token_batch(MASK, {"rewards": torch.tensor(rewards), "group_ids": torch.tensor([0, 0, 1, 1]), "old_logps": old},
                                 {"tokens": 7.0, "seqs": 4.0}))
    return b, leaf(old + torch.tensor(DIFF))


def test_separate_clip_by_hand():
    """Pairs (rows 0, 1) with R = (1, 0): Δ = (1, −1); (rows 2, 3) with R = (0, 2): Δ = (−2, 2).
    log s = (0.3, −0.05, −0.5, 0.1).  ε = 0.2:
    row 0: s = e^0.3 = 1.35 > 1.2, Δ > 0 → L = −1.2 (clipped, no gradient);  row 1: s = e^−0.05 in range → L = s, ∂ = s;
    row 2: s = e^−0.5 = 0.61 < 0.8, Δ < 0 → L = 2·0.8 (clipped);  row 3: s = e^0.1 in range → L = −2s, ∂ = −2s per token.
    loss = Σ L / 4; gradients ∂/4."""
    algo = P3O(P3OConfig())
    b, lp = _batch(algo, [1.0, 0.0, 0.0, 2.0])
    assert b.fields["advantages"].tolist() == [1.0, -1.0, -2.0, 2.0]
    s1, s3 = math.exp(-0.05), math.exp(0.1)
    out = algo.loss(b, PolicyOutput(lp))
    assert out.loss.item() == pytest.approx((-1.2 + s1 + 1.6 - 2 * s3) / 4, rel=1e-6)
    out.loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, 0.0], [s1 / 4, 0.0], [0.0, 0.0], [-2 * s3 / 4] * 2]), rtol=1e-6, atol=1e-8)
    assert out.metrics["clip_fraction"] == pytest.approx(0.5)


def test_joint_clip_by_hand():
    """clip="joint", ε = 1 (clip to [0, 2]): r_i = s_i / s_j, L_i = ½(−Δ_i r_i) while 0 ≤ r_i ≤ 2.
    log r = (0.35, −0.35, −0.6, 0.6), all in range.  ∂L_i/∂ℓ_{i,t} = −½Δ_i r_i and ∂L_i/∂ℓ_{j,t} = +½Δ_i r_i, so row i's
    token gradient is (−½Δ_i r_i + ½Δ_j r_j)/4."""
    algo = P3O(P3OConfig(clip="joint", epsilon_low=1.0, epsilon_high=1.0))
    b, lp = _batch(algo, [1.0, 0.0, 0.0, 2.0])
    d, r = [1.0, -1.0, -2.0, 2.0], [math.exp(x) for x in (0.35, -0.35, -0.6, 0.6)]
    out = algo.loss(b, PolicyOutput(lp))
    assert out.loss.item() == pytest.approx(sum(-0.5 * di * ri for di, ri in zip(d, r)) / 4, rel=1e-6)
    out.loss.backward()
    partner = [1, 0, 3, 2]
    g = [(-0.5 * d[i] * r[i] + 0.5 * d[partner[i]] * r[partner[i]]) / 4 for i in range(4)]
    assert_close(lp.grad, torch.tensor([[g[0]] * 2, [g[1], 0.0], [g[2]] * 2, [g[3]] * 2]), rtol=1e-6, atol=1e-8)
    # ε = 0.2: every pair ratio leaves [0.8, 1.2] on the side the advantage pushes: all clipped, no gradient
    algo = P3O(P3OConfig(clip="joint"))
    b, lp = _batch(algo, [1.0, 0.0, 0.0, 2.0])
    out = algo.loss(b, PolicyOutput(lp))
    assert out.loss.item() == pytest.approx(0.5 * (-1.2 + 0.8 + 1.6 - 2.4) / 4, rel=1e-6)
    out.loss.backward()
    assert float(lp.grad.abs().max()) == 0.0


def _pairs(seed):
    return random_groups(seed, [3, 5, 2, 4, 1, 3], [0, 0, 1, 1, 2, 2], [1.0, 0.0, 0.0, 1.0, 0.25, 0.75])


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_on_policy_is_the_pairwise_gradient_and_rloo(clip):
    """ρ = 1: ∇loss = −(1/B) Σ_i Δ_i ∇Σ_t ℓ_{i,t} = the mean over pairs of −½Δ(∇log π(y_1) − ∇log π(y_2)), which is RLOO's
    gradient (A_i = R_i − R_j for G = 2) with the seq-mean-token-sum aggregation."""
    grads = []
    for algo in (P3O(P3OConfig(clip=clip)), RLOO(RLOOConfig(aggregation="seq-mean-token-sum"))):
        b = _pairs(2)
        b.fields["old_logps"] = b.fields["pol"].clone()
        b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 6.0}
        b = algo.prepare(b)
        lp = leaf(b.fields["pol"])
        algo.loss(b, PolicyOutput(lp)).loss.backward()
        grads.append(lp.grad)
    assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)
    b = _pairs(2)
    d = b.fields["rewards"] - b.fields["rewards"].view(3, 2).flip(-1).reshape(-1)
    assert_close(grads[0], (-d / 6).unsqueeze(-1) * b.completion_mask)


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_invariant_to_shifting_both_rewards(clip):
    def run(shift):
        algo = P3O(P3OConfig(clip=clip))
        b = _pairs(3)
        b.fields["rewards"] = b.fields["rewards"] + shift
        b = algo.prepare(b)
        lp = leaf(b.fields["pol"])
        loss = algo.loss(b, PolicyOutput(lp)).loss
        loss.backward()
        return loss.detach(), lp.grad

    (l0, g0), (l1, g1) = run(0.0), run(torch.tensor([3.0, 3.0, -1.0, -1.0, 0.5, 0.5]))
    assert_close(l0, l1)
    assert_close(g0, g1)
    assert g0.abs().sum() > 0


def test_groups_must_be_pairs():
    b = random_groups(1, [2, 2, 2], [0, 0, 0], [1.0, 0.0, 0.0])
    with pytest.raises(UserError, match="--n 2"):
        P3O(P3OConfig()).prepare(b)


@pytest.mark.parametrize("clip,size", [("separate", 1), ("joint", 2)])
def test_micro_batches_add_up(clip, size):
    algo = P3O(P3OConfig(clip=clip, beta=0.04))
    b = _pairs(4)
    b.fields["ref_logps"] = b.fields["pol"] - 0.1
    b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 6.0}
    assert algo.needs.split_groups == (clip == "separate")
    full, summed, g_full, g_parts, n = micro_batch_check(algo, algo.prepare(b), size=size)
    assert n > 1
    assert_close(summed, full)
    assert_close(g_parts, g_full)


def test_config():
    with pytest.raises(ValueError, match="clip must be one of separate, joint"):
        P3OConfig(clip="both")
    with pytest.raises(ValueError, match="mismatch_correction=sequence"):
        P3OConfig(mismatch_correction="token")
    with pytest.raises(ValueError, match="scale_rewards must be none"):
        P3OConfig(scale_rewards="group")
    assert P3OConfig(mismatch_correction="sequence").clip == "separate"


@pytest.mark.slow
def test_cli_two_steps_train_changes_weights(tmp_path):
    """`tokalign train tokalign.algorithms.p3o:P3O` for 2 steps on the bundled model (online arith, 2 prompts × 2)."""
    train_changes_weights(tmp_path, "tokalign.algorithms.p3o:P3O", "--data", "arith", "--n", "2", grad_norm=False)
