"""r3 (DRO's Reasoning Reflection Reward; see tokalign/rewards/r3.py): the weights and rewards by hand and their
limits, what the reward asks of the policy (CoT cut at the marker, the reference after it, groups by prompt), the
certainties of the real model, and the reward through ``score --policy`` and online training."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import cli
from tokalign import artifacts
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.r3 import R3, R3Config, find, reference_text, reflection_rewards


def test_reflection_rewards_hand():
    """p = [[0.9, 0.5], [0.9, 0.1]]: σ = (0, 0.2); τ = 0.1 → w = softmax(0, 2) = (0.1192029, 0.8807971);
    R3 = (0.9·0.1192 + 0.5·0.8808, 0.9·0.1192 + 0.1·0.8808) = (0.5476812, 0.1953623) — the plain means (0.7, 0.5)
    would rank the two CoTs by 0.2, R3 by 0.35: the first token, certain after either CoT, no longer dilutes the second."""
    values, stds = reflection_rewards([[0.9, 0.5], [0.9, 0.1]], 0.1)
    assert stds == pytest.approx([0.0, 0.2])
    assert values == pytest.approx([0.5476812, 0.1953623], abs=1e-7)


def test_limits_are_the_mean_certainty_and_the_most_variable_token():
    p = [[0.9, 0.5, 0.3], [0.8, 0.1, 0.35], [0.85, 0.3, 0.2]]
    means = [sum(r) / 3 for r in p]
    assert reflection_rewards(p, 1e9)[0] == pytest.approx(means, abs=1e-9)  # τ → ∞
    assert reflection_rewards(p, 1e-6)[0] == pytest.approx([0.5, 0.1, 0.3], abs=1e-9)  # τ → 0: token 2 (σ largest)
    assert reflection_rewards([p[0]], 0.1)[0] == pytest.approx([means[0]])  # a group of one: σ = 0 everywhere


def test_helpers():
    assert find([5, 1, 2, 3, 1, 2], [1, 2]) == 3 and find([5, 6], [1]) == -1 and find([5], []) == -1
    assert reference_text("67") == "67" and reference_text({"answer": 4}) == "4" and reference_text(None) == ""


class _Tok:
    """Characters as token ids (ord), for a view that needs no model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


class _View:
    """Records what it is asked; log p of a continuation token = −(prefix length + token position) / 10."""

    tokenizer = _Tok()

    def __init__(self):
        self.calls = []

    def logps(self, prefixes, continuations):
        self.calls.append((prefixes, continuations))
        return [torch.tensor([-(len(p) + j) / 10 for j in range(len(c))]) for p, c in zip(prefixes, continuations)]


def _sample(i, prompt, completion, reference):
    return Sample(str(i), prompt, completion, [ord(ch) for ch in completion], reference,
                  metadata={"prompt_ids": [ord(ch) for ch in prompt]})


def test_the_cot_is_cut_at_the_marker_and_the_reference_follows_it():
    """Sample 0's CoT ends at "#" (its own answer "zz" dropped), sample 1 has no marker (all of it is the CoT); the
    reference "ab" follows answer_prefix ":"; prompts "q" and "r" are separate groups; an empty reference scores 0."""
    view = _View()
    r3 = R3(R3Config(cot_end="#", answer_prefix=":", temperature=0.5))
    r3.bind_policy(view)
    samples = [_sample(0, "q", "xy#zz", "ab"), _sample(1, "q", "xyzw", "ab"), _sample(2, "r", "x#", "ab"),
               _sample(3, "r", "x#", None)]
    out = r3(samples)
    prefixes, conts = view.calls[0]
    assert prefixes == [[ord(c) for c in s] for s in ("qxy#", "qxyzw", "rx#")]
    assert conts == [[ord(c) for c in ":ab"]] * 3
    # group "q": p_0j = exp(−(4 + j)/10), p_1j = exp(−(5 + j)/10), j = 0..2: σ_j = |p_0j − p_1j|/2 falls with j
    p0, p1 = [math.exp(-(4 + j) / 10) for j in range(3)], [math.exp(-(5 + j) / 10) for j in range(3)]
    want, _ = reflection_rewards([p0, p1], 0.5)
    assert [out[0].value, out[1].value] == pytest.approx(want)
    assert out[0].info["cot_end_found"] and not out[1].info["cot_end_found"]
    assert out[2].value == pytest.approx(sum(math.exp(-(3 + j) / 10) for j in range(3)) / 3)  # a group of one
    assert out[3].value == 0.0 and "no reference" in out[3].info["detail"]


def test_unbound_or_without_prompt_ids_is_one_line():
    with pytest.raises(UserError, match="--policy"):
        R3()([_sample(0, "q", "x", "a")])
    r3 = R3()
    r3.bind_policy(_View())
    with pytest.raises(UserError, match="prompt_ids"):
        r3([Sample("0", "q", "x", [1], "a")])
    with pytest.raises(ValueError, match="temperature"):
        R3Config(temperature=0)


def test_certainties_are_the_models(tiny_model):
    """With the real view over a tiny model: a sample's certainty is the mean of exp log π(y*_j | x, c, y*_<j) from the
    model's own forward over prompt + CoT + reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign.rewards.policy import PolicyView

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    r3 = R3(R3Config(cot_end=""))
    r3.bind_policy(PolicyView(model, tok))
    s = Sample("0", "1+1=", "2", [7, 8], "11", metadata={"prompt_ids": [5, 6]})
    got = r3([s])[0]
    ref = tok("11", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[5, 6, 7, 8, *ref]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    want = [float(logp[3 + j, t].exp()) for j, t in enumerate(ref)]
    assert got.value == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert got.info["certainty"] == pytest.approx(got.value)


@pytest.mark.slow
def test_r3_through_score_and_training(tmp_path):
    """`score --policy` with r3 gives every sample a value in [0, 1]; a prompt whose samples differ gets different
    values; online, GRPO on r3 + exact_match trains (the reward logged per step)."""
    from tokalign.models import BUNDLED_MODEL

    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "3", "--seed", "0", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "r3", "--reward-opt", "r3.cot_end=", "--policy", str(BUNDLED_MODEL), "--out", "S", cwd=tmp_path)
    rows = list(artifacts.read(tmp_path / "S", ["scored"]).rows())
    assert len(rows) == 12 and all(0 < r["rewards"]["r3"] <= 1 for r in rows)
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append((r["completion"], r["rewards"]["r3"]))
    assert any(len({c for c, _ in g}) > 1 and len({v for _, v in g}) > 1 for g in by_prompt.values())
    proc = cli("train", "grpo", "--data", "arith", "--reward", "r3", "--reward-opt", "r3.cot_end=", "--reward", "exact_match",
               "--max-steps", "2", "--batch-size", "2", "--out", "T", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0
    metrics = [__import__("json").loads(line) for line in (tmp_path / "T" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < m["reward/r3"] <= 1 for m in metrics)
