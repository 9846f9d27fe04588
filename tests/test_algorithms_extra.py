"""RLOO, REINFORCE++-baseline, GSPO and SimPO on hand cases (TokenBatch and PolicyOutput built directly, expected
numbers worked out in each docstring), their limiting cases, the shared ops they added (``leave_one_out_mean``,
``masked_whiten``), and a slow end-to-end run of each through the real CLI. CPU only, seeded.

Reference: /work/shared/reference/algorithms.md §1–2. TRL parity: tests/test_trl_parity_extra.py.
Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, A = advantage, m = mask, ℓ̄ = mean token log-prob.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli, leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.grpo import GRPO
from tokalign.algorithms.gspo import GSPO, GSPOConfig
from tokalign.algorithms.reinforce_pp import ReinforcePPBaseline, ReinforcePPBaselineConfig
from tokalign.algorithms.rloo import RLOO, RLOOConfig
from tokalign.algorithms.simpo import SimPO, SimPOConfig
from tokalign.protocols import PolicyOutput, TokenBatch
from tokalign.batching import Seq, collate, micro_batches



# ---------------------------------------------------------------------------------------------------
# RLOO


def test_rloo_leave_one_out_advantages():
    """A_i = R_i − mean_{j≠i} R_j.  G=2, R=(1, 0): (1 − 0, 0 − 1) = (1, −1).  All-equal group (2, 2): 0.
    G=3, R=(1, 0, 0): (1 − 0, 0 − 0.5, 0 − 0.5) = (1, −0.5, −0.5) = 3/2·(R − 1/3).  A group of one: 0."""
    batch = _batch(torch.ones(8, 2), {"rewards": torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 5.0]),
                                      "group_ids": torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])})
    RLOO(RLOOConfig()).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -0.5, -0.5, 0.0]))
    assert_close(ops.leave_one_out_mean(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([7, 7, 7])), torch.tensor([0.0, 0.5, 0.5]))


def test_rloo_loss_is_grpo_loss_hand():
    """RLOO trains with GRPO's surrogate. R = (1, 0) ⇒ A = (1, −1); on-policy (ρ = 1), token-mean,
    mask [[1, 1], [1, 0]]: L = (−1 − 1 + 1)/3 = −1/3;  ∂L/∂ℓ_t = −A_i/3: row 0 (−1/3, −1/3), row 1 (1/3, 0).
    All-equal rewards ⇒ A = 0 ⇒ zero loss and gradient."""
    old = torch.tensor([[-1.0, -0.5], [-2.0, 0.0]])
    batch = _batch([[1.0, 1.0], [1.0, 0.0]], {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                              "old_logps": old})
    algo = RLOO(RLOOConfig())
    assert isinstance(algo, GRPO) and algo.needs.groups and not algo.needs.reference
    algo.prepare(batch)
    lp = _leaf(old)
    res = algo.loss(batch, PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(-1 / 3))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))

    batch.fields["rewards"] = torch.tensor([0.5, 0.5])
    algo.prepare(batch)
    lp = _leaf(old + 0.3)
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    assert float(res.loss.detach()) == 0.0 and float(lp.grad.abs().max()) == 0.0


def test_rloo_config_rejects_std_scaling():
    with pytest.raises(ValueError, match="scale_rewards must be none"):
        RLOOConfig(scale_rewards="group")


# ---------------------------------------------------------------------------------------------------
# REINFORCE++-baseline


def _rpp_hand_batch():
    """Groups (1, 0 | 1, 1), completion lengths (2, 1, 1, 1)."""
    mask = [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    return _batch(mask, {"rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "group_ids": torch.tensor([0, 0, 1, 1])})


def test_reinforce_pp_baseline_hand_tokens():
    """c = R − mean_g R = (0.5, −0.5, 0, 0). Whitened over the 5 completion tokens (row 0 counts twice):
    μ = (2·0.5 − 0.5)/5 = 0.1;  c − μ = (0.4, −0.6, −0.1, −0.1);
    σ² = (2·0.16 + 0.36 + 0.01 + 0.01)/(5 − 1) = 0.7/4 = 0.175, σ = 0.4183300;
    A = (0.9561829, −1.4342743, −0.2390457, −0.2390457). The all-equal group is pushed down: its tokens sit below
    the token-weighted batch mean."""
    batch = _rpp_hand_batch()
    ReinforcePPBaseline(ReinforcePPBaselineConfig()).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([0.9561829, -1.4342743, -0.2390457, -0.2390457]))


def test_reinforce_pp_baseline_hand_seqs():
    """whiten_over="seqs": c = (0.5, −0.5, 0, 0), μ = 0, σ² = (0.25 + 0.25)/3 = 1/6 ⇒ A = ±0.5·√6 = ±1.2247449, 0, 0."""
    batch = _rpp_hand_batch()
    ReinforcePPBaseline(ReinforcePPBaselineConfig(whiten_over="seqs")).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([1.2247449, -1.2247449, 0.0, 0.0]))


@pytest.mark.parametrize("whiten_over", ["tokens", "seqs"])
def test_reinforce_pp_baseline_batch_mean_0_std_1(whiten_over):
    """6 groups × 4 samples, random rewards and lengths 1–7: the advantages have (token- or row-weighted) batch mean 0
    and unbiased std 1; with whiten_over="tokens" the stored per-row advantage equals verl's per-token whitening of
    the broadcast centred reward, ops.masked_whiten(c ⊗ 1, mask)."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 8, (24,), generator=g)
    mask = (torch.arange(7) < lengths[:, None]).float()
    rewards = torch.randint(0, 3, (24,), generator=g).float() * torch.rand(24, generator=g)
    group_ids = torch.arange(24) // 4
    batch = _batch(mask, {"rewards": rewards, "group_ids": group_ids})
    ReinforcePPBaseline(ReinforcePPBaselineConfig(whiten_over=whiten_over)).prepare(batch)
    adv = batch.fields["advantages"]
    if whiten_over == "tokens":
        flat = adv[:, None].expand_as(mask)[mask.bool()]
        centred = ops.group_advantages(rewards, group_ids, "none")
        assert_close(ops.masked_whiten(centred[:, None].expand_as(mask), mask) * mask, adv[:, None] * mask)
    else:
        flat = adv
    assert_close(flat.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(flat.std(), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_reinforce_pp_baseline_defaults_and_validation():
    """KL as a loss term, k2, β = 1e-3 (OpenRLHF's reinforce_baseline recipe) ⇒ a reference model is loaded."""
    c = ReinforcePPBaselineConfig()
    assert (c.beta, c.kl_estimator, c.whiten_over, c.scale_rewards) == (1e-3, "k2", "tokens", "none")
    assert ReinforcePPBaseline(c).needs.reference
    with pytest.raises(ValueError, match="whiten_over"):
        ReinforcePPBaselineConfig(whiten_over="groups")


# ---------------------------------------------------------------------------------------------------
# GSPO


def _gspo_hand():
    """mask [[1,1,1],[1,1,0]], A = (1, −0.5); token ratios row 0 (1.2, 0.9, 1), row 1 (e^0.1, e^−0.3)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    log_ratio = torch.tensor([[math.log(1.2), math.log(0.9), 0.0], [0.1, -0.3, 0.0]])
    batch = _batch([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], {"advantages": torch.tensor([1.0, -0.5]), "old_logps": old})
    return batch, PolicyOutput(_leaf(old + log_ratio))


def test_gspo_hand_unclipped():
    """ε = 0.2. s_0 = (1.2·0.9·1)^{1/3} = 1.08^{1/3} = 1.0259856, s_1 = exp((0.1 − 0.3)/2) = e^{−0.1} = 0.9048374, both in
    [0.8, 1.2]. Per-token L = −A s: row 0 −1.0259856, row 1 0.4524187; seq-mean-token-mean = (−1.0259856 + 0.4524187)/2
    = −0.2867834.  ∂L/∂ℓ_t = −A s/(B|y|): row 0: −1.0259856/6 = −0.1709976 on each token; row 1: 0.4524187/4 = 0.1131047.
    (Token-level GRPO would weight each token by its own ratio instead.)"""
    batch, out = _gspo_hand()
    res = GSPO(GSPOConfig(epsilon_low=0.2, epsilon_high=0.2)).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.2867834))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.1709976] * 3, [0.1131047, 0.1131047, 0.0]]))
    assert res.metrics["clip_fraction"] == 0.0
    assert res.metrics["seq_ratio/mean"] == pytest.approx((1.0259856 + 0.9048374) / 2)


def test_gspo_hand_default_band_clips():
    """Defaults ε = (3e-4, 4e-4): s_0 = 1.026 > 1.0004 with A > 0 ⇒ L = −1.0004; s_1 = 0.905 < 0.9997 with A < 0 ⇒
    L = max(0.5·0.9048, 0.5·0.9997) = 0.49985. Loss (−1.0004 + 0.49985)/2 = −0.250275, zero gradient, every token
    clipped."""
    batch, out = _gspo_hand()
    res = GSPO(GSPOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.250275))
    res.loss.backward()
    assert float(out.logps.grad.abs().max()) == 0.0
    assert res.metrics["clip_fraction"] == 1.0


def test_gspo_equal_token_ratios_is_sequence_ratio_and_grpo():
    """Every token ratio = r = 1.0002 (inside the band) ⇒ s = r, L_t = −A r, and ∂L/∂ℓ_t = −A r/(B|y|) =
    the token-level GRPO loss with the same band and aggregation, value and gradient. A = (1, −2), lengths (3, 1):
    loss = (−1.0002 + 2.0004)/2 = 0.5001;  grad row 0: −1.0002/6 = −0.1667, row 1: 2.0004/2 = 1.0002."""
    r = 1.0002
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]])
    batch = _batch([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], {"advantages": torch.tensor([1.0, -2.0]), "old_logps": old})
    grads, losses = [], []
    for algo in (GSPO(GSPOConfig()), GRPO(GSPOConfig())):
        lp = _leaf(old + math.log(r))
        res = algo.loss(batch, PolicyOutput(lp))
        res.loss.backward()
        losses.append(res.loss.detach())
        grads.append(lp.grad)
    assert_close(losses[0], torch.tensor(0.5001))
    assert_close(grads[0], torch.tensor([[-r / 6] * 3, [r, 0.0, 0.0]]))
    assert_close(losses[0], losses[1])
    assert_close(grads[0], grads[1])


def test_gspo_defaults_and_micro_batches():
    """Defaults: ε (3e-4, 4e-4), seq-mean-token-mean, no KL, GRPO advantages. Three groups of random rows run whole
    and as micro-batches of 2 rows: the micro-batch losses and gradients add up to the full-batch ones."""
    c = GSPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.aggregation, c.beta, c.scale_rewards) == (3e-4, 4e-4, "seq-mean-token-mean", 0.0, "group")
    g = torch.Generator().manual_seed(7)
    seqs = []
    for i, (n, gid, r) in enumerate(zip([2, 3, 1, 4, 1, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])):
        pol = -torch.rand(n, generator=g)
        seqs.append(Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 1e-3 * torch.randn(n, generator=g)).tolist()}))
    batch = collate(seqs, pad_id=0)
    algo = GSPO(c)
    algo.prepare(batch)
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# SimPO


def _pair(chosen, rejected, mask_c, mask_r) -> tuple[TokenBatch, PolicyOutput]:
    """One pair: row 0 chosen, row 1 rejected; no reference log-probs."""
    fields = {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    return _batch([mask_c, mask_r], fields), PolicyOutput(_leaf([chosen, rejected]))


def test_simpo_equal_means_is_softplus_gamma():
    """ℓ̄_w = ℓ̄_l (−1.5 over 2 tokens, −1.5 over 3 tokens) ⇒ L = −log σ(−γ) = log(1 + e^γ); γ = 0.5: 0.9740770.
    dL/dΔ̄ = −β σ(γ) = −2·0.6224593 = −1.2449187 ⇒ −1.2449187/2 = −0.6224593 per chosen token,
    +1.2449187/3 = 0.4149729 per rejected token."""
    batch, out = _pair([-1.0, -2.0, 0.0], [-1.5, -1.0, -2.0], [1, 1, 0], [1, 1, 1])
    res = SimPO(SimPOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.9740770))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.6224593, -0.6224593, 0.0], [0.4149729] * 3]))


def test_simpo_hand_margin():
    """β = 2, γ = 0.5. ℓ_w = (−1, −2) ⇒ ℓ̄_w = −1.5;  ℓ_l = (−3, −1, −2) ⇒ ℓ̄_l = −2;  z = 2·0.5 − 0.5 = 0.5.
    L = −log σ(0.5) = log(1 + e^{−0.5}) = 0.4740770;  dL/dz = −σ(−0.5) = −0.3775407 ⇒
    ∂L/∂ℓ_w,t = −0.3775407·β/2 = −0.3775407,  ∂L/∂ℓ_l,t = +0.3775407·β/3 = 0.2516938.
    metrics: rewards/chosen = βℓ̄_w = −3, rewards/rejected = −4, margin 1, accuracy 1."""
    batch, out = _pair([-1.0, -2.0, 0.0], [-3.0, -1.0, -2.0], [1, 1, 0], [1, 1, 1])
    res = SimPO(SimPOConfig(beta=2.0, gamma=0.5)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.4740770))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.3775407, -0.3775407, 0.0], [0.2516938] * 3]))
    assert res.metrics == pytest.approx({"rewards/chosen": -3.0, "rewards/rejected": -4.0, "rewards/margin": 1.0,
                                         "rewards/accuracy": 1.0})


def test_simpo_gamma0_single_tokens_is_reference_free_dpo():
    """Limiting case: one-token completions make ℓ̄ = Σℓ, so with γ = 0 SimPO(β) is DPO(β) with ℓ_ref ≡ 0."""
    g = torch.Generator().manual_seed(3)
    seqs = [Seq([1, 2], [5], p, row={"is_chosen": float(ch)}, token={"pol": [-float(torch.rand(1, generator=g)) * 3]})
            for p in range(3) for ch in (1, 0)]
    batch = collate(seqs, pad_id=0)
    batch.fields["ref_logps"] = torch.zeros_like(batch.fields["pol"])
    a, b = _leaf(batch.fields["pol"]), _leaf(batch.fields["pol"])
    simpo = SimPO(SimPOConfig(beta=0.7, gamma=0.0)).loss(batch, PolicyOutput(a)).loss
    dpo = DPO(DPOConfig(beta=0.7)).loss(batch, PolicyOutput(b)).loss
    simpo.backward()
    dpo.backward()
    assert_close(simpo, dpo)
    assert_close(a.grad, b.grad)


def test_simpo_needs_and_micro_batches():
    """Reference-free pairs; with totals["groups"] the per-pair micro-batch losses sum to the batch mean."""
    algo = SimPO(SimPOConfig())
    assert algo.needs.data == ("pairs",) and algo.needs.reference is False
    g = torch.Generator().manual_seed(4)
    seqs = [Seq([1, 2], list(range(5, 5 + n)), p, row={"is_chosen": float(ch)},
                token={"pol": (-torch.rand(n, generator=g) * 3).tolist()})
            for p, ns in enumerate([(2, 3), (1, 1), (4, 2)]) for n, ch in zip(ns, (1, 0))]
    batch = collate(seqs, pad_id=0)
    full = algo.loss(batch, PolicyOutput(batch.fields["pol"])).loss
    parts = [algo.loss(mb, PolicyOutput(mb.fields["pol"])).loss for mb in micro_batches(batch, 2)]
    assert len(parts) == 3
    assert_close(sum(parts), full)
    with pytest.raises(ValueError, match="beta"):
        SimPOConfig(beta=0.0)


# ---------------------------------------------------------------------------------------------------
# the real CLI

_PREFS = [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo", "reinforce_pp_baseline", "gspo", "simpo"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train ALGO` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples; SimPO on a
    conversational TRL preference JSONL): the run prints its checkpoint path, every logged loss is finite and the
    saved weights differ from the bundled model's."""
    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / f"x-{algo}"
    if algo == "simpo":
        data = tmp_path / "prefs.jsonl"
        data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                            "chosen": [{"role": "assistant", "content": c}],
                                            "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                                for q, c, r in _PREFS))
        args = ["--data", str(data)]
    else:
        args = ["--data", "arith", "--n", "4"]
    proc = cli("train", algo, *args, "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--overwrite", "--quiet")
    assert proc.stdout.strip() == str(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    base = load_file(BUNDLED_MODEL / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 0
