"""``ops.gae`` over non-contiguous masks (multi-turn completions: the environment's replies have mask 0 between the
model's turns) and with per-position γ_t, λ_t tensors: a hand-computed two-turn row, the limiting case (removing the
gap changes nothing on the model's tokens), contiguous masks against the closed form Σ_k (γλ)^k δ_{t+k}, and constant
tensors equal to the floats. CPU only."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tokalign import ops


def test_two_turns_by_hand():
    """mask 1 1 0 0 1 1 (turn 1, the environment's reply, turn 2), γ = 0.9, λ = 0.8 (γλ = 0.72),
    r = (0, 0.1, 5, 0, 0, 1), V = (0.5, 0.4, 9, 9, 0.3, 0.2): the reply's reward 5 and values 9 are ignored.
    Model positions 0, 1, 4, 5; the next of 1 is 4 (the reply is skipped), 5 is the last (V = A = 0 after it):
      δ5 = 1 − 0.2 = 0.8                      A5 = 0.8
      δ4 = 0 + 0.9·0.2 − 0.3 = −0.12          A4 = −0.12 + 0.72·0.8 = 0.456
      δ1 = 0.1 + 0.9·0.3 − 0.4 = −0.03        A1 = −0.03 + 0.72·0.456 = 0.29832
      δ0 = 0 + 0.9·0.4 − 0.5 = −0.14          A0 = −0.14 + 0.72·0.29832 = 0.0747904
    returns = A + V on the model's tokens: (0.5747904, 0.69832, 0, 0, 0.756, 1.0); A = returns = 0 on the reply.
    (The contiguous reading would have reset the chain at the reply: A1 = 0.1 − 0.4 = −0.3, the first turn blind to
    the final reward.)"""
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0.1, 5, 0, 0, 1]])
    values = torch.tensor([[0.5, 0.4, 9, 9, 0.3, 0.2]])
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[0.0747904, 0.29832, 0, 0, 0.456, 0.8]]), atol=1e-6, rtol=0)
    assert_close(ret, torch.tensor([[0.5747904, 0.69832, 0, 0, 0.756, 1.0]]), atol=1e-6, rtol=0)


def test_per_token_gamma_by_hand():
    """mask 1 1 0 1, γ_t = (1, 0.5, ·, ·), λ = 1, V = 0, r = (0, 0, 0, 1): A3 = 1; A1 = 0 + 0.5·1 = 0.5 (γ_1 applies
    between position 1 and its next model position 3); A0 = 0 + 1·A1 = 0.5. γ_t at the reply is ignored (NaN here, and
    the result is still finite), at the last position it multiplies V = A = 0 (7 here)."""
    mask = torch.tensor([[1.0, 1, 0, 1]])
    gamma = torch.tensor([[1.0, 0.5, float("nan"), 7.0]])
    adv, ret = ops.gae(torch.tensor([[0.0, 0, 0, 1]]), torch.zeros(1, 4), mask, gamma, 1.0)
    assert_close(adv, torch.tensor([[0.5, 0.5, 0, 1]]))
    assert_close(ret, adv)


def _random_rows(seed: int, b: int = 6, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.4).float()
    mask[0] = 0  # a row without a model token
    return mask, torch.randn(b, t, generator=g), torch.randn(b, t, generator=g), torch.rand(b, t, generator=g), \
        torch.rand(b, t, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [False, True])
def test_removing_the_gaps_changes_nothing_on_model_tokens(seed, per_token):
    """Limiting case: each row's model tokens moved together (the mask-0 positions deleted) give the same advantages
    and returns on them as the row with its gaps; the deleted positions' rewards, values and γ, λ (random) do not
    matter. Random masks (one row with no model token), float or per-token γ, λ."""
    mask, rewards, values, gamma, lam = _random_rows(seed)
    if not per_token:
        gamma, lam = 0.9, 0.7
    adv, ret = ops.gae(rewards, values, mask, gamma, lam)
    for i in range(mask.shape[0]):
        keep = mask[i] > 0
        n = int(keep.sum())
        g, lm = (gamma[i][keep].unsqueeze(0), lam[i][keep].unsqueeze(0)) if per_token else (gamma, lam)
        a, r = ops.gae(rewards[i][keep].unsqueeze(0), values[i][keep].unsqueeze(0), torch.ones(1, n), g, lm)
        assert_close(adv[i][keep], a[0])
        assert_close(ret[i][keep], r[0])
        assert float(adv[i][~keep].abs().sum()) == 0.0 and float(ret[i][~keep].abs().sum()) == 0.0


def test_contiguous_mask_is_the_closed_form():
    """A contiguous block (prompt before, padding after): A_t = Σ_{k≥0} (γλ)^k δ_{t+k}, δ_t = r_t + γ V_{t+1} − V_t with
    V = 0 after the block's last token — computed here directly, sum by sum."""
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    mask = torch.tensor([[0.0, 0, 1, 1, 1, 1, 1, 0]])
    gamma, lam = 0.95, 0.9
    adv, ret = ops.gae(rewards, values, mask, gamma, lam)
    cols = list(range(2, 7))
    v = [float(values[0, c]) for c in cols] + [0.0]
    delta = [float(rewards[0, c]) + gamma * v[k + 1] - v[k] for k, c in enumerate(cols)]
    want = [sum((gamma * lam) ** j * delta[k + j] for j in range(len(cols) - k)) for k in range(len(cols))]
    assert adv[0, cols].tolist() == pytest.approx(want, abs=1e-5)
    assert ret[0, cols].tolist() == pytest.approx([a + b for a, b in zip(want, v)], abs=1e-5)
    assert adv[0, [0, 1, 7]].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_constant_tensors_equal_the_floats(seed):
    """γ_t ≡ 0.9 and λ_t ≡ 0.8 as [B, T] tensors give the floats' advantages and returns, with gaps or without (up to
    float32 rounding: γ_t·λ_t is a float32 product, γ·λ a Python float)."""
    mask, rewards, values, _, _ = _random_rows(seed)
    for m in (mask, torch.ones_like(mask)):
        a, r = ops.gae(rewards, values, m, 0.9, 0.8)
        at, rt = ops.gae(rewards, values, m, torch.full_like(m, 0.9), torch.full_like(m, 0.8))
        assert_close(at, a, atol=1e-6, rtol=1e-6)
        assert_close(rt, r, atol=1e-6, rtol=1e-6)


def test_placed_rewards_count_a_token_reward_once():
    """R = 1.5 of which 0.5 given per token (a process reward's value is the sum of its token values): the last token
    gets the remaining 1, so the rewards sum to R (before: R on the last token plus the token values, 2.0). Masked-off
    positions get nothing; without token rewards R lands on the last masked token."""
    from tokalign.ops import placed_rewards

    mask = torch.tensor([[1.0, 1, 0, 1, 0]])
    got = placed_rewards(torch.tensor([1.5]), mask, torch.tensor([[0.0, 0.5, 9.0, 0.0, 0.0]]))
    assert torch.equal(got, torch.tensor([[0.0, 0.5, 0.0, 1.0, 0.0]]))
    assert torch.equal(placed_rewards(torch.tensor([2.0]), mask), torch.tensor([[0.0, 0, 0, 2.0, 0]]))
