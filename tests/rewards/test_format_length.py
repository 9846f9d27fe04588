"""The ``format`` reward (tag structure) and the ``length`` reward (DLER truncation, linear penalty)."""

import pytest

from tokalign import rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.format import Format, FormatConfig
from tokalign.rewards.length import Length, LengthConfig, completion_length, sampler_limit
from tokalign.rewards.overlong import Overlong


def s(completion="", n_tokens=0, finish="stop", reference=None, max_new_tokens=None) -> Sample:
    return Sample("id", "q", completion, list(range(n_tokens)), reference, finish, {"max_new_tokens": max_new_tokens})


# ------------------------------------------------------------------ format

FORMAT_CASES = [
    # (preset, completion, matches?)
    ("think", "<think>add 2 and 2</think> The answer is 4.", True),
    ("think", "  <think>\nlong\nthoughts\n</think>\n\n4\n", True),
    ("think", "<think>thoughts</think>   ", False),  # no answer after the thinking
    ("think", "The answer is 4.", False),  # no thinking
    ("think", "<think>a</think> b <think>c</think> d", False),  # two blocks
    ("think", "<think>a <think>b</think> c", False),  # nested / unbalanced
    ("think", "preamble <think>a</think> b", False),  # must start with <think>
    ("think_boxed", "<think>2+2</think> so \\boxed{4}.", True),
    ("think_boxed", "<think>2+2</think> so 4.", False),
    ("think_boxed", "<think>\\boxed{4}</think> so 4.", False),  # the box must be in the answer
    ("think_answer", "<think>2+2</think>\n<answer>4</answer>", True),
    ("think_answer", "<think>2+2</think><answer> </answer>", False),  # empty answer
    ("think_answer", "<think>2+2</think><answer>4</answer> trailing", False),
    ("think_answer", "<answer>4</answer>", False),
    ("reasoning_answer", "<reasoning>2+2 is 4</reasoning>\n<answer>\n4\n</answer>\n", True),
    ("reasoning_answer", "<reasoning>2+2</reasoning><answer>4", False),
]


@pytest.mark.parametrize("preset,completion,ok", FORMAT_CASES)
def test_format_presets(preset, completion, ok):
    (r,) = Format(FormatConfig(preset=preset))([s(completion)])
    assert (r.value, r.info["passed"]) == ((1.0, True) if ok else (0.0, False))


def test_format_custom_pattern_and_search():
    fmt = Format(FormatConfig(pattern=r"Answer: -?\d+"))
    assert [r.value for r in fmt([s("Answer: 12"), s("Answer: 12 because"), s("answer: 12")])] == [1.0, 0.0, 0.0]
    anywhere = Format(FormatConfig(pattern=r"Answer: -?\d+", search=True))
    assert [r.value for r in anywhere([s("Answer: 12"), s("so... Answer: -3 because")])] == [1.0, 1.0]


def test_format_is_linear_on_long_completions():
    """Tempered tokens, no nested quantifiers: a long non-matching completion returns (no test on time)."""
    text = "<think>" + "x " * 200_000 + "</think>" + " y" * 100_000 + "<think>"
    assert [r.value for r in Format()([s(text)])] == [0.0]


def test_format_config_validation():
    with pytest.raises(ValueError, match="preset"):
        FormatConfig(preset="xml")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        FormatConfig(pattern="(unclosed")
    with pytest.raises(UserError, match="search"):
        rewards.resolve(["format"], {"format": {"search": "sometimes"}})


# ------------------------------------------------------------------ length


def test_helpers_shared_with_overlong():
    x = s("héllo", n_tokens=3, max_new_tokens=20)
    assert (completion_length(x), completion_length(x, "chars"), sampler_limit(x)) == (3, 5, 20)
    assert sampler_limit(s()) is None
    assert Overlong()([s(n_tokens=18, max_new_tokens=20)])[0].value == pytest.approx(-0.5)  # unchanged by the reuse


@pytest.mark.parametrize("n,finish,expected", [(0, "stop", 0.0), (10, "stop", 0.0), (11, "stop", -1.0), (5, "length", -1.0)])
def test_dler_additive_penalty(n, finish, expected):
    """L_trunc = 10: over when |y| > 10 or the sampler cut the completion."""
    (r,) = Length(LengthConfig(max_len=10))([s(n_tokens=n, finish=finish)])
    assert r.value == expected


def test_dler_multiplies_a_base_reward():
    """DLER: R = correctness if |y| ≤ L_trunc else 0 (L_trunc = 10 tokens here)."""
    length = Length(LengthConfig(max_len=10, base="exact_match"))
    batch = [s("4", 10, reference="4"), s("4", 11, reference="4"), s("5", 3, reference="4"), s("4", 3, "length", reference="4")]
    out = length(batch)
    assert [r.value for r in out] == [1.0, 0.0, 0.0, 0.0]
    assert [r.info["over"] for r in out] == [False, True, False, True]
    assert [r.info["base"] for r in out] == [1.0, 1.0, 0.0, 1.0]


def test_dler_sampler_cut_only_and_chars():
    cut_only = Length(LengthConfig(max_len=0))
    assert [r.value for r in cut_only([s(n_tokens=10_000), s(n_tokens=3, finish="length")])] == [0.0, -1.0]
    chars = Length(LengthConfig(max_len=4, unit="chars", penalty=0.5))
    assert [r.value for r in chars([s("abcd", 99), s("abcde", 1)])] == [0.0, -0.5]


@pytest.mark.parametrize("n,expected", [(0, 0.0), (10, 0.0), (20, -0.25), (50, -1.0), (90, -2.0)])
def test_linear_penalty_by_hand(n, expected):
    """r = −penalty·max(0, |y| − free_len)/(L − free_len) = −2·max(0, n − 10)/(90 − 10)."""
    (r,) = Length(LengthConfig(mode="linear", max_len=90, free_len=10, penalty=2.0))([s(n_tokens=n)])
    assert r.value == pytest.approx(expected)


def test_linear_penalty_uses_the_sampler_limit():
    linear = Length(LengthConfig(mode="linear", max_len=0))
    out = linear([s(n_tokens=16, max_new_tokens=64), s(n_tokens=16)])
    assert out[0].value == pytest.approx(-0.25)
    assert out[1].value == 0.0 and "no max_len" in out[1].info["detail"]


def test_length_config_validation_and_registry():
    for bad in ({"mode": "quadratic"}, {"unit": "words"}, {"max_len": -1}, {"penalty": -1}, {"base": "length"},
                {"mode": "linear", "base": "math"}, {"base_options": {"x": 1}}, {"mode": "linear", "max_len": 5, "free_len": 5}):
        with pytest.raises(ValueError):
            LengthConfig(**bad)
    assert LengthConfig() == LengthConfig(mode="dler", max_len=4000, base="", penalty=1.0, free_len=0, unit="tokens")
    (r,) = rewards.resolve(["length"], {"length": {"max_len": 3, "base": "math", "base_options": {"last_number": False}}})
    out = r.fn([s("it is 4", 2, reference="4"), s("\\boxed{4}", 2, reference="4"), s("\\boxed{4}", 4, reference="4")])
    assert [x.value for x in out] == [0.0, 1.0, 0.0]  # no last-number fallback; correct; correct but too long
    with pytest.raises(UserError, match="mode"):
        rewards.resolve(["length"], {"length": {"mode": "cubic"}})
