"""THOR (arXiv:2509.13761) on hand-made two-turn tool episodes (expected numbers worked out in each docstring): the
episode's per-turn tool fields (tokalign.rows), the hierarchical advantage (trajectory GRPO over the trajectories
without a failed call + step GRPO over the group's tool-call turns), the NLL term, its limits (no tool turns, or w = 0
and no filter ⇒ GRPO's loss exactly), environment tokens getting advantage and gradient 0, micro-batches adding up.
CPU only.

Notation: ℓ = policy log-prob, ρ = exp(ℓ − ℓ_old), A = trajectory advantage, A' = step advantage, m = mask."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import groups_batch, micro_batches_add_up, off_policy_loss_and_grad
from conftest import Scripted
from conftest import leaf as _leaf
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.thor import THOR, THORConfig
from tokalign.batching import collate
from tokalign.protocols import PolicyOutput
from tokalign.rows import dumps, episode_token_fields
from tokalign.train.sources import scored_seqs

EPS = 1e-6


def episode(segments, reward, group, errors=None, extra_calls=0):
    """A rollout row after prompt [1, 2]: ``segments`` of ("model" | "env", ids); each env segment is the reply to one
    tool call of the model turn before it; ``errors``: failed calls per model turn; ``extra_calls``: calls of the last
    turn that ran but got no reply (the episode ended)."""
    ids, mask, spans, messages, calls = [], [], [], [], []
    for who, seg in segments:
        spans.append([len(ids), len(ids) + len(seg), who])
        ids += seg
        mask += [1 if who == "model" else 0] * len(seg)
        messages.append({"role": "assistant" if who == "model" else "tool", "content": ""})
        if who == "env":
            calls.append({"name": "calculator", "arguments": {}})
    calls += [{"name": "calculator", "arguments": {}}] * extra_calls
    turns = sum(who == "model" for who, _ in segments)
    ep = {"turns": spans, "messages": messages, "tool_calls": calls, "turn_errors": errors or [0] * turns,
          "turn_rewards": [None] * turns, "model_turns": turns}
    return {"id": f"{group}#{reward}", "prompt_ids": [1, 2], "completion_ids": ids, "group_id": group, "reward": reward,
            "loss_mask": mask, "sampler_logps": [0.0] * len(ids), "episode": dumps(ep)}


def batch_of(rows):
    return collate(scored_seqs(rows, [r["group_id"] for r in rows]), pad_id=0)


def two_turn_group():
    """Four episodes: a call turn (2 tokens), its reply (2 env tokens), an answer turn (1 token). τ3's call failed."""
    def ep(call, answer, reward, failed):
        return episode([("model", call), ("env", [90, 91]), ("model", answer)], reward, 0, errors=[int(failed), 0])
    return [ep([5, 6], [7], 1.0, False), ep([5, 8], [7], 0.0, False), ep([5, 9], [4], 0.0, True), ep([3, 6], [7], 1.0, False)]


def per_turn(batch, i):
    """Row i's values of a [B, T] field on its completion tokens, in order (model and environment)."""
    start = 1  # prompt [1, 2]: completion token j sits at column 1 + j
    n = int(batch.attention_mask[i].sum()) - 2
    return lambda name: batch.fields[name][i, start:start + n].tolist()


def test_episode_token_fields_tool_calls_per_turn():
    """Turn 0 made two calls (two tool messages), one failed; turn 1 made one call that ran but got no reply (the episode
    hit max_turns): its call is the episode's third tool call, counted on the last turn. Environment tokens get 0.
    An episode without tool calls keeps the old output: only turn_index."""
    row = episode([("model", [5, 6]), ("env", [90]), ("env", [91]), ("model", [7])], 1.0, 0, errors=[1, 0], extra_calls=1)
    assert episode_token_fields(row) == {"turn_index": [0.0, 0.0, -1.0, -1.0, 1.0],
                                         "turn_tool_calls": [2.0, 2.0, 0.0, 0.0, 1.0],
                                         "turn_tool_errors": [1.0, 1.0, 0.0, 0.0, 0.0]}
    plain = {"completion_ids": [5, 6, 9], "episode": dumps({"turns": [[0, 2, "model"], [2, 3, "env"]]})}
    assert episode_token_fields(plain) == {"turn_index": [0.0, 0.0, -1.0]}


def test_thor_hierarchical_advantage_hand():
    """R = (1, 0, 0, 1); τ3's call failed. Trajectory level (filter on: τ3 dropped, 3 ≥ ⌈0.5·4⌉ kept): R = (1, 0, 1),
    mean 2/3, unbiased std √(1/3) ⇒ A = (1/3)/(√(1/3)+eps) = 0.5773493 for τ1, τ4, −(2/3)/(√(1/3)+eps) = −1.1546986 for
    τ2, 0 for τ3. Step level: the four call turns with pass rates (1, 1, 0, 1): mean 3/4, std 1/2 ⇒ A' = 0.25/(0.5+eps)
    = 0.4999990 for the ones that ran, −0.75/(0.5+eps) = −1.4999970 for τ3's.
    A_{i,t}: call turn A + A', answer turn A, environment tokens 0:
      τ1, τ4: (1.0773483, 1.0773483 | 0, 0 | 0.5773493);  τ2: (−0.6546996, −0.6546996 | 0, 0 | −1.1546986);
      τ3: (−1.4999970, −1.4999970 | 0, 0 | 0).
    NLL weights n_t = 1[A > 1e-7] + 1[A' > 1e-7]: τ1, τ4 (2, 2, 1), τ2 (1, 1, 0), τ3 (0, 0, 0) ⇒ Σ n = 12."""
    batch = batch_of(two_turn_group())
    THOR(THORConfig()).prepare(batch)
    a_pos, a_neg = (1 / 3) / (math.sqrt(1 / 3) + EPS), -(2 / 3) / (math.sqrt(1 / 3) + EPS)
    s_ok, s_fail = 0.25 / (0.5 + EPS), -0.75 / (0.5 + EPS)
    want = [[a_pos + s_ok] * 2 + [0, 0, a_pos], [a_neg + s_ok] * 2 + [0, 0, a_neg], [s_fail] * 2 + [0, 0, 0],
            [a_pos + s_ok] * 2 + [0, 0, a_pos]]
    for i, w in enumerate(want):
        assert per_turn(batch, i)("advantages") == pytest.approx(w, abs=1e-6)
        assert per_turn(batch, i)("thor_step_adv") == pytest.approx([s_fail if i == 2 else s_ok] * 2 + [0, 0, 0], abs=1e-6)
    assert batch.fields["thor_kept"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert [per_turn(batch, i)("thor_nll_weight") for i in range(4)] == [[2, 2, 0, 0, 1], [1, 1, 0, 0, 0], [0] * 5, [2, 2, 0, 0, 1]]
    assert batch.fields["thor_nll_tokens"].tolist() == [12.0] * 4
    off = batch.completion_mask == 0  # environment tokens, prompt and padding
    assert float(batch.fields["advantages"][off].abs().max()) == 0.0


def test_thor_loss_and_gradient_hand():
    """On-policy (ρ = 1, ℓ = −1), token-mean over the 12 model tokens: ∂L/∂ℓ_t = −A_{i,t}/12 − α·n_t/Σn
    (α = 0.01, Σn = 12). Loss: Σ_t A_{i,t} = 3(2A_pos + A_neg) + 6A'_ok + 2A'_fail = 0 (up to eps), and
    L_NLL = −Σ n_t·(−1)/12 = 1 ⇒ L = 0.01. Environment tokens: gradient exactly 0."""
    batch = batch_of(two_turn_group())
    algo = THOR(THORConfig())
    algo.prepare(batch)
    batch.fields["old_logps"] = torch.full_like(batch.completion_mask, -1.0)
    lp = _leaf(batch.fields["old_logps"])
    res = algo.loss(batch, PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(0.01), atol=1e-6, rtol=0)
    res.loss.backward()
    m = batch.completion_mask
    want = (-batch.fields["advantages"] / 12 - 0.01 * batch.fields["thor_nll_weight"] / 12) * m
    assert_close(lp.grad, want)
    assert float(lp.grad[m == 0].abs().max()) == 0.0
    assert res.metrics["thor/nll"] == pytest.approx(1.0)
    assert res.metrics["thor/kept_fraction"] == pytest.approx(0.75)
    assert res.metrics["thor/step_token_fraction"] == pytest.approx(8 / 12)


def test_thor_filter_drops_groups_and_can_be_off():
    """Group of four with three failed calls: 1 kept < ⌈0.5·4⌉ = 2 ⇒ the group keeps no trajectory advantage; only the
    step level speaks (pass rates (1, 0, 0, 0): mean 1/4, std 1/2 ⇒ A' = 0.75/(0.5+eps), −0.25/(0.5+eps)).
    filter_failed=False: every trajectory keeps GRPO's A, R = (1, 0, 0, 1) ⇒ A = ±0.5/(√(1/3)+eps).
    step_group="turn" with one call turn per episode gives the same step groups here."""
    rows = [episode([("model", [5, 6]), ("env", [90]), ("model", [7])], r, 0, errors=[e, 0])
            for r, e in ((1.0, 0), (0.0, 1), (0.0, 1), (1.0, 1))]
    for cfg in (THORConfig(), THORConfig(step_group="turn")):
        batch = batch_of(rows)
        THOR(cfg).prepare(batch)
        assert batch.fields["thor_kept"].tolist() == [0.0] * 4
        got = [per_turn(batch, i)("advantages") for i in range(4)]
        assert got == [pytest.approx([v, v, 0, 0], abs=1e-6) for v in (0.75 / (0.5 + EPS),) + (-0.25 / (0.5 + EPS),) * 3]
    batch = batch_of(rows)
    THOR(THORConfig(filter_failed=False, step_weight=0.0)).prepare(batch)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    got = [per_turn(batch, i)("advantages") for i in range(4)]
    assert got == [pytest.approx([v, v, 0, v], abs=1e-6) for v in (a, -a, -a, a)]


def grpo_and_thor_grads(rows_or_batch, cfg):
    """Loss and gradient of GRPO(ε_high 0.28) and of THOR(cfg) on two copies of a batch, off-policy (ρ ≠ 1)."""
    out = []
    for algo in (GRPO(GRPOConfig(epsilon_high=0.28)), THOR(cfg)):
        b = rows_or_batch()
        algo.prepare(b)
        out.append(off_policy_loss_and_grad(algo, b, seed=3))
    return out


def test_thor_limits_are_grpo_exactly():
    """(1) No tool turns (single-turn rows: no tool fields) and α = 0: THOR's per-token advantage is A_i on the
    completion, GRPO's loss and gradient exactly (bit for bit). (2) Tool episodes with a failed call, w = 0, filter off,
    α = 0: the step level and the filter vanish ⇒ GRPO exactly again."""
    def single():
        return groups_batch([[3, 4, 5], [3, 6], [7, 8, 9, 1], [2]], [1.0, 0.0, 0.5, 1.0], [0, 0, 0, 1])

    (gl, gg), (tl, tg) = grpo_and_thor_grads(single, THORConfig(nll_alpha=0.0))
    assert torch.equal(gl, tl) and torch.equal(gg, tg)
    (gl, gg), (tl, tg) = grpo_and_thor_grads(lambda: batch_of(two_turn_group()),
                                             THORConfig(nll_alpha=0.0, step_weight=0.0, filter_failed=False))
    assert torch.equal(gl, tl) and torch.equal(gg, tg)
    assert float(gg.abs().max()) > 1e-3


def test_thor_micro_batches_sum_to_full_batch():
    """With the NLL term (normalised by the whole batch's positive tokens): micro-batches of 2 rows add up to the full
    batch (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(THOR(THORConfig(nll_alpha=0.5)))


def test_thor_config_checks():
    assert THOR(THORConfig()).needs.groups and THOR(THORConfig()).needs.data == ("online", "scored")
    for bad in ({"step_weight": -1.0}, {"nll_alpha": -0.1}, {"min_kept_fraction": 1.5}, {"step_group": "episode"}):
        with pytest.raises(ValueError):
            THORConfig(**bad)


def test_thor_on_real_calculator_episodes():
    """Episodes run by the real episode engine and calculator (max_turns 2), scripted model turns:
    τ_A: "calculator(1/0)" (fails: ZeroDivisionError) → its error reply → "calculator(2*3)" (runs; the episode ends at
    max_turns, so its reply is not appended: the call is the episode's last); R = 0.
    τ_B: "calculator(2*3)" → its reply → "6" (no call: the answer); R = 1.
    Fields: τ_A calls (1 | 1), errors (1 | 0); τ_B calls (1 | 0). THOR: τ_A is filtered, τ_B alone in its group ⇒ A = 0
    (kept, a group of one). Step group: pass rates (0, 1, 1), mean 2/3, std √(1/3) ⇒ A' = −(2/3)/(√(1/3)+eps) on τ_A's first turn,
    (1/3)/(√(1/3)+eps) on τ_A's second and τ_B's first; τ_B's answer and every environment token: 0."""
    from tokalign import models
    from tokalign.environments.builtin import Calculator
    from tokalign.environments.calls import hermes_text
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.episodes import EpisodeEngine
    from tokalign.rows import rollout_rows

    tok = models.load_tokenizer("")
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "2*3="}], add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    bad, good = hermes_text("calculator", {"expression": "1/0"}), hermes_text("calculator", {"expression": "2*3"})
    eps = [EpisodeEngine(Scripted(tok, texts), Calculator(), max_turns=2).generate([prompt], SamplingSpec(n=1, max_new_tokens=200))[0][0]
           for texts in ([bad, good], [good, "6"])]
    rows = rollout_rows([{"id": "p", "prompt": "[]", "prompt_text": "", "prompt_ids": prompt}], [eps])
    for r, reward in zip(rows, (0.0, 1.0)):
        r["reward"] = reward
    fields = [episode_token_fields(r) for r in rows]
    turns = [sorted({(int(k), int(c), int(e)) for k, c, e in zip(f["turn_index"], f["turn_tool_calls"], f["turn_tool_errors"]) if k >= 0})
             for f in fields]
    assert turns == [[(0, 1, 1), (1, 1, 0)], [(0, 1, 0), (1, 0, 0)]]
    batch = batch_of(rows)
    THOR(THORConfig()).prepare(batch)
    lo, hi = -(2 / 3) / (math.sqrt(1 / 3) + EPS), (1 / 3) / (math.sqrt(1 / 3) + EPS)
    m, t = batch.completion_mask.bool(), batch.fields["turn_index"]
    adv = batch.fields["advantages"]
    assert batch.fields["thor_kept"].tolist() == [0.0, 1.0]
    assert_close(adv[0][m[0] & (t[0] == 0)], torch.full_like(adv[0][m[0] & (t[0] == 0)], lo))
    assert_close(adv[0][m[0] & (t[0] == 1)], torch.full_like(adv[0][m[0] & (t[0] == 1)], hi))
    assert_close(adv[1][m[1] & (t[1] == 0)], torch.full_like(adv[1][m[1] & (t[1] == 0)], hi))
    assert float(adv[1][m[1] & (t[1] == 1)].abs().max()) == 0.0
    assert float(adv[~m].abs().max()) == 0.0
