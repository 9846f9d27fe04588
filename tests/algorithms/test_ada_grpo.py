"""Ada-GRPO (ARM, arXiv:2505.20258): the format labeller and its component, the cosine decay at a few steps, the
format-frequency scales, rewards, advantages, loss and gradient by hand, the limits (single-format groups, the last
step, no formats) = GRPO bit for bit, config errors, and a short run through the real CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run, same_as_base
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.ada_grpo import (
    AdaGRPO,
    AdaGRPOConfig,
    ReasoningFormats,
    decay_at,
    format_of,
    format_scales,
)
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.batching import Seq, collate
from tokalign.components.train_step import TotalSteps, TrainStep
from tokalign.protocols import PolicyOutput

TAGS = ["<ANSWER>", "<COT>", "<CODE>", "<LONG_COT>"]  # 0 direct, 1 short_cot, 2 code, 3 long_cot; 4 other
LENGTHS = [2, 3, 1, 4, 2, 3]
REWARDS = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
GROUPS = [0, 0, 0, 0, 1, 1]
FORMATS = [3, 3, 3, 1, 0, 2]  # group 0: long, long, long, short; group 1: direct, code


@pytest.fixture(scope="module")
def tok():
    from tokalign.tiny import build_tokenizer

    return build_tokenizer()


def _batch(formats=FORMATS, step=None, total=None, old=None):
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS)}
    if formats is not None:
        f["reasoning_format"] = torch.tensor(formats, dtype=torch.float32)
    if step is not None:
        f["train_step"] = torch.full((6,), float(step))
    if total is not None:
        f["train_total_steps"] = torch.full((6,), float(total))
    if old is not None:
        f["old_logps"] = old
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 6.0})


def test_format_labeller():
    assert [format_of(s, TAGS) for s in ("<ANSWER>7", "<COT>a</COT>7", "<CODE>print(7)", "<LONG_COT>hm")] == [0, 1, 2, 3]
    assert format_of(" \n <COT>x", TAGS) == 1  # leading whitespace is skipped
    assert [format_of(s, TAGS) for s in ("7", "", "so <COT>", "<cot>x", "<LONG>")] == [4] * 5  # other: not at the start, case
    assert format_of("<CODE>x", ["<C", "<CODE>"]) == 1 and format_of("<COT>", ["<C", "<CODE>"]) == 0  # the longest tag wins


def test_formats_component_reads_the_completions(tok):
    """Completions "<COT> 3+4=7", "  <LONG_COT>x", "12<|im_end|>" (special token kept, no tag: other) → 1, 3, 4."""
    texts = ["<COT> 3+4=7", "  <LONG_COT>x", "12<|im_end|>"]
    seqs = [Seq([1, 2], tok(t, add_special_tokens=False)["input_ids"], 0) for t in texts]
    batch = collate(seqs, pad_id=0)
    metrics = ReasoningFormats(["direct", "short_cot", "code", "long_cot"], TAGS).fill(batch, SimpleNamespace(seqs=seqs, tokenizer=tok))
    assert batch.fields["reasoning_format"].tolist() == [1.0, 3.0, 4.0]
    assert metrics == {"ada_grpo/format/direct": 0.0, "ada_grpo/format/short_cot": 1 / 3, "ada_grpo/format/code": 0.0,
                       "ada_grpo/format/long_cot": 1 / 3, "ada_grpo/format/other": 1 / 3}
    ctx = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(max_steps=7)))
    TotalSteps().fill(batch, ctx)
    assert batch.fields["train_total_steps"].tolist() == [7.0] * 3
    TotalSteps(5).fill(batch, ctx)
    assert batch.fields["train_total_steps"].tolist() == [5.0] * 3


def test_needs():
    algo = AdaGRPO(AdaGRPOConfig(total_steps=9))
    comps = algo.needs.components
    assert [type(c) for c in comps] == [TrainStep, TotalSteps, ReasoningFormats] and comps[1].total == 9
    assert comps[2].tags == TAGS and algo.needs.groups and algo.needs.old_logps


def test_decay_at_a_few_steps():
    """T = 4, t = step + 1: d = ½(1 + cos(π t/4)) = ½(1 + 0.7071068) = 0.8535534, ½, ½(1 − 0.7071068) = 0.1464466, then 0
    at the last step (step 3) and after it (t clamped at T). T = 1: the only step is the last, d = 0."""
    assert [decay_at(s, 4) for s in range(4)] == pytest.approx([0.8535534, 0.5, 0.1464466, 0.0], abs=1e-7)
    assert decay_at(1, 4) == 0.5 and decay_at(3, 4) == 0.0 and decay_at(10, 4) == 0.0 and decay_at(0, 1) == 0.0
    assert decay_at(0, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi / 1000)))
    with pytest.raises(ValueError, match="T must be"):
        decay_at(0, 0)


def test_scales_rewards_loss_and_gradient_by_hand():
    """Step 1 of T = 4: t = 2, d = ½. Group 0 (G = 4): F(long) = 3 → α = 1 + (4/3 − 1)·½ = 7/6; F(short) = 1 →
    α = 1 + (4 − 1)·½ = 5/2. Group 1 (G = 2): F = 1 each → α = 1 + (2 − 1)·½ = 3/2.
    r' = α·r = 7/6, 7/6, 0, 5/2 | 3/2, 0. scale none: group 0 mean = (7/3 + 5/2)/4 = 29/24 →
    A = −1/24, −1/24, −29/24, 31/24 (a correct Long CoT now sits below the group's mean: the rare Short CoT outranks it);
    group 1 mean ¾ → A = ¾, −¾. On policy, token-mean over N = 15: loss = −Σ A_i ℓ_i / N, ∂loss/∂logp_it = −A_i / N."""
    algo = AdaGRPO(AdaGRPOConfig(scale_rewards="none"))
    old = -torch.rand(6, 4, generator=torch.Generator().manual_seed(5))
    batch = algo.prepare(_batch(step=1, total=4, old=old))
    f = batch.fields
    alpha = [7 / 6, 7 / 6, 7 / 6, 5 / 2, 3 / 2, 3 / 2]
    assert_close(f["format_alpha"], torch.tensor(alpha))
    assert_close(f["rewards"], torch.tensor([7 / 6, 7 / 6, 0.0, 5 / 2, 3 / 2, 0.0]))
    assert torch.equal(f["raw_rewards"], torch.tensor(REWARDS))
    adv = [-1 / 24, -1 / 24, -29 / 24, 31 / 24, 0.75, -0.75]
    assert_close(f["advantages"], torch.tensor(adv))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    n = sum(LENGTHS)
    assert float(out.loss.detach()) == pytest.approx(-sum(a * ln for a, ln in zip(adv, LENGTHS)) / n, rel=1e-6)
    grad = torch.tensor([[-a / n] * ln + [0.0] * (4 - ln) for a, ln in zip(adv, LENGTHS)])
    assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["ada_grpo/decay"] == 0.5 and out.metrics["ada_grpo/alpha_max"] == 2.5
    assert out.metrics["ada_grpo/alpha_mean"] == pytest.approx(sum(alpha) / 6)


def test_group_scaling_is_grpo_on_the_scaled_rewards():
    """Default scale_rewards="group": the advantages are GRPO's on r' (std of r' within the group)."""
    batch = AdaGRPO(AdaGRPOConfig()).prepare(_batch(step=1, total=4))
    ref = GRPO(GRPOConfig()).prepare(_batch(step=1, total=4))
    ref.fields["rewards"] = torch.tensor([7 / 6, 7 / 6, 0.0, 5 / 2, 3 / 2, 0.0])
    assert_close(batch.fields["advantages"], GRPO(GRPOConfig()).prepare(ref).fields["advantages"])


def test_scales_across_formats_and_decay():
    """Group of 8 (the paper's G): formats 5 long, 2 code, 1 direct → at d = 1: G/F = 8/5, 4, 8; at d = 0: 1."""
    formats, gids = torch.tensor([3, 3, 3, 3, 3, 2, 2, 0]), torch.zeros(8, dtype=torch.long)
    assert format_scales(formats, gids, 1.0).tolist() == [1.6] * 5 + [4.0, 4.0, 8.0]
    assert format_scales(formats, gids, 0.0).tolist() == [1.0] * 8
    # the same format index in two groups is counted per group
    assert format_scales(torch.tensor([1, 1, 1, 2]), torch.tensor([0, 0, 1, 1]), 1.0).tolist() == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("case", ["single-format groups", "last step", "past the end", "no formats"])
def test_limits_are_grpo_bit_for_bit(case):
    torch.manual_seed(0)
    values = -torch.rand(6, 4) * 3
    old = values + 0.3 * torch.randn(6, 4)
    formats, step = {"single-format groups": ([3, 3, 3, 3, 4, 4], 0), "last step": (FORMATS, 9),
                     "past the end": (FORMATS, 25), "no formats": (None, 2)}[case]
    same_as_base((AdaGRPO(AdaGRPOConfig(beta=0.04)), GRPO(GRPOConfig(beta=0.04))),
                 lambda: _batch(formats=formats, step=step, total=10, old=old), values)


def test_mid_run_mixed_formats_differ_from_grpo():
    ada = AdaGRPO(AdaGRPOConfig(total_steps=10)).prepare(_batch(step=4)).fields["advantages"]
    grpo = GRPO(GRPOConfig()).prepare(_batch(step=4)).fields["advantages"]
    assert not torch.allclose(ada, grpo)


def test_total_steps_from_config_or_field():
    """total_steps in the config wins over the field; neither: an error."""
    algo = AdaGRPO(AdaGRPOConfig(total_steps=4))
    assert algo.steps_total(_batch(total=100)) == 4 and AdaGRPO(AdaGRPOConfig()).steps_total(_batch(total=100)) == 100
    with pytest.raises(ValueError, match="total steps T"):
        AdaGRPO(AdaGRPOConfig()).prepare(_batch(step=1))
    with pytest.raises(ValueError, match="reasoning_format must be"):
        AdaGRPO(AdaGRPOConfig(total_steps=4)).prepare(_batch(formats=[0, 1, 2, 3, 4, 5]))


def test_config():
    for bad, msg in [({"format_names": ["a"], "format_tags": ["<A>", "<B>"]}, "one name per tag"),
                     ({"format_names": [], "format_tags": []}, "one name per tag"),
                     ({"format_names": ["a", "a"], "format_tags": ["<A>", "<B>"]}, "format_names must be"),
                     ({"format_names": ["a", "other"], "format_tags": ["<A>", "<B>"]}, "format_names must be"),
                     ({"format_names": ["a", " "], "format_tags": ["<A>", "<B>"]}, "format_names must be"),
                     ({"format_names": ["a", "b"], "format_tags": ["<A>", "<A>"]}, "format_tags must be"),
                     ({"format_names": ["a", "b"], "format_tags": ["<A>", ""]}, "format_tags must be"),
                     ({"total_steps": -1}, "total_steps must be"), ({"total_steps": True}, "total_steps must be"),
                     ({"total_steps": 2.5}, "total_steps must be")]:
        with pytest.raises(ValueError, match=msg):
            AdaGRPOConfig(**bad)
    c = AdaGRPOConfig()
    assert c.format_names == ["direct", "short_cot", "code", "long_cot"] and c.format_tags == TAGS and c.total_steps == 0


@pytest.mark.slow
def test_cli_ada_grpo(tmp_path):
    """The bundled arith model answers with digits; sampled at temperature 2, the tags "1" … "9" split its completions
    into formats (the rest "other"), so the first step's groups mix formats (α > 1 there). T = 2 steps: d = ½ at step 1,
    0 (α = 1 everywhere) at step 2."""
    digits = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    out = tmp_path / "ada_grpo"
    cli("train", "ada_grpo", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--set", "rollout.temperature=2", "--set", f"algorithm.format_names=[{','.join(digits)}]",
        "--set", "algorithm.format_tags=[1,2,3,4,5,6,7,8,9]", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert [m["ada_grpo/decay"] for m in metrics] == [0.5, 0.0]
    assert metrics[0]["ada_grpo/alpha_max"] > 1 and metrics[1]["ada_grpo/alpha_max"] == metrics[1]["ada_grpo/alpha_mean"] == 1.0
    fractions = [sum(m[f"ada_grpo/format/{n}"] for n in (*digits, "other")) for m in metrics]
    assert fractions == pytest.approx([1.0, 1.0])
