"""DCPO (arXiv:2509.02333) on hand cases (expected numbers worked out in each docstring): the dynamic clip bounds, the
loss with the dual clip (clip_type="dual" without it ⇒ DAPO), the smooth advantage standardisation with its per-prompt
statistics (first visit ⇒ GRPO; state round trip), the only-token-mean aggregation; and slow runs through the real CLI,
including a killed run that resumes its per-prompt statistics. CPU only, seeded.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, q = exp(ℓ_old), ρ = exp(ℓ − ℓ_old), A = advantage, m = mask."""

from __future__ import annotations

import io
import math

import pytest
import torch
from algo_helpers import random_groups, run_metrics, train_changes_weights
from conftest import cli, leaf as _leaf, token_batch as _batch, micro_batch_check, run_and_kill
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.dcpo import DCPO, DCPOConfig, dynamic_clip_bounds
from tokalign.algorithms.grpo import DAPO, DAPOConfig
from tokalign.batching import micro_batches
from tokalign.protocols import PolicyOutput, TokenBatch


def _group(rewards, prompt=7) -> TokenBatch:
    """One group of len(rewards) rows (one token each) of prompt ``prompt``."""
    n = len(rewards)
    return _batch(torch.ones(n, 1), {"rewards": torch.tensor(rewards, dtype=torch.float32),
                                     "group_ids": torch.zeros(n, dtype=torch.long),
                                     "prompt_index": torch.full((n,), prompt, dtype=torch.long)})


# ---------------------------------------------------------------------------------------------------
# dynamic clip bounds


def test_dcpo_dynamic_bounds_hand():
    """ε_l = 0.2, ε_h = 0.28, C = 10.  q = 1: low = ½(1 + √0.2) = 0.7236068, high = ½(1 + √2.12) = 1.2280110.
    q = 0.9: low = ½(1 + √(1 − 0.8/0.9)) = ½(1 + 1/3) = 2/3.   q = 0.5: high = ½(1 + √3.24) = ½(1 + 1.8) = 1.4.
    low = ½ exactly when 1 − 4ε_l/q ≤ 0, i.e. q ≤ 4ε_l = 0.8 (the rule "q < 0.8 ⇒ ½" holds, q = 0.8
    included). q → 0 (ℓ_old = −200, q underflows): [½, max(C, 10)]; C = 20 raises the cap, C = 3 keeps 10."""
    q = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.01])
    low, high = dynamic_clip_bounds(q.log(), 0.2, 0.28, 10.0)
    assert_close(low, torch.tensor([0.7236068, 2 / 3, 0.5, 0.5, 0.5]))
    assert_close(high[[0, 3]], torch.tensor([1.2280110, 1.4]))
    assert_close(high[4], torch.tensor(0.5 * (1 + math.sqrt(1 + 4 * 0.28 / 0.01))))  # 5.8151 < 10: uncapped
    for c, cap in [(10.0, 10.0), (20.0, 20.0), (3.0, 10.0)]:
        low, high = dynamic_clip_bounds(torch.tensor([-200.0]), 0.2, 0.28, c)
        assert float(low) == 0.5 and float(high) == cap
    q = torch.linspace(0.01, 1, 50)
    low, high = dynamic_clip_bounds(q.log(), 0.2, 0.28, 10.0)
    assert (low[q <= 0.8] == 0.5).all() and (low[q > 0.8 + 1e-6] > 0.5).all() and (high > 1).all()


def test_dcpo_loss_hand():
    """Dynamic bounds with dual clip (C = 10), token-mean over 4 tokens.
    Row 0, A = +1: token 1 q = 1, ρ = e^0.3 = 1.3499 > 1.2280 ⇒ L = −1.2280 (clipped, no gradient);
                   token 2 q = 0.5, ρ = 1.3 < high(0.5) = 1.4 ⇒ L = −1.3, ∂L/∂ℓ = −ρ/4 = −0.325 (DAPO would clip at 1.28).
    Row 1, A = −1: token 1 q = 1, ρ = e^3 = 20.09 ⇒ max(20.09, 1.228) = 20.09, dual clip min(·, 10) = 10 (no gradient);
                   token 2 q = 1, ρ = e^−0.5 = 0.6065 < 0.7236 ⇒ L = max(0.6065, 0.7236) = 0.7236 (clipped).
    loss = (−1.2280110 − 1.3 + 10 + 0.7236068)/4 = 2.0488990; clip fraction 2/4, dual-clip fraction 1/4.
    clip_type="dual" (fixed [0.8, 1.28]): (−1.28 − 1.28 + 10 + 0.8)/4 = 2.06."""
    old = torch.tensor([[0.0, math.log(0.5)], [0.0, 0.0]])
    logps = old + torch.tensor([[0.3, math.log(1.3)], [3.0, -0.5]])
    batch = _batch(torch.ones(2, 2), {"advantages": torch.tensor([1.0, -1.0]), "old_logps": old})
    lp = _leaf(logps)
    res = DCPO(DCPOConfig()).loss(batch, PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(2.0488990))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, -0.325], [0.0, 0.0]]))
    assert res.metrics["clip_fraction"] == 0.5 and res.metrics["clip_fraction_lower"] == 0.25
    fixed = DCPO(DCPOConfig(clip_type="dual")).loss(batch, PolicyOutput(logps)).loss
    assert_close(fixed, torch.tensor(2.06))


def test_dcpo_dual_type_without_dual_clip_is_dapo():
    """Limiting case: clip_type="dual" with ratios far below C is DAPO's loss (ε 0.2/0.28, token-mean)."""
    batch = random_groups(1, [2, 3, 1, 4], [0, 0, 1, 1], [1, 0, 0.5, 0.2])
    DAPO(DAPOConfig()).prepare(batch)
    a, b = _leaf(batch.fields["pol"]), _leaf(batch.fields["pol"])
    dcpo = DCPO(DCPOConfig(clip_type="dual", aggregation="token-mean")).loss(batch, PolicyOutput(a)).loss
    dapo = DAPO(DAPOConfig()).loss(batch, PolicyOutput(b)).loss
    dcpo.backward()
    dapo.backward()
    assert_close(dcpo, dapo)
    assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------------
# smooth advantage standardisation


def test_dcpo_first_visit_is_grpo_advantage():
    """n = 0 for every prompt ⇒ w = 1, μ_c = μ_s ⇒ A = (R − μ_s)/σ_s: GRPO's advantage (without its eps = 1e-6);
    an all-equal group gets 0. Same for scale_rewards="none" (R − μ_s) and with smoothing off at any step."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.3, 0.9, 0.5, 0.5, 0.5])
    gids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    for scale in ("group", "none"):
        b = _batch(torch.ones(8, 1), {"rewards": rewards, "group_ids": gids, "prompt_index": gids + 10})
        algo = DCPO(DCPOConfig(scale_rewards=scale))
        algo.prepare(b)
        assert_close(b.fields["advantages"], ops.group_advantages(rewards, gids, scale))
        assert (b.fields["advantages"][5:] == 0).all()
    off = DCPO(DCPOConfig(smooth_advantages=False))
    for _ in range(3):
        b = _batch(torch.ones(8, 1), {"rewards": rewards, "group_ids": gids, "prompt_index": gids})
        off.prepare(b)
        assert_close(b.fields["advantages"], ops.group_advantages(rewards, gids))
    assert off.stats == {}


def test_dcpo_smooth_standardisation_hand():
    """One prompt, G = 4, unbiased std.
    Step 1, R = (1,0,0,0): μ = 1/4, σ² = (9/16 + 3/16)/3 = 1/4 ⇒ A = (1.5, −0.5, −0.5, −0.5) = GRPO; state (1/4, 1/2, 1).
    Step 2, R = (1,1,0,0): μ_s = 1/2, σ_s² = 1/3.  t = 2: μ_c = (1/4 + 1/2)/2 = 3/8,
      σ_c² = (1·1/4 + 1/3 + (1/2)(1/4)²)/2 = (0.25 + 0.333333 + 0.03125)/2 = 0.3072917, σ_c = 0.5543389.
      A_new = ±(1/2)/√(1/3) = ±0.8660254;  A_cum(R=1) = (5/8)/σ_c = 1.1274688, A_cum(R=0) = −(3/8)/σ_c = −0.6764813.
      w = 1/2 ⇒ both candidates are the average: A(R=1) = 0.9967471, A(R=0) = −0.7712533.
    Step 3, R = (1,1,1,0): μ_s = 3/4, σ_s = 1/2.  t = 3: μ_c = (2·3/8 + 3/4)/3 = 1/2,
      σ_c² = (2·0.3072917 + 1/4 + (2/3)(3/8)²)/3 = 0.3194444, σ_c = 0.5651942.
      A_new = (0.5, −1.5), A_cum = (0.8846517, −0.8846517), w = 1/3:
      R=1: SA_new = 0.2948839 + 0.3333333 = 0.6282172 < SA_cum = 0.1666667 + 0.5897678 = 0.7564345 ⇒ 0.6282172;
      R=0: SA_new = −0.2948839 − 1 = −1.2948839, SA_cum = −0.5 − 0.5897678 = −1.0897678 ⇒ −1.0897678 (smaller |·|).
    Instead of step 2, an all-equal step R = (1,1,1,1): A_new = 0, μ_c = 5/8, σ_c² = (1/4 + 0 + (1/2)(3/4)²)/2
      = 0.265625, A_cum = (3/8)/0.5153882 = 0.7276069 ⇒ A = 0.7276069/2 = 0.3638034 for every row (no dead zone)."""
    algo = DCPO(DCPOConfig())
    expected = [[1.5, -0.5, -0.5, -0.5], [0.9967471, 0.9967471, -0.7712533, -0.7712533],
                [0.6282172, 0.6282172, 0.6282172, -1.0897678]]
    for rewards, want in zip([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], expected):
        assert_close(algo.prepare(_group(rewards)).fields["advantages"], torch.tensor(want))
    mu, sd, n = algo.stats[7]
    assert (mu, n) == (0.5, 3) and sd == pytest.approx(math.sqrt(0.3194444), rel=1e-6)

    algo = DCPO(DCPOConfig())
    algo.prepare(_group([1, 0, 0, 0]))
    assert_close(algo.prepare(_group([1, 1, 1, 1])).fields["advantages"], torch.full((4,), 0.3638034))


def test_dcpo_state_round_trip_and_keys():
    """state_dict → torch.save → torch.load → load_state_dict in a fresh instance: the next step's advantages and the
    new state are identical. Prompts are keyed by prompt_index (not group id); index −1 keeps no history; the
    same prompt twice in one batch reads the pre-step state in both groups."""
    a = DCPO(DCPOConfig())
    steps = [([1, 0, 0, 0], 3), ([0, 1, 0, 1], 5), ([1, 1, 0, 0], 3), ([0, 0, 0, 1], 5)]
    for rewards, p in steps[:2]:
        a.prepare(_group(rewards, p))
    buf = io.BytesIO()
    torch.save({"algorithm": a.state_dict()}, buf)
    buf.seek(0)
    b = DCPO(DCPOConfig())
    b.load_state_dict(torch.load(buf, weights_only=False)["algorithm"])
    assert b.stats == a.stats and set(b.stats) == {3, 5}
    for rewards, p in steps[2:]:
        assert_close(a.prepare(_group(rewards, p)).fields["advantages"], b.prepare(_group(rewards, p)).fields["advantages"])
    assert a.state_dict() == b.state_dict() and a.stats[3][2] == 2

    fresh = DCPO(DCPOConfig())
    for _ in range(2):
        adv = fresh.prepare(_group([1, 1, 0, 0], -1)).fields["advantages"]
        assert_close(adv, ops.group_advantages(torch.tensor([1.0, 1, 0, 0]), torch.zeros(4)))
    assert fresh.stats == {}

    twice = _batch(torch.ones(4, 1), {"rewards": torch.tensor([1.0, 0, 1, 1]), "group_ids": torch.tensor([0, 0, 1, 1]),
                                      "prompt_index": torch.tensor([9, 9, 9, 9])})
    c = DCPO(DCPOConfig())
    c.prepare(twice)
    assert_close(twice.fields["advantages"], torch.tensor([0.7071068, -0.7071068, 0.0, 0.0]))  # both first visits
    assert c.stats[9] == (1.0, 0.0, 1)  # the later group's statistics are kept


# ---------------------------------------------------------------------------------------------------
# aggregation


def test_dcpo_otm_and_token_mean_micro_batches():
    """OTM = Σ_mb (|mb|/B)·token-mean(mb). One micro-batch: OTM = token-mean. One row per micro-batch (every row its
    own group): OTM sums (1/B)·token-mean(row) = seq-mean-token-mean. aggregation="token-mean" (global token total)
    is micro-batch consistent: micro-batch losses and gradients add up to the full-batch ones."""
    batch = random_groups(2, [2, 3, 1, 4, 1, 2], [0, 1, 2, 3, 4, 5], [1, 0, 0.5, 0.2, 1, 0])
    batch.fields["advantages"] = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.1])
    otm, tm = DCPO(DCPOConfig()), DCPO(DCPOConfig(aggregation="token-mean"))
    pol = batch.fields["pol"]
    assert_close(otm.loss(batch, PolicyOutput(pol)).loss, tm.loss(batch, PolicyOutput(pol)).loss)
    per_row = sum(otm.loss(mb, PolicyOutput(mb.fields["pol"])).loss for mb in micro_batches(batch, 1))
    smtm = DCPO(DCPOConfig(aggregation="seq-mean-token-mean")).loss(batch, PolicyOutput(pol)).loss
    assert_close(per_row, smtm)
    assert not torch.isclose(per_row, tm.loss(batch, PolicyOutput(pol)).loss)  # OTM depends on the split

    full, summed, full_grad, mb_grad, n = micro_batch_check(tm, batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)


def test_dcpo_defaults_needs_and_validation():
    c = DCPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.clip_ratio_c, c.clip_type, c.aggregation, c.beta, c.smooth_advantages) == \
        (0.2, 0.28, 10.0, "dynamic", "only-token-mean", 0.0, True)
    algo = DCPO(c)
    assert algo.needs.data == ("online", "scored") and algo.needs.groups and algo.needs.old_logps
    assert not algo.needs.reference and DCPO(DCPOConfig(beta=0.01)).needs.reference
    for bad in [dict(clip_type="fixed"), dict(aggregation="sum"), dict(scale_rewards="batch"), dict(clip_ratio_c=1.0),
                dict(epsilon_low=-0.1), dict(kl_estimator="k4")]:
        with pytest.raises(ValueError):
            DCPOConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# the real CLI (module:attr names; no entry points registered)


_DCPO = "tokalign.algorithms.dcpo:DCPO"


@pytest.mark.slow
@pytest.mark.parametrize("algo", [_DCPO])
def test_cli_three_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train <module:attr> --data arith` for 3 steps on the bundled model (2 prompts × 4 samples): the run
    prints its checkpoint path, every logged loss is finite and the weights differ from the bundled model's."""
    metrics = train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", steps=3)
    assert "clip_fraction_lower" in metrics[0]


@pytest.mark.slow
def test_cli_dcpo_killed_run_resumes_its_statistics(tmp_path):
    """Two arith prompts, so every step revisits both and SAS uses their history. A run killed (SIGKILL) after a
    checkpoint holds the per-prompt statistics in trainer_state.pt; resuming ends with exactly the weights and
    metrics of an uninterrupted run. Control: the same resume with the statistics dropped from the checkpoint
    ends with different weights, so the restored state is what makes them equal."""
    import shutil

    from safetensors.torch import load_file

    from tokalign.train import checkpoint

    cli("prepare", "arith", "--limit", "2", "--out", "p2", cwd=tmp_path)
    args = ["train", _DCPO, "--data", "p2", "--max-steps", "6", "--batch-size", "2", "--n", "4", "--lr", "1e-3",
            "--set", "rollout.max_new_tokens=6", "--set", "train.save_every=2", "--quiet"]
    cli(*args, "--out", "full", cwd=tmp_path)

    run_and_kill(args, "cut", "checkpoint-2", tmp_path)
    ckpt = checkpoint.latest(tmp_path / "cut.partial")
    state = torch.load(ckpt / checkpoint.STATE, weights_only=False)
    step = state["step"]
    stats = state["algorithm"]["stats"]
    assert len(stats) == 2 and all(n == step for _, _, n in stats.values())  # both prompts, once per step

    shutil.copytree(tmp_path / "cut.partial", tmp_path / "nostate.partial")
    state["algorithm"] = None
    torch.save(state, checkpoint.latest(tmp_path / "nostate.partial") / checkpoint.STATE)

    cli(*args, "--out", "cut", "--resume", cwd=tmp_path)
    cli(*args, "--out", "nostate", "--resume", cwd=tmp_path)
    full, cut, nostate = (load_file(tmp_path / r / "model.safetensors") for r in ("full", "cut", "nostate"))
    assert all((full[k] == cut[k]).all() for k in full)
    assert run_metrics(tmp_path / "cut") == run_metrics(tmp_path / "full")
    assert any(not torch.equal(full[k], nostate[k]) for k in full)
