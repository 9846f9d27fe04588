"""Constrained RLHF (arXiv:2310.04373): Lagrange multipliers on reward components, updated each step, resumed."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import run_metrics
from conftest import cli, run_and_kill, token_batch
from torch.testing import assert_close

from tokalign.algorithms.constrained import Constrained, ConstrainedConfig
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import PolicyOutput

EM = [1.0, 0.0, 1.0, 1.0]
LEN = [0.8, 0.2, 0.6, 0.6]


def _batch(em=EM, length=LEN):
    return token_batch(torch.ones(4, 3), {"rewards.exact_match": torch.tensor(em), "rewards.length": torch.tensor(length),
                                          "group_ids": torch.tensor([0, 0, 1, 1]), "old_logps": torch.full((4, 3), -1.0)})


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_two_multiplier_steps_by_hand():
    """Sigmoid form, one constraint (length ≤ θ = 0.3), lr 0.1, momentum 0.9, the same batch twice.

    c̄ = (0.8 + 0.2 + 0.6 + 0.6)/4 = 0.55, gap c̄ − θ = 0.25.
    Step 1: λ = 0, σ = ½: w_len = ½, w_em = ½ → r = [0.9, 0.1, 0.8, 0.8]; group 0: mean 0.5, std √(0.4² + 0.4²) = 0.5657,
            A = ±0.4/(0.5657 + 1e-6) = ±0.70711; group 1 all equal: A = 0.
            g = σ(1 − σ)·gap = 0.25 · 0.25 = 0.0625 (< 0.5, not clipped); b = 0.0625; λ = 0 − 0.1 · 0.0625 = −0.00625.
    Step 2: σ(−0.00625) = 0.4984375; g = 0.4984375 · 0.5015625 · 0.25 = 0.062499; b = 0.9 · 0.0625 + 0.062499 = 0.118749;
            λ = −0.00625 − 0.1 · 0.118749 = −0.0181249. Length is above its threshold, so its weight falls."""
    algo = Constrained(ConstrainedConfig(thresholds=[0.3], multiplier_lr=0.1))
    b = algo.prepare(_batch())
    a = 0.4 / (math.sqrt(0.32) + 1e-6)
    assert_close(b.fields["advantages"], torch.tensor([a, -a, 0.0, 0.0]))
    assert algo.used == {"multiplier/length": 0.5, "lagrange/length": 0.0, "constraint/length_gap": pytest.approx(0.25)}
    assert algo.multipliers == [pytest.approx(-0.00625)] and algo.momentum == [pytest.approx(0.0625)]
    algo.prepare(_batch())
    s = _sig(-0.00625)
    assert s == pytest.approx(0.4984375, abs=1e-7)
    assert algo.used["multiplier/length"] == pytest.approx(s)
    g2 = s * (1 - s) * 0.25
    assert algo.momentum == [pytest.approx(0.9 * 0.0625 + g2)]
    assert algo.multipliers == [pytest.approx(-0.00625 - 0.1 * (0.9 * 0.0625 + g2))]
    assert algo.multipliers[0] == pytest.approx(-0.0181249, abs=1e-7)
    assert algo.weights()[1][0] < 0.5  # the constraint's weight fell


def test_linear_form_clips_the_gradient_and_keeps_lambda_nonnegative():
    """Linear: r = r_em − λ r_len, g = θ − c̄. θ = 0: g = −0.55, norm above 0.5 → × 0.5/(0.55 + 1e-6): λ = 0.5 + 1 · 0.4999991.
    θ = 1: g = 0.45 (not clipped), lr 2: λ = 0.5 − 0.9 < 0 → projected to 0."""
    up = Constrained(ConstrainedConfig(thresholds=[0.0], multiplier_lr=1.0, parametrisation="linear"))
    b = up.prepare(_batch())
    assert_close(b.fields["rewards"], torch.tensor(EM) - 0.5 * torch.tensor(LEN))
    assert up.multipliers == [pytest.approx(0.5 + 0.55 * 0.5 / (0.55 + 1e-6))]
    down = Constrained(ConstrainedConfig(thresholds=[1.0], multiplier_lr=2.0, parametrisation="linear"))
    down.prepare(_batch())
    assert down.multipliers == [0.0]


def test_zero_multiplier_lr_is_grpo_on_the_fixed_weighted_sum():
    """multiplier_lr = 0, λ₀ = 0.3 fixed: every step is GRPO on r = (1 − σ(0.3)) r_em + σ(0.3) r_len, bit for bit."""
    algo = Constrained(ConstrainedConfig(thresholds=[0.3], multiplier_lr=0.0, initial_multipliers=[0.3]))
    grpo = GRPO(GRPOConfig())
    w = _sig(0.3)
    logps = torch.tensor([[-0.9, -1.2, -1.0]] * 4, requires_grad=True)
    for _ in range(2):
        b = algo.prepare(_batch())
        ref = _batch()
        ref.fields["rewards"] = (1 - w) * ref.fields["rewards.exact_match"] + w * ref.fields["rewards.length"]
        ref = grpo.prepare(ref)
        assert torch.equal(b.fields["advantages"], ref.fields["advantages"])
        assert torch.equal(algo.loss(b, PolicyOutput(logps)).loss, grpo.loss(ref, PolicyOutput(logps)).loss)
        assert algo.multipliers == [0.3]


def test_config_errors():
    with pytest.raises(ValueError, match="one θ per constraint"):
        ConstrainedConfig(thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="distinct"):
        ConstrainedConfig(objective="length")


def test_state_round_trip():
    a = Constrained(ConstrainedConfig(thresholds=[0.3]))
    a.prepare(_batch())
    b = Constrained(ConstrainedConfig(thresholds=[0.3]))
    b.load_state_dict(a.state_dict())
    a.prepare(_batch())
    b.prepare(_batch())
    assert a.multipliers == b.multipliers and a.momentum == b.momentum


ARGS = ["train", "constrained", "--data", "p2", "--reward", "exact_match", "--reward", "length",
        "--reward-opt", "length.mode=linear", "--reward-opt", "length.max_len=6",
        "--max-steps", "6", "--batch-size", "2", "--n", "4", "--lr", "1e-3",
        "--set", "rollout.max_new_tokens=6", "--set", "rollout.temperature=1.5", "--set", "algorithm.thresholds=[-0.4]",
        "--set", "algorithm.multiplier_lr=1", "--set", "train.save_every=2", "--quiet"]


def test_cli_reward_multipliers_resume_bit_exactly(tmp_path):
    """A run killed (SIGKILL) after a checkpoint holds λ and the momentum buffer in trainer_state.pt; resumed, it logs
    the same multipliers each step and ends with exactly the weights of an uninterrupted run. Control: the same resume
    with the multiplier state dropped (λ restarts at 0) logs other multipliers."""
    import shutil

    from safetensors.torch import load_file

    from tokalign.train import checkpoint

    cli("prepare", "arith", "--limit", "2", "--out", "p2", cwd=tmp_path)
    cli(*ARGS, "--out", "full", cwd=tmp_path)
    run_and_kill(ARGS, "cut", "checkpoint-2", tmp_path)
    ckpt = checkpoint.latest(tmp_path / "cut.partial")
    state = torch.load(ckpt / checkpoint.STATE, weights_only=False)
    assert len(state["algorithm"]["multipliers"]) == 1 and state["algorithm"]["momentum"] is not None

    shutil.copytree(tmp_path / "cut.partial", tmp_path / "nostate.partial")
    state["algorithm"] = None
    torch.save(state, checkpoint.latest(tmp_path / "nostate.partial") / checkpoint.STATE)

    cli(*ARGS, "--out", "cut", "--resume", cwd=tmp_path)
    cli(*ARGS, "--out", "nostate", "--resume", cwd=tmp_path)
    full, cut = run_metrics(tmp_path / "full"), run_metrics(tmp_path / "cut")
    lams = [r["lagrange/length"] for r in full]
    assert len(set(lams)) == len(lams)  # the multiplier moves every step
    assert [r["multiplier/length"] for r in cut] == [r["multiplier/length"] for r in full]
    assert cut == full
    wf, wc = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    nostate = run_metrics(tmp_path / "nostate")
    assert [r["lagrange/length"] for r in nostate] != lams


def test_cli_unknown_component_names_the_fix(tmp_path):
    cli("prepare", "arith", "--limit", "2", "--out", "p2", cwd=tmp_path)
    proc = cli("train", "constrained", "--data", "p2", "--max-steps", "1", "--batch-size", "1", "--n", "2",
               "--set", "rollout.max_new_tokens=4", "--quiet", "--out", "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--reward length" in proc.stderr
