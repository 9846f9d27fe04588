"""The ``math`` verifier: answer extraction, and equivalence through math-verify on hand-labelled pairs.

Every label below is what a careful human grader says (a unit or a currency sign is not part of the
number; a rounded decimal is not the exact value; 50% and 0.5 are the same quantity). Where
math-verify disagrees and our code cannot reasonably fix it, the pair is an xfail with the reason.
"""

import json
import signal
import threading

import pytest
from verifier_helpers import write_rollouts

from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.verifiers.math import (
    UNCLOSED,
    MathConfig,
    MathVerifier,
    after_hashes,
    extract_answer,
    last_boxed,
    last_number,
    normalise,
    reference_answer,
)

GSM8K = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"

# (reference, completion, equal?)
PAIRS = [
    # fractions, decimals, LaTeX \frac / \dfrac / \tfrac
    ("3/4", "The answer is \\boxed{0.75}.", True),
    ("0.75", "So we get \\boxed{\\frac{3}{4}}", True),
    ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", True),
    ("\\dfrac{1}{2}", "\\boxed{\\tfrac12}", True),
    ("\\frac{2}{3}", "\\boxed{\\frac{4}{6}}", True),
    ("\\frac{7}{2}", "\\boxed{3.5}", True),
    ("\\frac{5}{2}", "\\boxed{2\\frac{1}{2}}", True),  # mixed number
    ("2", "\\boxed{\\frac{4}{2}}", True),
    ("3/4", "\\boxed{0.7}", False),
    ("\\frac{1}{3}", "\\boxed{0.333}", False),  # a rounded value is not the exact one
    ("1/3", "\\boxed{0.33}", False),
    ("100", "\\boxed{99.99}", False),
    ("0.0001", "\\boxed{0.0002}", False),
    ("72", "\\boxed{72.0}", True),
    ("0.3", "\\boxed{0.1+0.2}", True),
    ("1000", "\\boxed{1.000}", False),  # a decimal point, not a thousands separator
    # units and currency
    ("5", "The side is \\boxed{5 \\text{ cm}}", True),
    ("5", "\\boxed{5\\,\\mathrm{cm}}", True),
    ("5 cm", "\\boxed{5}", True),
    ("12", "She earns \\boxed{12 dollars}", True),
    ("12", "\\boxed{12 \\text{ apples}}", True),
    ("12", "\\boxed{\\$12}", True),
    ("12", "\\boxed{13 \\text{ dollars}}", False),
    ("1000.5", "\\boxed{\\$1,000.50}", True),
    ("5\\sqrt{2}", "\\boxed{5\\sqrt{2} \\text{ cm}}", True),
    ("7", "\\boxed{7 \\mathrm{m}^2}", True),
    ("90", "\\boxed{90^\\circ}", True),
    ("90^\\circ", "\\boxed{90}", True),
    # intervals
    ("[1,2)", "\\boxed{(1,2]}", False),
    ("[1,2)", "\\boxed{[1, 2)}", True),
    ("(1,3)", "\\boxed{(1,3]}", False),
    ("(-\\infty, 3]", "\\boxed{(-\\infty,3)}", False),
    ("(-\\infty, 3]", "\\boxed{(-\\infty, 3]}", True),
    ("[0, \\infty)", "\\boxed{[0,\\infty)}", True),
    ("[1,2)", "\\boxed{x \\in [1,2)}", True),
    # tuples and sets
    ("(1,2)", "\\boxed{(2,1)}", False),  # an ordered pair
    ("(1, 2)", "\\boxed{(1,2)}", True),
    ("(3,\\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", True),
    ("\\{1,2,3\\}", "\\boxed{\\{3, 2, 1\\}}", True),
    ("\\{1,2,3\\}", "\\boxed{\\{1, 2\\}}", False),
    ("1,2,3", "\\boxed{3,2,1}", True),  # a list of solutions, any order
    ("\\{2,3\\}", "\\boxed{x=2 \\text{ or } x=3}", True),
    ("\\emptyset", "\\boxed{\\{\\}}", True),
    # percentages
    ("50\\%", "\\boxed{50}", True),
    ("50", "\\boxed{50\\%}", True),
    ("25\\%", "\\boxed{0.25}", True),
    ("0.5", "\\boxed{50\\%}", True),
    ("25\\%", "\\boxed{0.3}", False),
    # thousands separators and notation
    ("1000", "\\boxed{1,000}", True),
    ("1000", "\\boxed{1{,}000}", True),
    ("1234567", "The total is 1,234,567.", True),
    ("10^6", "\\boxed{1,000,000}", True),
    ("1000", "\\boxed{1e3}", True),
    ("1024", "\\boxed{2^{10}}", True),
    ("3000", "\\boxed{3 \\times 10^3}", True),
    # negative numbers
    ("-3", "\\boxed{3}", False),
    ("-\\frac{1}{2}", "\\boxed{-0.5}", True),
    ("-2", "x = -2, so the answer is \\boxed{-2}", True),
    ("-5", "\\boxed{- 5}", True),
    ("0", "\\boxed{-0}", True),
    ("-7", "The temperature dropped to -7 degrees", True),
    ("5", "5-3=2, so 2", False),
    # radicals
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
    ("\\sqrt{2}", "\\boxed{2^{1/2}}", True),
    ("4", "\\boxed{\\sqrt{16}}", True),
    ("4", "\\boxed{\\pm 4}", False),
    ("\\sqrt{2}", "\\boxed{1.414}", False),
    ("\\sqrt{3}", "\\boxed{\\sqrt{2}}", False),
    # pi
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}", True),
    ("2\\pi", "\\boxed{6.28}", False),
    ("2\\pi", "\\boxed{2 \\pi}", True),
    ("\\pi", "\\boxed{\\pi}", True),
    ("3\\pi", "\\boxed{\\pi}", False),
    # algebra, equations, choices
    ("x^2-1", "\\boxed{(x-1)(x+1)}", True),
    ("2x+1", "\\boxed{1+2x}", True),
    ("2x+1", "\\boxed{2x-1}", False),
    ("3", "x=3", True),
    ("3", "\\boxed{x=3}", True),
    ("B", "\\boxed{\\text{(B)}}", True),
    ("B", "\\boxed{C}", False),
    # \boxed{} nesting and which answer counts
    ("7", "\\boxed{\\boxed{7}}", True),
    ("\\frac{1}{2}", "first \\boxed{3} then finally \\boxed{\\frac{1}{2}}", True),
    ("3", "first \\boxed{3} then finally \\boxed{\\frac{1}{2}}", False),
    ("\\{1,2\\}", "\\boxed{\\{1,2\\}}", True),
    ("10", "The answer is \\boxed{10", False),  # truncated: no answer
    ("5", "\\boxed 5", True),
    # GSM8K references and answers, last-number fallback
    (GSM8K, "48 + 24 = 72 clips. #### 72", True),
    (GSM8K, "48 + 24 = 72 clips, minus 2 is 70", False),
    ("#### 1,200", "The answer is 1200", True),
    ("72", "The answer is 72.", True),
    ("\\frac{1}{2}", "The probability is $\\frac{1}{2}$.", True),
    ("0.5", "I think it is 1/2", True),
    ("The answer is \\boxed{\\frac{\\pi}{4}}.", "\\boxed{\\frac{1}{4}\\pi}", True),
]

XFAIL = {
    ("\\frac{1}{3}", "\\boxed{0.3333333}", False):
        "math-verify compares floats rounded to float_rounding=6 decimals, so 0.3333333 equals 1/3",
    ("-1", "\\boxed{e^{i\\pi}}", True):
        "math-verify reads i as a symbol unless the gold answer is complex, so e^{iπ} stays unevaluated",
    ("i", "\\boxed{\\sqrt{-1}}", True):
        "math-verify does not simplify sqrt(-1) to the imaginary unit i",
}

CASES = [pytest.param(*p, id=f"{i}") for i, p in enumerate(PAIRS)] + [
    pytest.param(*p, id=f"xfail{i}", marks=pytest.mark.xfail(reason=why, strict=True)) for i, (p, why) in enumerate(XFAIL.items())
]


def test_enough_tricky_pairs():
    assert len(PAIRS) + len(XFAIL) >= 40
    assert sum(label for *_, label in PAIRS) > 20 and sum(not label for *_, label in PAIRS) > 20


@pytest.mark.parametrize("reference,completion,equal", CASES)
def test_hand_labelled_pair(reference, completion, equal):
    v = MathVerifier().verify(Sample("s", "q", completion, reference=reference))
    assert (v.passed, v.score) == (equal, 1.0 if equal else 0.0), v.detail


def test_detail_names_what_was_extracted():
    v = MathVerifier().verify(Sample("s", "q", "so \\boxed{\\frac{3}{4}}", reference=GSM8K))
    assert v.detail == "extracted '\\frac{3}{4}' (boxed); does not equal reference '72'"
    v = MathVerifier().verify(Sample("s", "q", "no digits here", reference="4"))
    assert not v.passed and "no answer extracted" in v.detail


def test_last_boxed_nesting_and_escapes():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{\\{1, \\}2\\}}") == "\\{1, \\}2\\}"  # escaped braces do not count
    assert last_boxed("\\boxed{1} and \\fbox{2}") == "2"
    assert last_boxed("\\boxed{a + \\boxed{b}}") == "a + \\boxed{b}"  # the outer one is the answer
    assert last_boxed("\\boxed{\\boxed{b}}") == "b"
    assert last_boxed("\\boxed{1} then \\boxed{2") is UNCLOSED
    assert last_boxed("\\boxed 42 done") == "42"
    assert last_boxed("no box") is None


def test_extraction_order_and_helpers():
    assert extract_answer("#### 5 but \\boxed{6}") == ("6", "boxed")
    assert extract_answer("work 3 then\n#### 1,000\nthanks 9") == ("1,000", "####")
    assert extract_answer("3 apples and 4 pears give 7") == ("7", "last number")
    assert extract_answer("3 apples", use_last_number=False) == (None, "no \\boxed{} and no '####'")
    assert after_hashes("x\n####  -12 \n") == "-12"
    assert last_number("from -3 to 2-5 is \\frac{3}{4} or 3/4 then 1,234.5") == "1,234.5"
    assert last_number("slope is -\\frac{3}{4}") == "-\\frac{3}{4}"
    assert last_number("x-5") == "5"  # a minus between terms is not a sign
    assert reference_answer(GSM8K) == "72"
    assert reference_answer("\\boxed{\\pi}") == "\\pi"
    assert reference_answer(3) == "3" and reference_answer(0.5) == "0.5" and reference_answer(None) is None


def test_normalise():
    assert normalise("$1,000$.") == "1000"
    assert normalise("\\$5") == "5"
    assert normalise("12 dollars") == "12"
    assert normalise("2 pi") == "2 pi"  # a maths word is kept
    assert normalise("1.5e3") == "1500"
    assert normalise("1{,}000") == "1000"


def test_list_reference_any_matches_and_missing_reference():
    v = MathVerifier()
    assert v.verify(Sample("s", "q", "\\boxed{2}", reference=["1", "2"])).passed
    r = v.verify(Sample("s", "q", "\\boxed{2}", reference=None))
    assert (r.passed, r.score, r.detail) == (False, 0.0, "no reference answer for this sample")


def test_config_defaults_and_validation():
    assert MathVerifier().config == MathConfig(float_rounding=6, timeout_s=5.0, last_number=True)
    for bad in ({"float_rounding": -1}, {"float_rounding": 1.5}, {"timeout_s": -1}, {"last_number": "yes"}):
        with pytest.raises(ValueError):
            MathConfig(**bad)
    strict = MathVerifier(MathConfig(last_number=False))
    assert not strict.verify(Sample("s", "q", "it is 4", reference="4")).passed


def test_built_through_the_registry_with_options():
    from tokalign import rewards

    (r,) = rewards.resolve(["math"], {"math": {"float_rounding": 2}})
    assert r.config["float_rounding"] == 2
    out = r.fn([Sample("s", "q", "\\boxed{0.334}", reference="1/3")])
    assert out[0].value == 1.0  # equal at two decimals
    with pytest.raises(UserError, match="float_rounding"):
        rewards.resolve(["math"], {"math": {"float_rounding": 99}})


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_outer_alarm_survives_a_comparison():
    """A scorer's per-sample ITIMER_REAL must still be armed (minus the time spent) after verify."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 50.0)
        assert MathVerifier().verify(Sample("s", "q", "\\boxed{\\frac{2}{4}}", reference="0.5")).passed
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left <= 50.0 and not fired
        assert signal.getsignal(signal.SIGALRM) is not previous  # our test handler is back
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ through the real CLI


@pytest.mark.slow
def test_score_cli_with_the_math_reward(tmp_path):
    from conftest import cli
    from tokalign import artifacts

    write_rollouts(tmp_path / "R", [
        ("frac", "<think>3 of 4</think> so \\boxed{\\dfrac{3}{4}}", "0.75"),
        ("gsm", "<think>48+24</think> They sold 72 clips.", GSM8K),
        ("wrong", "I get \\boxed{71}", "#### 72"),
        ("cut", "The answer is \\boxed{1", "1"),
    ])
    proc = cli("score", "R", "--reward", "math", "--reward", "format*0.5", "--reward-opt", "math.float_rounding=4",
               "--no-cache", "--out", "S", cwd=tmp_path)
    assert proc.stdout == "S\n"
    rows = artifacts.read(tmp_path / "S", ["scored"]).rows()
    assert [r["rewards"]["math"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["rewards"]["format"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["reward"] for r in rows] == [1.5, 1.5, 0.0, 0.0]
    verdicts = [json.loads(r["verdicts"])["math"] for r in rows]
    assert verdicts[1] == {"passed": True, "detail": "extracted '72' (last number); equals reference '72'"}
    assert "never closed" in verdicts[3]["detail"]
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["plugins"]] == ["math", "format"]
