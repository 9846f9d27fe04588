"""BNPO, REC/OPMD, TEMPO and GTPO (token-level RLVR variants of group RL) on hand cases — TokenBatch and PolicyOutput
built directly, expected numbers worked out in each docstring —, their limiting cases, micro-batches adding up to the
full batch, and a slow end-to-end run of each through the real CLI (module:attr names, no entry points). CPU only.

Reference: /work/shared/reference/algorithms.md §1 (GRPO) and §5.
Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask, G = group size.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli, leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign.algorithms.bnpo import BNPO, BNPOConfig, beta_pdf, fit_beta
from tokalign.algorithms.gtpo import GTPO, GTPOConfig, conflict_delta
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.rec import OPMD, REC, OPMDConfig, RECConfig
from tokalign.algorithms.tempo import TEMPO, TEMPOConfig, prefix_td
from tokalign.protocols import PolicyOutput, TokenBatch
from tokalign.batching import Seq, collate



def _groups(completions, rewards, group_ids, token=None) -> TokenBatch:
    """Collated rows with prompt [1, 2] and the given completion ids (so the tree code sees real token ids)."""
    token = token or [{} for _ in completions]
    return collate([Seq([1, 2], list(c), g, row={"rewards": float(r)}, token=tk)
                    for c, r, g, tk in zip(completions, rewards, group_ids, token)], pad_id=0)


# ---------------------------------------------------------------------------------------------------
# BNPO


def _rewards_batch(rewards, group_ids) -> TokenBatch:
    return _batch(torch.ones(len(rewards), 2), {"rewards": torch.tensor(rewards, dtype=torch.float32),
                                                "group_ids": torch.tensor(group_ids)})


def test_bnpo_alpha_beta_one_is_reinforce_with_mean_baseline():
    """α = β = 1 ⇒ Beta_pdf ≡ 1 ⇒ A = R − p̂.  Groups (1, 0, 0, 0 | 1, 1, 0.5, 0): p̂ = 0.25, 0.625 ⇒
    A = (0.75, −0.25, −0.25, −0.25 | 0.375, 0.375, −0.125, −0.625). Fixed by norm_alpha/norm_beta, and also what the fit
    gives for a single group (no spread to fit: the official code's α = β = 1 too)."""
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.375, 0.375, -0.125, -0.625])
    batch = _rewards_batch([1, 0, 0, 0, 1, 1, 0.5, 0], [0] * 4 + [1] * 4)
    BNPO(BNPOConfig(norm_alpha=1.0, norm_beta=1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], expected)
    single = _rewards_batch([1, 1, 0.5, 0], [3] * 4)
    algo = BNPO(BNPOConfig())
    algo.prepare(single)
    assert algo.fitted == (1.0, 1.0)
    assert_close(single.fields["advantages"], expected[4:])


def test_bnpo_fitted_three_halves_is_proportional_to_grpo():
    """Binary rewards, G = 4, group means p̂ = (0.25, 0.5, 0.75): m = 0.5, unbiased v = (0.0625 + 0 + 0.0625)/2 = 1/16,
    m(1−m)/v − 1 = 4 − 1 = 3 ⇒ a = b = 1.5 ⇒ α = β = 1 + 1.5/3 = 3/2. Beta(3/2, 3/2) = (8/π)√(p(1−p)):
    p = 0.25: √0.1875 = 0.4330127, 1/pdf = π/(8·0.4330127) = 0.9068997 ⇒ A = 0.75·0.9068997 = 0.6801748, −0.25·… = −0.2267249;
    p = 0.5:  1/pdf = π/4 = 0.7853982 ⇒ A = ±0.3926991;   p = 0.75 mirrors p = 0.25.
    GRPO: std_g = √(4/3·p(1−p)) ⇒ A_BNPO / A_GRPO = π/8·√(4/3) = 0.4534498 for every row."""
    rewards = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    groups = [0] * 4 + [1] * 4 + [2] * 4
    batch = _rewards_batch(rewards, groups)
    algo = BNPO(BNPOConfig())
    algo.prepare(batch)
    assert algo.fitted == pytest.approx((1.5, 1.5))
    a, b = 0.6801748, 0.2267249
    assert_close(batch.fields["advantages"], torch.tensor([a, -b, -b, -b, 0.3926991, 0.3926991, -0.3926991, -0.3926991,
                                                           b, b, b, -a]))
    grpo = _rewards_batch(rewards, groups)
    GRPO(GRPOConfig()).prepare(grpo)
    assert_close(batch.fields["advantages"], math.pi / 8 * math.sqrt(4 / 3) * grpo.fields["advantages"], rtol=1e-5, atol=1e-6)


def test_bnpo_asymmetric_fit_and_fixed_parameters():
    """Fit on p̂ = (0.25, 0.25, 0.5): m = 1/3, v = ((1/12)²·2 + (1/6)²)/2 = 1/48, m(1−m)/v − 1 = (2/9)·48 − 1 = 29/3
    ⇒ a = 29/9, b = 58/9 ⇒ α = 1 + 29/27 = 2.0740741, β = 1 + 58/27 = 3.1481481.
    Fixed α = 2, β = 1: pdf = 2p; group (1, 0, 0, 0): p = 0.25, 1/pdf = 2 ⇒ A = 2(R − 0.25) = (1.5, −0.5, −0.5, −0.5)."""
    assert fit_beta(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)) == pytest.approx((56 / 27, 85 / 27))
    assert_close(beta_pdf(torch.tensor([0.0, 0.25, 1.0]), 2.0, 1.0), torch.tensor([0.0, 0.5, 2.0]))
    batch = _rewards_batch([1, 0, 0, 0], [0] * 4)
    BNPO(BNPOConfig(norm_alpha=2.0, norm_beta=1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_bnpo_defaults_and_validation():
    """Official run.sh: ε = (0.2, 0.28), seq-mean-token-sum, no KL; rewards outside [reward_min, reward_max] name the fix;
    rewards in [−1, 1] with reward_min = −1 map onto [0, 1]: (1, −1) ⇒ s = (1, 0), p = 0.5, α = β = 1 ⇒ A = (0.5, −0.5)."""
    c = BNPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.aggregation, c.beta) == (0.2, 0.28, "seq-mean-token-sum", 0.0)
    assert not BNPO(c).needs.reference and BNPO(c).needs.groups
    with pytest.raises(ValueError, match="reward_min/reward_max"):
        BNPO(c).prepare(_rewards_batch([2.0, 1.0], [0, 0]))
    batch = _rewards_batch([1.0, -1.0], [0, 0])
    BNPO(BNPOConfig(reward_min=-1.0)).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))
    for bad in ({"scale_rewards": "group"}, {"reward_max": 0.0}, {"norm_alpha": 0.0}):
        with pytest.raises(ValueError):
            BNPOConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# REC / OPMD


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

    batch = _rewards_batch([1.0, 0.0, 3.0], [0, 0, 1])
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
# TEMPO


def test_tempo_two_responses_differ_at_one_token():
    """Group of two, completions (3, 4, 5, 6) R = 1 and (3, 4, 7, 6) R = 0, differing only at token k = 2. GRPO:
    A = ±(0.5/0.7071068) = ±0.7071061 (eps 1e-6). At k = 2 the shared node (V = 0.5) splits into two leaves of one
    completion each (V = R): TD = R_i − 0.5 = ±0.5 = ±(R_1 − R_2)/2; every other token gets exactly the GRPO advantage."""
    batch = _groups([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    TEMPO(TEMPOConfig()).prepare(batch)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = batch.fields["advantages"][batch.completion_mask.bool()].view(2, 4)
    assert_close(adv, torch.tensor([[a, a, a + 0.5, a], [-a, -a, -a - 0.5, -a]]))
    grpo = _groups([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    GRPO(GRPOConfig()).prepare(grpo)
    non_branch = adv[:, [0, 1, 3]]
    assert torch.equal(non_branch, grpo.fields["advantages"][:, None].expand(2, 3))  # exactly, not approximately
    assert float(batch.fields["advantages"][~batch.completion_mask.bool()].abs().max()) == 0.0


def test_tempo_tree_hand():
    """Completions (1, 2, 3) R = 1, (1, 2, 4) R = 0, (1, 5, 6) R = 1. Tree: root V = 2/3 (3 completions) → [1] (3, V 2/3,
    no branch) → [1, 2] (2, V 0.5) and [1, 5] (1, V 1) → leaves. TD per token:
    c1: (0, 0.5 − 2/3 = −1/6, 1 − 0.5 = +0.5);  c2: (0, −1/6, 0 − 0.5 = −0.5);  c3: (0, 1 − 2/3 = +1/3, 0: [1, 5] → [1, 5, 6]
    keeps its one completion, no branch). Along each path the TD terms telescope to R_i − mean_g R (1/3, −2/3, 1/3).
    A completion that is a prefix of another: (1, 2) R = 1 and (1, 2, 3) R = 0: only token 3 branches (the shorter one
    ends there): TD = 0 − 0.5 = −0.5; the shorter one gets no TD."""
    td = prefix_td([[1, 2, 3], [1, 2, 4], [1, 5, 6]], [1.0, 0.0, 1.0])
    assert_close(torch.tensor(td), torch.tensor([[0.0, -1 / 6, 0.5], [0.0, -1 / 6, -0.5], [0.0, 1 / 3, 0.0]]))
    assert [sum(t) for t in td] == pytest.approx([1 / 3, -2 / 3, 1 / 3])
    assert prefix_td([[1, 2], [1, 2, 3]], [1.0, 0.0]) == [[0.0, 0.0], [0.0, 0.0, -0.5]]
    batch = _groups([[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3]], [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 1])
    TEMPO(TEMPOConfig()).prepare(batch)
    # groups are separate trees: the last row is a group of one (GRPO A = 0, no branching)
    grpo = torch.tensor([1 / 3, -2 / 3, 1 / 3]) / (math.sqrt(1 / 3) + 1e-6)
    adv = batch.fields["advantages"][batch.completion_mask.bool()].view(4, 3)
    assert_close(adv[:3], grpo[:, None] + torch.tensor(td))
    assert float(adv[3].abs().max()) == 0.0


def test_tempo_loss_is_grpo_loss_with_token_advantages():
    """On-policy (ρ = 1), token-mean over the 8 tokens of the two-response group: ∂L/∂ℓ_t = −A_{i,t}/8, i.e. GRPO's
    −A_i/8 plus ∓0.5/8 = ∓0.0625 at the branching token; without branches (identical completions) TEMPO = GRPO exactly."""
    batch = _groups([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    algo = TEMPO(TEMPOConfig())
    algo.prepare(batch)
    batch.fields["old_logps"] = torch.zeros_like(batch.completion_mask) - 1.0
    lp = _leaf(batch.fields["old_logps"])
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    assert_close(lp.grad, -batch.fields["advantages"] * batch.completion_mask / 8)
    assert res.metrics["tempo/td_token_fraction"] == pytest.approx(2 / 8)

    same = [_groups([[3, 4, 5], [3, 4, 5]], [1.0, 0.0], [0, 0]) for _ in range(2)]
    grads = []
    for algo, b in zip((TEMPO(TEMPOConfig()), GRPO(GRPOConfig())), same):
        algo.prepare(b)
        b.fields["old_logps"] = torch.full_like(b.completion_mask, -1.0)
        lp = _leaf(b.fields["old_logps"] + 0.1)
        algo.loss(b, PolicyOutput(lp)).loss.backward()
        grads.append(lp.grad)
    assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------
# GTPO


def test_gtpo_no_shared_first_or_last_token_delta_is_one():
    """Positive (5, 6, 7) and negative (8, 6, 9): position 0 holds 5 vs 8 and the last position 7 vs 9, so neither run
    starts ⇒ δ ≡ 1 and no conflict tokens (the shared 6 in the middle is not a run)."""
    deltas, counts = conflict_delta([[5, 6, 7], [8, 6, 9]], [0.5, -0.5], 2.0)
    assert deltas == [[1.0] * 3, [1.0] * 3] and counts == [0, 0]


def test_gtpo_conflict_mask_hand():
    """R = (1, 0, 0) ⇒ A = (2/3, −1/3, −1/3). pos (5, 6, 7, 1, 9), neg₁ (5, 6, 8, 9), neg₂ (5, 4, 7, 2, 9).
    Forward (position, token) pairs in both a positive and a negative: (0,5), (1,6), (2,7), (4,9).
      pos run 3 (5, 6, 7; (3,1) is not shared); neg₁ run 2 ((2,8) not shared); neg₂ run 1 ((1,4) not shared).
    Backward (position from the end): pos 9,1,7,6,5; neg₁ 9,8,6,5; neg₂ 9,2,7,4,5 ⇒ shared (0,9), (2,7), (4,5):
      every run is 1 (the final 9), since position 1 from the end differs.
    δ = δ_fwd·δ_bwd, W = 2 on a positive's runs, 0 on a negative's:
      pos  (2, 2, 2, 1, 1)·(1, 1, 1, 1, 2) = (2, 2, 2, 1, 2), n = 3 + 1 = 4
      neg₁ (0, 0, 1, 1)·(1, 1, 1, 0)       = (0, 0, 1, 0),    n = 3
      neg₂ (0, 1, 1, 1, 1)·(1, 1, 1, 1, 0) = (0, 1, 1, 1, 0), n = 2
    Loss with mean entropies (0.5, 0.8, 0.2): A' = 2/3 − 0.05 = 0.6166667; 0.8 > 0.7 ⇒ 0; −1/3 − 0.02 = −0.3533333.
    Per completion −A'Σδ/(|y|·n): pos −0.6166667·9/(5·4) = −0.2775; neg₁ 0; neg₂ 0.3533333·3/(5·2) = 0.106;
    loss = (−0.2775 + 0.106)/3 = −0.0571667. ∂L/∂ℓ_t = −A'δ_t/(|y| n B): pos −0.6166667·δ/60 ⇒ −0.0205556 (δ 2),
    −0.0102778 (δ 1); neg₂ 0.3533333·δ/30 ⇒ 0.0117778 on δ = 1, 0 on δ = 0."""
    comps = [[5, 6, 7, 1, 9], [5, 6, 8, 9], [5, 4, 7, 2, 9]]
    ent = [0.5, 0.8, 0.2]
    batch = _groups(comps, [1.0, 0.0, 0.0], [0, 0, 0], token=[{"ent": [e] * len(c)} for c, e in zip(comps, ent)])
    algo = GTPO(GTPOConfig())
    assert not algo.needs.old_logps and not algo.needs.reference
    algo.prepare(batch)
    m = batch.completion_mask.bool()
    delta = [batch.fields["gtpo_delta"][i][m[i]].tolist() for i in range(3)]
    assert delta == [[2, 2, 2, 1, 2], [0, 0, 1, 0], [0, 1, 1, 1, 0]]
    assert batch.fields["gtpo_conflicts"].tolist() == [4, 3, 2]
    assert float(batch.fields["gtpo_delta"][~m].abs().max()) == 0.0
    lp = _leaf(torch.full_like(batch.completion_mask, -1.0))
    res = algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"]))
    assert_close(res.loss, torch.tensor(-0.0571667))
    res.loss.backward()
    expected = [[-0.0205556] * 3 + [-0.0102778, -0.0205556], [0.0] * 4, [0.0, 0.0117778, 0.0117778, 0.0117778, 0.0]]
    assert [lp.grad[i][m[i]].tolist() for i in range(3)] == [pytest.approx(e, abs=1e-6) for e in expected]
    assert res.metrics["gtpo/entropy_kept_fraction"] == pytest.approx(2 / 3)


def test_gtpo_limits():
    """All-equal rewards ⇒ A = 0 ⇒ δ ≡ 1; the entropy shift still applies (as in the official code): H̄ = 0.1 ⇒
    A' = −0.01 ⇒ loss = (0.01 + 0.01)/2 = 0.01, ∂L/∂ℓ_t = 0.01/(|y|·2) = 0.0025 (|y| = 2), 0.0016667 (|y| = 3); with
    entropy_scale 0, zero loss and gradient. Low entropy, no shared tokens, entropy_scale 0 ⇒ per token −A/(|y| B):
    REINFORCE with the group-mean baseline, seq-mean-token-mean.
    A positive whose whole completion is a prefix run and a suffix run gets W² = 4 on tokens in both (official δ_fwd·δ_bwd)."""
    for scale, loss, grads in ((0.1, 0.01, (0.0025, 0.01 / 6)), (0.0, 0.0, (0.0, 0.0))):
        batch = _groups([[5, 6], [7, 8, 9]], [1.0, 1.0], [0, 0], token=[{"ent": [0.1] * 2}, {"ent": [0.1] * 3}])
        algo = GTPO(GTPOConfig(entropy_scale=scale))
        algo.prepare(batch)
        lp = _leaf(torch.zeros_like(batch.completion_mask))
        res = algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"]))
        res.loss.backward()
        assert float(res.loss.detach()) == pytest.approx(loss)
        m = batch.completion_mask.bool()
        assert lp.grad[0][m[0]].tolist() == pytest.approx([grads[0]] * 2) and lp.grad[1][m[1]].tolist() == pytest.approx([grads[1]] * 3)

    batch = _groups([[5, 6], [7, 8, 9]], [1.0, 0.0], [0, 0], token=[{"ent": [0.1] * 2}, {"ent": [0.1] * 3}])
    algo = GTPO(GTPOConfig(entropy_scale=0.0))
    algo.prepare(batch)
    lp = _leaf(torch.zeros_like(batch.completion_mask))
    algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"])).loss.backward()
    m = batch.completion_mask.bool()
    assert lp.grad[0][m[0]].tolist() == pytest.approx([-0.5 / 4] * 2) and lp.grad[1][m[1]].tolist() == pytest.approx([0.5 / 6] * 3)

    deltas, counts = conflict_delta([[5, 6], [5, 6]], [1.0, -1.0], 2.0)
    assert deltas == [[4.0, 4.0], [0.0, 0.0]] and counts == [2, 2]
    with pytest.raises(ValueError, match="entropy"):
        algo.loss(batch, PolicyOutput(lp))
    with pytest.raises(ValueError):
        GTPOConfig(conflict_weight=0.5)


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


_ALGOS = {"bnpo": lambda: BNPO(BNPOConfig()), "rec": lambda: REC(RECConfig(clip_mode="ring", weight="importance_sampling",
                                                                          regularizer="k2", tau=0.1)),
          "opmd": lambda: OPMD(OPMDConfig(baseline="logavgexp")), "tempo": lambda: TEMPO(TEMPOConfig(aggregation="seq-mean-token-mean")),
          "gtpo": lambda: GTPO(GTPOConfig())}


@pytest.mark.parametrize("name", list(_ALGOS))
def test_micro_batches_sum_to_full_batch(name):
    """Three groups of random completions over a 4-token vocabulary (so prefixes are shared and branch), run whole and
    as micro-batches of 2 rows (groups kept whole, each trimmed to its width): with batch.totals the micro-batch losses
    and gradients add up to the full-batch ones."""
    g = torch.Generator().manual_seed(11)
    seqs = []
    for i, (gid, r) in enumerate(zip([0, 0, 0, 1, 1, 2, 2, 2], [1, 0, 0, 1, 1, 0.5, 0, 1])):
        n = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(3, 7, (n,), generator=g).tolist()
        pol = -torch.rand(n, generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 3), ids, gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.2 * torch.randn(n, generator=g)).tolist(),
                               "ref_logps": (pol + 0.1 * torch.randn(n, generator=g)).tolist(),
                               "ent": (torch.rand(n, generator=g) * 0.8).tolist()}))
    batch = collate(seqs, pad_id=0)
    algo = _ALGOS[name]()
    algo.prepare(batch)
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch, entropy=lambda b: b.fields["ent"])
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.bnpo:BNPO", "tokalign.algorithms.rec:REC",
                                  "tokalign.algorithms.rec:OPMD", "tokalign.algorithms.tempo:TEMPO",
                                  "tokalign.algorithms.gtpo:GTPO"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train package.module:Class` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the
    run prints its checkpoint path, every logged loss is finite and the saved weights differ from the bundled model's."""
    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / "x"
    proc = cli("train", algo, "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--out", str(out),
               "--overwrite", "--quiet")
    assert proc.stdout.strip() == str(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    base = load_file(BUNDLED_MODEL / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 0
