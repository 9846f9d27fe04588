"""OTR (One-Token Rollout; see tokalign/algorithms/otr.py for the source): the sampled and the expected loss and their
gradients by hand, the sampled loss as the expectation under its candidates' empirical distribution and its K → ∞
limit, β = 0 ⇒ SFT's gradient reweighted by π(y), candidates that do not depend on the batch split, and a slow run
through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import train_changes_weights
from conftest import cli
from torch.testing import assert_close

from tokalign.algorithms.otr import OTR, OTRConfig, candidates, expected_token_loss, inverse_cdf, sampled_token_loss
from tokalign.algorithms.sft import SFT, SFTConfig
from tokalign.components.train_step import STEP_FIELD
from tokalign.protocols import PolicyOutput, TokenBatch

# π = softmax(0, ln 2, 0) = (0.25, 0.5, 0.25) at one completion position; the gold token is 1
Z = torch.tensor([[[0.0, math.log(2), 0.0]]])
GOLD = torch.tensor([[1]])


def _one_token_batch(z=Z, gold=GOLD, mask=None):
    b, t, _ = z.shape
    ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), gold], 1)
    mask = torch.ones(b, t) if mask is None else mask
    return TokenBatch(ids, torch.ones_like(ids), mask, {}, {})




def test_sampled_loss_hand():
    """K = 4 candidates (1, 0, 1, 2), β = 0.1: rewards (1, −0.1, 1, −0.1), log π = (ln .5, ln .25, ln .5, ln .25)
    L = −¼(2 ln .5 − 0.2 ln .25) = 0.4 ln 2 = 0.2772589; ∂L/∂z = −¼[Σ r_k e_{a_k} − (Σ r_k) π]
    = −¼[(−0.1, 2, −0.1) − 1.8 (0.25, 0.5, 0.25)] = (0.1375, −0.275, 0.1375). Two hits of four."""
    z = Z.clone().requires_grad_(True)
    gold_lp = torch.log_softmax(z, -1).gather(-1, GOLD.unsqueeze(-1)).squeeze(-1)
    loss, hit = sampled_token_loss(z, gold_lp, GOLD, torch.tensor([[[1, 0, 1, 2]]]), 0.1)
    assert_close(loss, torch.tensor([[0.4 * math.log(2)]]))
    loss.sum().backward()
    assert_close(z.grad, torch.tensor([[[0.1375, -0.275, 0.1375]]]))
    assert hit.tolist() == [[[True, False, True, False]]]


def test_expected_loss_hand():
    """β = 0.1. τ = 1: q = π, L = −[1.1·0.5 ln .5 − 0.1·(−1.5 ln 2)] = (0.55 − 0.15) ln 2 = 0.2772589 — the sampled case's
    value, as its candidates' frequencies (¼, ½, ¼) are π — and the same gradient (0.1375, −0.275, 0.1375).
    τ = 2: q ∝ (1, √2, 1) = (0.2928932, 0.4142136, 0.2928932), L = −[1.1 q_y ln .5 − 0.1 Σ q ln π] = 0.2059037,
    ∂L/∂z = −[1.1 q_y (e_y − π) − 0.1 (q − π)] = (0.1181981, −0.2363961, 0.1181981)."""
    for tau, value, grad in [(1.0, 0.4 * math.log(2), [0.1375, -0.275, 0.1375]),
                             (2.0, 0.2059037, [0.1181981, -0.2363961, 0.1181981])]:
        z = Z.clone().requires_grad_(True)
        gold_lp = torch.log_softmax(z, -1).gather(-1, GOLD.unsqueeze(-1)).squeeze(-1)
        res = OTR(OTRConfig(estimator="expected", temperature=tau)).loss(_one_token_batch(), PolicyOutput(gold_lp, logits=z))
        assert_close(res.loss, torch.tensor(value))
        res.loss.backward()
        assert_close(z.grad, torch.tensor([[grad]]))
    assert res.metrics["otr/gold_prob"] == pytest.approx(0.4142136)
    assert res.metrics["otr/nll"] == pytest.approx(math.log(2))


def _random_case(seed: int, b=2, t=3, v=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v, generator=g) * 1.5
    gold = torch.randint(0, v, (b, t), generator=g)
    return z, gold


def _loss_and_grad(fn, z, gold):
    z = z.clone().requires_grad_(True)
    gold_lp = torch.log_softmax(z, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    loss = fn(z, gold_lp)
    loss.sum().backward()
    return loss.detach(), z.grad


def test_sampled_is_the_expectation_over_its_candidates_and_tends_to_the_expected_loss():
    """For any candidates, the sampled loss is −Σ_a q̂(a) r(a) log π(a) with q̂ their empirical frequencies (exact); with
    K = 20000 candidates drawn from q = softmax(z / τ), loss and gradient are the expected estimator's within MC error."""
    z, gold = _random_case(0)
    tau, beta = 1.3, 0.25
    cands = torch.randint(0, 5, (2, 3, 7), generator=torch.Generator().manual_seed(1))
    loss, _ = sampled_token_loss(z, torch.log_softmax(z, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1), gold, cands, beta)
    q_hat = torch.nn.functional.one_hot(cands, 5).float().mean(-2)
    reward = torch.where(torch.nn.functional.one_hot(gold, 5).bool(), 1.0, -beta)
    assert_close(loss, -(q_hat * reward * torch.log_softmax(z, -1)).sum(-1))

    k = 20_000
    u = torch.rand(2 * 3, k, generator=torch.Generator().manual_seed(2))
    big = inverse_cdf(torch.softmax(z / tau, -1).reshape(6, 5), u).reshape(2, 3, k)
    sampled = _loss_and_grad(lambda zz, lp: sampled_token_loss(zz, lp, gold, big, beta)[0], z, gold)
    expected = _loss_and_grad(lambda zz, lp: expected_token_loss(zz, lp, gold, tau, beta)[0], z, gold)
    assert_close(sampled[0], expected[0], atol=0.03, rtol=0)
    assert_close(sampled[1], expected[1], atol=0.01, rtol=0)
    assert float(expected[1].abs().max()) > 0.05


def test_beta0_expected_is_sft_gradient_weighted_by_the_gold_probability():
    """β = 0, τ = 1: ∂L/∂ℓ(y_t) = π(y_t) · SFT's ∂L/∂ℓ(y_t) (token-mean over the same mask), and nothing else reaches
    the logits' other entries beyond what flows through ℓ."""
    z, gold = _random_case(3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    batch = _one_token_batch(z, gold, mask)
    gold_lp = torch.log_softmax(z, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    grads = {}
    for name, algo in {"otr": OTR(OTRConfig(estimator="expected", penalty=0.0)), "sft": SFT(SFTConfig())}.items():
        lp = gold_lp.clone().requires_grad_(True)
        algo.loss(batch, PolicyOutput(lp, logits=z)).loss.backward()
        grads[name] = lp.grad
    assert_close(grads["otr"], gold_lp.exp() * grads["sft"])
    assert float(grads["otr"].abs().min()) == 0.0 and float(grads["otr"].abs().max()) > 0


def test_inverse_cdf_never_draws_a_zero_probability_token():
    """p = (0.2, 0, 0.8): u = 0.1 → 0; u = 0.2 (exactly the first cumulative mass) → 2, not the empty token 1."""
    assert inverse_cdf(torch.tensor([[0.2, 0.0, 0.8]]), torch.tensor([[0.1, 0.2, 0.5, 0.999]])).tolist() == [[0, 2, 2, 2]]


def test_candidates_follow_the_row_and_step_not_the_batch_split():
    """A row draws the same candidates alone or in a batch (its generator is seeded by its own token ids and the step);
    another step draws others; prompt positions (mask 0) keep the gold token."""
    z, gold = _random_case(4, b=3, t=4)
    mask = torch.tensor([[0.0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]])
    batch = _one_token_batch(z, gold, mask)
    batch.input_ids[:, 0] = torch.tensor([5, 6, 7])  # rows differ also where the prompt is
    whole = candidates(z, batch, 6, 1.0, seed=0, step=3)
    for r in range(3):
        one = TokenBatch(batch.input_ids[r:r + 1], batch.attention_mask[r:r + 1], mask[r:r + 1], {}, {})
        assert torch.equal(candidates(z[r:r + 1], one, 6, 1.0, seed=0, step=3), whole[r:r + 1])
    assert not torch.equal(candidates(z, batch, 6, 1.0, seed=0, step=4), whole)
    assert torch.equal(whole[mask == 0], gold[mask == 0].unsqueeze(-1).expand(-1, 6))


def test_the_loss_draws_by_the_step_component():
    """The sampled estimator asks for the step (``TrainStep``) and its loss changes with ``train_step``."""
    algo = OTR(OTRConfig(num_candidates=2))
    assert [c.name for c in algo.needs.components] == ["train_step"] and algo.needs.full_vocab
    assert OTR(OTRConfig(estimator="expected")).needs.components == ()
    z, gold = _random_case(5)
    losses = set()
    for step in range(4):
        batch = _one_token_batch(z, gold)
        batch.fields[STEP_FIELD] = torch.full((2,), float(step))
        lp = torch.log_softmax(z, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
        losses.add(round(float(algo.loss(batch, PolicyOutput(lp, logits=z)).loss), 6))
    assert len(losses) > 1


@pytest.mark.parametrize("bad,msg", [({"num_candidates": 0}, "num_candidates"), ({"temperature": 0.0}, "temperature"),
                                     ({"penalty": -1.0}, "penalty"), ({"estimator": "exact"}, "estimator")])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        OTRConfig(**bad)


def _completions(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(3) for b in range(2)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["sample", "expected"])
def test_otr_through_the_cli(tmp_path, estimator):
    metrics = train_changes_weights(tmp_path, "otr", "--data", _completions(tmp_path), "--set", f"algorithm.estimator={estimator}")
    key = "otr/hit_rate" if estimator == "sample" else "otr/gold_prob"
    assert all(0 <= m[key] <= 1 for m in metrics)


def test_a_bad_setting_is_one_line(tmp_path):
    proc = cli("train", "otr", "--data", _completions(tmp_path), "--set", "algorithm.num_candidates=0", "--out",
               str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "num_candidates must be a whole number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
