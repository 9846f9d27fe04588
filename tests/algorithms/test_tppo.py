"""T-PPO (arXiv:2506.15050): EGAE on a finished and an unfinished row by hand, the decoupled losses (policy on the step's
new tokens, critic on finished rows) and their gradients by hand, every row finished ⇒ PPO bit for bit (loss and
gradients), micro-batches adding up, the windowed sampling hook with a stand-in engine (carry-over, continuation, the
W-window cap, scoring only finished rows, its state), the config's errors, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import ppo_batch, train_changes_weights
from conftest import leaf
from torch.testing import assert_close

from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.algorithms.tppo import TPPO, UNFINISHED, WINDOW, TPPOConfig, WindowedSampling
from tokalign.batching import Seq, collate, micro_batches
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput

TPPO_PATH = "tokalign.algorithms.tppo:TPPO"
HAND = dict(kl_coef=0.0, gamma=0.9, lam=0.8, whiten_advantages=False, vf_coef=0.1)

# row 0 finished (R = 1) on completion columns 0–2; row 1 unfinished (its scored R = 1 is not a reward yet) on 1–3
MASK = [[1.0, 1, 1, 0], [0, 1, 1, 1]]
VALUES = [[0.5, 0.6, 0.8, 0.0], [0.0, 0.2, 0.4, 0.5]]


def _hand_batch(window=None, token_rewards=None):
    batch = ppo_batch([1.0, 1.0], MASK, old_values=VALUES)
    batch.fields[UNFINISHED] = torch.tensor([0.0, 1.0])
    if window is not None:
        batch.fields[WINDOW] = torch.tensor(window)
    if token_rewards is not None:
        batch.fields["token_rewards"] = torch.tensor(token_rewards)
    return batch


# ---------------------------------------------------------------------------------------------------
# EGAE and the decoupled losses, by hand


def test_egae_hand():
    """γ = 0.9, λ = 0.8 (γλ = 0.72), no KL, no whitening.

    Row 0, finished, V = (0.5, 0.6, 0.8), R = 1 on its last token, V = 0 past it (PPO's GAE):
        δ = (0.9·0.6 − 0.5, 0.9·0.8 − 0.6, 1 − 0.8) = (0.04, 0.12, 0.2)
        A_2 = 0.2,  A_1 = 0.12 + 0.72·0.2 = 0.264,  A_0 = 0.04 + 0.72·0.264 = 0.23008;  G = A + V = (0.73008, 0.864, 1)
    Row 1, unfinished after 3 tokens, V = (0.2, 0.4, 0.5): no reward (its R = 1 and token rewards (0.3, 0.3, 0.3) are
    ignored) and V(s_3) := V_2 = 0.5:
        δ = (0.9·0.4 − 0.2, 0.9·0.5 − 0.4, 0.9·0.5 − 0.5) = (0.16, 0.05, −0.05)
        A_2 = −0.05,  A_1 = 0.05 − 0.72·0.05 = 0.014,  A_0 = 0.16 + 0.72·0.014 = 0.17008;  G = (0.37008, 0.414, 0.45)
    PPO would take row 1 as terminal with R = 1: δ_2 = 1 − 0.5 = 0.5, A = (0.4552, 0.41, 0.5). Row 0 is PPO's exactly."""
    algo = TPPO(TPPOConfig(**HAND))
    batch = algo.prepare(_hand_batch(token_rewards=[[0.0] * 4, [0.0, 0.3, 0.3, 0.3]]))
    assert_close(batch.fields["advantages"], torch.tensor([[0.23008, 0.264, 0.2, 0.0], [0.0, 0.17008, 0.014, -0.05]]))
    assert_close(batch.fields["returns"], torch.tensor([[0.73008, 0.864, 1.0, 0.0], [0.0, 0.37008, 0.414, 0.45]]))
    assert batch.fields["rewards"].tolist() == [1.0, 1.0]  # the rows' own rewards are left as they were
    ppo = PPO(PPOConfig(**HAND)).prepare(ppo_batch([1.0, 1.0], MASK, old_values=VALUES))
    assert_close(ppo.fields["advantages"][1], torch.tensor([0.0, 0.4552, 0.41, 0.5]))
    assert torch.equal(batch.fields["advantages"][0], ppo.fields["advantages"][0])


def test_gamma_one_bootstrap_cancels_the_last_value():
    """γ = λ = 1: the unfinished row's last TD error is 0 + V_2 − V_2 = 0, so A = (0.4 − 0.2, 0.5 − 0.4, 0) + later ones
    = (0.3, 0.1, 0) — the values' own increments; G = A + V = V_2 = 0.5 everywhere."""
    algo = TPPO(TPPOConfig(**{**HAND, "gamma": 1.0, "lam": 1.0}))
    batch = algo.prepare(_hand_batch())
    assert_close(batch.fields["advantages"][1], torch.tensor([0.0, 0.3, 0.1, 0.0]))
    assert_close(batch.fields["returns"][1], torch.tensor([0.0, 0.5, 0.5, 0.5]))


def test_decoupled_losses_and_gradients_hand():
    """Row 0 finished in its second window (column 0 came from the first: window (0, 1, 1)); row 1 is all new. On policy
    (ρ = 1, V = V_old: no clipping), token-mean, the advantages of ``test_egae_hand``.
    Policy tokens P = row 0 columns 1–2 + row 1 columns 1–3, N_P = 5:
        ∂L/∂ℓ_t = −A_t/5,  L^π = −(0.264 + 0.2 + 0.17008 + 0.014 − 0.05)/5 = −0.59808/5 = −0.119616
    Critic tokens C = row 0 columns 0–2 (the finished row, earlier window included), N_C = 3; V − G = (−0.23008,
    −0.264, −0.2):
        ∂L/∂V_t = 0.1·(V_t − G_t)/3,  L^V = ½ (0.0529368064 + 0.069696 + 0.04)/3 = 0.0271054677
    loss = −0.119616 + 0.1·0.0271054677 = −0.1169054532; the unfinished row's values get no gradient."""
    algo = TPPO(TPPOConfig(**HAND))
    batch = algo.prepare(_hand_batch(window=[[0.0, 1, 1, 0], [0, 1, 1, 1]]))
    assert batch.totals["tppo_policy_tokens"] == 5 and batch.totals["tppo_value_tokens"] == 3
    assert batch.totals["tppo_policy_seqs"] == 2 and batch.totals["tppo_value_seqs"] == 1
    logps, values = leaf(torch.zeros(2, 4)), leaf(torch.tensor(VALUES))
    res = algo.loss(batch, PolicyOutput(logps, values=values))
    res.loss.backward()
    adv, ret = batch.fields["advantages"], batch.fields["returns"]
    policy = torch.tensor([[0.0, 1, 1, 0], [0, 1, 1, 1]])
    critic = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0]])
    assert_close(logps.grad, -adv * policy / 5)
    assert_close(values.grad, 0.1 * (torch.tensor(VALUES) - ret) * critic / 3)
    assert float(res.loss.detach()) == pytest.approx(-0.119616 + 0.1 * 0.0271054677, abs=1e-7)
    assert res.metrics["pg_loss"] == pytest.approx(-0.119616, abs=1e-7)
    assert res.metrics["vf_loss"] == pytest.approx(0.0271054677, abs=1e-7)


def test_value_on_unfinished_and_whitening_over_the_policy_tokens():
    """``value_on_unfinished``: the critic fits every token (N_C = 6). With whitening, the advantages are whitened over
    the policy's tokens P (5 of them) and are 0 elsewhere: mean 0 and unit (Bessel) variance over P."""
    algo = TPPO(TPPOConfig(**{**HAND, "whiten_advantages": True, "value_on_unfinished": True}))
    batch = algo.prepare(_hand_batch(window=[[0.0, 1, 1, 0], [0, 1, 1, 1]]))
    assert batch.totals["tppo_value_tokens"] == 6 and batch.totals["tppo_value_seqs"] == 2
    policy = batch.fields["tppo_policy_mask"].bool()
    adv = batch.fields["advantages"]
    assert float(adv[~policy].abs().max()) == 0.0
    assert float(adv[policy].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv[policy].var()) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# every row finished ⇒ PPO; micro-batches


def _random_batch(seed: int, unfinished=(), windowed=True):
    """Collated rows with random rewards, behaviour / reference log-probs and old values; ``unfinished`` rows are cut at
    the window; with ``windowed`` every row carries the hook's fields (row 2 then finished in its second window)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate([3, 5, 4, 2, 6]):
        token = {k: (torch.randn(n, generator=g) * s - o).tolist() for k, s, o in
                 (("old_logps", 0.3, 1.0), ("ref_logps", 0.3, 1.0), ("old_values", 0.5, 0.0))}
        row = {"rewards": float(torch.rand(1, generator=g))}
        if windowed:
            row[UNFINISHED] = float(i in unfinished)
            token[WINDOW] = [0.0 if (i == 2 and unfinished and j < 2) else 1.0 for j in range(n)]
        seqs.append(Seq([1] * (1 + i % 2), list(range(10, 10 + n)), i, row=row, token=token, prompt_index=i))
    return collate(seqs, pad_id=0)


def _loss_and_grads(algo, batch, seed: int):
    """The loss on a prepared ``batch`` off policy (log-probs 0.2·N(0, 1) from the behaviour ones, values 0.3·N(0, 1)
    from the old ones: the ratio clip takes 10% of the tokens, the value clip more) and its gradients w.r.t. the log-probs and the values."""
    g = torch.Generator().manual_seed(seed)
    shape = batch.completion_mask.shape
    logps = leaf(batch.fields["old_logps"] + 0.2 * torch.randn(shape, generator=g))
    values = leaf(batch.fields["old_values"] + 0.3 * torch.randn(shape, generator=g))
    res = algo.loss(batch, PolicyOutput(logps, values=values))
    res.loss.backward()
    return res.loss.detach(), logps.grad, values.grad


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_every_row_finished_is_ppo_bit_for_bit(windowed, aggregation):
    """No unfinished row and every token new (the hook's fields, or none): the same advantages, returns, loss and
    gradients as PPO, bit for bit — with the KL penalty, whitening and the dual clip on. ``windows`` = 1 has PPO's
    needs (no hook)."""
    cfg = dict(kl_coef=0.05, gamma=0.95, lam=0.9, aggregation=aggregation)
    results = []
    for algo in (TPPO(TPPOConfig(**cfg)), PPO(PPOConfig(**cfg))):
        batch = algo.prepare(_random_batch(3, windowed=windowed))
        results.append((batch.fields["advantages"], batch.fields["returns"], *_loss_and_grads(algo, batch, 4)))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    assert results[1][3].abs().sum() > 0 and results[1][4].abs().sum() > 0
    one, base = TPPO(TPPOConfig(windows=1)).needs, PPO(PPOConfig()).needs
    assert (one.data, one.hooks, one.reference, [c.name for c in one.components]) == (
        base.data, base.hooks, base.reference, [c.name for c in base.components])
    windowed_needs = TPPO(TPPOConfig()).needs
    assert windowed_needs.data == ("online",) and [h.name for h in windowed_needs.hooks] == ["tppo_windows"]


def test_unfinished_rows_change_the_loss():
    """The same batch with rows 1 and 3 unfinished (and row 2's first two tokens from an earlier window) differs from
    PPO's: the mask choice and EGAE are live."""
    algo, ppo = TPPO(TPPOConfig()), PPO(PPOConfig())
    mine = _loss_and_grads(algo, algo.prepare(_random_batch(3, unfinished=(1, 3))), 4)
    base = _loss_and_grads(ppo, ppo.prepare(_random_batch(3, unfinished=(1, 3))), 4)
    assert not torch.equal(mine[0], base[0])
    batch = algo.prepare(_random_batch(3, unfinished=(1, 3)))
    critic = batch.fields["tppo_value_mask"]
    assert float(critic[1].sum()) == 0 and float(critic[3].sum()) == 0 and float(critic[0].sum()) == 3
    assert float(batch.fields["tppo_policy_mask"][2].sum()) == 2  # row 2: 4 tokens, 2 of them new


def _micro_grads(algo, batch, seed):
    """Loss and gradients (on completion tokens, row by row) of the whole batch and of its micro-batches of 2 rows, on the
    same inputs."""
    g = torch.Generator().manual_seed(seed)
    shape = batch.completion_mask.shape
    dl, dv = 0.2 * torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g)

    def run(b, rows):
        width = b.completion_mask.shape[1]
        logps = leaf(b.fields["old_logps"] + dl[rows, :width])
        values = leaf(b.fields["old_values"] + dv[rows, :width])
        res = algo.loss(b, PolicyOutput(logps, values=values))
        res.loss.backward()
        m = b.completion_mask.bool()
        return res.loss.detach(), logps.grad[m], values.grad[m]

    full = run(batch, list(range(len(batch))))
    parts = [run(mb, rows) for mb, rows in zip(micro_batches(batch, 2), ([0, 1], [2, 3], [4]))]
    return full, parts


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_add_up(aggregation):
    """With unfinished rows, an earlier window and both masks, micro-batches of 2 rows sum to the whole batch's loss and
    gradients (each loss's totals are the whole batch's, from ``prepare``)."""
    algo = TPPO(TPPOConfig(aggregation=aggregation))
    batch = algo.prepare(_random_batch(5, unfinished=(1, 3)))
    full, parts = _micro_grads(algo, batch, 6)
    assert_close(sum(p[0] for p in parts), full[0])
    assert_close(torch.cat([p[1] for p in parts]), full[1])
    assert_close(torch.cat([p[2] for p in parts]), full[2])
    assert float(full[1].abs().max()) > 1e-3 and float(full[2].abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# the windowed sampling hook


PROMPTS = [{"id": p, "prompt": f'"{p}"', "prompt_text": p, "prompt_ids": ids, "reference": None}
           for p, ids in (("A", [1]), ("B", [2]), ("C", [3]))]


def _source(seen, hook, batch_size=3, episode=False):
    """An online source over prompts A, B, C with a stand-in engine (window 2 tokens): A answers (7) and stops; B is cut
    at (8, 8) and then answers (9); C is cut at every window (8, 8). The reward is len(completion_ids)/10."""
    from tokalign.protocols import Reward
    from tokalign.rewards import ResolvedReward
    from tokalign.rollout import Completion, SamplingSpec
    from tokalign.train.sources import OnlineSource

    def answer(p):
        if p[0] == 1:
            return [7], "stop"
        if p[0] == 2 and len(p) > 1:
            return [9], "stop"
        return [8, 8], "length"

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Engine:
        tokenizer = Tok()

        def sync(self, policy):
            return None

        def generate(self, prompts, spec):
            seen.setdefault("generated", []).append(([list(p) for p in prompts], spec.n, spec.max_new_tokens))
            out = []
            for p in prompts:
                ids, why = answer(p)
                out.append([Completion(ids, [-0.5] * len(ids), why, Tok().decode(ids),
                                       loss_mask=[1] * len(ids) if episode else None) for _ in range(spec.n)])
            return out

    def score(samples):
        seen.setdefault("scored", []).extend(list(s.completion_ids) for s in samples)
        seen.setdefault("budgets", []).extend(s.metadata["max_new_tokens"] for s in samples)
        return [Reward(len(s.completion_ids) / 10) for s in samples]

    reward = ResolvedReward("len", 1.0, score, None, False)
    return OnlineSource(PROMPTS, Engine(), [reward], SamplingSpec(n=1, max_new_tokens=2), batch_size, 0, hooks=(hook,))


def _by_completion(seqs):
    return {tuple(s.completion_ids): s for s in seqs}


def test_hook_carries_continues_and_caps_hand():
    """W = 2. Step 1: A (7) finishes; B and C are cut at (8, 8): unfinished, unscored, reward 0, carried. Step 2: B and
    C are continued from prompt + (8, 8) with one sample each, one fresh prompt fills the third group; B ends
    (8, 8, 9) "stop", C is cut again at (8, 8, 8, 8) — its second window, the cap: finished ("length", terminal). Both
    are scored on their whole completion (0.3, 0.4) with the budget W·L = 4, and their window field marks the step's
    tokens only."""
    seen: dict = {}
    hook = WindowedSampling(windows=2)
    source = _source(seen, hook)
    seqs, metrics = source.batch(0)
    rows = {s.prompt_ids[0]: s for s in seqs}
    assert {p: (s.completion_ids, s.row[UNFINISHED], s.row["rewards"]) for p, s in rows.items()} == {
        1: ([7], 0.0, 0.1), 2: ([8, 8], 1.0, 0.0), 3: ([8, 8], 1.0, 0.0)}
    assert all(s.token[WINDOW] == [1.0] * len(s.completion_ids) for s in seqs)
    assert seen["scored"] == [[7]] and seen["budgets"] == [4]
    assert metrics["reward/mean"] == pytest.approx(0.1) and metrics["tppo/finished_rows"] == 1
    assert metrics["tppo/unfinished_fraction"] == pytest.approx(2 / 3) and metrics["tppo/carried_rows"] == 0
    assert sorted(r["prompt_ids"][0] for r in hook.pool) == [2, 3]

    state = hook.state_dict()
    seen.clear()
    seqs, metrics = source.batch(1)
    prompts, n, window = seen["generated"][0]
    assert sorted(prompts) == [[2, 8, 8], [3, 8, 8]] and n == 1 and window == 2  # the carried rows, one sample each
    assert len(seen["generated"]) == 2 and len(seen["generated"][1][0]) == 1  # and one fresh prompt
    assert metrics["tppo/carried_rows"] == 2 and metrics["tppo/fresh_prompts"] == 1 and len(seqs) == 3
    done = _by_completion(seqs)
    b, c = done[(8, 8, 9)], done[(8, 8, 8, 8)]
    assert (b.row[UNFINISHED], b.row["rewards"], b.token[WINDOW]) == (0.0, pytest.approx(0.3), [0.0, 0.0, 1.0])
    assert (c.row[UNFINISHED], c.row["rewards"], c.token[WINDOW]) == (0.0, pytest.approx(0.4), [0.0, 0.0, 1.0, 1.0])
    assert [8, 8, 9] in seen["scored"] and [8, 8, 8, 8] in seen["scored"] and set(seen["budgets"]) == {4}
    assert [8, 8] not in seen["scored"]  # a fresh row cut at its window is not scored
    assert b.token["sampler_logps"] == [-0.5] * 3
    assert metrics["tppo/windows_mean"] >= 5 / 3  # B and C took 2 windows; a finished fresh row 1

    again = WindowedSampling(windows=2)  # the pool as it was after step 1 survives a checkpoint
    again.load_state_dict(state)
    assert sorted((r["prompt_ids"][0], tuple(r["completion_ids"])) for r in again.pool) == [(2, (8, 8)), (3, (8, 8))]


def test_hook_refuses_multi_turn_episodes():
    with pytest.raises(UserError, match="single-turn"):
        _source({}, WindowedSampling(windows=2), episode=True).batch(0)


@pytest.mark.parametrize("kwargs", [{"windows": 0}, {"windows": 1.5}, {"windows": True}])
def test_config_errors(kwargs):
    with pytest.raises(ValueError, match="windows"):
        TPPOConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# the real CLI. The bundled model answers in a few tokens (digits and EOS): a 2-token window cuts every answer at step 1,
# and step 2 continues (and here finishes) them. Step 1 has no gradient: with the critic at 0 (zero-initialised), no KL
# yet (policy = reference) and no finished row, every EGAE advantage is 0 and the critic has nothing to fit.


@pytest.mark.slow
def test_tppo_through_the_cli(tmp_path):
    metrics = train_changes_weights(tmp_path, TPPO_PATH, "--data", "arith", "--n", "2", "--set", "rollout.max_new_tokens=2",
                                    "--set", "algorithm.windows=3", grad_norm=False)
    first, second = metrics
    assert first["tppo/unfinished_fraction"] > 0 and second["tppo/carried_rows"] > 0
    assert second["tppo/finished_rows"] > 0 and second["vf_loss"] > 0 and second["grad_norm"] > 0
    assert second["completion/len_max"] > 2  # continued past the window
    assert (tmp_path / "x" / "value_head.safetensors").is_file()
