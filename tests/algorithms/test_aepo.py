"""AEPO (arXiv:2510.08141): the temperature switch and the extra-sample selection by hand, the hook's collect on a
fake source, advantages / loss / gradient by hand, α = 0 (and no selected extra row) = GRPO bit for bit, the entropy
state's round trip, config errors, and short runs through the real CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch

from tokalign.algorithms.aepo import AEPO, EXTRA_FIELD, AEPOConfig, EntropySamples, choose_temperature, select_extra
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput

AEPO_PATH = "aepo"


def test_temperature_switch():
    """H ≤ H* (0.5; None before the first update counts as 0): T_high 1.2; H > H*: T_low 0.8."""
    c = AEPOConfig()
    assert [choose_temperature(h, c) for h in (None, 0.0, 0.5, 0.5001, 3.0)] == [1.2, 1.2, 1.2, 0.8, 0.8]
    c = AEPOConfig(target_entropy=2.0, temperature_high=1.5, temperature_low=0.5)
    assert [choose_temperature(h, c) for h in (1.9, 2.1)] == [1.5, 0.5]


EXTRA_R = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
EXTRA_G = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_selection_by_hand():
    """Group 0: R = 1, 0, 0, 1 → mean ½, std √(1/3) = 0.577 → Â = ±0.866: rows 0, 3 pass τ = 0.05. Group 1: all 0 →
    Â = 0: none. Group 2: R = 1, 1, 1, 0 → mean ¾, std ½ → Â = ½, ½, ½, −1.5: rows 8, 9, 10. Kept in order: 0, 3, 8, 9,
    10 (5). M = 3: the first three. H = 0.7 > H*: ⌊5/2⌋ = 2. τ = 0.6: only group 0's (0.866 > 0.6 > 0.5)."""
    r, g = torch.tensor(EXTRA_R, dtype=torch.float64), torch.tensor(EXTRA_G)
    assert select_extra(r, g, 0.3, AEPOConfig()) == [0, 3, 8, 9, 10]
    assert select_extra(r, g, None, AEPOConfig()) == [0, 3, 8, 9, 10]
    assert select_extra(r, g, 0.3, AEPOConfig(max_samples=3)) == [0, 3, 8]
    assert select_extra(r, g, 0.7, AEPOConfig()) == [0, 3]
    assert select_extra(r, g, 0.7, AEPOConfig(max_samples=3)) == [0]  # ⌊3/2⌋ = 1
    assert select_extra(r, g, 0.3, AEPOConfig(adv_threshold=0.6)) == [0, 3]


class FakeSource:
    """The part of the online source the hook uses: 4 prompts, n = 2; ``sample`` records its spec and returns
    rows with group ids per prompt and rewards from ``rewards`` (cycled)."""

    def __init__(self, rewards):
        self.rows = [{"id": f"p{i}", "prompt_ids": [1, 2 + i]} for i in range(6)]
        self.step, self.spec, self.calls, self.rewards = 3, SimpleNamespace(n=2), [], list(rewards)

    def pick(self, step, round_):
        assert (step, round_) == (3, 0)
        return [5, 1, 4, 0]

    def sample(self, prompts, **spec):
        self.calls.append(spec)
        n = spec.get("n", self.spec.n)
        out = []
        for g, p in enumerate(prompts):
            for k in range(n):
                out.append({"id": f"{p['id']}#{k}", "prompt_ids": p["prompt_ids"], "completion_ids": [7], "group_id": g,
                            "reward": self.rewards.pop(0) if self.rewards else 0.0})
        return out


def test_hook_collect_on_a_fake_source():
    """Batch of 4 prompts (n = 2) rewarded 0 (8 rewards), then f = ½ → the first 2 prompts again, n = 3 at T_low
    (H = 0.9 > H* = 0.5): extra rewards 1, 0, 0 | 1, 1, 1 → group 0: Â = 1.155, −0.577, −0.577; group 1: 0. Kept:
    row 0 only; H > H*: ⌊1/2⌋ = 0 — nothing. Second call, H = 0.2 ≤ H*: T_high, the same rewards keep row 0 (1 row)."""
    algo = AEPO(AEPOConfig(prompt_fraction=0.5, samples=3))
    hook = next(h for h in algo.needs.hooks if isinstance(h, EntropySamples))
    src = FakeSource([0.0] * 8 + [1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    algo._sum, algo._count = 9.0, 10.0  # the last step: mean entropy 0.9
    groups, sampled, metrics = hook.collect(src)
    assert src.calls == [{}, {"n": 3, "temperature": 0.8}]
    assert [len(g) for g in groups] == [2, 2, 2, 2] and len(sampled) == 8
    assert metrics["aepo/temperature"] == 0.8 and metrics["aepo/entropy"] == pytest.approx(0.9)
    assert metrics["aepo/extra_rows"] == 0.0 and metrics["aepo/extra_reward_mean"] == pytest.approx(4 / 6)
    src = FakeSource([0.0] * 8 + [1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    algo._sum, algo._count = 2.0, 10.0
    groups, _, metrics = hook.collect(src)
    assert src.calls[1] == {"n": 3, "temperature": 1.2} and metrics["aepo/extra_rows"] == 1.0
    assert [len(g) for g in groups] == [3, 2, 2, 2]
    extra = groups[0][2]
    assert extra["fields"][EXTRA_FIELD] == 1.0 and extra["prompt_index"] == 5 and extra["id"] == "p5#0#aepo"
    assert all(r["fields"][EXTRA_FIELD] == 0.0 for g in groups for r in g[:2])
    assert algo.entropy == pytest.approx(0.2) and algo._count == 0.0


LENGTHS = [2, 3, 1, 2, 4]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0]
GROUPS = [0, 0, 0, 1, 1]


def _batch(extra, old=None, entropy_rows=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS)}
    if extra is not None:
        f[EXTRA_FIELD] = torch.tensor(extra)
    if old is not None:
        f["old_logps"] = old
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 5.0})


def test_advantages_loss_and_gradient_by_hand():
    """Row 2 (group 0, R = 1) is an extra sample, α = 0.5. GRPO rows only: group 0 R = 1, 0 → mean ½, std √½ →
    A = ±0.5/(0.70711 + 1e-6) = ±0.70711; group 1 R = 0, 1 → A = ∓0.70711. Extra row: A = α = 0.5 (with it in the
    statistics group 0 would read 1, 0, 1 and A = 0.577, −1.155, 0.577 — not so).
    On policy (ρ = 1), token-mean over N = 12 tokens: loss = −Σ_i A_i |o_i| / N
        = −(0.70711·2 − 0.70711·3 + 0.5·1 − 0.70711·2 + 0.70711·4)/12 = −(0.70711 + 0.5)/12 = −0.10059,
    ∂loss/∂ℓ_it = −A_i / N (the extra row's: −α/N, REINFORCE on it)."""
    algo = AEPO(AEPOConfig(coef=0.5))
    old = -torch.rand(5, 4, generator=torch.Generator().manual_seed(7))
    batch = algo.prepare(_batch([0.0, 0.0, 1.0, 0.0, 0.0], old=old))
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    adv = [a, -a, 0.5, -a, a]
    torch.testing.assert_close(batch.fields["advantages"], torch.tensor(adv))
    lp = leaf(old)
    ent = torch.rand(5, 4, generator=torch.Generator().manual_seed(8))
    out = algo.loss(batch, PolicyOutput(lp, entropy=ent))
    out.loss.backward()
    n = sum(LENGTHS)
    assert float(out.loss.detach()) == pytest.approx(-(a + 0.5) / n, rel=1e-6)
    grad = torch.tensor([[-x / n] * ln + [0.0] * (4 - ln) for x, ln in zip(adv, LENGTHS)])
    torch.testing.assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["aepo/extra_fraction"] == pytest.approx(0.2)
    # the step's entropy: the masked mean of the entropies, over this (the only) loss call
    mask = batch.completion_mask
    assert algo.step_entropy() == pytest.approx(float((ent * mask).sum() / mask.sum()), rel=1e-6)


def test_off_policy_extra_rows_are_clipped_like_grpo():
    """ρ ≠ 1: the extra row with A = α > 0 has GRPO's clipped surrogate −α·min(ρ, 1 + ε) per token."""
    algo = AEPO(AEPOConfig(coef=1.0))
    old = torch.full((5, 4), -1.0)
    batch = algo.prepare(_batch([0.0, 0.0, 1.0, 0.0, 0.0], old=old))
    lp = leaf(torch.full((5, 4), -1.0) + torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]).unsqueeze(-1))  # row 2: ρ = e^0.5 > 1.2
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert lp.grad[2, 0] == 0.0  # clipped: no gradient
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    assert float(out.loss.detach()) == pytest.approx(-(a * (2 - 3 - 2 + 4) + 1.0 * 1.2) / 12, rel=1e-6)


@pytest.mark.parametrize("extra", [None, [0.0] * 5], ids=["coef-0", "no-extra-row"])
def test_limit_is_grpo_bit_for_bit(extra):
    """α = 0 (no hook, no field): GRPO; α > 0 with no selected extra row in the batch: GRPO as well."""
    from algo_helpers import same_as_base

    torch.manual_seed(0)
    values = -torch.rand(5, 4) * 3
    old = values + 0.3 * torch.randn(5, 4)
    cfg = {"beta": 0.04, "scale_rewards": "batch"}
    aepo = AEPO(AEPOConfig(coef=0.0 if extra is None else 1.0, **cfg))
    if extra is None:
        assert aepo.needs == GRPO(GRPOConfig(**cfg)).needs
    same_as_base([aepo, GRPO(GRPOConfig(**cfg))], lambda: _batch(extra, old=old.clone()), values)


def test_missing_field_is_an_error():
    with pytest.raises(UserError, match="aepo_extra"):
        AEPO(AEPOConfig()).prepare(_batch(None))


def test_state_round_trip():
    a = AEPO(AEPOConfig())
    assert a.state_dict() == {"entropy": None, "sum": 0.0, "count": 0.0}
    a._sum, a._count = 3.0, 4.0
    assert a.step_entropy() == 0.75
    a._sum, a._count = 1.0, 2.0  # a step half accumulated when the checkpoint is written
    b = AEPO(AEPOConfig())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == {"entropy": 0.75, "sum": 1.0, "count": 2.0}
    assert b.step_entropy() == a.step_entropy() == 0.5
    c = AEPO(AEPOConfig())
    c.load_state_dict({"entropy": None, "sum": 0.0, "count": 0.0})
    assert c.step_entropy() is None


@pytest.mark.parametrize("kwargs,match", [
    ({"coef": -1.0}, "coef must be"), ({"coef": float("nan")}, "coef must be"),
    ({"target_entropy": -0.1}, "target_entropy must be"), ({"temperature_high": 0.0}, "temperature_high and"),
    ({"temperature_low": -1.0}, "temperature_high and"), ({"prompt_fraction": 0.0}, "prompt_fraction must be"),
    ({"prompt_fraction": 1.5}, "prompt_fraction must be"), ({"samples": -1}, "samples must be"),
    ({"max_samples": 0}, "max_samples"), ({"adv_threshold": float("inf")}, "adv_threshold must be"),
    ({"mismatch_correction": "token"}, "mismatch_correction=none"), ({"aggregation": "bogus"}, "aggregation must be"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AEPOConfig(**kwargs)


def test_config_ok_at_zero_coef_with_correction():
    AEPOConfig(coef=0.0, mismatch_correction="token")


@pytest.mark.slow
def test_cli_aepo(tmp_path):
    """Two steps, 2 prompts × 4 samples, every prompt sampled again (f = 1): step 1 has no entropy yet (T_high), step 2
    switches on the measured one (H* = 100: still T_high)."""
    out = tmp_path / "aepo"
    cli("train", AEPO_PATH, "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--set",
        "algorithm.prompt_fraction=1", "--set", "algorithm.target_entropy=100", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert [m["aepo/temperature"] for m in metrics] == [1.2, 1.2]
    # the switch reads step 1's trained-token entropy, the loop's logged one
    assert metrics[0]["aepo/entropy"] == 0.0 and metrics[1]["aepo/entropy"] == pytest.approx(metrics[0]["entropy"], rel=1e-5)
    assert all(0 <= m["aepo/extra_rows"] <= 8 for m in metrics) and metrics[0]["aepo/extra_rows"] > 0


@pytest.mark.slow
def test_cli_aepo_low_temperature(tmp_path):
    """H* = 0: step 2's measured entropy is above it, so T_low."""
    out = tmp_path / "aepo_low"
    cli("train", AEPO_PATH, "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--set",
        "algorithm.prompt_fraction=1", "--set", "algorithm.target_entropy=0", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert [m["aepo/temperature"] for m in metrics] == [1.2, 0.8]
