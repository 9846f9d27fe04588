"""RMT (arXiv:2509.24375): the dual loss by hand, the GRPO limit, the budget, the curriculum's window and its
resumability, the next-token reward and task, and a short real run."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import random_groups, same_as_base, train_changes_weights
from conftest import leaf
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.rmt import RMT, DifficultyCurriculum, RMTConfig, budget_at, length_reward, window
from tokalign.batching import Seq, collate
from tokalign.data.next_token import NextToken
from tokalign.protocols import PolicyOutput, Sample
from tokalign.rewards.next_token import NextToken as NextTokenReward


def test_limit_is_grpo_bit_for_bit():
    """λ = 0, curriculum off, w = 0: rewards, advantages, loss and gradient are GRPO's exactly."""
    off = RMT(RMTConfig(ntp_coef=0, curriculum=False, length_weight=0))
    assert off.needs == GRPO(GRPOConfig()).needs
    make = lambda: random_groups(3, [3, 2, 4, 1, 3, 2], [0, 0, 0, 1, 1, 1], [1.0, 0.0, 0.5, 0.0, 1.0, 1.0])  # noqa: E731
    values = -torch.rand(6, random_groups(3, [3, 2, 4, 1, 3, 2], [0, 0, 0, 1, 1, 1], [0] * 6).completion_mask.shape[1],
                         generator=torch.Generator().manual_seed(5))
    same_as_base([off, GRPO(GRPOConfig())], make, values)


def gold_batch():
    """One group: samples A (2 tokens, reward 1) and B (1 token, reward 0), and the gold row (2 tokens)."""
    seqs = [Seq([1, 2], [5, 6], 0, row={"rewards": 1.0, "is_reference": 0.0}),
            Seq([1, 2], [7], 0, row={"rewards": 0.0, "is_reference": 0.0}),
            Seq([1, 2], [8, 9], 0, row={"rewards": 0.0, "is_reference": 1.0})]
    b = collate(seqs, pad_id=0)
    b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 3.0}
    return b


def test_dual_loss_by_hand():
    """On-policy (ℓ = ℓ_old), λ = 0.5, w = 0, token-mean. Advantages over the sampled rows only: rewards (1, 0), std
    (unbiased) = √0.5, mean 0.5 → A = ±0.5/(√0.5 + 1e-6) ≈ ±0.70711; the gold row gets A = 0 and leaves the RL mask.
    RL = mean over the 3 sampled tokens of −A·ρ = (−A·2 + A·1)/3 = −A/3 ≈ −0.23570.
    NTP = −mean of the gold tokens' log-probs (−0.5, −1.5) = 1.0.   loss = −0.23570 + 0.5 · 1.0 = 0.26430."""
    algo = RMT(RMTConfig(ntp_coef=0.5, curriculum=False, length_weight=0))
    batch = algo.prepare(gold_batch())
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    assert_close(batch.fields["advantages"], torch.tensor([a, -a, 0.0]))
    assert batch.totals == {"tokens": 3.0, "seqs": 2.0}
    lp = torch.zeros_like(batch.completion_mask)
    lp[2, 1:3] = torch.tensor([-0.5, -1.5])  # prompt [1, 2]: completion token j at column 1 + j
    lp[0, 1:3], lp[1, 1] = torch.tensor([-0.2, -0.3]), -0.4
    batch.fields["old_logps"] = lp.clone()
    lp = leaf(lp)
    out = algo.loss(batch, PolicyOutput(lp))
    assert_close(out.loss, torch.tensor(-a / 3 + 0.5))
    assert_close(out.loss, torch.tensor(0.26430), atol=1e-5, rtol=0)
    assert out.metrics["rmt/ntp_loss"] == pytest.approx(1.0)
    out.loss.backward()
    assert_close(lp.grad[2, 1:3], torch.tensor([-0.25, -0.25]))  # −λ / N_gold on each gold token


def test_budget_and_length_reward_by_hand():
    """B_t = max(1, 256 · 0.5^((t/10)^k)): t = 0 → 256, t = 5 (k = 1) → 256/√2 = 181.02, t ≥ 10 → 128; k = 2, t = 5:
    256 · 0.5^0.25 = 215.27. r_len(ℓ; 100) at ℓ = 50, 100, 150, 250: 0.5, 1, 0.5, 0."""
    assert budget_at(0, 10, 256, 0.5, 1, 1) == 256
    assert budget_at(5, 10, 256, 0.5, 1, 1) == pytest.approx(181.019, abs=1e-3)
    assert budget_at(20, 10, 256, 0.5, 1, 1) == 128
    assert budget_at(5, 10, 256, 0.5, 2, 1) == pytest.approx(215.269, abs=1e-3)
    assert budget_at(5, 10, 2, 0.01, 1, 1) == 1  # the floor
    assert_close(length_reward(torch.tensor([50.0, 100, 150, 250]), 100.0), torch.tensor([0.5, 1, 0.5, 0]))
    algo = RMT(RMTConfig(ntp_coef=0, curriculum=False, length_weight=0.5, initial_budget=2, decay_factor=1))
    batch = algo.prepare(gold_batch())  # lengths 2, 1, 2 with B = 2: r_len = 1, 0.5, 1
    assert_close(batch.fields["rewards"], torch.tensor([1.5, 0.25, 0.5]))


class Ctx:
    def __init__(self, n, step, seed=3, batch_size=2):
        self.rows = [{"prompt_ids": [1], "reference": str(i)} for i in range(n)]
        self.step, self.seed, self.batch_size = step, seed, batch_size


def hook(steps=10):
    h = DifficultyCurriculum(pool=3, steps=steps)
    h.difficulty = lambda ctx, i: h.cache.setdefault(i, float((7 * i) % 11))  # a stand-in for the entropy
    return h


def test_curriculum_window_easy_to_hard_and_resumable():
    """A pool of 3 × 2 = 6 of 20 prompts; step 0 takes the pool's 2 easiest, step ≥ T its 2 hardest; a fresh hook
    (a resumed run) picks the same prompts at the same step; the weights make the source's draw exactly them."""
    assert window([3.0, 1.0, 2.0, 0.0], 2, 0.0) == [3, 1]
    assert window([3.0, 1.0, 2.0, 0.0], 2, 1.0) == [2, 0]
    assert window([3.0, 1.0, 2.0, 0.0], 2, 0.5) == [1, 2]
    h = hook()
    first, last = h.choose(Ctx(20, 0)), h.choose(Ctx(20, 10))
    d = lambda ids: sorted(h.cache[i] for i in ids)  # noqa: E731
    pool0 = torch.randperm(20, generator=torch.Generator().manual_seed(3 * 1_000_033 + 17))[:6].tolist()
    assert d(first) == sorted(h.cache[i] for i in pool0)[:2]
    assert max(d(first)) <= min(h.cache[i] for i in pool0 if i not in first)
    assert hook().choose(Ctx(20, 10)) == last
    h.collect(Ctx(20, 4))
    w = h.prompt_weights(20)
    assert sum(w) == 2 and h.prompt_weights(19) is None
    assert hook().choose(Ctx(2, 0)) is None  # data no larger than the batch: the source's own walk


def test_needs():
    algo = RMT(RMTConfig())
    assert [h.name for h in algo.needs.hooks] == ["rmt_curriculum", "reference_answers"]
    assert {c.name for c in algo.needs.components} >= {"train_step", "total_steps", "rmt_schedule"}
    with pytest.raises(ValueError, match="mismatch_correction"):
        RMTConfig(mismatch_correction="token")
    with pytest.raises(ValueError, match="decay_factor"):
        RMTConfig(decay_factor=0)


def test_reward_by_hand():
    """<answer> tags win (the last pair), else the last word; exact equality, whitespace collapsed."""
    r = NextTokenReward()
    s = lambda c, ref="cat": Sample("x", "p", c, reference=ref)  # noqa: E731
    assert r.verify(s("I think <answer> cat </answer>")).score == 1.0
    assert r.verify(s("<answer>dog</answer> no, <answer>cat</answer>")).score == 1.0
    assert r.verify(s("<answer>cats</answer>")).score == 0.0
    assert r.verify(s("the next word is cat")).score == 1.0
    assert r.verify(s("")).score == 0.0
    assert r.verify(s("57", ref="57")).score == 1.0
    assert r.verify(s("cat", ref=None)).score == 0.0
    assert r.answer(s("so <answer>Cat</answer>")) == "Cat"


def test_task_windows(tmp_path):
    """12 words, context 4, stride 3, target 2: windows at words 0, 3, 6 (6 + 4 + 2 = 12); test share 1/3 → 1 record."""
    f = tmp_path / "c.txt"
    f.write_text(" ".join(f"w{i}" for i in range(12)))
    task = NextToken(f"{f}?context=4&stride=3&target=2&test=0.34")
    train, test = task.records("train"), task.records("test")
    assert [r["reference"] for r in train] == ["w4 w5", "w7 w8"]
    assert [r["reference"] for r in test] == ["w10 w11"]
    assert train[1]["prompt"][0]["content"].endswith("\n\nw3 w4 w5 w6")
    assert train[0]["completion"][0]["content"] == "<answer>w4 w5</answer>"


@pytest.mark.slow
def test_cli_two_steps_train_changes_weights(tmp_path):
    """`tokalign train tokalign.algorithms.rmt:RMT` for 2 steps on the bundled model: online arith (2 prompts × 4
    samples + each prompt's gold row), the next_token reward (arith's answer is one word), the curriculum drawing
    from a pool of 8 ranked by the reference's entropy, and the budget."""
    metrics = train_changes_weights(tmp_path, "tokalign.algorithms.rmt:RMT", "--data", "arith", "--n", "4",
                                    "--reward", "tokalign.rewards.next_token:NextToken", grad_norm=False)
    assert all("rmt/ntp_loss" in m and "rmt/budget" in m and "rmt/difficulty_mean" in m for m in metrics)
    assert metrics[0]["rmt/curriculum_progress"] == 0.0
