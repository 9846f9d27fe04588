"""D³S (dual-level down-sampling, arXiv:2509.22115): the max-variance subset by hand and against brute force, the two
levels, the loss and gradient by hand, keep fractions 1 (and a finished schedule) = GRPO bit for bit, the schedule at
a few steps, the batch component, micro-batch invariance, dropped = absent, config errors, and a short run through
the real CLI."""

from __future__ import annotations

import itertools

import pytest
import torch
from algo_helpers import check_run, same_as_base
from conftest import cli, leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.d3s import (
    D3S,
    D3SComponent,
    D3SConfig,
    keep_at,
    keep_count,
    max_variance_subset,
    sample_mask,
)
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.batching import Seq, collate
from tokalign.components.train_step import TotalSteps, TrainStep
from tokalign.protocols import PolicyOutput, TokenBatch

# the hand-computed batch: three groups, completion lengths ≤ 3
REWARDS = [1.0, 0.0, 0.25, 0.75, 0.0, 0.5, 1.0, 1.0, 1.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 2, 2]
LENGTHS = [2, 3, 1, 2, 2, 1, 3, 2, 1]
ENTROPY = [[0.8, 0.2, 0.0], [1.0, 0.4, 0.6], [5.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.3, 1.2, 0.0], [5.0, 0.0, 0.0],
           [0.9, 0.1, 0.7], [2.0, 2.0, 0.0], [3.0, 0.0, 0.0]]


def _batch(step=0, old=None, entropy=True):
    mask = torch.tensor([[1.0] * n + [0.0] * (3 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS), "train_step": torch.full((9,), float(step))}
    if entropy:
        f["old_entropy"] = torch.tensor(ENTROPY)
    if old is not None:
        f["old_logps"] = old
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 9.0, "max_completion_len": 3.0})


def test_max_variance_subset_by_hand():
    """A = ½, −½, −¼, ¼, m = 2. Sorted: −½ (1), −¼ (2), ¼ (3), ½ (0). k = 0: {−½, −¼} Var = 5/32 − 9/64 = 1/64;
    k = 1: {−½, ½} Var = ¼; k = 2: {¼, ½} Var = 1/64 → rows 0 and 1 (the extremes)."""
    assert max_variance_subset(torch.tensor([0.5, -0.5, -0.25, 0.25]), 2).tolist() == [0, 1]
    assert max_variance_subset(torch.tensor([0.5, -0.5]), 2).tolist() == [0, 1]
    # all equal: every subset has Var 0 → k = 0, the first m in row order
    assert max_variance_subset(torch.zeros(4), 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_max_variance_subset_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    for n in range(2, 8):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x[: n // 3] = x[n - 1]  # some ties
        for m in range(1, n + 1):
            best = max(float(x[list(c)].var(unbiased=False)) for c in itertools.combinations(range(n), m))
            got = max_variance_subset(x, m)
            assert len(got) == m and len(set(got.tolist())) == m
            assert float(x[got].var(unbiased=False)) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_keep_counts():
    """⌈ρ n⌉, at least the minimum, at most n; 0.7 · 10 = 7.000000000000001 in floats is still 7."""
    assert [keep_count(0.5, n, 2) for n in (1, 2, 3, 4, 8)] == [1, 2, 2, 2, 4]
    assert keep_count(0.7, 10) == 7 and keep_count(0.01, 5) == 1 and keep_count(0.5, 0) == 0


def test_sample_level_group_and_batch_scope_by_hand():
    """scale none: A = ½, −½, −¼, ¼ | −½, 0, ½ | 0, 0.
    group scope, ρ_s = ½: group 0 m = 2 → rows 0, 1 (above); group 1 m = max(2, ⌈1.5⌉) = 2: k = 1 {−½, ½} (Var ¼)
    beats {−½, 0}, {0, ½} (1/16) → rows 4, 6; group 2 m = 2 = n → rows 7, 8.
    batch scope, m = ⌈4.5⌉ = 5 of the pool sorted −½ (1), −½ (4), −¼ (2), 0 (5), 0 (7), 0 (8), ¼ (3), ½ (0), ½ (6):
    k = 0 .. 5 give Var = .05, .14, .21, .21, .14, .05 (k = 2: {−½, −½, −¼, ½, ½}, mean −.05, 1.0625/5 − .0025);
    the tie k = 2, 3 goes to the smallest k → rows 0, 1, 2, 4, 6."""
    adv = GRPO(GRPOConfig(scale_rewards="none")).prepare(_batch()).fields["advantages"]
    assert adv.tolist() == [0.5, -0.5, -0.25, 0.25, -0.5, 0.0, 0.5, 0.0, 0.0]
    gids = torch.tensor(GROUPS)
    assert torch.nonzero(sample_mask(adv, gids, 0.5)).squeeze(-1).tolist() == [0, 1, 4, 6, 7, 8]
    assert torch.nonzero(sample_mask(adv, gids, 0.5, "batch")).squeeze(-1).tolist() == [0, 1, 2, 4, 6]


def test_prepare_loss_and_gradient_by_hand():
    """Step 0 of T = 10: ρ_s = ρ_t = ½. Sample level (group scope, above): rows 0, 1, 4, 6, 7, 8 stay (A = ½, −½, −½,
    ½, 0, 0). Their N = 2 + 3 + 2 + 3 + 2 + 1 = 13 tokens, s = |A|·H:
        row 0: .4, .1   row 1: .5, .2, .3   row 4: .15, .6   row 6: .45, .05, .35   rows 7, 8: 0, 0, 0
    keep ⌈6.5⌉ = 7: .6 (4,1) .5 (1,0) .45 (6,0) .4 (0,0) .35 (6,2) .3 (1,2) .2 (1,1). Rows 7, 8 lose every token
    (an all-equal group teaches nothing), rows 2, 3, 5 were dropped: tokens = 7, seqs = 9 − 3 − 2 = 4.
    On policy (ρ = 1), token-mean over the 7 kept tokens: L_t = −A_i, loss = −(½·1 − ½·3 − ½·1 + ½·2)/7 = ½/7,
    ∂loss/∂logp_it = −A_i/7 on the kept tokens, 0 elsewhere."""
    algo = D3S(D3SConfig(scale_rewards="none", relax_steps=10))
    old = -torch.rand(9, 3, generator=torch.Generator().manual_seed(0))
    batch = algo.prepare(_batch(old=old))
    kept = [[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert batch.completion_mask.tolist() == kept
    assert batch.totals == {"tokens": 7.0, "seqs": 4.0, "max_completion_len": 3.0}
    assert batch.fields["d3s_kept_rows"].tolist() == [1, 1, 0, 0, 1, 0, 1, 0, 0]
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(0.5 / 7, rel=1e-6)
    adv = torch.tensor([0.5, -0.5, -0.25, 0.25, -0.5, 0.0, 0.5, 0.0, 0.0]).unsqueeze(-1)
    assert_close(lp.grad, -adv * torch.tensor(kept, dtype=torch.float32) / 7, rtol=1e-6, atol=1e-9)
    m = out.metrics
    assert (m["d3s/sample_keep"], m["d3s/token_keep"]) == (0.5, 0.5)
    assert m["d3s/rows_kept_fraction"] == pytest.approx(4 / 9) and m["d3s/tokens_kept_fraction"] == pytest.approx(7 / 17)


def test_only_one_level():
    """ρ_t = 1: the sample level alone (rows 0, 1, 4, 6, 7, 8 keep all their tokens; no entropies needed).
    ρ_s = 1: the token level alone over all 17 tokens: ⌈8.5⌉ = 9 kept."""
    batch = D3S(D3SConfig(scale_rewards="none", token_keep=1.0, relax_steps=10)).prepare(_batch(entropy=False))
    assert batch.completion_mask.sum(-1).tolist() == [2, 3, 0, 0, 2, 0, 3, 2, 1]
    assert batch.totals["tokens"] == 13.0 and batch.totals["seqs"] == 6.0
    batch = D3S(D3SConfig(scale_rewards="none", sample_keep=1.0, relax_steps=10)).prepare(_batch())
    assert batch.totals["tokens"] == 9.0
    with pytest.raises(ValueError, match="old_entropy"):
        D3S(D3SConfig(relax_steps=10)).prepare(_batch(entropy=False))


@pytest.mark.parametrize("cfg, step", [({"sample_keep": 1.0, "token_keep": 1.0}, 0),  # no down-sampling
                                       ({"relax_steps": 4}, 4), ({"relax_steps": 4, "schedule": "cosine"}, 9)],  # relaxed
                         ids=["keep-1", "linear-relaxed", "cosine-relaxed"])
def test_keep_fractions_one_is_grpo_bit_for_bit(cfg, step):
    torch.manual_seed(0)
    values = -torch.rand(9, 3) * 3
    old = values + 0.3 * torch.randn(9, 3)
    same_as_base((D3S(D3SConfig(beta=0.04, **cfg)), GRPO(GRPOConfig(beta=0.04))), lambda: _batch(step=step, old=old), values)
    batch = D3S(D3SConfig(**cfg)).prepare(_batch(step=step))
    assert torch.equal(batch.completion_mask, _batch().completion_mask) and batch.totals == _batch().totals


def test_schedule_at_steps():
    """ρ_0 = ¼ → 1 over T = 4. Linear: ¼ + ¾·t/4 = .25, .4375, .625, .8125, 1, then 1. Cosine at t = 1:
    ¼ + ¾·(1 − cos π/4)/2 = .359835; t = 2: .625. Constant: ¼ throughout; no horizon known: ¼."""
    assert [keep_at(t, 0.25, 1.0, 4) for t in (0, 1, 2, 3, 4, 10)] == [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]
    assert keep_at(1, 0.25, 1.0, 4, "cosine") == pytest.approx(0.25 + 0.75 * (1 - 2 ** -0.5) / 2)
    assert keep_at(2, 0.25, 1.0, 4, "cosine") == pytest.approx(0.625)
    assert keep_at(4, 0.3, 1.0, 4, "cosine") == 1.0
    assert [keep_at(t, 0.25, 1.0, 4, "constant") for t in (0, 4, 100)] == [0.25] * 3
    assert keep_at(3, 0.25, 1.0, 0) == 0.25
    # the algorithm's step and horizon: relax_steps, else TotalSteps' train_total_steps field, else none (ρ_0)
    algo = D3S(D3SConfig(sample_keep=0.25, token_keep=0.5, token_keep_end=0.75))
    batch = _batch(step=2)
    assert algo.keeps(batch) == (0.25, 0.5)
    batch.fields["train_total_steps"] = torch.full((9,), 4.0)
    assert algo.keeps(batch) == (0.625, 0.625)
    assert D3S(D3SConfig(sample_keep=0.25, relax_steps=8)).keeps(batch) == (0.4375, 0.625)


def test_component_fills_entropies_only_when_needed():
    class Train:
        max_steps = 8

    class Ctx:
        class cfg:
            train = Train

        step, policy, calls = 0, object(), 0

        def map_micro_batches(self, batch, fn, *models):
            Ctx.calls += 1
            assert models == (self.policy,)
            return {"h": torch.full(batch.completion_mask.shape, 0.5, dtype=torch.bfloat16)}

    comp, ctx = D3SComponent(D3SConfig()), Ctx()
    comp.setup(ctx)
    batch = _batch(entropy=False)
    comp.fill(batch, ctx)
    assert comp.horizon == 8 and Ctx.calls == 1
    assert batch.fields["old_entropy"].dtype == torch.float32
    ctx.step = 8  # ρ_t = 1: no pass
    batch = _batch(entropy=False)
    comp.fill(batch, ctx)
    assert "old_entropy" not in batch.fields and Ctx.calls == 1
    comp = D3SComponent(D3SConfig(token_keep=1.0, relax_steps=3))  # the token level off: never a pass
    comp.setup(ctx)
    ctx.step = 0
    comp.fill(batch, ctx)
    assert comp.horizon == 3 and "old_entropy" not in batch.fields and Ctx.calls == 1
    names = [type(c) for c in D3S(D3SConfig()).needs.components]
    assert names == [TrainStep, TotalSteps, D3SComponent] and D3S(D3SConfig()).needs.split_groups


def _random_batch(seed=5) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    gids = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    for i, gid in enumerate(gids):
        n = int(torch.randint(1, 7, (1,), generator=g))
        pol = -torch.rand(n, generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(torch.randint(0, 3, (1,), generator=g)) / 2},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.2 * torch.randn(n, generator=g)).tolist(),
                               "ref_logps": (pol + 0.1 * torch.randn(n, generator=g)).tolist(),
                               "old_entropy": (torch.rand(n, generator=g) * 3).tolist()}))
    return collate(seqs, pad_id=0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_micro_batches_add_up_and_dropped_is_absent(aggregation, scope):
    """Selection is decided once per batch in prepare: micro-batches of 2 rows (groups whole) sum to the full loss and
    gradient; and the loss is GRPO's on a batch that holds only the kept rows and tokens, with totals counted afresh
    (the advantages being the full groups')."""
    cfg = {"beta": 0.04, "aggregation": aggregation, "sample_scope": scope, "sample_keep": 0.6, "token_keep": 0.4,
           "relax_steps": 10}
    algo = D3S(D3SConfig(**cfg))
    batch = algo.prepare(_random_batch())
    assert 0 < batch.totals["tokens"] < float(_random_batch().completion_mask.sum())
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch)
    assert n > 2
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3
    rows = torch.nonzero(batch.fields["d3s_kept_rows"]).squeeze(-1)
    sub = batch.select(rows)
    sub.totals = {"tokens": float(sub.completion_mask.sum()), "seqs": float(len(rows)), "max_completion_len": batch.totals["max_completion_len"]}
    assert bool((sub.completion_mask.sum(-1) > 0).all())
    grpo = GRPO(GRPOConfig(beta=0.04, aggregation=aggregation))
    assert_close(grpo.loss(sub, PolicyOutput(sub.fields["pol"])).loss, algo.loss(batch, PolicyOutput(batch.fields["pol"])).loss)


def test_config():
    for bad, msg in [({"sample_keep": 0.0}, "sample_keep must be"), ({"token_keep": 1.5}, "token_keep must be"),
                     ({"sample_keep_end": -1.0}, "sample_keep_end must be"), ({"token_keep_end": 2}, "token_keep_end must be"),
                     ({"sample_keep": 0.8, "sample_keep_end": 0.5}, "the schedule relaxes"),
                     ({"token_keep": 0.8, "token_keep_end": 0.5}, "the schedule relaxes"),
                     ({"schedule": "exponential"}, "schedule must be"), ({"relax_steps": -1}, "relax_steps must be"),
                     ({"relax_steps": 2.5}, "relax_steps must be"), ({"sample_scope": "prompt"}, "sample_scope must be"),
                     ({"beta": -1}, "beta must be")]:
        with pytest.raises(ValueError, match=msg):
            D3SConfig(**bad)


@pytest.mark.slow
def test_cli_d3s(tmp_path):
    """Two steps, n = 4, T = train.max_steps = 2: ρ = ½ at step 0 (2 of 4 rollouts per group), ¾ at step 1."""
    out = tmp_path / "d3s"
    cli("train", "d3s", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert [m["d3s/sample_keep"] for m in metrics] == [0.5, 0.75]
    assert [m["d3s/token_keep"] for m in metrics] == [0.5, 0.75]
    assert metrics[0]["d3s/rows_kept_fraction"] <= 0.5 and metrics[0]["d3s/tokens_kept_fraction"] < 1
