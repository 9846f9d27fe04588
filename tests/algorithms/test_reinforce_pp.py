"""REINFORCE++ (arXiv:2501.03262): discounted token returns with the KL in the reward, whitened over the batch; and
REINFORCE++-baseline (the same paper's group-baseline variant): hand cases, the batch whitening (mean 0, std 1), its
defaults, and slow runs of both through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import train_changes_weights
from conftest import cli, token_batch
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.reinforce_pp import ReinforcePP, ReinforcePPConfig, ReinforcePPBaseline, ReinforcePPBaselineConfig
from tokalign.protocols import TokenBatch


# ---------------------------------------------------------------------------------------------------
# REINFORCE++


def _batch(rewards, mask, old=None, ref=None):
    mask = torch.tensor(mask)
    fields = {"rewards": torch.tensor(rewards), "group_ids": torch.arange(len(rewards))}
    if old is not None:
        fields.update(old_logps=torch.tensor(old), ref_logps=torch.tensor(ref))
    b, t = mask.shape
    return TokenBatch(torch.zeros(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long), mask, fields, {})


def test_hand_case_without_kl():
    """γ = 1, no KL: every token's return is its row's R. R = (1, 0), lengths (2, 1): token values (1, 1, 0),
    mean 2/3, unbiased variance ((1/3)²·2 + (2/3)²)/2 = 1/3 ⇒ A = (0.5773503, 0.5773503 | −1.1547005)."""
    batch = ReinforcePP(ReinforcePPConfig(kl_coef=0.0)).prepare(_batch([1.0, 0.0], [[1.0, 1.0], [1.0, 0.0]]))
    assert_close(batch.fields["advantages"], torch.tensor([[0.5773503, 0.5773503], [-1.1547005, 0.0]]))


def test_kl_in_the_reward_and_whitening():
    """kl_coef 0.5, γ = 1, R = 1 on a 2-token row with ℓ_old − ℓ_ref = (0.2, −0.4): r = (−0.1, 0.2 + 1) ⇒
    returns (1.1, 1.2); across a random batch the whitened advantages have masked mean 0 and std 1."""
    reward = ops.last_token_mask(torch.ones(1, 2)) * 1.0 - 0.5 * torch.tensor([[0.2, -0.4]])
    returns, _ = ops.gae(reward, torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    assert_close(returns, torch.tensor([[1.1, 1.2]]))
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    old, ref = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    batch = ReinforcePP(ReinforcePPConfig()).prepare(_batch(torch.rand(6, generator=g).tolist(), mask.tolist(), old.tolist(), ref.tolist()))
    a = batch.fields["advantages"]
    n = mask.sum()
    mean = (a * mask).sum() / n
    assert float(mean) == pytest.approx(0.0, abs=1e-6)
    assert float(((a - mean) ** 2 * mask).sum() / (n - 1)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_reinforce_pp_through_the_cli(tmp_path):
    cli("train", "reinforce_pp", "--data", "arith", "--max-steps", "2", "--batch-size", "2", "--n", "4", "--out", "R", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "R" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


# ---------------------------------------------------------------------------------------------------
# REINFORCE++-baseline


def _rpp_hand_batch():
    """Groups (1, 0 | 1, 1), completion lengths (2, 1, 1, 1)."""
    mask = [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    return token_batch(mask, {"rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "group_ids": torch.tensor([0, 0, 1, 1])})


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
    batch = token_batch(mask, {"rewards": rewards, "group_ids": group_ids})
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


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["reinforce_pp_baseline"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train ALGO` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the run prints its
    checkpoint path, every logged loss is finite (and every gradient norm positive) and the saved weights differ from
    the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4")
