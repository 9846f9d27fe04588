"""REC and OPMD (arXiv:2509.24203) on hand cases (expected numbers worked out in each docstring): REC's clip modes,
weights and k2 regulariser, clip none + weight none ⇒ REINFORCE with the group-mean baseline, on-policy ⇒ PPO's
gradient; OPMD's baselines; their defaults; micro-batches adding up to the full batch, and slow runs through the real
CLI (module:attr names). CPU only.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask, G = group size."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import rewards_batch, micro_batches_add_up, train_changes_weights
from conftest import leaf as _leaf, token_batch as _batch
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.rec import OPMD, REC, OPMDConfig, RECConfig
from tokalign.protocols import PolicyOutput


def _rec_hand():
    """Group R = (1, 0) ⇒ A = (0.5, −0.5). Row 0 ratios ρ = (1.0, 1.5, 0.3, 0.6); row 1 ρ = (0.7, 3.5, 1.5, ·)."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-1.2, -3.0, -0.8, 0.0]])
    ratio = torch.tensor([[1.0, 1.5, 0.3, 0.6], [0.7, 3.5, 1.5, 1.0]])
    batch = _batch([[1.0] * 4, [1.0, 1.0, 1.0, 0.0]], {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                                      "old_logps": old})
    return batch, old + ratio.log(), ratio


# kept tokens per clip mode, ε = (0.2, 0.2), ε' = (0.6, 2.0): band [0.8, 1.2]; ring adds A ≥ 0 ∧ ρ ≤ 0.4, A ≤ 0 ∧ ρ ≥ 3
_KEEP = {"none": [[1, 1, 1, 1], [1, 1, 1, 0]],
         "two-side": [[1, 0, 0, 0], [0, 0, 0, 0]],
         "one-side": [[1, 0, 1, 1], [0, 1, 1, 0]],  # A ≥ 0: ρ ≤ 1.2;  A ≤ 0: ρ ≥ 0.8
         "ring": [[1, 0, 1, 0], [0, 1, 0, 0]]}


@pytest.mark.parametrize("clip_mode", list(_KEEP))
def test_rec_clip_modes_hand(clip_mode):
    """beta = 0, weight none, token-mean over 7 tokens: L = Σ −A·ℓ·keep / 7 ⇒ ∂L/∂ℓ_t = −A·keep_t/7 = ∓0.0714286 on
    kept tokens (row 0 A = +0.5, row 1 A = −0.5), 0 on dropped ones; loss = Σ_kept −A·ℓ / 7.
    ring: row 0 keeps ρ = 1 (band) and ρ = 0.3 (≤ 0.4), drops 1.5 and 0.6; row 1 keeps only ρ = 3.5 (≥ 3); clip_fraction 4/7.
    ℓ = ℓ_old + log ρ: row 0 (−1, −1.5945349, −1.7039728, −2.0108256), row 1 (−1.5566749, −1.7472370, −0.3945349)."""
    batch, logps, _ = _rec_hand()
    algo = REC(RECConfig(beta=0.0, clip_mode=clip_mode))
    algo.prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))
    lp = _leaf(logps)
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    keep = torch.tensor(_KEEP[clip_mode], dtype=torch.float32)
    sign = torch.tensor([[-0.5], [0.5]])
    assert_close(lp.grad, sign * keep / 7)
    assert_close(res.loss, (sign * keep * logps).sum() / 7)
    if clip_mode == "ring":
        assert_close(res.loss, torch.tensor((0.5 * 1.0 + 0.5 * 1.7039728 - 0.5 * 1.7472370) / 7))
        assert res.metrics["clip_fraction"] == pytest.approx(4 / 7)


def test_rec_weights_and_k2_hand():
    """Ring mode (kept tokens as above), token-mean over 7 tokens.
    importance_sampling: ∂L/∂ℓ_t = −A·ρ_t·keep_t/7 (ρ detached): row 0 (−0.5·1/7, 0, −0.5·0.3/7, 0) = (−0.0714286, 0,
    −0.0214286, 0); row 1 (0, 0.5·3.5/7 = 0.25, 0).
    advantage, temp 1: w = A·e^A: 0.5·e^0.5 = 0.8243606, −0.5·e^−0.5 = −0.3032653 ⇒ row 0 kept −0.8243606/7 = −0.1177658,
    row 1 kept 0.3032653/7 = 0.0433236.
    k2, clip none, τ = 0.5: + τ(ℓ − ℓ_old)² adds 2τ·log ρ/7 = log ρ/7 to REINFORCE's −A/7: row 0 ρ = 1.5 ⇒ −0.0714286 +
    0.4054651/7 = −0.0135050."""
    batch, logps, ratio = _rec_hand()
    keep = torch.tensor(_KEEP["ring"], dtype=torch.float32)
    adv = torch.tensor([[0.5], [-0.5]])
    cases = {("ring", "importance_sampling", "none"): -adv * ratio * keep / 7,
             ("ring", "advantage", "none"): -adv * torch.exp(adv) * keep / 7,
             ("none", "none", "k2"): (-adv + ratio.log()) * torch.tensor(_KEEP["none"]) / 7}
    for (clip, weight, reg), expected in cases.items():
        algo = REC(RECConfig(beta=0.0, clip_mode=clip, weight=weight, regularizer=reg, tau=0.5 if reg == "k2" else 0.0))
        algo.prepare(batch)
        lp = _leaf(logps)
        algo.loss(batch, PolicyOutput(lp)).loss.backward()
        assert_close(lp.grad, expected)
    assert_close(cases[("none", "none", "k2")][0, 1], torch.tensor(-0.0135050))
    assert_close(cases[("ring", "importance_sampling", "none")][1, 1], torch.tensor(0.25))


def test_rec_none_none_is_reinforce_with_group_mean_baseline_off_policy():
    """clip none + weight none: L = token-mean(−(R − mean_g R)·ℓ) whatever ρ. Groups (1, 0, 0 | 2, 1): A = (2/3, −1/3,
    −1/3 | 0.5, −0.5); lengths (2, 1, 3, 2, 2) ⇒ 10 tokens; ∂L/∂ℓ_t = −A_i/10 on every completion token, ℓ far from ℓ_old."""
    g = torch.Generator().manual_seed(0)
    lengths, rewards, gids = [2, 1, 3, 2, 2], [1.0, 0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1, 1]
    mask = (torch.arange(3) < torch.tensor(lengths)[:, None]).float()
    old = -torch.rand(5, 3, generator=g) * 3
    batch = _batch(mask, {"rewards": torch.tensor(rewards), "group_ids": torch.tensor(gids), "old_logps": old})
    algo = REC(RECConfig(beta=0.0))
    algo.prepare(batch)
    lp = _leaf(old + torch.randn(5, 3, generator=g))
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    adv = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.5, -0.5])[:, None]
    assert_close(lp.grad, -adv * mask / 10)
    assert_close(res.loss, (-adv * lp.detach() * mask).sum() / 10)


@pytest.mark.parametrize("clip_mode", list(_KEEP))
@pytest.mark.parametrize("weight", ["none", "importance_sampling"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_rec_on_policy_gradient_equals_ppo(clip_mode, weight, aggregation):
    """At ρ = 1 every clip mode keeps every token and ∂(−A·ℓ)/∂ℓ = −A = ∂(−A·ρ)/∂ℓ: REC's gradient equals GRPO's with
    scale_rewards none (PPO-clip on R − mean_g R), same aggregation, no KL."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 1, 4, 2, 2, 4])
    mask = (torch.arange(4) < lengths[:, None]).float()
    old = -torch.rand(6, 4, generator=g) * 2
    fields = {"rewards": torch.tensor([1.0, 0.0, 0.3, 1.0, 0.0, 0.0]), "group_ids": torch.tensor([0, 0, 0, 1, 1, 1]), "old_logps": old}
    grads = []
    for algo in (REC(RECConfig(beta=0.0, clip_mode=clip_mode, weight=weight, aggregation=aggregation)),
                 GRPO(GRPOConfig(scale_rewards="none", aggregation=aggregation))):
        batch = _batch(mask, dict(fields))
        algo.prepare(batch)
        lp = _leaf(old)
        algo.loss(batch, PolicyOutput(lp)).loss.backward()
        grads.append(lp.grad)
    assert_close(grads[0], grads[1])
    assert float(grads[0].abs().max()) > 1e-3


def test_opmd_hand_and_baselines():
    """OPMD = REINFORCE ÷ (1 + τ), token-mean, no ℓ_old. τ = 1, mean baseline, R = (1, 0) ⇒ A = (0.5, −0.5); mask
    [[1, 1], [1, 0]] ⇒ ∂L/∂ℓ = −A/(3·2): row 0 (−1/12, −1/12), row 1 (1/12, 0).
    logavgexp baseline: b = τ·log((e^1 + e^0)/2) = log(1.8591409) = 0.6201145 ⇒ A = (0.3798855, −0.6201145); a group of one
    gets b = R ⇒ A = 0."""
    batch = _batch([[1.0, 1.0], [1.0, 0.0]], {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])})
    algo = OPMD(OPMDConfig(beta=0.0))
    assert not algo.needs.old_logps and not algo.needs.reference and algo.needs.groups
    algo.prepare(batch)
    lp = _leaf([[-1.0, -2.0], [-0.5, 0.0]])
    res = algo.loss(batch, PolicyOutput(lp))  # no old_logps in the batch: OPMD never reads them
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 12, -1 / 12], [1 / 12, 0.0]]))
    assert_close(res.loss, torch.tensor((0.5 * 1 + 0.5 * 2 - 0.5 * 0.5) / 6))

    batch = rewards_batch([1.0, 0.0, 3.0], [0, 0, 1])
    OPMD(OPMDConfig(baseline="logavgexp")).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.3798855, -0.6201145, 0.0]))


def test_rec_opmd_defaults_and_validation():
    """Trinity-RFT: ε (0.2, 0.2), ε' (0.6, 2.0), clip none, weight none, token-mean, no std scaling, KL loss k2 at 1e-3
    (⇒ a reference model); OPMD τ = 1 with a mean baseline."""
    c = RECConfig()
    assert (c.epsilon_low, c.epsilon_high, c.epsilon_low_prime, c.epsilon_high_prime) == (0.2, 0.2, 0.6, 2.0)
    assert (c.clip_mode, c.weight, c.regularizer, c.aggregation, c.scale_rewards, c.beta, c.kl_estimator) == (
        "none", "none", "none", "token-mean", "none", 1e-3, "k2")
    assert REC(c).needs.old_logps and REC(c).needs.reference
    o = OPMDConfig()
    assert (o.tau, o.baseline, o.aggregation) == (1.0, "mean", "token-mean")
    for cls, bad in ((RECConfig, {"clip_mode": "both"}), (RECConfig, {"weight": "is"}), (RECConfig, {"temp": 0.0}),
                     (RECConfig, {"epsilon_low": 1.5}), (RECConfig, {"tau": 0.5}), (OPMDConfig, {"clip_mode": "ring"}), (OPMDConfig, {"baseline": "max"})):
        with pytest.raises(ValueError):
            cls(**bad)


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


_ALGOS = {"rec": lambda: REC(RECConfig(clip_mode="ring", weight="importance_sampling", regularizer="k2", tau=0.1)),
          "opmd": lambda: OPMD(OPMDConfig(baseline="logavgexp"))}


@pytest.mark.parametrize("name", list(_ALGOS))
def test_micro_batches_sum_to_full_batch(name):
    """REC and OPMD: three groups of random completions over a 4-token vocabulary, run whole and as micro-batches of 2
    rows — the micro-batch losses and gradients add up to the full-batch ones (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(_ALGOS[name]())


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.rec:REC", "tokalign.algorithms.rec:OPMD"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train package.module:Class` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the
    run prints its checkpoint path, every logged loss is finite and the saved weights differ from the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", grad_norm=False)
