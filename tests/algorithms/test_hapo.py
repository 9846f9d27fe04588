"""HAPO (arXiv:2509.16591) on hand cases (expected numbers worked out in each docstring): the normalised entropy ĥ, the
token-level group average and its fallback, the entropy-adaptive clip and advantage, the limit constant entropy ⇒
DAPO/GRPO, micro-batches (ĥ per micro-batch), its defaults, and a slow run through the real CLI. CPU only, seeded.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask,
ĥ = normalised entropy."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import random_groups, train_changes_weights
from conftest import leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.grpo import DAPO, DAPOConfig, GRPO, GRPOConfig
from tokalign.algorithms.hapo import HAPO, HAPOConfig, entropy_h_hat, token_group_advantages
from tokalign.protocols import PolicyOutput


def test_hapo_h_hat_hand():
    """log H = (−2, 0, 1, 2) over 4 valid tokens, pivot 0.8: index round(0.8·3) = 2 of the sorted values ⇒ Q = 1;
    h = (−3, −1, 0, 1); dividing by the RMS √(11/4) cancels in the rescaling: positive side ÷ max = 1, negative side
    ÷ |min| = 3 ⇒ ĥ = (−1, −1/3, 0, 1). Masked tokens neither count nor get a value. Constant entropy ⇒ ĥ ≡ 0."""
    ent = torch.tensor([[math.exp(-2), math.exp(0), 50.0], [math.exp(1), math.exp(2), 1e-3]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]])
    assert_close(entropy_h_hat(ent, mask, 0.8), torch.tensor([[-1.0, -1 / 3, 0.0], [0.0, 1.0, 0.0]]))
    assert float(entropy_h_hat(torch.full((3, 4), 0.7), torch.ones(3, 4), 0.8).abs().max()) == 0.0
    # pivot 0 puts every valid token at or above Q: ĥ = (log H − min)/(max − min) ∈ [0, 1]
    assert_close(entropy_h_hat(ent, mask, 0.0), torch.tensor([[0.0, 0.5, 0.0], [0.75, 1.0, 0.0]]))


def test_hapo_token_group_average_hand():
    """R = (1, 0), lengths (3, 1): μ = 3/4, σ = √(3/4·1/4) = √3/4 ⇒ A = (1/√3, −√3) = (0.5773503, −1.7320508).
    R = (1, 0, 0, 0), lengths (1, 10, 10, 10): μ = 1/31, σ = √30/31 ⇒ A_1 = √30 = 5.48 ≥ 5 ⇒ the group falls back
    to GRPO: (1.5, −0.5, −0.5, −0.5). Equal lengths: μ is GRPO's group mean (scale "none" is exactly R − mean_g),
    and with std scaling A = A_GRPO·√(G/(G−1)) (population vs unbiased std), up to the 1e-6."""
    adv, fb = token_group_advantages(torch.tensor([1.0, 0, 1, 0, 0, 0]), torch.tensor([3.0, 1, 1, 10, 10, 10]),
                                     torch.tensor([0, 0, 1, 1, 1, 1]))
    assert_close(adv, torch.tensor([0.5773503, -1.7320508, 1.5, -0.5, -0.5, -0.5]))
    assert fb.tolist() == [False, False, True, True, True, True]

    r, g = torch.tensor([1.0, 0.0, 0.0, 0.3, 0.9, 0.2, 0.7]), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    lengths = torch.tensor([4.0, 4, 4, 2, 2, 7, 7])
    assert_close(token_group_advantages(r, lengths, g, scale="none")[0], ops.group_advantages(r, g, "none"))
    size = torch.tensor([3.0, 3, 3, 2, 2, 2, 2])
    assert_close(token_group_advantages(r, lengths, g)[0], ops.group_advantages(r, g) * (size / (size - 1)).sqrt(),
                 rtol=1e-5, atol=1e-5)


def test_hapo_loss_hand():
    """One row, A = 1, ℓ_old = 0, entropies with ĥ = (−1, −1/3, 0, 1) (log H = −2, 0, 1, 2), ε = 0.2/0.2, α = β = 1.
    Clip ε_l = 0.2(1 − ĥ) where ĥ ≤ 0: (0.4, 0.2667, 0.2, 0.2); ε_h = 0.2(1 + ĥ) where ĥ > 0: (0.2, 0.2, 0.2, 0.4).
    Band 1 − ε_l/2 < ρ < 1 + ε_h/2; A_ent = A(1 + ĥ) = (0, 2/3, 1, 2).
    t1 ρ = 1 in (0.8, 1.1), low entropy ⇒ A_ent = 0 ⇒ L = 0.
    t2 ρ = 0.8 outside (0.8667, 1.1) ⇒ A = 1; inside its clip [0.7333, 1.2] ⇒ L = −0.8.
    t3 ρ = 1.05, ĥ = 0 counts as low entropy: inside ⇒ A_ent = 1 ⇒ L = −1.05.
    t4 ρ = 1.3 outside (0.9, 1.2), high entropy ⇒ A_ent = 2; clip [0.8, 1.4] ⇒ unclipped, L = −2.6 (DAPO at ε 0.2
       would clip at 1.2 and pass no gradient).
    token-mean: (0 − 0.8 − 1.05 − 2.6)/4 = −1.1125;  ∂L/∂ℓ_t = −A_t ρ_t/4 = (0, −0.2, −0.2625, −0.65)."""
    ent = torch.tensor([[-2.0, 0.0, 1.0, 2.0]]).exp()
    batch = _batch(torch.ones(1, 4), {"advantages": torch.tensor([1.0]), "old_logps": torch.zeros(1, 4)})
    lp = _leaf(torch.tensor([[1.0, 0.8, 1.05, 1.3]]).log())
    res = HAPO(HAPOConfig()).loss(batch, PolicyOutput(lp, entropy=ent))
    assert_close(res.loss, torch.tensor(-1.1125))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, -0.2, -0.2625, -0.65]]))
    assert res.metrics["clip_fraction"] == 0.0 and res.metrics["advantage/redistributed_fraction"] == 0.5
    assert res.metrics["h_hat/positive_fraction"] == 0.25


def test_hapo_constant_entropy_is_dapo_loss():
    """Limiting case: constant entropy ⇒ ĥ = 0 ⇒ base ε and unchanged A ⇒ the PPO/DAPO clip loss (dual clip inactive:
    ratios ≪ C). Same advantages (GRPO's) in both; HAPO with ε_h = 0.28 equals DAPO, ε 0.2/0.2 equals GRPO."""
    batch = random_groups(3, [2, 3, 1, 4, 2, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])
    GRPO(GRPOConfig()).prepare(batch)
    ent = torch.full_like(batch.fields["pol"], 0.9)
    pol = batch.fields["pol"] + 0.4 * torch.randn(batch.fields["pol"].shape, generator=torch.Generator().manual_seed(0))
    for hapo, base in [(HAPO(HAPOConfig(epsilon_high=0.28)), DAPO(DAPOConfig())), (HAPO(HAPOConfig()), GRPO(GRPOConfig()))]:
        a, b = _leaf(pol), _leaf(pol)
        h = hapo.loss(batch, PolicyOutput(a, entropy=ent))
        g = base.loss(batch, PolicyOutput(b)).loss
        h.loss.backward()
        g.backward()
        assert_close(h.loss, g)
        assert_close(a.grad, b.grad)
        assert h.metrics["clip_fraction"] > 0 and h.metrics["advantage/redistributed_fraction"] == 0.0


def test_hapo_micro_batches_and_per_micro_batch_h_hat():
    """With ĥ the same in every micro-batch (constant entropy) the token-mean losses and gradients of micro-batches
    add up to the full batch's. With varying entropy ĥ is normalised over each micro-batch's tokens (as the
    official dp_actor), so the split changes the loss: HAPO is per-micro-batch by construction."""
    batch = random_groups(4, [2, 3, 1, 4, 2, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])
    algo = HAPO(HAPOConfig())
    algo.prepare(batch)
    for ent_key, consistent in [(None, True), ("ent", False)]:
        entropy = (lambda b: torch.full_like(b.fields["pol"], 0.9)) if ent_key is None else (lambda b: b.fields["ent"])
        full, summed, full_grad, mb_grad, _ = micro_batch_check(algo, batch, logps=lambda b: b.fields["pol"] + 0.2,
                                                                entropy=entropy)
        if consistent:
            assert_close(summed, full)
            assert_close(mb_grad, full_grad)
        else:
            assert not torch.isclose(summed, full)


def test_hapo_defaults_needs_and_validation():
    c = HAPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.clip_ratio_c, c.entropy_pivot, c.clip_alpha, c.adv_beta, c.aggregation,
            c.beta) == (0.2, 0.2, 10.0, 0.8, 1.0, 1.0, "token-mean", 0.0)
    algo = HAPO(c)
    assert isinstance(algo, GRPO) and algo.needs.groups and algo.needs.old_logps and not algo.needs.reference
    batch = _batch(torch.ones(2, 1), {"advantages": torch.tensor([1.0, -1.0]), "old_logps": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="entropies"):
        algo.loss(batch, PolicyOutput(torch.zeros(2, 1)))
    off = HAPO(HAPOConfig(token_level_advantage=False))
    b = _batch([[1.0, 1.0], [1.0, 0.0]], {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])})
    assert_close(off.prepare(b).fields["advantages"], torch.tensor([0.7071061, -0.7071061]))
    for bad in [dict(entropy_pivot=1.5), dict(clip_ratio_c=0.5), dict(scale_rewards="batch"), dict(adv_beta=-1.0),
                dict(aggregation="nope")]:
        with pytest.raises(ValueError):
            HAPOConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# the real CLI (module:attr name; no entry point registered)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.hapo:HAPO"])
def test_cli_three_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train <module:attr> --data arith` for 3 steps on the bundled model (2 prompts × 4 samples): the run
    prints its checkpoint path, every logged loss is finite and the weights differ from the bundled model's."""
    metrics = train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", steps=3)
    assert "clip_fraction_lower" in metrics[0]
