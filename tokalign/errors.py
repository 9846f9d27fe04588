"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(Exception):
    """Bad input the user can fix. The message is one line that names the fix."""

    exit_code = 2


class NoSpace(UserError):
    """The disk (or the quota) filled up while writing: one line naming where and the fix, exit 2."""


# what a full disk says when the errno did not survive: Rust's io::Error (safetensors, tokenizers), Arrow's detail
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "errno 28", "os error 122")


def no_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, says the disk or the quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc).lower() for t in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_error(path=None, exc: BaseException | None = None, left: str = "") -> NoSpace:
    """The one line for a full disk while writing ``path`` (None: unknown); ``left``: what became of the partial output."""
    where = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    detail = f" (writing '{where}')" if where and str(where) != str(path) else ""
    device = f"the device holding '{path}'" if path else "the device"
    return NoSpace(f"No space left on {device}{detail}: free some space there, or write elsewhere (another --out){left}.")


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
    transpositions each cost 1 (so the typo 'gpro' is 1 from 'grpo', 2 from 'gspo')."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' or '' — appended to unknown-name errors."""
    close = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.6)
    if not close:
        return ""
    best = min(close, key=lambda c: (edit_distance(name, c), close.index(c)))
    return f" Did you mean '{best}'?"


def unknown(what: str, name: str, choices: Iterable[str]) -> UserError:
    choices = sorted(set(choices))
    listed = ", ".join(choices) if choices else "(none)"
    return UserError(f"Unknown {what} '{name}'.{did_you_mean(name, choices)} Available: {listed}.")


class PluginError(UserError):
    """A plug-in raised or broke its contract: one line naming the plug-in, its distribution and the method
    (``tokalign.plugin_errors`` builds them; defined here so the registry can raise them without a cycle)."""


class ContractViolation(PluginError):
    """A plug-in returned something its protocol forbids: a bug of the plug-in on any input, so callers that
    tolerate per-sample failures (scoring) still stop on it."""
