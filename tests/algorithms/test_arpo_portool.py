"""ARPO and PORTool (tokalign/algorithms/arpo.py, portool.py): the step-level advantages of tool-call rollout trees, by
hand on a small tree, and their limiting cases — ARPO's soft attribution is GRPO bit for bit, its hard attribution is
SALT's node rule; PORTool with λ = 0 is GRPO, and on independent episodes its first steps' fork advantages are GRPO's.
Their rollouts (tokalign/rollout/branching.py) are tested in tests/rollout/test_branching.py; the run through the CLI
here."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import batch_of, completion, episode, micro_batches_add_up, off_policy_loss_and_grad
from conftest import cli

from tokalign.algorithms.arpo import ARPO, ARPOConfig
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.portool import PORTool, PORToolConfig, fork_advantages
from tokalign.algorithms.salt import SALT, SALTConfig
from tokalign.protocols import PolicyOutput

EPS = 1e-6
A1, A2 = (2 / 3) / (math.sqrt(1 / 3) + EPS), -(1 / 3) / (math.sqrt(1 / 3) + EPS)  # GRPO on R = (1, 0, 0)


def tree_group():
    """A forked group: τ1 (5, 6 | 90, 91 | 7) R = 1 and τ2 (5, 6 | 90, 91 | 8) R = 0 share their first step, which made
    one tool call that worked; τ3 (5, 9 | 90, 91 | 7) R = 0, whose call failed. Group 1: τ4 alone."""
    return [episode([5, 6], [90, 91], [7], 1.0, 0, calls=1), episode([5, 6], [90, 91], [8], 0.0, 0, calls=1),
            episode([5, 9], [90, 91], [7], 0.0, 0, calls=1, errors=1), episode([5, 6], [90, 91], [7], 1.0, 1, calls=1)]


def test_arpo_soft_is_grpo_bit_for_bit():
    arpo_b, grpo_b = batch_of(tree_group()), batch_of(tree_group())
    ARPO(ARPOConfig()).prepare(arpo_b)
    GRPO(GRPOConfig()).prepare(grpo_b)
    assert torch.equal(arpo_b.fields["advantages"], grpo_b.fields["advantages"])
    g = [off_policy_loss_and_grad(a, b, seed=3) for a, b in ((ARPO(ARPOConfig()), arpo_b), (GRPO(GRPOConfig()), grpo_b))]
    assert torch.equal(g[0][0], g[1][0]) and torch.equal(g[0][1], g[1][1])
    # the metric: the shared first step of τ1 and τ2 (4 of the 12 model tokens)
    res = ARPO(ARPOConfig()).loss(arpo_b, PolicyOutput(arpo_b.fields["old_logps"]))
    assert res.metrics["arpo/shared_token_fraction"] == pytest.approx(4 / 12)


def test_arpo_hard_is_salts_node_rule():
    arpo_b, salt_b = batch_of(tree_group()), batch_of(tree_group())
    ARPO(ARPOConfig(attribution="hard")).prepare(arpo_b)
    SALT(SALTConfig()).prepare(salt_b)
    assert torch.equal(arpo_b.fields["advantages"], salt_b.fields["advantages"])
    shared = (A1 + A2) / 2  # the shared first step: the mean of τ1's and τ2's advantages
    assert completion(arpo_b, 0) == pytest.approx([shared, shared, 0, 0, A1], abs=1e-6)


def test_arpo_samples_with_entropy_branching():
    assert ARPO(ARPOConfig()).needs.branching == "entropy" and PORTool(PORToolConfig()).needs.branching == "tree"
    with pytest.raises(ValueError, match="attribution"):
        ARPOConfig(attribution="mixed")


def test_portool_hand():
    """α = 0.1, λ = 0.5. Nodes: v0 = τ1/τ2's first step, v3 = τ3's; under v0: v1 (… 7) and v2 (… 8); under v3: v4.
    Step rewards: R(v0) = max(1, 0) + α·1 = 1.1 (its call worked), R(v3) = 0 + α·0 = 0 (it failed), R(v1) = 1,
    R(v2) = R(v4) = 0 (answers make no call: ok = 0).
    Fork {v0, v3}: mean 0.55, unbiased std 0.55·√2 ⇒ A_fork = ±0.55/(0.55·√2 + eps) = ±0.7071058.
    Fork {v1, v2}: mean 0.5, std √0.5 ⇒ ±0.5/(√0.5 + eps) = ±0.7071058; v4 has no sibling: 0.
    A_{i,t} = 0.5·A_traj(i) + 0.5·A_fork(v); environment tokens 0; group 1 (one trajectory, one step each): 0."""
    batch = batch_of(tree_group())
    PORTool(PORToolConfig()).prepare(batch)
    f0 = 0.55 / (0.55 * math.sqrt(2) + EPS)
    f1 = 0.5 / (math.sqrt(0.5) + EPS)
    want = [[0.5 * A1 + 0.5 * f0] * 2 + [0, 0, 0.5 * A1 + 0.5 * f1],
            [0.5 * A2 + 0.5 * f0] * 2 + [0, 0, 0.5 * A2 - 0.5 * f1],
            [0.5 * A2 - 0.5 * f0] * 2 + [0, 0, 0.5 * A2],
            [0.0] * 5]
    for i, w in enumerate(want):
        assert completion(batch, i) == pytest.approx(w, abs=1e-5)
    assert completion(batch, 2, "portool_fork_advantage") == pytest.approx([-f0, -f0, 0, 0, 0], abs=1e-5)


def test_fork_advantages_unscaled_and_alone():
    assert fork_advantages([1.0, 0.0, 2.0], [-1, -1, 0], scale=False, eps=EPS) == [0.5, -0.5, 0.0]


def test_portool_without_fork_weight_is_grpo():
    p_b, g_b = batch_of(tree_group()), batch_of(tree_group())
    PORTool(PORToolConfig(fork_weight=0.0)).prepare(p_b)
    GRPO(GRPOConfig()).prepare(g_b)
    m = p_b.completion_mask.bool()
    assert torch.equal(p_b.fields["advantages"][m], g_b.fields["advantages"][:, None].expand_as(m)[m])
    g = [off_policy_loss_and_grad(a, b, seed=4) for a, b in ((PORTool(PORToolConfig(fork_weight=0.0)), p_b), (GRPO(GRPOConfig()), g_b))]
    assert torch.allclose(g[0][0], g[1][0], atol=1e-7) and torch.allclose(g[0][1], g[1][1], atol=1e-7)


def test_portool_independent_episodes_first_steps_are_grpo():
    """No shared step and α = 0: the root fork's children are the trajectories' first steps, whose step rewards are the
    outcomes, so their fork advantages are GRPO's; second steps have no sibling (A_fork = 0)."""
    rows = [episode([5, k], [90], [7], r, 0) for k, r in ((6, 1.0), (8, 0.0), (9, 0.5))]
    p_b, g_b = batch_of(rows), batch_of(rows)
    PORTool(PORToolConfig(tool_bonus=0.0)).prepare(p_b)
    GRPO(GRPOConfig()).prepare(g_b)
    grpo = g_b.fields["advantages"].tolist()
    for i in range(3):
        fork = completion(p_b, i, "portool_fork_advantage")
        assert fork == pytest.approx([grpo[i], grpo[i], 0, 0], abs=1e-6)


def test_micro_batches_sum_to_full_batch():
    micro_batches_add_up(PORTool(PORToolConfig(aggregation="seq-mean-token-mean")))
    micro_batches_add_up(ARPO(ARPOConfig(attribution="hard")))


def test_arpo_needs_an_environment_online(tmp_path):
    res = cli("train", "arpo", "--data", "tool_arith", "--out", str(tmp_path / "o"), "--dry-run", check=False)
    assert res.returncode == 2 and "pass --env NAME" in res.stderr and "Traceback" not in res.stderr
    res = cli("train", "arpo", "--data", "tool_arith", "--env", "calculator", "--out", str(tmp_path / "o"), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "branching: entropy" in res.stdout or "branching" in res.stdout
