"""Verifier ``math``: extract the final answer from a completion and check it against the reference
by symbolic equivalence with Hugging Face's ``math-verify`` (https://github.com/huggingface/Math-Verify),
the rule-based math reward used by the RLVR seed papers (DCPO, DAPO-style recipes; i.e.
boxed-answer extraction + symbolic equivalence).

Answer extraction, from the completion (first rule that applies):

1. the last top-level ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched with nesting and
   ``\\{``/``\\}`` escapes skipped; a ``\\boxed`` left unclosed (a truncated completion) means
   *no answer*, rather than a number picked from inside it;
2. GSM8K style: the text after the last ``####`` on its line;
3. the last number in the text (integers, decimals, ``1,234`` thousands separators, ``a/b`` and
   ``\\frac{a}{b}``, a leading minus sign), when ``last_number`` is true.

The reference (``Sample.reference``) may be a plain answer (``"3/4"``, ``"\\frac{\\pi}{2}"``), a
string holding ``\\boxed{...}``, a GSM8K solution ending in ``#### 72``, a number, or a list of any
of these (any one matching passes). Both sides are normalised before parsing (surrounding ``$``,
a trailing period, a currency sign, thousands separators, ``1e3`` notation, a trailing unit word
after a number as in ``5 dollars``), wrapped in ``\\boxed{}`` and parsed by ``math_verify.parse``;
``math_verify.verify(gold, answer)`` then compares them (numbers to ``float_rounding`` decimals,
fractions, radicals, π, percentages, intervals, sets, equations ``x=3`` vs ``3``, ...). When either
side cannot be parsed, the normalised strings must be equal.

Score 1.0 (equivalent) or 0.0; ``detail`` names what was extracted from both sides.

``answer(sample)``: the extracted answer, normalised as above and whitespace-collapsed (None when
nothing is extracted): what ``eval``'s maj@k votes on. Votes compare these strings, so ``0.5`` and
``1/2`` count as different answers.

Timeouts: math-verify's own SIGALRM timers are disabled (they would cancel a scorer's per-sample
alarm); this module arms one deadline of ``timeout_s`` per comparison that respects and restores
any outer timer.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from tokalign.errors import UserError
from tokalign.protocols import Sample, Verdict

UNCLOSED = object()  # a \boxed{ without its closing brace

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_SIGN = r"(?:(?<![\w.)\]}])-)?"
_NUM = (
    rf"{_SIGN}\\[dt]?frac\{{\s*-?\d+(?:\.\d+)?\s*\}}\{{\s*\d+(?:\.\d+)?\s*\}}"  # \frac{3}{4}
    rf"|{_SIGN}\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?"  # 1,234,567.5
    rf"|{_SIGN}\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"  # 12, 0.5, 3/4
    rf"|{_SIGN}\.\d+"  # .5
)
_NUMBER = re.compile(_NUM)
_PLAIN_NUMBER = rf"(?:{_NUM})"
_UNIT_WORDS = re.compile(
    rf"^({_PLAIN_NUMBER})\s*(?:\\(?:text|textbf|mbox|mathrm)\s*\{{\s*([A-Za-z][A-Za-z .]*)\}}|([A-Za-z][A-Za-z .]*))$"
)
# words that are maths, not units: never stripped from "2 pi", "3 i", "5 sqrt"...
_MATH_WORDS = {"pi", "i", "e", "sqrt", "infty", "inf", "cdot", "times", "x", "y", "z", "n", "k", "mod", "deg", "degrees"}


class _Timeout(BaseException):  # BaseException: math-verify's broad ``except Exception`` must not swallow it
    pass


@dataclass
class MathConfig:
    float_rounding: int = 6  # decimals compared for floats (math-verify's default)
    timeout_s: float = 5.0  # per comparison (parsing both sides + verify); 0 = no limit
    last_number: bool = True  # fall back to the last number in the completion when there is no \boxed / ####

    def __post_init__(self) -> None:
        if isinstance(self.float_rounding, bool) or not isinstance(self.float_rounding, int) or not 0 <= self.float_rounding <= 15:
            raise ValueError(f"float_rounding must be a whole number from 0 to 15, got {self.float_rounding!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s < 0:
            raise ValueError(f"timeout_s must be a number of seconds ≥ 0 (0 = no limit), got {self.timeout_s!r}")
        if not isinstance(self.last_number, bool):
            raise ValueError(f"last_number must be true or false, got {self.last_number!r}")


# ------------------------------------------------------------------ extraction


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at``; ``\\{`` and ``\\}`` are literal braces."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str):
    """Content of the last top-level ``\\boxed{...}``; None if there is none; ``UNCLOSED`` if the
    last one never closes. A ``\\boxed`` nested in a boxed content is unwrapped."""
    found, pos = None, 0
    while True:
        m = _BOXED.search(text, pos)
        if m is None:
            break
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _match_brace(text, j)
            if close is None:
                return UNCLOSED
            found, pos = text[j + 1:close], close + 1
        else:  # \boxed 5
            tok = re.match(r"[^\s$]+", text[j:])
            found, pos = (tok.group(0) if tok else None), j + (tok.end() if tok else 0)
    if isinstance(found, str) and _BOXED.match(found.strip()):  # \boxed{\boxed{3}}
        again = last_boxed(found.strip())
        if isinstance(again, str):
            return again
    return found


def after_hashes(text: str) -> str | None:
    """GSM8K's final answer: the rest of the line after the last ``####``."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    line = text[idx + 4:].strip().splitlines()
    return line[0].strip() if line and line[0].strip() else None


def last_number(text: str) -> str | None:
    found = None
    for m in _NUMBER.finditer(text):
        found = m.group(0)
    return found


def extract_answer(text: str, use_last_number: bool = True) -> tuple[str | None, str]:
    """(answer or None, how it was found: 'boxed' | '####' | 'last number' | why nothing was)."""
    boxed = last_boxed(text)
    if boxed is UNCLOSED:
        return None, "the last \\boxed{ is never closed"
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    hashed = after_hashes(text)
    if hashed is not None:
        return hashed, "####"
    if use_last_number:
        num = last_number(text)
        if num is not None:
            return num, "last number"
    return None, "no \\boxed{}, no '####' and no number" if use_last_number else "no \\boxed{} and no '####'"


def reference_answer(ref) -> str | None:
    """The answer inside a reference: a boxed one, a GSM8K ``#### x`` tail, else the text itself."""
    if isinstance(ref, bool) or ref is None:
        return None
    if isinstance(ref, (int, float)):
        return repr(ref) if isinstance(ref, float) else str(ref)
    text = str(ref).strip()
    boxed = last_boxed(text)
    if isinstance(boxed, str) and boxed.strip():
        return boxed.strip()
    hashed = after_hashes(text)
    return hashed if hashed is not None else (text or None)


# ------------------------------------------------------------------ normalisation


def normalise(ans: str) -> str:
    """Surface clean-up before parsing (both sides alike)."""
    s = ans.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) - 1 and s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)].strip()
    s = s.rstrip(".").strip()
    s = re.sub(r"^(?:\\\$|\$)\s*", "", s)  # currency: \$5, $5
    s = re.sub(r"^(?:\\text\{\s*\})", "", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    m = _UNIT_WORDS.match(s)
    if m:
        word = (m.group(2) or m.group(3) or "").strip().rstrip(".").lower()
        if word and word not in _MATH_WORDS:
            s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s):
        try:
            s = format(Decimal(s), "f")
        except InvalidOperation:
            pass
    return s


# ------------------------------------------------------------------ comparison


@contextmanager
def _deadline(seconds: float):
    """Raise _Timeout after ``seconds``; an outer ITIMER_REAL (a scorer's per-sample timeout) is
    kept: ours never outlives it, and it is re-armed with its remaining time afterwards."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-6))


def _math_verify():
    try:
        import math_verify
        from math_verify import grader, parser
    except ImportError as e:
        raise UserError("the math verifier needs the math-verify package: pip install math-verify") from e
    parser.TIMEOUT_WARNING_SHOWN = grader.TIMEOUT_WARNING_SHOWN = True  # we time out ourselves (see _deadline)
    return math_verify


def equivalent(gold: str, answer: str, float_rounding: int = 6) -> bool:
    """Whether ``answer`` equals ``gold`` (both already extracted), via math-verify."""
    mv = _math_verify()
    g, a = normalise(gold), normalise(answer)
    if not g or not a:
        return False
    pg = mv.parse("\\boxed{" + g + "}", parsing_timeout=None)
    pa = mv.parse("\\boxed{" + a + "}", parsing_timeout=None)
    if not pg or not pa:
        return " ".join(g.split()) == " ".join(a.split())
    return bool(mv.verify(pg, pa, float_rounding=float_rounding, timeout_seconds=None))


class MathVerifier:
    Config = MathConfig

    def __init__(self, config: MathConfig | None = None):
        self.config = config or MathConfig()

    def answer(self, sample: Sample) -> str | None:
        found, _ = extract_answer(sample.completion or "", self.config.last_number)
        if found is None:
            return None
        return " ".join(normalise(found).split()) or None

    def verify(self, sample: Sample) -> Verdict:
        refs = sample.reference if isinstance(sample.reference, list) else [sample.reference]
        golds = [g for g in (reference_answer(r) for r in refs) if g]
        if not golds:
            return Verdict(False, 0.0, "no reference answer for this sample")
        answer, how = extract_answer(sample.completion or "", self.config.last_number)
        if answer is None:
            return Verdict(False, 0.0, f"no answer extracted ({how}); expected '{golds[0]}'")
        try:
            with _deadline(self.config.timeout_s):
                ok = any(equivalent(g, answer, self.config.float_rounding) for g in golds)
        except _Timeout:
            return Verdict(False, 0.0, f"extracted '{answer}' ({how}); comparison with '{golds[0]}' timed out")
        verb = "equals" if ok else "does not equal"
        return Verdict(ok, 1.0 if ok else 0.0, f"extracted '{answer}' ({how}); {verb} reference '{golds[0]}'"
                       + (f" (or {len(golds) - 1} other)" if len(golds) > 1 else ""))
