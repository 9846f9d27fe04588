"""The environment protocol: ``start(row)`` opens an episode, ``step(state, text)`` answers one model turn."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """An environment's answer to one model turn.

    ``messages``: chat messages appended to the conversation (``{"role": "tool", "name": ..., "content": ...}`` for
    tool results, ``{"role": "user", ...}`` for feedback); ``done``: the episode ends here (``messages`` is then
    ignored); ``reward``: this turn's reward, if the environment gives rewards per turn; ``info``: what it wants
    logged (``tool_calls``: the calls it parsed, each ``{"name", "arguments"}`` or ``{"name": None, "error"}``)."""

    messages: list[dict] = field(default_factory=list)
    done: bool = False
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Base class of environments (subclassing it is optional: the protocol is ``name``, ``tools()``, ``start`` and
    ``step``). One instance serves every episode of a run; per-episode state lives in what ``start`` returns."""

    name = "environment"

    def tools(self) -> list[dict] | None:
        """JSON schemas of the tools the model may call, passed to the chat template as ``tools=`` (None: none)."""
        return None

    def start(self, row: dict) -> Any:
        """The state of a new episode on this prompt row (its ``prompt``, ``reference``, ...)."""
        return None

    def step(self, state: Any, text: str) -> Reply:
        """Answer the model's turn ``text`` (its decoded output, special tokens skipped)."""
        raise NotImplementedError

    def fork(self, state: Any) -> Any:
        """An independent copy of an episode's state, for a rollout that branches there (``rollout.branching``)."""
        return copy.deepcopy(state)


def fork_state(env: Any, state: Any) -> Any:
    """``env.fork(state)``, or a deep copy for environments without the (optional) method."""
    fork = getattr(env, "fork", None)
    return fork(state) if callable(fork) else copy.deepcopy(state)


def check(obj: Any) -> str | None:
    """None if ``obj`` (an environment class or instance) has the protocol's methods, else the reason in one line."""
    for attr in ("start", "step", "tools"):
        if not callable(getattr(obj, attr, None)):
            return f"an environment needs a '{attr}' method (see tokalign.environments.base.Environment)"
    return None
