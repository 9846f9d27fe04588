"""Reward calls, isolated per sample: an exception, a contract violation or a run past the timeout
becomes a recorded failure of that sample, never an error of the run.

A reward is called with one sample at a time, unless it declares ``batched = True`` (a reward model
that wants whole batches on a GPU): then it gets lists of up to ``BATCH`` samples with a time budget
of ``timeout × len(samples)``; a batched call that raises is retried one sample at a time (so only
the culprits fail), one that runs past its budget fails all its samples as timed out.

A contract violation (``plugin_errors.ContractViolation``: a reward returning a str, a verifier returning a
bool, the wrong number of values or token values) is the plug-in's bug on any input, not a bad sample: it
stops the run with the plug-in's one-line error. So does a reward failing on every sample (``check_broken``).

The timeout is a SIGALRM timer (Unix, main thread) that interrupts Python code and sleeps. Code
stuck inside a C call that never returns to the interpreter is only stopped in worker processes,
whose parent kills them at a hard deadline (see ``pool``).
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Callable

from tokalign.plugin_errors import ContractViolation, PluginError, contract, label

OK, ERROR, TIMEOUT = "ok", "error", "timeout"
MAX_MESSAGE = 300
BATCH = 64  # samples per call of a batched reward (and per chunk handed to a worker process)


def is_batched(fn) -> bool:
    return bool(getattr(fn, "batched", False))


def plugin_of(fn) -> tuple[str, str]:
    """(kind, method) to name a reward callable's failures: a wrapped verifier fails in verify()."""
    return getattr(fn, "plugin_kind", "reward"), getattr(fn, "plugin_method", "__call__")


class SampleTimeout(BaseException):
    """Raised by the alarm; a BaseException so that a reward's own ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise SampleTimeout()


class Alarm:
    """Installs the SIGALRM handler for a ``with`` block, when a timeout is set and it can be used here."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout if timeout and timeout > 0 else None
        self.active = bool(self.timeout) and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self._previous = None

    def __enter__(self) -> "Alarm":
        if self.active:
            self._previous = signal.signal(signal.SIGALRM, _on_alarm)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous if self._previous is not None else signal.SIG_DFL)


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _plain(info: Any) -> Any:
    """A reward's ``info`` as plain JSON data: it crosses process boundaries, the cache and the artifact."""
    return json.loads(json.dumps(info, default=str)) if info else {}


def _timed(fn: Callable, samples: list, alarm: Alarm, budget: float | None) -> list:
    try:
        if alarm.active:
            signal.setitimer(signal.ITIMER_REAL, budget)
        return list(fn(samples))
    finally:
        if alarm.active:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _checked(name: str, sample, value) -> tuple[str, Any]:
    from tokalign.rewards import normalise

    r = normalise(name, sample, value)  # a contract violation propagates: it stops the run
    try:
        return OK, (float(r.value), r.token_values, _plain(r.info))
    except (Exception, SystemExit) as e:  # e.g. an info json refuses (a circular reference)
        return ERROR, one_line(f"{type(e).__name__}: {e}")


def _count_mismatch(fn, name: str, got: int, want: int) -> None:
    kind, method = plugin_of(fn)
    contract(kind, name, method, f"it must return one value per sample, got {got} for {want}")


def call_one(fn: Callable, name: str, sample, alarm: Alarm) -> tuple[str, Any]:
    """(OK, (value, token_values, info)) or (ERROR | TIMEOUT, message)."""
    try:
        values = _timed(fn, [sample], alarm, alarm.timeout)
    except SampleTimeout:
        return TIMEOUT, f"timed out after {alarm.timeout:g}s"
    except ContractViolation:
        raise
    except (Exception, SystemExit) as e:
        return ERROR, one_line(f"{type(e).__name__}: {e}")
    if len(values) != 1:
        _count_mismatch(fn, name, len(values), 1)
    return _checked(name, sample, values[0])


def call_many(fn: Callable, name: str, samples: list, alarm: Alarm) -> list[tuple[str, Any]]:
    """``call_one`` for each sample, or one call for all of them when the reward is batched."""
    if not is_batched(fn) or len(samples) == 1:
        return [call_one(fn, name, s, alarm) for s in samples]
    budget = alarm.timeout * len(samples) if alarm.timeout else None
    try:
        values = _timed(fn, samples, alarm, budget)
    except SampleTimeout:
        return [(TIMEOUT, f"timed out: a batched call of {len(samples)} samples ran past {budget:g}s")] * len(samples)
    except ContractViolation:
        raise
    except (Exception, SystemExit):
        return [call_one(fn, name, s, alarm) for s in samples]  # find the culprits
    if len(values) != len(samples):
        _count_mismatch(fn, name, len(values), len(samples))
    return [_checked(name, s, v) for s, v in zip(samples, values)]


def check_broken(report, rewards) -> None:
    """A reward failing on every one of ≥ 2 samples is broken, not unlucky: its one-line ``PluginError``.
    ``report``: a ``scoring.ScoreReport`` of a run of ``rewards`` (``ResolvedReward``s)."""
    for r in rewards:
        stats = report.rewards.get(r.name)
        if stats is not None and report.samples >= 2 and stats.failed == report.samples:
            kind, method = plugin_of(r.fn)
            raise PluginError(f"{label(kind, r.name)} failed in {method}() on all {report.samples} samples: {stats.first_error}")
