"""OTC-PO's tool-integrated reward (arXiv:2504.14870): r = α · r_tool(m, n) · r_φ, by hand.

r_tool = cos(mπ/(2m + c)) when n = 0 (1 at m = 0); sin(f·π/(2n)) with f = 2nm/(m + n) otherwise.
"""

import json
import math

import pytest

from tokalign import registry, rewards
from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards.otc import OTC, OTCConfig, tool_calls, tool_reward

CALL = {"name": "search", "arguments": {"query": "capital of France"}}


def s(completion="Paris", reference="Paris", m=0) -> Sample:
    messages = [{"role": "assistant", "content": "<tool_call>" + json.dumps(CALL) + "</tool_call>"},
                {"role": "tool", "name": "search", "content": "Paris is the capital."}] * m
    messages.append({"role": "assistant", "content": completion})
    return Sample("id", "q", completion, [], reference, "stop", {"messages": messages, "tool_calls": [CALL] * m, "turns": m + 1})


def value(sample, **cfg) -> float:
    (r,) = OTC(OTCConfig(**cfg))([sample])
    return r.value


@pytest.mark.parametrize("m,n,expected", [
    (0, 0, 1.0),  # f = n = 0
    (1, 0, 0.5),  # cos(π/3)
    (2, 0, math.cos(2 * math.pi / 5)),  # cos(2π/5) = 0.309…
    (3, 0, math.cos(3 * math.pi / 7)),
    (0, 2, 0.0),  # f = 0: sin 0
    (2, 2, 1.0),  # m = n: f = n, sin(π/2)
    (1, 2, math.sqrt(3) / 2),  # f = 4/3: sin(π/3)
    (4, 2, math.sqrt(3) / 2),  # f = 8/3: sin(2π/3)
    (3, 1, math.sqrt(2) / 2),  # f = 3/2: sin(3π/4)
])
def test_correct_answer_by_hand(m, n, expected):
    """A correct answer (exact_match = 1) with m calls and n optimal, c = 1: r = r_tool(m, n)."""
    assert tool_reward(m, n, 1.0) == pytest.approx(expected)
    assert value(s(m=m), n_optimal=n) == pytest.approx(expected)


def test_wrong_answer_scores_zero_whatever_the_calls():
    for m, n in ((0, 0), (2, 2), (5, 1)):
        assert value(s("Lyon", m=m), n_optimal=n) == 0.0


def test_limiting_cases():
    """efficiency off, or m = n: r = α·r_φ."""
    assert value(s(m=5), efficiency=False) == 1.0
    assert value(s("Lyon", m=5), efficiency=False) == 0.0
    assert value(s(m=3), n_optimal=3) == pytest.approx(1.0)
    assert value(s(m=3), n_optimal=3, alpha=0.5) == pytest.approx(0.5)


def test_smoothing_constant():
    """c = 2, m = 1: cos(π/4) = √2/2 (a larger c is more tolerant)."""
    assert value(s(m=1), c=2.0) == pytest.approx(math.sqrt(2) / 2)


def test_per_sample_n_from_a_dict_reference():
    ref = {"answer": "Paris", "n_optimal": 1}
    assert value(s(m=1, reference=ref), n_optimal=0) == pytest.approx(1.0)
    assert value(s(m=0, reference=ref)) == 0.0
    (r,) = OTC()([s(m=2, reference=ref)])
    assert r.info["n_optimal"] == 1 and r.info["tool_calls"] == 2 and r.value == pytest.approx(math.sin(4 / 3 * math.pi / 2))
    with pytest.raises(ValueError, match="n_optimal"):
        OTC()([s(reference={"answer": "Paris", "n_optimal": -1})])


def test_single_turn_counts_tool_call_tags():
    text = "<tool_call>{}</tool_call>\n<tool_call>{}</tool_call>\nParis"
    assert tool_calls(Sample("id", "q", text)) == 2
    assert tool_calls(Sample("id", "q", "Paris")) == 0


def test_another_base_reward():
    """base math: \\boxed{4} vs 4 is correct; m = 1, n = 0 ⇒ cos(π/3) = 0.5."""
    assert value(s("so \\boxed{4}", "4", m=1), base="math") == pytest.approx(0.5)
    assert value(s("so \\boxed{5}", "4", m=1), base="math") == 0.0


def test_negative_base_is_not_softened_and_positive_is_scaled():
    """base toolrl (∈ [−3, 4]): a malformed call scores 0 + (−3), kept as −3 (more calls never soften a penalty);
    the perfect call scores 4, times cos(π/3) with n = 0, times sin(π/2) = 1 with n = 1."""
    bad = Sample("id", "q", "", [], [CALL], "stop", {"tool_calls": [{"name": None, "arguments": None, "error": "x"}]})
    good = Sample("id", "q", "", [], [CALL], "stop", {"tool_calls": [CALL]})
    assert value(bad, base="toolrl") == -3.0
    assert value(good, base="toolrl") == pytest.approx(2.0)
    assert value(good, base="toolrl", n_optimal=1) == pytest.approx(4.0)


def test_token_values_are_scaled_with_the_value():
    otc = OTC()
    otc.base.fn = lambda samples: [Reward(1.0, [0.25, 0.75]) for _ in samples]
    sample = s(m=1)
    sample.completion_ids = [7, 8]
    (r,) = otc([sample])
    assert r.value == pytest.approx(0.5) and r.token_values == pytest.approx([0.125, 0.375])


def test_config_validation():
    for bad in ({"base": "otc"}, {"base": ""}, {"n_optimal": -1}, {"n_optimal": 1.5}, {"c": -1}, {"alpha": "x"},
                {"efficiency": "no"}, {"base_options": 3}):
        with pytest.raises(ValueError):
            OTCConfig(**bad)
    with pytest.raises(UserError, match="Unknown reward 'exact'"):
        OTC(OTCConfig(base="exact"))


def test_resolves_by_name_like_score_reward():
    """`tokalign score --reward otc --reward-opt otc.n_optimal=2 --reward-opt otc.base=math` resolves through rewards.resolve."""
    assert "otc" in registry.available("reward")
    (r,) = rewards.resolve(["otc"], {"otc": {"n_optimal": 2, "base": "math", "base_options": {"last_number": False}}})
    assert isinstance(r.fn, OTC) and r.fn.base.name == "math" and r.config["n_optimal"] == 2
    assert [x.value for x in r.fn([s("\\boxed{4}", "4", m=1), s("it is 4", "4", m=2)])] == [pytest.approx(math.sqrt(3) / 2), 0.0]
    (plain,) = rewards.resolve(["otc"])
    assert plain.config == {"base": "exact_match", "base_options": {}, "n_optimal": 0, "c": 1.0, "alpha": 1.0, "efficiency": True}
    with pytest.raises(UserError, match="n_optimal"):
        rewards.resolve(["otc"], {"otc": {"n_optimal": -2}})
