"""SALT (arXiv:2510.20022) on hand-made two-turn episodes (expected numbers worked out in each docstring): the trajectory
graph (identical turn tokens after an identical history are one node), each step's advantage the mean GRPO advantage of
the trajectories through its node, its limits (all trajectories distinct ⇒ GRPO's advantages exactly; all identical ⇒
0), environment tokens getting advantage and gradient 0, micro-batches adding up. CPU only.

Notation: ℓ = policy log-prob, ρ = exp(ℓ − ℓ_old), A_i = GRPO advantage, m = mask."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import (
    batch_of,
    completion,
    episode,
    groups_batch,
    micro_batches_add_up,
    off_policy_loss_and_grad,
)
from conftest import leaf as _leaf
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.salt import (
    SALT,
    SALTConfig,
    episode_turns,
    graph_step_advantages,
)
from tokalign.protocols import PolicyOutput

EPS = 1e-6


def hand_group():
    """Group 0: τ1 (5, 6 | 90, 91 | 7) R = 1, τ2 (5, 6 | 90, 91 | 8) R = 0, τ3 (5, 9 | 90, 91 | 7) R = 0.
    Group 1: τ4 (5, 6 | 90, 91 | 7) R = 1 alone — the same tokens as τ1, but another group: another graph."""
    return [episode([5, 6], [90, 91], [7], 1.0, 0), episode([5, 6], [90, 91], [8], 0.0, 0),
            episode([5, 9], [90, 91], [7], 0.0, 0), episode([5, 6], [90, 91], [7], 1.0, 1)]


def test_episode_turns_segments():
    """τ1's steps: turn 0 at columns 1, 2 with segment (5, 6); turn 1 at column 5 with segment (90, 91, 7) — the
    environment's reply before it, then the turn."""
    turns = episode_turns(batch_of(hand_group()))
    assert [(cols.tolist(), seg) for cols, seg in turns[0]] == [([1, 2], (5, 6)), ([5], (90, 91, 7))]
    assert [seg for _, seg in turns[2]] == [(5, 9), (90, 91, 7)]


def test_salt_graph_advantages_hand():
    """GRPO (group 0): R = (1, 0, 0), mean 1/3, unbiased std √(1/3) ⇒ A = (2/3)/(√(1/3)+eps) = 1.1546986,
    −(1/3)/(√(1/3)+eps) = −0.5773493 (×2). Group 1 is one trajectory: A = 0.
    Step 0: τ1 and τ2 share (5, 6) ⇒ one node, mean (A1 + A2)/2 = 0.2886747; τ3's (5, 9) is its own: −0.5773493.
    Step 1: τ1 (… 7) and τ2 (… 8) differ ⇒ their own A; τ3 answers 7 like τ1 but after another history ⇒ not merged: A3.
    Environment tokens: 0. τ4's graph is group 1's: A = 0 everywhere."""
    batch = batch_of(hand_group())
    SALT(SALTConfig()).prepare(batch)
    a1, a2 = (2 / 3) / (math.sqrt(1 / 3) + EPS), -(1 / 3) / (math.sqrt(1 / 3) + EPS)
    shared = (a1 + a2) / 2
    want = [[shared, shared, 0, 0, a1], [shared, shared, 0, 0, a2], [a2, a2, 0, 0, a2], [0] * 5]
    for i, w in enumerate(want):
        assert completion(batch, i) == pytest.approx(w, abs=1e-6)
    assert [completion(batch, i, "salt_shared") for i in range(4)] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert float(batch.fields["advantages"][batch.completion_mask == 0].abs().max()) == 0.0


def test_graph_step_advantages_tree():
    """Three trajectories of three steps: a, b, c share step 0 (mean of all three = 0 for A = (1, −0.5, −0.5)); a and b
    share step 1 (mean 0.25); step 2 is each one's own. c leaves at step 1 (its own node: −0.5)."""
    vals, sizes = graph_step_advantages([[(1,), (2,), (3,)], [(1,), (2,), (4,)], [(1,), (5,), (3,)]], [1.0, -0.5, -0.5])
    assert vals == [[0.0, 0.25, 1.0], [0.0, 0.25, -0.5], [0.0, -0.5, -0.5]]
    assert sizes == [[3, 2, 1], [3, 2, 1], [3, 1, 1]]


def test_salt_distinct_trajectories_are_grpo_exactly():
    """Every trajectory's first turn differs ⇒ every node holds one trajectory ⇒ A_{i,t} = A_i on every model token,
    exactly (bit for bit) GRPO's advantages, and GRPO's loss and gradient; environment tokens 0. Single-turn rows (no
    turn_index) that all differ: the same."""
    rows = [episode([5, k], [90], [7], r, 0) for k, r in ((6, 1.0), (8, 0.0), (9, 0.5))] + [episode([4], [90], [3], 0.0, 1)]
    pairs = [(batch_of(rows), batch_of(rows)),
             tuple(groups_batch([[3, 4], [5], [6, 7, 8], [2]], [1.0, 0.0, 0.5, 1.0], [0, 0, 0, 1]) for _ in range(2))]
    for salt_b, grpo_b in pairs:
        SALT(SALTConfig()).prepare(salt_b)
        GRPO(GRPOConfig()).prepare(grpo_b)
        m = salt_b.completion_mask.bool()
        assert torch.equal(salt_b.fields["advantages"][m], grpo_b.fields["advantages"][:, None].expand_as(m)[m])
        assert float(salt_b.fields["advantages"][~m].abs().max()) == 0.0
        grads = [off_policy_loss_and_grad(algo, b, seed=5)
                 for algo, b in ((SALT(SALTConfig()), salt_b), (GRPO(GRPOConfig()), grpo_b))]
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_salt_identical_trajectories_are_neutral():
    """Two identical episodes with rewards 1 and 0 (a stochastic verifier): every step is one node of both, mean
    advantage 0 ⇒ no gradient at all from the surrogate."""
    batch = batch_of([episode([5, 6], [90], [7], 1.0, 0), episode([5, 6], [90], [7], 0.0, 0)])
    SALT(SALTConfig()).prepare(batch)
    assert float(batch.fields["advantages"].abs().max()) == pytest.approx(0.0, abs=1e-7)


def test_salt_loss_and_gradient_hand():
    """On-policy (ρ = 1), token-mean over the 12 model tokens of the hand batch: ∂L/∂ℓ_t = −A_{i,t}/12 on model tokens,
    exactly 0 on environment tokens."""
    batch = batch_of(hand_group())
    algo = SALT(SALTConfig())
    algo.prepare(batch)
    batch.fields["old_logps"] = torch.full_like(batch.completion_mask, -1.0)
    lp = _leaf(batch.fields["old_logps"])
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    m = batch.completion_mask
    assert_close(lp.grad, -batch.fields["advantages"] * m / 12)
    assert float(lp.grad[m == 0].abs().max()) == 0.0
    assert res.metrics["salt/shared_token_fraction"] == pytest.approx(4 / 12)


def test_salt_micro_batches_sum_to_full_batch():
    """Micro-batches of 2 rows add up to the full batch (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(SALT(SALTConfig(aggregation="seq-mean-token-mean")))
