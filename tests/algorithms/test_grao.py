"""GRAO (arXiv:2508.07750): the per-row weights, loss and gradient by hand against the paper's eq. 3, the limit
β = λ = 0 without reference rows (GRPO bit for bit), the reference-answer sampling hook on a fake sampler, micro-batches
add up, the config's checks; a slow run through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import random_groups, train_changes_weights
from conftest import leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.grao import GRAO, GRAOConfig, ReferenceAnswers
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def test_by_hand_against_eq3():
    """One group: samples o_1, o_2 (rewards 1, 0; 2 and 1 tokens) and the reference y (reward 1; 3 tokens), so n_g = 3,
    G = 2. μ = ⅔, σ (1/n) = √(2/9): Â = (⅓, −⅔, ⅓)/(σ + eps). β = 1, λ = 0.6, Ā = (Â_1 + Â_2)/2.
    The paper's J_g = ½ Σ_i (1 + λ) Â_i J(o_i) + (β Â_y − λ Ā) J(y), J = token mean of ℓ: on-policy the gradient of −J_g is
    −(1 + λ) Â_i / (2 |o_i|) on o_i's tokens and −(β Â_y − λ Ā) / |y| on y's.
    The loss is GRPO's: (1/3) Σ_r mean_t(−c_r ρ_t) = −(c_1 + c_2 + c_y)/3 with c_i = (3/2)(1 + λ) Â_i, c_y = 3(β Â_y − λ Ā)."""
    sigma = math.sqrt(2 / 9)
    a1, a2, ay = (1 / 3) / (sigma + 1e-6), (-2 / 3) / (sigma + 1e-6), (1 / 3) / (sigma + 1e-6)
    abar = (a1 + a2) / 2
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, 0.0, 0.0], [-0.3, -0.2, -0.1]])
    algo = GRAO(GRAOConfig(imitation_coef=1.0))
    b = algo.prepare(token_batch(mask, {"rewards": torch.tensor([1.0, 0.0, 1.0]), "group_ids": torch.tensor([0, 0, 0]),
                                        "is_reference": torch.tensor([0.0, 0.0, 1.0]), "old_logps": old}, {"tokens": 6.0, "seqs": 3.0}))
    c = [1.5 * 1.6 * a1, 1.5 * 1.6 * a2, 3 * (ay - 0.6 * abar)]
    assert b.fields["grao_advantages"].tolist() == pytest.approx([a1, a2, ay], rel=1e-6)
    assert b.fields["advantages"].tolist() == pytest.approx(c, rel=1e-6)
    lp = leaf(old)
    out = algo.loss(b, PolicyOutput(lp))
    assert out.loss.item() == pytest.approx(-sum(c) / 3, rel=1e-6)
    out.loss.backward()
    want = torch.tensor([[-1.6 * a1 / 4] * 2 + [0.0], [-1.6 * a2 / 2, 0.0, 0.0], [-(ay - 0.6 * abar) / 3] * 3])
    assert_close(lp.grad, want, rtol=1e-6, atol=1e-8)
    assert out.metrics["grao/reference_advantage_mean"] == pytest.approx(ay, rel=1e-6)


def test_all_samples_wrong_still_imitates():
    """Rewards (0, 0, 0) for the samples and 1 for y: GRPO would have no signal; GRAO pushes y up (c_y > 0) and the
    samples down."""
    b = GRAO(GRAOConfig()).prepare(token_batch(torch.ones(4, 2), {
        "rewards": torch.tensor([0.0, 0.0, 0.0, 1.0]), "group_ids": torch.tensor([0, 0, 0, 0]),
        "is_reference": torch.tensor([0.0, 0.0, 0.0, 1.0])}))
    c = b.fields["advantages"]
    assert float(c[3]) > 0 and bool((c[:3] < 0).all())


@pytest.mark.parametrize("beta_kl", [0.0, 0.04])
def test_terms_off_is_grpo_bit_for_bit(beta_kl):
    """β = λ = 0, no reference rows, σ unbiased: GRPO's advantages, loss and gradient exactly (off-policy; with KL too)."""
    def run(algo):
        b = random_groups(5, [3, 5, 2, 4, 3], [0, 0, 1, 1, 1], [1.0, 0.0, 0.0, 1.0, 0.5])
        b.fields["ref_logps"] = b.fields["pol"] + 0.1
        b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 5.0}
        b = algo.prepare(b)
        lp = leaf(b.fields["pol"])
        loss = algo.loss(b, PolicyOutput(lp)).loss
        loss.backward()
        return b.fields["advantages"], loss.detach(), lp.grad

    ref = run(GRPO(GRPOConfig(aggregation="seq-mean-token-mean", beta=beta_kl)))
    got = run(GRAO(GRAOConfig(imitation_coef=0.0, alignment_coef=0.0, population_std=False, beta=beta_kl)))
    for x, y in zip(got, ref):
        assert torch.equal(x, y)
    assert ref[2].abs().sum() > 0


def test_without_reference_rows_it_is_scaled_grpo():
    """Scored data (no reference rows): the weights are (1 + λ)·Â, Â with the 1/n std."""
    b = random_groups(6, [3, 5, 2, 4], [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0])
    b = GRAO(GRAOConfig(alignment_coef=0.5)).prepare(b)
    assert_close(b.fields["advantages"], 1.5 * b.fields["grao_advantages"])
    assert_close(b.fields["grao_advantages"].abs(), torch.full((4,), 0.5 / (0.5 + 1e-6)))  # ±½ / (σ = ½)


class FakeSampler:
    """A SamplingContext: prompt rows with references, two samples per prompt with rewards from ``rewards``, scoring by
    exact match of the completion text, a character tokenizer with EOS 0."""

    def __init__(self, references, rewards):
        self.rows = [{"id": f"p{k}", "prompt_ids": [1, 2], "reference": ref} for k, ref in enumerate(references)]
        self.step, self.rewards = 0, list(rewards)
        self.tokenizer = _CharTokenizer()

    def pick(self, step, round_):
        return list(range(len(self.rows)))[::-1]  # the second prompt first: group ids and prompt indices differ

    def sample(self, prompts):
        return [{"id": f"{p['id']}#{k}", "prompt_id": p["id"], "group_id": g, "prompt_ids": p["prompt_ids"], "reference": p["reference"],
                 "completion": "x", "completion_ids": [9], "sampler_logps": [-1.0], "reward": self.rewards.pop(0)}
                for g, p in enumerate(prompts) for k in range(2)]

    def score(self, rows):
        return [{**r, "reward": float(r["completion"] == str(json.loads(r["reference"])))} for r in rows]


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_reference_answers_hook():
    ctx = FakeSampler(['"12"', "7"], [0.0, 1.0, 0.0, 0.0])  # the row schema's JSON: a string and a number
    groups, sampled, metrics = ReferenceAnswers().collect(ctx)
    assert len(sampled) == 4 and [len(g) for g in groups] == [3, 3]
    ref = groups[0][-1]
    assert ref["completion_ids"] == [ord("7"), 0] and ref["reward"] == 1.0 and ref["sampler_logps"] is None
    assert ref["prompt_index"] == 1 and ref["group_id"] == 0 and ref["id"] == "p1#reference"
    assert [r["fields"]["is_reference"] for r in groups[1]] == [0.0, 0.0, 1.0]
    assert groups[1][-1]["completion_ids"] == [ord("1"), ord("2"), 0]
    assert metrics["grao/reference_reward_mean"] == 1.0
    with pytest.raises(UserError, match="reference_answers=false"):
        ReferenceAnswers().collect(FakeSampler(["null", "3"], [0.0] * 4))


def test_micro_batches_add_up():
    algo = GRAO(GRAOConfig())
    b = random_groups(4, [3, 5, 2, 4, 2, 3], [0, 0, 0, 1, 1, 1], [1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    b.fields["is_reference"] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    b.totals = {"tokens": float(b.completion_mask.sum()), "seqs": 6.0}
    full, summed, g_full, g_parts, n = micro_batch_check(algo, algo.prepare(b), size=1)
    assert n > 1
    assert_close(summed, full)
    assert_close(g_parts, g_full)


def test_config_and_needs():
    assert [h.name for h in GRAO(GRAOConfig()).needs.hooks] == ["reference_answers"]
    assert GRAO(GRAOConfig(reference_answers=False)).needs == GRPO(GRPOConfig()).needs
    assert (GRAOConfig().imitation_coef, GRAOConfig().alignment_coef, GRAOConfig().beta) == (0.5, 0.6, 0.0)
    with pytest.raises(ValueError, match="must be ≥ 0"):
        GRAOConfig(alignment_coef=-0.1)
    with pytest.raises(ValueError, match="mismatch_correction=none"):
        GRAOConfig(mismatch_correction="token")
    assert GRAOConfig(mismatch_correction="token", reference_answers=False).mismatch_correction == "token"


@pytest.mark.slow
def test_cli_two_steps_train_changes_weights(tmp_path):
    """`tokalign train tokalign.algorithms.grao:GRAO` for 2 steps on the bundled model (online arith, 2 prompts × 4
    samples + each prompt's reference answer); the reference rows score 1 under exact_match."""
    metrics = train_changes_weights(tmp_path, "tokalign.algorithms.grao:GRAO", "--data", "arith", "--n", "4", grad_norm=False)
    assert all(m["grao/reference_reward_mean"] == 1.0 for m in metrics)
    assert all(m["mismatch/logp_gap_abs"] < 0.05 for m in metrics)  # the reference rows (never sampled) count as no gap
