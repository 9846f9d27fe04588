"""Failures of plug-ins, reported as the plug-in's, in one line (exit code 2), not as tokalign's internal error.

An exception escaping a plug-in's method is the plug-in's bug, not the user's input and not tokalign's:
the line names the plug-in, where it comes from and the method, so the user knows whom to tell::

    algorithm 'x' (pkg 0.1.0) raised in loss(): RuntimeError: boom
    algorithm 'x' (pkg 0.1.0) broke the contract in loss(): the loss must be a scalar tensor, got shape [2, 3]
    task 'my_mod:Task' (module my_mod, no distribution) raised in records(): KeyError: 'question'

Use, at the call sites of plug-in code (``kind``: algorithm | reward | verifier | task; ``name``: as the
user wrote it, a registered name or ``module:attr``)::

    from tokalign import plugin_errors

    with plugin_errors.guard("algorithm", name, "loss"):      # wraps whatever the block raises
        out = algo.loss(batch, policy_out)
    out = plugin_errors.call("algorithm", name, "prepare", algo.prepare, batch)   # the same, for one call
    if out.loss.dim() != 0:
        plugin_errors.contract("algorithm", name, "loss", f"the loss must be a scalar tensor, got shape {list(out.loss.shape)}")

A ``UserError`` the plug-in raises itself is its own one-line message and passes through unchanged, and so do
``KeyboardInterrupt``/``SystemExit``/timeouts (``BaseException``s). The original exception stays chained
(``raise … from e``): ``--debug`` prints its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, NoReturn

from tokalign.errors import ContractViolation, PluginError, UserError

__all__ = ["ContractViolation", "PluginError", "call", "contract", "guard", "label", "raised"]

MAX_DETAIL = 300  # characters of the exception's message kept on the line


def label(kind: str, name: str) -> str:
    """``algorithm 'x' (pkg 0.1.0)``; ``(module my_mod, no distribution)`` for a local ``module:attr``."""
    from tokalign import registry

    info = None
    for k in dict.fromkeys((kind, *registry.GROUPS)):  # a reward-group name may be used as a verifier, and so on
        try:
            info = registry.info(k, name)
            break
        except (UserError, KeyError):
            continue
    return f"{kind} '{name}' ({info.label})" if info is not None else f"{kind} '{name}'"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def raised(kind: str, name: str, method: str, exc: BaseException) -> PluginError:
    """The error for ``exc`` escaping ``method``; raise it ``from exc``."""
    detail = _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return PluginError(f"{label(kind, name)} raised in {method}(): {detail}")


def contract(kind: str, name: str, method: str, problem: str) -> NoReturn:
    """Raise the contract-violation line: ``problem`` says what was expected and what came instead."""
    raise ContractViolation(f"{label(kind, name)} broke the contract in {method}(): {_one_line(problem)}")


@contextmanager
def guard(kind: str, name: str, method: str) -> Iterator[None]:
    """Any non-``UserError`` exception from the block becomes the plug-in's one-line ``PluginError``."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise raised(kind, name, method, e) from e


def call(kind: str, name: str, method: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under ``guard(kind, name, method)``."""
    with guard(kind, name, method):
        return fn(*args, **kwargs)
