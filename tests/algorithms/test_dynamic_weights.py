"""Dynamic reward weighting (arXiv:2509.11452): reward-component weights moved online by gradient influence (mirror
descent on the simplex) or a hypervolume meta reward; the weights and the Pareto front resume with the run."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import run_metrics, same_as_base
from conftest import cli, run_and_kill, token_batch
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.dynamic_weights import (
    DynamicWeights,
    DynamicWeightsConfig,
    GradientInfluence,
    gradient_influences,
    hypervolume,
    hypervolume_contribution,
    influence_field,
)
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.batching import Seq, collate, micro_batches
from tokalign.forward import forward
from tokalign.protocols import TokenBatch

EM = [1.0, 0.0, 1.0, 1.0]
LEN = [0.8, 0.2, 0.6, 0.6]


def _batch(em=EM, length=LEN, influence=None, groups=(0, 0, 1, 1)):
    fields = {"rewards.exact_match": torch.tensor(em), "rewards.length": torch.tensor(length),
              "group_ids": torch.tensor(list(groups)), "old_logps": torch.full((4, 3), -1.0)}
    for name, s in (influence or {}).items():
        fields[influence_field(name)] = torch.full((4,), s)
    return token_batch(torch.ones(4, 3), fields)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _mixed(w_em, w_len, em=EM, length=LEN):
    return w_em * torch.tensor(em) + w_len * torch.tensor(length)


# ---------------------------------------------------------------------------------------------------
# the gradient method's weight update


def test_two_weight_steps_by_hand():
    """Two objectives, w₀ = (½, ½), η = 0.1, one group of four rows. With K = 2 the softmax is a sigmoid of the
    logit gap: w_em = σ(ln ½ − ln ½ + η Σ_t (s_em,t − s_len,t)).

    Step 1: s = (0.4, −0.2): logits (ln ½ + 0.04, ln ½ − 0.02), w_em = σ(0.06) = 1/(1 + e^−0.06) = 0.5149955,
            w_len = 0.4850045; r = w_em · EM + w_len · LEN = (0.9029991, 0.0970009, 0.8059982, 0.8059982).
    Step 2: s = (0.1, 0.3): gap 0.06 + 0.1 · (0.1 − 0.3) = 0.04, w_em = σ(0.04) = 0.5099987 — length's gradient
            influence was the larger, so its weight grew back. Each step's r uses the weights updated that step."""
    algo = DynamicWeights(DynamicWeightsConfig(weight_lr=0.1))
    assert algo.weights == [0.5, 0.5]
    b = algo.prepare(_batch(influence={"exact_match": 0.4, "length": -0.2}, groups=(0, 0, 0, 0)))
    w1 = _sig(0.4 * 0.1 - (-0.2 * 0.1))
    assert w1 == pytest.approx(0.5149955, abs=1e-7)
    assert algo.weights == [pytest.approx(w1, abs=1e-7), pytest.approx(1 - w1, abs=1e-7)]
    assert_close(b.fields["rewards"], torch.tensor([0.9029991, 0.0970009, 0.8059982, 0.8059982]))
    assert_close(b.fields["advantages"], ops.group_advantages(_mixed(w1, 1 - w1), torch.zeros(4, dtype=torch.long)))
    assert algo.used["weight/exact_match"] == pytest.approx(w1, abs=1e-7)
    assert algo.used["influence/exact_match"] == pytest.approx(0.4) and algo.used["influence/length"] == pytest.approx(-0.2)
    algo.prepare(_batch(influence={"exact_match": 0.1, "length": 0.3}))
    assert algo.weights[0] == pytest.approx(_sig(0.04), abs=1e-7) and algo.weights[0] == pytest.approx(0.5099987, abs=1e-7)
    assert sum(algo.weights) == pytest.approx(1.0, abs=1e-15)


def test_three_objectives_softmax_by_hand():
    """w₀ = (½, ¼, ¼), s = (1, 0, −1), η = 0.5: w ∝ (½ e^0.5, ¼, ¼ e^−0.5) = (0.824361, 0.25, 0.151633), sum 1.225994,
    w = (0.672402, 0.203916, 0.123681)."""
    cfg = DynamicWeightsConfig(objectives=["exact_match", "length", "format"], initial_weights=[0.5, 0.25, 0.25], weight_lr=0.5)
    algo = DynamicWeights(cfg)
    batch = _batch(influence={"exact_match": 1.0, "length": 0.0, "format": -1.0})
    batch.fields["rewards.format"] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    algo.prepare(batch)
    assert algo.weights == [pytest.approx(x, abs=1e-6) for x in (0.672402, 0.203916, 0.123681)]


def test_weight_update_every_averages_the_window():
    """N = 2, the same influences as the two-step test: step 1 only adds s to the window (w stays ½), step 2 steps with
    the window's mean s̄ = ((0.4 + 0.1)/2, (−0.2 + 0.3)/2) = (0.25, 0.05): w_em = σ(0.1 · 0.2) = σ(0.02) = 0.5049998."""
    algo = DynamicWeights(DynamicWeightsConfig(weight_lr=0.1, weight_update_every=2))
    algo.prepare(_batch(influence={"exact_match": 0.4, "length": -0.2}))
    assert algo.weights == [0.5, 0.5] and algo.influence_sum == [pytest.approx(0.4), pytest.approx(-0.2)]
    algo.prepare(_batch(influence={"exact_match": 0.1, "length": 0.3}))
    assert algo.weights[0] == pytest.approx(0.5049998, abs=1e-7) and algo.influence_sum == [0.0, 0.0]


def test_gradient_method_without_influences_says_which_field():
    algo = DynamicWeights(DynamicWeightsConfig())
    with pytest.raises(ValueError, match="influence.exact_match"):
        algo.prepare(_batch())


# ---------------------------------------------------------------------------------------------------
# hypervolume


def test_hypervolume_by_hand():
    """2-D, z = 0: one point (1, 2): 2; (2, 1) and (1, 2): 2 + 2 − 1 = 3. 3-D: (2, 1, 1) and (1, 2, 1): 2 + 2 − 1 = 3.
    A point below z in one objective adds nothing (the official recursion would count (2, −1) as −2)."""
    assert hypervolume([[1.0, 2.0]], [0.0, 0.0]) == 2.0
    assert hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0]) == 3.0
    assert hypervolume([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]], [0.0, 0.0, 0.0]) == 3.0
    assert hypervolume([[2.0, -1.0]], [0.0, 0.0]) == 0.0
    assert hypervolume([[2.0, -1.0], [1.0, 1.0]], [0.0, 0.0]) == 1.0
    assert hypervolume_contribution([[2.0, 1.0]], [1.0, 2.0], [0.0, 0.0]) == 1.0
    assert hypervolume_contribution([[2.0, 1.0]], [1.0, 1.0], [0.0, 0.0]) == 0.0  # dominated


def test_three_meta_reward_steps_by_hand():
    """z = (0, −1), w = (½, ½), a = 0.5, b = 1.5.

    Step 1: p₁ = (mean EM, mean LEN) = (0.75, 0.55); F empty: ΔHV = 0.75 · (0.55 + 1) = 1.1625,
            m = 0.5 + 1.5 tanh(1.1625) = 0.5 + 1.5 · 0.821853 = 1.732779; F = {p₁}.
    Step 2: p₂ = (0.25, 0.9), not dominated by p₁: HV(F ∪ {p₂}) = (0.75 − 0.25) · 1.55 + 0.25 · 1.9 = 1.25,
            ΔHV = 1.25 − 1.1625 = 0.0875, m = 0.5 + 1.5 tanh(0.0875) = 0.5 + 1.5 · 0.087277 = 0.630916; F = {p₁, p₂}.
    Step 3: p₁ again: weakly dominated by F, ΔHV = 0, m = 0.5. The advantages are m × GRPO's of the weighted sum."""
    algo = DynamicWeights(DynamicWeightsConfig(method="hypervolume", reference_point=[0.0, -1.0]))
    assert algo.needs.components == ()  # no gradient passes
    em2, len2 = [0.0, 0.0, 1.0, 0.0], [1.0, 0.8, 0.9, 0.9]
    expected = [(1.1625, 1.732779, 1), (0.0875, 0.630916, 2), (0.0, 0.5, 2)]
    for (em, length), (delta, meta, size) in zip([(EM, LEN), (em2, len2), (EM, LEN)], expected):
        b = algo.prepare(_batch(em, length))
        assert algo.used["hypervolume/contribution"] == pytest.approx(delta, abs=1e-7)  # float32 rewards
        assert algo.used["hypervolume/meta_reward"] == pytest.approx(meta, abs=1e-6)
        assert algo.used["hypervolume/front_size"] == size
        base = GRPO(GRPOConfig()).prepare(_with_rewards(_batch(em, length), _mixed(0.5, 0.5, em, length)))
        assert torch.equal(b.fields["advantages"], base.fields["advantages"] * algo.used["hypervolume/meta_reward"])
    assert algo.front == [[0.75, pytest.approx(0.55)], [0.25, pytest.approx(0.9)]]


def test_reference_defaults_to_the_first_batch():
    """No reference point: the first batch's means become z and its m is 1; a later batch below z in one objective
    adds nothing: m = a = 0.5."""
    algo = DynamicWeights(DynamicWeightsConfig(method="hypervolume"))
    algo.prepare(_batch())
    assert algo.reference == [0.75, pytest.approx(0.55)] and algo.used["hypervolume/meta_reward"] == 1.0
    algo.prepare(_batch([0.0, 0.0, 1.0, 0.0], [1.0, 0.8, 0.9, 0.9]))
    assert algo.used["hypervolume/meta_reward"] == 0.5 and algo.front == []


# ---------------------------------------------------------------------------------------------------
# limits


def _with_rewards(batch: TokenBatch, rewards: torch.Tensor) -> TokenBatch:
    batch.fields["rewards"] = rewards
    return batch


@pytest.mark.parametrize("method", ["gradient", "hypervolume"])
def test_zero_weight_lr_or_unit_meta_is_grpo_on_the_fixed_weighted_sum(method):
    """weight_lr = 0 (gradient) or a = 1, b = 0 (hypervolume), w₀ = (0.3, 0.7): every step is GRPO on
    r = 0.3 r_em + 0.7 r_len, bit for bit (rewards, advantages, loss and gradient); the weights never move."""
    opts = {"weight_lr": 0.0} if method == "gradient" else {"meta_base": 1.0, "meta_scale": 0.0, "reference_point": [0.0, -1.0]}
    algo = DynamicWeights(DynamicWeightsConfig(method=method, initial_weights=[0.3, 0.7], beta=0.04, **opts))
    assert algo.needs.components == ()
    base = GRPO(GRPOConfig(beta=0.04))
    values = torch.tensor([[-0.9, -1.2, -1.0], [-0.5, -0.7, -2.0], [-1.1, -0.3, -0.6], [-0.8, -0.8, -1.4]])
    for em, length in [(EM, LEN), ([0.0, 1.0, 1.0, 0.0], [0.1, 0.9, 0.3, 0.5])]:
        # same_as_base makes one batch per algorithm, in order: ours the components, GRPO's the weighted sum as rewards
        made = iter([lambda: _batch(em, length), lambda: _with_rewards(_batch(em, length), _mixed(0.3, 0.7, em, length))])
        same_as_base([algo, base], lambda: next(made)(), values)
        assert algo.weights == [0.3, 0.7]


# ---------------------------------------------------------------------------------------------------
# state and config


@pytest.mark.parametrize("method", ["gradient", "hypervolume"])
def test_state_round_trip(method):
    cfg = DynamicWeightsConfig(method=method, weight_lr=0.1, weight_update_every=2)
    steps = [{"exact_match": 0.4, "length": -0.2}, {"exact_match": 0.1, "length": 0.3}, {"exact_match": -0.5, "length": 0.2}]
    batches = [(EM, LEN), ([0.0, 0.0, 1.0, 0.0], [1.0, 0.8, 0.9, 0.9]), ([1.0, 1.0, 1.0, 0.0], [0.9, 0.9, 0.9, 0.95])]
    a = DynamicWeights(cfg)
    for (em, length), s in zip(batches[:2], steps[:2]):
        a.prepare(_batch(em, length, influence=s))
    b = DynamicWeights(cfg)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    (em, length), s = batches[2], steps[2]
    ra, rb = a.prepare(_batch(em, length, influence=s)), b.prepare(_batch(em, length, influence=s))
    assert a.state_dict() == b.state_dict() and a.used == b.used
    assert torch.equal(ra.fields["advantages"], rb.fields["advantages"])


def test_config_errors():
    with pytest.raises(ValueError, match="at least two distinct"):
        DynamicWeightsConfig(objectives=["exact_match"])
    with pytest.raises(ValueError, match="at least two distinct"):
        DynamicWeightsConfig(objectives=["length", "length"])
    with pytest.raises(ValueError, match="method must be"):
        DynamicWeightsConfig(method="pareto")
    with pytest.raises(ValueError, match="summing to 1"):
        DynamicWeightsConfig(initial_weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="positive"):
        DynamicWeightsConfig(initial_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="weight_lr"):
        DynamicWeightsConfig(weight_lr=-0.1)
    with pytest.raises(ValueError, match="weight_update_every"):
        DynamicWeightsConfig(weight_update_every=0)
    with pytest.raises(ValueError, match="gradient_layers"):
        DynamicWeightsConfig(gradient_layers=[-1])
    with pytest.raises(ValueError, match="meta_base"):
        DynamicWeightsConfig(meta_scale=-1.0)
    with pytest.raises(ValueError, match="reference_point"):
        DynamicWeightsConfig(reference_point=[0.0])
    with pytest.raises(ValueError, match="scale_rewards"):  # GRPO's own checks still run
        DynamicWeightsConfig(scale_rewards="row")


# ---------------------------------------------------------------------------------------------------
# the gradient influence on the bundled model


def _policy():
    from tokalign import models

    return models.load_model(str(models.BUNDLED_MODEL))


def _model_batch():
    """Two groups of three completions over the bundled vocabulary, with two reward components that differ."""
    g = torch.Generator().manual_seed(3)
    seqs = []
    em, length = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [-0.2, -0.6, -0.4, -0.8, -0.2, -0.4]
    for i in range(6):
        n = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(10, 300, (n,), generator=g).tolist()
        seqs.append(Seq([1, 20 + i], ids, i // 3, row={"rewards.exact_match": em[i], "rewards.length": length[i]}))
    return collate(seqs, pad_id=0)


def _by_hand(policy, batch, algo, names, clip, layers=None):
    """The Gram matrix of clipped per-objective gradients, each from .backward() of GRPO's loss (ρ = 1)."""
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    flats = []
    for name in names:
        policy.zero_grad(set_to_none=True)
        b = TokenBatch(batch.input_ids, batch.attention_mask, batch.completion_mask, dict(batch.fields), batch.totals)
        b.fields["advantages"] = ops.group_advantages(b.fields[f"rewards.{name}"], b.fields["group_ids"])
        out = forward(policy, b)
        b.fields["old_logps"] = out.logps.detach()
        GRPO.loss(algo, b, out).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], clip)
        flats.append(torch.cat([p.grad.flatten() for n, p in named if layers is None or any(f"layers.{i}." in n for i in layers)]).double())
    policy.zero_grad(set_to_none=True)
    g = torch.stack(flats)
    return g @ g.T


@pytest.mark.parametrize("clip", [1.0, 100.0])
def test_gradient_influences_are_gram_row_sums(clip):
    """s_k = Σ_j ⟨g_k, g_j⟩ with g_k the clipped gradient of GRPO's loss on r_k's advantages: equal to .backward()
    and torch's clip_grad_norm_ per objective (clip 1: both clipped; 100: neither), whole or in micro-batches of 2
    groups' rows; the parameters' .grad stay untouched; ``gradient_layers`` keeps those layers' parameters only."""
    torch.manual_seed(0)
    policy, batch = _policy(), _model_batch()
    algo = DynamicWeights(DynamicWeightsConfig())
    names = ["exact_match", "length"]
    gram = _by_hand(policy, batch, algo, names, clip)
    s, g = gradient_influences(policy, batch, names, algo.objective_loss, lambda b: [b], "group", 1e-6, clip, [])
    assert all(p.grad is None for p in policy.parameters())
    assert_close(torch.tensor(g, dtype=torch.float64), gram, rtol=1e-5, atol=1e-9)
    assert_close(torch.tensor(s, dtype=torch.float64), gram.sum(-1), rtol=1e-5, atol=1e-9)
    if clip > 10:  # unclipped, the two objectives' influences differ (clipped to norm 1 both, they are equal)
        assert abs(s[0] - s[1]) > 1e-3
    else:
        assert s[0] == pytest.approx(s[1], rel=1e-5)
    s_mb, _ = gradient_influences(policy, batch, names, algo.objective_loss, lambda b: micro_batches(b, 3), "group",
                                  1e-6, clip, [])
    assert_close(torch.tensor(s_mb), torch.tensor(s), rtol=1e-5, atol=1e-7)
    s1, g1 = gradient_influences(policy, batch, names, algo.objective_loss, lambda b: [b], "group", 1e-6, clip, [1])
    assert_close(torch.tensor(g1, dtype=torch.float64), _by_hand(policy, batch, algo, names, clip, layers=[1]),
                 rtol=1e-5, atol=1e-9)
    assert g1[0][0] < g[0][0]


def test_component_fills_the_influence_fields():
    from types import SimpleNamespace

    policy, batch = _policy(), _model_batch()
    algo = DynamicWeights(DynamicWeightsConfig())
    (comp,) = [c for c in algo.needs.components if isinstance(c, GradientInfluence)]
    assert comp.provides == ("influence.exact_match", "influence.length")
    ctx = SimpleNamespace(policy=policy, micro_batches=lambda b: [b],
                          cfg=SimpleNamespace(train=SimpleNamespace(max_grad_norm=1.0, distributed="ddp")))
    comp.setup(ctx)
    assert comp.fill(batch, ctx) == {}
    s, _ = gradient_influences(policy, batch, algo.config.objectives, algo.objective_loss, lambda b: [b], "group", 1e-6, 1.0, [])
    assert batch.fields["influence.length"].shape == (6,)
    assert batch.fields["influence.length"].tolist() == [float(torch.tensor(s[1], dtype=torch.float32))] * 6
    with pytest.raises(Exception, match="match none"):
        gradient_influences(policy, batch, algo.config.objectives, algo.objective_loss, lambda b: [b], "group", 1e-6, 1.0, [99])


# ---------------------------------------------------------------------------------------------------
# through the real CLI

NAME = "dynamic_weights"
COMMON = ["--data", "p2", "--reward", "exact_match", "--reward", "length", "--reward-opt", "length.mode=linear",
          "--reward-opt", "length.max_len=6", "--batch-size", "2", "--n", "4", "--lr", "1e-3",
          "--set", "rollout.max_new_tokens=6", "--set", "rollout.temperature=1.5", "--quiet"]
# unclipped (max_grad_norm 100), the two objectives' gradients differ in size, so their influences differ
GRADIENT = ["train", NAME, *COMMON, "--max-steps", "4", "--set", "train.max_grad_norm=100",
            "--set", "algorithm.weight_lr=0.002", "--set", "train.save_every=2"]


def test_cli_hypervolume_run(tmp_path):
    """A short hypervolume run: the first step's m is a + b·tanh(ΔHV) of its own point against z = (−1, −1), later
    steps' points join the front or get m = a."""
    cli("prepare", "arith", "--limit", "2", "--out", "p2", cwd=tmp_path)
    cli("train", NAME, *COMMON, "--max-steps", "3", "--set", "algorithm.method=hypervolume",
        "--set", "algorithm.reference_point=[-1,-1]", "--out", "h", cwd=tmp_path)
    rows = run_metrics(tmp_path / "h")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    first = rows[0]
    delta = (first["objective/exact_match_mean"] + 1) * (first["objective/length_mean"] + 1)
    assert first["hypervolume/contribution"] == pytest.approx(delta)
    assert first["hypervolume/meta_reward"] == pytest.approx(0.5 + 1.5 * math.tanh(delta))
    assert first["hypervolume/front_size"] == 1  # every point is above z = (−1, −1): the first one opens the front
    assert all(r["weight/exact_match"] == 0.5 for r in rows)
    assert all(r["hypervolume/meta_reward"] == 0.5 or r["hypervolume/contribution"] > 0 for r in rows)


def test_cli_weights_resume_bit_exactly(tmp_path):
    """The gradient method through the CLI: the weights move. A run of 4 steps killed (SIGKILL) after its
    checkpoint at step 2 holds w in trainer_state.pt; resumed for the 2 steps left, it logs the same weights each step
    and ends with exactly the model weights of the uninterrupted 4-step run. Control: the same resume with the
    algorithm's state dropped (w restarts at ½) logs other weights."""
    import shutil

    from safetensors.torch import load_file

    from tokalign.train import checkpoint

    cli("prepare", "arith", "--limit", "2", "--out", "p2", cwd=tmp_path)
    cli(*GRADIENT, "--out", "full", cwd=tmp_path)
    run_and_kill(GRADIENT, "cut", "checkpoint-2", tmp_path)
    ckpt = checkpoint.latest(tmp_path / "cut.partial")
    state = torch.load(ckpt / checkpoint.STATE, weights_only=False)
    full = run_metrics(tmp_path / "full")
    assert state["algorithm"]["weights"] == [full[1]["weight/exact_match"], full[1]["weight/length"]]
    assert state["algorithm"]["steps"] == 2

    shutil.copytree(tmp_path / "cut.partial", tmp_path / "nostate.partial")
    state["algorithm"] = None
    torch.save(state, checkpoint.latest(tmp_path / "nostate.partial") / checkpoint.STATE)

    cli(*GRADIENT, "--out", "cut", "--resume", cwd=tmp_path)
    cli(*GRADIENT, "--out", "nostate", "--resume", cwd=tmp_path)
    cut = run_metrics(tmp_path / "cut")
    weights = [r["weight/exact_match"] for r in full]
    assert len(set(weights)) > 1 and weights[1] != 0.5  # the weights move; the checkpoint's are not the initial ones
    assert [r["weight/exact_match"] for r in cut] == weights
    assert cut == full
    wf, wc = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    nostate = run_metrics(tmp_path / "nostate")
    assert [r["weight/exact_match"] for r in nostate][2:] != weights[2:]
