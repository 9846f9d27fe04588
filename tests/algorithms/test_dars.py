"""DARS (arXiv:2508.13755): the ET / HW schedules by hand, the two sampling rounds and the pool filter on a fake
sampler, and the limit n_max = N, which is GRPO's batch and loss bit for bit; a slow run through the real CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch

from tokalign.algorithms.dars import DARS, DARSConfig, Schedule, extra_rollouts
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def test_schedules_by_hand():
    """N = 8, no std: S(a) = 2a(1 − a), A_peak = 4.
    ET a = 1/8: S = 7/32, N·S = 1.75, (4 − 1.75) / (7/32) = 10.29 → 11;  a = 2/8: (4 − 3) / 0.375 = 2.67 → 3;
    a = 3/8: (4 − 3.75) / (15/32) = 0.53 → 1;  a = 0 counts as 1/16: S = 15/128, (4 − 0.9375) / S = 26.1 → 27,
    capped at N_max − N = 24;  a ≥ ½ → 0.
    HW (target 2(1 − a)·4), N_max 64: a = 1/8: (7 − 1.75) / (7/32) = 24;  a = 0 → 1/16: (7.5 − 0.9375) / (15/128) = 56;
    a = 2/8: (6 − 3) / 0.375 = 8.
    std (S = 2√(a(1 − a)), A_peak = 8), ET a = 2/8: (8 − 8·0.866) / 0.866 = 1.24 → 2."""
    assert [extra_rollouts(a, 8, 32) for a in (0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 7 / 8, 1)] == [24, 11, 3, 1, 0, 0, 0]
    assert [extra_rollouts(a, 8, 64, "HW") for a in (0, 1 / 8, 2 / 8)] == [56, 24, 8]
    assert extra_rollouts(2 / 8, 8, 32, std=True) == 2
    assert extra_rollouts(1 / 8, 8, 8) == 0  # n_max = N: no second round
    with pytest.raises(UserError, match="rewards in \\[0, 1\\]"):
        extra_rollouts(2.0, 8, 32)


class FakeSampler:
    """A SamplingContext whose prompt p yields the rewards ``rewards[p]`` in order; records each call's (prompts, n)."""

    def __init__(self, rewards: dict[str, list[float]], n: int):
        self.rows = [{"id": p} for p in rewards]
        self.spec, self.step, self.calls = SimpleNamespace(n=n), 0, []
        self._left = {p: list(r) for p, r in rewards.items()}

    def pick(self, step, round_):
        return list(range(len(self.rows)))

    def sample(self, prompts, n):
        self.calls.append(([p["id"] for p in prompts], n))
        return [{"prompt": p["id"], "group_id": k, "reward": self._left[p["id"]].pop(0)} for k, p in enumerate(prompts) for _ in range(n)]


def test_two_rounds_and_the_filter():
    """N = 4, ET, N_max 16. Round 1: a (1 of 4 right: a = ¼, S = 0.375, (2 − 1.5) / 0.375 = 1.33 → 2 more),
    b (2 of 4: a = ½, done), c (0 of 4: a → 1/8, S = 7/32, (2 − 0.875) / (7/32) = 5.14 → 6 more), d (4 of 4, done).
    Round 2 draws 2 for a and 6 for c, one call per count. c stays all wrong and d all right: both dropped; the batch is
    a's 6 rows and b's 4, each group the whole pool."""
    rewards = {"a": [1, 0, 0, 0, 1, 1], "b": [1, 1, 0, 0], "c": [0] * 10, "d": [1] * 4}
    ctx = FakeSampler(rewards, n=4)
    hook = DARS(DARSConfig(n_max=16)).needs.hooks[-1]
    groups, sampled, metrics = hook.collect(ctx)
    assert ctx.calls == [(["a", "b", "c", "d"], 4), (["a"], 2), (["c"], 6)]
    assert [[r["reward"] for r in g] for g in groups] == [[1, 0, 0, 0, 1, 1], [1, 1, 0, 0]]
    assert [g[0]["prompt_index"] for g in groups] == [0, 1] and len(sampled) == 24
    assert groups[0][0]["fields"]["pool_mean"] == pytest.approx(0.5) and metrics["sampling/kept_groups"] == 2
    # every group all right or all wrong: nothing is dropped (zero advantages) rather than an empty batch
    groups, _, _ = hook.collect(FakeSampler({"c": [0] * 10, "d": [1] * 4}, n=4))
    assert len(groups) == 2


def test_no_extra_rollouts_is_one_plain_round():
    """n_max = N: one call of N samples per prompt, the groups as sampled (less the all-right / all-wrong ones)."""
    ctx = FakeSampler({"a": [1, 0, 0, 0], "b": [1, 1, 1, 1]}, n=4)
    groups, _, _ = DARS(DARSConfig(n_max=4)).needs.hooks[-1].collect(ctx)
    assert ctx.calls == [(["a", "b"], 4)] and [[r["reward"] for r in g] for g in groups] == [[1, 0, 0, 0]]
    assert Schedule(4, "ET", False, 1.0).select([{"reward": 0}] * 2, 4, final=False) is None


def test_loss_is_grpos_bit_for_bit():
    """Groups of unequal size (6 and 3 rows): A = R − mean_group (no std), GRPO's clipped surrogate, Σ m·L / (B·T).
    Hand check of the advantages: group 0 rewards (1, 0, 0, 0, 1, 1) mean ½ → ±½; group 1 (1, 0, 0) → (⅔, −⅓, −⅓)."""
    torch.manual_seed(0)
    b, t = 9, 5
    values = -torch.rand(b, t) * 3
    mask = (torch.rand(b, t) > 0.2).float()
    mask[:, 0] = 1
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    old = values + 0.3 * torch.randn(b, t)
    results = []
    for algo in (DARS(DARSConfig()), GRPO(GRPOConfig(scale_rewards="none", aggregation="seq-mean-token-sum-norm"))):
        batch = algo.prepare(token_batch(mask, {"rewards": rewards, "group_ids": groups, "old_logps": old},
                                         {"tokens": float(mask.sum()), "seqs": float(b), "max_completion_len": float(t)}))
        logps = leaf(values)
        out = algo.loss(batch, PolicyOutput(logps))
        out.loss.backward()
        results.append((batch.fields["advantages"], out.loss.detach(), logps.grad))
    torch.testing.assert_close(results[0][0], torch.tensor([0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 2 / 3, -1 / 3, -1 / 3]))
    for x, y in zip(results[0], results[1]):
        assert torch.equal(x, y)
    assert results[0][2].abs().sum() > 0


def test_config():
    with pytest.raises(ValueError, match="schedule must be"):
        DARSConfig(schedule="xx")
    with pytest.raises(ValueError, match="scale_rewards must be none or group"):
        DARSConfig(scale_rewards="batch")
    assert math.isclose(DARSConfig().epsilon_high, 0.2)


@pytest.mark.slow
def test_cli_dars_second_round(tmp_path):
    out = tmp_path / "dars"
    cli("train", "dars", "--data", "arith", "--n", "4", "--set", "algorithm.n_max=8", "--max-steps", "2",
        "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(1 <= m["sampling/rounds"] <= 2 and m["sampling/pool_size_mean"] >= 4 for m in metrics)
