"""ToolRL's tool-call reward (arXiv:2504.13958 §3.3): R = R_format + 6·R_max/S_max − 3, by hand.

The gold of most cases is one call, weather(city="Paris", unit="C"): S_max = 1 + |G| + Σ|keys| = 1 + 1 + 2 = 4.
"""

import json

import pytest

from tokalign import registry, rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.toolrl import ToolRL, ToolRLConfig, gold_calls

GOLD = [{"name": "weather", "arguments": {"city": "Paris", "unit": "C"}}]


def call(name, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def s(completion="", reference=None, **metadata) -> Sample:
    return Sample("id", "q", completion, [], GOLD if reference is None else reference, "stop", metadata)


def score(sample, **cfg):
    (r,) = ToolRL(ToolRLConfig(**cfg))([sample])
    return r


CASES = [
    # (case, completion, format, correctness): correctness = 6·R_max/4 − 3 with R_max = r_name + r_param + r_value
    ("perfect call", call("weather", city="Paris", unit="C"), 1.0, 3.0),  # R_max = 1 + 1 + 2 = 4
    ("wrong name", call("forecast", city="Paris", unit="C"), 1.0, -3.0),  # r_name = 0/2, nothing to pair: R_max = 0
    ("wrong param value", call("weather", city="Paris", unit="F"), 1.0, 1.5),  # 1 + 1 + 1 = 3 → 4.5 − 3
    ("missing param", call("weather", city="Paris"), 1.0, 0.75),  # 1 + |{city}|/|{city, unit}| + 1 = 2.5 → 3.75 − 3
    ("extra call", call("weather", city="Paris", unit="C") + "\n" + call("news", topic="x"), 1.0, 2.25),  # ½ + 1 + 2 = 3.5
    ("malformed call", '<tool_call>{"name": "weather", "arguments": {"city": "Paris"</tool_call>', 0.0, -3.0),
    ("unclosed call", '<tool_call>{"name": "weather", "arguments": {}}', 0.0, -3.0),
    ("no call", "It is sunny in Paris.", 0.0, -3.0),  # the gold calls a tool: no format, R_max = 0
]


@pytest.mark.parametrize("case,completion,fmt,correct", CASES, ids=[c[0] for c in CASES])
def test_single_turn_by_hand(case, completion, fmt, correct):
    r = score(s(completion))
    assert (r.info["format"], r.info["correctness"]) == (fmt, pytest.approx(correct))
    assert r.value == pytest.approx(fmt + correct)


def test_gold_without_calls_scores_the_format_only():
    """The released code: no gold call ⇒ R_correct = 0; the format asks for a direct, non-empty answer."""
    assert score(s("I cannot check the weather.", reference=[])).value == 1.0
    assert score(s(call("weather", city="Paris"), reference="Sorry, no tool fits.")).value == 0.0
    assert score(s("   ", reference=[])).value == 0.0


def test_strict_false_drops_malformed_calls():
    """Malformed + perfect call: the format is still 0, the perfect call is matched: 0 + 3."""
    text = "<tool_call>{oops}</tool_call>" + call("weather", city="Paris", unit="C")
    assert score(s(text)).value == -3.0
    r = score(s(text), strict=False)
    assert (r.value, r.info["malformed"], r.info["calls"]) == (3.0, 1, 2)


SUMS = [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 1, "b": 3}}]
TURNS = [{"name": "add", "arguments": {"a": 1, "b": 3}}, {"name": "add", "arguments": {"a": 5, "b": 2}}]


def episode(calls, final="The sums are 3 and 4.", think=False):
    lead = "<think>sum</think>\n" if think else ""
    messages = []
    for c in calls:
        messages += [{"role": "assistant", "content": lead + "<tool_call>" + json.dumps(c) + "</tool_call>"},
                     {"role": "tool", "name": c.get("name") or "?", "content": "…"}]
    messages.append({"role": "assistant", "content": lead + final})
    return s(lead + final, SUMS, messages=messages, tool_calls=calls, turns=len(calls) + 1)


def test_multi_turn_optimal_and_greedy_matching():
    """S_max = 1 + 2 + 4 = 7, r_name = 1. Pair scores (key Jaccard + equal values):
    G1{a1,b2}–P1{a1,b3} = 1+1, G1–P2{a5,b2} = 1+1, G2{a1,b3}–P1 = 1+2, G2–P2 = 1+0.
    optimal: G1–P2 + G2–P1 = 2 + 3 ⇒ R_max = 6, 6·6/7 − 3 = 15/7;
    greedy (the released code, gold in order, first best): G1–P1 then G2–P2 = 2 + 1 ⇒ R_max = 4, 6·4/7 − 3 = 3/7."""
    r = score(episode(TURNS))
    assert (r.info["format"], r.info["r_match"], r.info["s_max"]) == (1.0, 6.0, 7)
    assert r.value == pytest.approx(1 + 15 / 7)
    assert score(episode(TURNS), matching="greedy").value == pytest.approx(1 + 3 / 7)
    assert score(episode(SUMS)).value == pytest.approx(4.0)  # both right, in either matching
    assert score(episode(SUMS), matching="greedy").value == pytest.approx(4.0)


def test_multi_turn_reads_the_episode_not_the_final_text():
    """The final turn holds no call; the episode's calls are what count. A malformed one: format 0, R_correct = −3."""
    assert score(episode(SUMS)).info["calls"] == 2
    bad = SUMS[:1] + [{"name": None, "arguments": None, "error": "the tool call is not valid JSON"}]
    r = score(episode(bad))
    assert (r.info["format"], r.info["correctness"], r.info["malformed"]) == (0.0, -3.0, 1)
    assert score(episode([])).value == -3.0  # no call at all: 0 − 3


def test_think_option_checks_every_assistant_turn():
    perfect = call("weather", city="Paris", unit="C")
    assert score(s("<think>need the weather</think>\n" + perfect), think=True).value == 4.0
    assert score(s(perfect), think=True).value == 3.0  # no <think>: format 0
    assert score(episode(SUMS, think=True), think=True).value == pytest.approx(4.0)
    assert score(episode(SUMS), think=True).value == pytest.approx(3.0)


def test_scaling_options():
    """CORRECTMAX1 (±1): the wrong value's R_max = 3 ⇒ 2·3/4 − 1 = 0.5; format 1."""
    wrong = s(call("weather", city="Paris", unit="F"))
    assert score(wrong, correct_max=1.0, correct_min=-1.0).value == pytest.approx(1.5)
    assert score(wrong, format_max=0.5).value == pytest.approx(2.0)


@pytest.mark.parametrize("reference", [
    GOLD,
    json.dumps(GOLD),
    {"tool_calls": GOLD},
    GOLD[0],
    call("weather", city="Paris", unit="C"),
    '<tool_call>\n{"name": "weather", "parameters": {"city": "Paris", "unit": "C"}}\n</tool_call>',  # ToolRL's data
    [{"name": "weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}],  # arguments as a JSON string
])
def test_reference_forms(reference):
    assert gold_calls(reference) == GOLD
    assert score(s(call("weather", city="Paris", unit="C"), reference=reference)).value == 4.0


def test_several_calls_in_one_block_and_parameters_key():
    text = '<tool_call>\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n{"name": "add", "parameters": {"a": 1, "b": 3}}\n</tool_call>'
    assert score(s(text, SUMS)).value == pytest.approx(4.0)
    assert gold_calls(text) == SUMS


def test_bad_references_and_config():
    for bad in (None, {"answer": "4"}, [{"arguments": {}}], 3):
        with pytest.raises(ValueError):
            ToolRL()([s("x", reference=bad)] if bad is not None else [Sample("id", "q", "x")])
    for cfg in ({"matching": "hungarian"}, {"correct_max": -4.0}, {"think": "yes"}):
        with pytest.raises(ValueError):
            ToolRLConfig(**cfg)


def test_resolves_by_name_like_score_reward():
    """`tokalign score --reward toolrl --reward-opt toolrl.matching=greedy` resolves through rewards.resolve."""
    assert "toolrl" in registry.available("reward")
    (r,) = rewards.resolve(["toolrl*0.5"], {"toolrl": {"matching": "greedy", "think": True}})
    assert isinstance(r.fn, ToolRL) and r.weight == 0.5 and r.config["matching"] == "greedy" and not r.is_verifier
    assert r.config == {"format_max": 1.0, "format_min": 0.0, "correct_max": 3.0, "correct_min": -3.0,
                        "matching": "greedy", "think": True, "strict": True}
    (plain,) = rewards.resolve(["toolrl"])
    assert [x.value for x in plain.fn([s(call("weather", city="Paris", unit="C"))])] == [4.0]
    with pytest.raises(UserError, match="matching must be one of optimal, greedy"):
        rewards.resolve(["toolrl"], {"toolrl": {"matching": "best"}})
