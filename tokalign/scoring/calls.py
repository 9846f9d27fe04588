"""One reward call on one sample, isolated: an exception, a contract violation or a run past the
timeout becomes a recorded failure of that sample, never an error of the run.

The timeout is a SIGALRM timer (Unix, main thread) that interrupts Python code and sleeps. Code
stuck inside a C call that never returns to the interpreter is only stopped in worker processes,
whose parent kills them at a hard deadline (see ``pool``).
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Callable

OK, ERROR, TIMEOUT = "ok", "error", "timeout"
MAX_MESSAGE = 300


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


def call_one(fn: Callable, name: str, sample, alarm: Alarm) -> tuple[str, Any]:
    """(OK, (value, token_values, info)) or (ERROR | TIMEOUT, message)."""
    from tokalign.errors import UserError
    from tokalign.rewards import normalise

    try:
        try:
            if alarm.active:
                signal.setitimer(signal.ITIMER_REAL, alarm.timeout)
            values = list(fn([sample]))
        finally:
            if alarm.active:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if len(values) != 1:
            return ERROR, f"returned {len(values)} values for 1 sample"
        r = normalise(name, sample, values[0])
        return OK, (float(r.value), r.token_values, _plain(r.info))
    except SampleTimeout:
        return TIMEOUT, f"timed out after {alarm.timeout:g}s"
    except UserError as e:  # the reward contract, checked by normalise
        return ERROR, one_line(str(e))
    except (Exception, SystemExit) as e:
        return ERROR, one_line(f"{type(e).__name__}: {e}")
