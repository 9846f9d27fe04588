"""POAD (arXiv:2405.15821): the per-token discounts of action decomposition (γ at an action's last token, 1 inside),
a hand-computed two-action episode, the limit (one action ⇒ PPO with γ = 1 and the same λ: loss and gradients), and the
loss end to end on multi-turn rows built through the row schema (environment tokens get exactly zero gradient). CPU
only.

Notation: V = old values, r = per-token reward, m = completion mask, n(t) = the row's next model token."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import ppo_batch
from conftest import leaf
from torch.testing import assert_close

from tokalign.algorithms.poad import POAD, POADConfig, action_discounts
from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.batching import collate
from tokalign.protocols import PolicyOutput
from tokalign.rows import dumps
from tokalign.train.sources import scored_seqs

PLAIN = {"kl_coef": 0.0, "whiten_advantages": False, "dual_clip": 0.0}


def test_action_discounts():
    """Row 0: two turns with a reply between (turn 0 | reply | turn 1 | padding): γ on each turn's last token.
    Row 1: two turns back to back (no reply), then padding. Row 2: no turn_index ⇒ one action (γ only on its last
    token). Every other position 1."""
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]])
    turns = torch.tensor([[0.0, 0, -1, -1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [0] * 7])
    g = 0.9
    want = torch.tensor([[1, g, 1, 1, 1, g, 1], [1, 1, g, 1, g, 1, 1], [1, 1, 1, g, 1, 1, 1]])
    assert torch.equal(action_discounts(mask, turns, g), want)
    assert torch.equal(action_discounts(mask[2:], None, g), want[2:])


def test_two_actions_by_hand():
    """Action 0 = positions 0, 1; the environment's reply 2, 3 (m = 0, V = 9 there: ignored); action 1 = 4, 5.
    R = 1.5 in all: action 0's own reward 0.5 on its last token (token_rewards, as the gated reward places it) and the
    remaining 1 on the last token.
    V = (0.5, 0.4, 9, 9, 0.3, 0.2), γ = 0.9, λ = 0.8; γ_t = (1, 0.9, ·, ·, 1, 0.9):
      δ5 = 1 − 0.2 = 0.8                         A5 = 0.8
      δ4 = 0 + 1·0.2 − 0.3 = −0.1                A4 = −0.1 + 1·0.8·0.8 = 0.54
      δ1 = 0.5 + 0.9·0.3 − 0.4 = 0.37            A1 = 0.37 + 0.9·0.8·0.54 = 0.7588
      δ0 = 0 + 1·0.4 − 0.5 = −0.1                A0 = −0.1 + 1·0.8·0.7588 = 0.50704
    returns = A + V = (1.00704, 1.1588, 0, 0, 0.84, 1.0). PPO (γ = 0.9 on every token) differs: its δ0 = 0.36 − 0.5."""
    mask = [[1.0, 1, 0, 0, 1, 1]]
    values = [[0.5, 0.4, 9, 9, 0.3, 0.2]]
    batch = ppo_batch([1.5], mask, old_values=values)
    batch.fields["turn_index"] = torch.tensor([[0.0, 0, -1, -1, 1, 1]])
    batch.fields["token_rewards"] = torch.tensor([[0.0, 0.5, 0, 0, 0, 0]])
    POAD(POADConfig(gamma=0.9, lam=0.8, **PLAIN)).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([[0.50704, 0.7588, 0, 0, 0.54, 0.8]]), atol=1e-6, rtol=0)
    assert_close(batch.fields["returns"], torch.tensor([[1.00704, 1.1588, 0, 0, 0.84, 1.0]]), atol=1e-6, rtol=0)
    ppo = ppo_batch([1.5], mask, old_values=values)
    ppo.fields["token_rewards"] = batch.fields["token_rewards"]
    PPO(PPOConfig(gamma=0.9, lam=0.8, **PLAIN)).prepare(ppo)
    assert abs(float(ppo.fields["advantages"][0, 0]) - 0.50704) > 0.01


def _loss_and_grads(algo, batch, seed: int):
    """Loss and its gradients w.r.t. the policy log-probs and the values, off-policy (ρ ≠ 1, V ≠ V_old)."""
    g = torch.Generator().manual_seed(seed)
    shape = batch.completion_mask.shape
    logps = leaf(batch.fields["old_logps"] + 0.3 * torch.randn(shape, generator=g))
    values = leaf(batch.fields["old_values"] + 0.3 * torch.randn(shape, generator=g))
    res = algo.loss(batch, PolicyOutput(logps, values=values))
    res.loss.backward()
    return res.loss.detach(), logps.grad, values.grad


def _random_single_turn(seed: int, turn_index: bool):
    g = torch.Generator().manual_seed(seed)
    mask = [[0.0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]  # prompt before, padding after
    batch = ppo_batch([1.0, 0.0, -0.5], mask, old_values=torch.randn(3, 6, generator=g).tolist(),
                      logps=(-torch.rand(3, 6, generator=g)).tolist())
    batch.fields["ref_logps"] = batch.fields["old_logps"] - 0.1 * torch.rand(3, 6, generator=g)
    if turn_index:  # one model turn: index 0 on the completion (and 0 in padding, as collate pads)
        batch.fields["turn_index"] = torch.zeros(3, 6)
    return batch


@pytest.mark.parametrize("lam", [0.8, 1.0])
@pytest.mark.parametrize("turn_index", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_one_action_is_ppo_with_gamma_one(lam, turn_index, kl_coef):
    """A single action (no turn_index, or one turn): no action boundary inside the completion, so POAD's γ_t = 1 on
    every token but the last (where it meets V = 0) ⇒ PPO with γ = 1 and the same λ: the same advantages, returns,
    loss and gradients (policy and value), to 1e-6; with the defaults' whitening and value clip, and the KL in the
    reward."""
    kw = {"kl_coef": kl_coef, "lam": lam, "vf_coef": 0.5, "dual_clip": 0.0}
    poad, ppo = POAD(POADConfig(gamma=0.9, **kw)), PPO(PPOConfig(gamma=1.0, **kw))
    a, b = _random_single_turn(0, turn_index), _random_single_turn(0, turn_index)
    poad.prepare(a)
    ppo.prepare(b)
    for k in ("advantages", "returns"):
        assert_close(a.fields[k], b.fields[k], atol=1e-6, rtol=0)
    (la, ga, va), (lb, gb, vb) = _loss_and_grads(poad, a, 1), _loss_and_grads(ppo, b, 1)
    assert_close(la, lb, atol=1e-6, rtol=0)
    assert_close(ga, gb, atol=1e-6, rtol=0)
    assert_close(va, vb, atol=1e-6, rtol=0)
    assert float(ga.abs().max()) > 1e-3


def _episode_row(turns, reward, group):
    """A rollout row after prompt [1, 2]: ``turns`` alternate model and environment token lists (model first)."""
    ids, spans, loss_mask = [], [], []
    for k, toks in enumerate(turns):
        who = "model" if k % 2 == 0 else "env"
        spans.append([len(ids), len(ids) + len(toks), who])
        ids += toks
        loss_mask += [int(who == "model")] * len(toks)
    messages = [{"role": "assistant" if k % 2 == 0 else "user", "content": ""} for k in range(len(turns))]
    episode = {"turns": spans, "messages": messages, "tool_calls": [], "turn_errors": []}
    return {"id": str(group), "prompt_ids": [1, 2], "completion_ids": ids, "group_id": group, "reward": reward,
            "loss_mask": loss_mask, "sampler_logps": [0.0] * len(ids), "episode": dumps(episode)}


def test_multi_turn_rows_end_to_end():
    """Rows through the row schema (episode_token_fields ⇒ turn_index, loss_mask ⇒ completion mask): a three-turn and
    a two-turn episode and a single-turn row. With the defaults (γ = λ = 0.95, whitening, value clip): γ_t is γ exactly
    on each turn's last token; advantages and returns are 0 off the model's tokens; the loss is finite, and its
    gradients w.r.t. log-probs and values are exactly 0 on environment tokens, prompt and padding, and non-zero on
    each row's model tokens."""
    rows = [_episode_row([[5, 6], [90, 91, 92], [7], [93], [8, 9]], 1.0, 0), _episode_row([[5], [90], [6, 7]], 0.0, 0),
            {**_episode_row([[5, 6, 7]], 0.5, 1), "episode": None, "loss_mask": None}]
    batch = collate(scored_seqs(rows, [0, 0, 1]), pad_id=0)
    g = torch.Generator().manual_seed(0)
    shape = batch.completion_mask.shape
    batch.fields["old_logps"] = -torch.rand(shape, generator=g)
    batch.fields["old_values"] = torch.randn(shape, generator=g)
    algo = POAD(POADConfig())
    m, t = batch.completion_mask, batch.fields["turn_index"]
    # completion token j at column 1 + j: turn ends at 2 (turn 0), 6 (turn 1), 9 (turn 2) / 1, 4 / 3 (one action)
    ends = [[2, 6, 9], [1, 4], [3]]
    gammas = action_discounts(m, t, 0.95)
    for i, cols in enumerate(ends):
        assert [c for c in range(shape[1]) if m[i, c] > 0 and gammas[i, c] != 1.0] == cols
    algo.prepare(batch)
    off = m == 0
    assert float(batch.fields["advantages"][off].abs().max()) == 0.0
    assert float(batch.fields["returns"][off].abs().max()) == 0.0
    loss, glp, gv = _loss_and_grads(algo, batch, 2)
    assert math.isfinite(float(loss))
    assert float(glp[off].abs().max()) == 0.0 and float(gv[off].abs().max()) == 0.0
    for i in range(shape[0]):  # (clipped tokens have gradient 0 too, so only "some" on each row)
        assert bool((glp[i][~off[i]] != 0).any()) and bool((gv[i][~off[i]] != 0).any())


def test_defaults_are_the_authors_code():
    c = POADConfig()
    assert (c.gamma, c.lam, c.epsilon, c.epsilon_value, c.vf_coef, c.kl_coef, c.dual_clip) == (0.95, 0.95, 0.2, 0.2, 0.5, 0.0, 0.0)
    assert not POAD(c).needs.reference
