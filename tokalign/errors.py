"""User-facing errors: one clear line, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input the user can fix. The message is one line that names the fix."""

    exit_code = 2


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' or '' — appended to unknown-name errors."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> UserError:
    choices = sorted(set(choices))
    listed = ", ".join(choices) if choices else "(none)"
    return UserError(f"Unknown {what} '{name}'.{did_you_mean(name, choices)} Available: {listed}.")
