"""DCPO and HAPO on hand cases (TokenBatch and PolicyOutput built directly, expected numbers worked out in each
docstring), their limiting cases, and slow end-to-end runs through the real CLI, DCPO's including a killed run that
resumes its per-prompt statistics. CPU only, seeded.

Reference: /work/shared/reference/algorithms.md §1 (PPO dual clip, GRPO) and §5 (DCPO, HAPO).
Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, q = exp(ℓ_old), ρ = exp(ℓ − ℓ_old), A = advantage,
m = mask, ĥ = normalised entropy.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from conftest import cli, leaf as _leaf, token_batch as _batch, micro_batch_check, run_and_kill
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.dcpo import DCPO, DCPOConfig, dynamic_clip_bounds
from tokalign.algorithms.grpo import DAPO, DAPOConfig, GRPO, GRPOConfig
from tokalign.algorithms.hapo import HAPO, HAPOConfig, entropy_h_hat, token_group_advantages
from tokalign.protocols import PolicyOutput, TokenBatch
from tokalign.batching import Seq, collate, micro_batches



def _group(rewards, prompt=7) -> TokenBatch:
    """One group of len(rewards) rows (one token each) of prompt ``prompt``."""
    n = len(rewards)
    return _batch(torch.ones(n, 1), {"rewards": torch.tensor(rewards, dtype=torch.float32),
                                     "group_ids": torch.zeros(n, dtype=torch.long),
                                     "prompt_index": torch.full((n,), prompt, dtype=torch.long)})


def _random_groups(seed: int, lengths, gids, rewards) -> TokenBatch:
    """Collated rows with random policy log-probs (field "pol") and behaviour log-probs near them."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (n, gid, r) in enumerate(zip(lengths, gids, rewards)):
        pol = -torch.rand(n, generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.05 * torch.randn(n, generator=g)).tolist(),
                               "ent": (torch.rand(n, generator=g) * 3).tolist()},
                        prompt_index=gid))
    return collate(seqs, pad_id=0)


# ---------------------------------------------------------------------------------------------------
# DCPO: dynamic clip bounds


def test_dcpo_dynamic_bounds_hand():
    """ε_l = 0.2, ε_h = 0.28, C = 10.  q = 1: low = ½(1 + √0.2) = 0.7236068, high = ½(1 + √2.12) = 1.2280110.
    q = 0.9: low = ½(1 + √(1 − 0.8/0.9)) = ½(1 + 1/3) = 2/3.   q = 0.5: high = ½(1 + √3.24) = ½(1 + 1.8) = 1.4.
    low = ½ exactly when 1 − 4ε_l/q ≤ 0, i.e. q ≤ 4ε_l = 0.8 (the reference's "q < 0.8 ⇒ ½" holds, q = 0.8
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
    batch = _random_groups(1, [2, 3, 1, 4], [0, 0, 1, 1], [1, 0, 0.5, 0.2])
    DAPO(DAPOConfig()).prepare(batch)
    a, b = _leaf(batch.fields["pol"]), _leaf(batch.fields["pol"])
    dcpo = DCPO(DCPOConfig(clip_type="dual", aggregation="token-mean")).loss(batch, PolicyOutput(a)).loss
    dapo = DAPO(DAPOConfig()).loss(batch, PolicyOutput(b)).loss
    dcpo.backward()
    dapo.backward()
    assert_close(dcpo, dapo)
    assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------------
# DCPO: smooth advantage standardisation


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
# DCPO: aggregation


def test_dcpo_otm_and_token_mean_micro_batches():
    """OTM = Σ_mb (|mb|/B)·token-mean(mb). One micro-batch: OTM = token-mean. One row per micro-batch (every row its
    own group): OTM sums (1/B)·token-mean(row) = seq-mean-token-mean. aggregation="token-mean" (global token total)
    is micro-batch consistent: micro-batch losses and gradients add up to the full-batch ones."""
    batch = _random_groups(2, [2, 3, 1, 4, 1, 2], [0, 1, 2, 3, 4, 5], [1, 0, 0.5, 0.2, 1, 0])
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
# HAPO


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
    batch = _random_groups(3, [2, 3, 1, 4, 2, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])
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
    batch = _random_groups(4, [2, 3, 1, 4, 2, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])
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
# the real CLI (module:attr names; no entry points registered)

_DCPO, _HAPO = "tokalign.algorithms.dcpo:DCPO", "tokalign.algorithms.hapo:HAPO"


def _metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("algo", [_DCPO, _HAPO])
def test_cli_three_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train <module:attr> --data arith` for 3 steps on the bundled model (2 prompts × 4 samples): the run
    prints its checkpoint path, every logged loss is finite and the weights differ from the bundled model's."""
    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / "x"
    proc = cli("train", algo, "--data", "arith", "--max-steps", "3", "--batch-size", "2", "--n", "4", "--out", str(out),
               "--overwrite", "--quiet")
    assert proc.stdout.strip() == str(out)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert "clip_fraction_lower" in metrics[0]
    base, trained = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(out / "model.safetensors")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 0


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
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")
    assert any(not torch.equal(full[k], nostate[k]) for k in full)
