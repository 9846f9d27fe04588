"""An environment built from plain Python functions: the model calls them, their results come back as tool messages.

Each function's JSON schema comes from its signature and Google-style docstring (``transformers.utils.get_json_schema``,
the same one ``apply_chat_template(tools=[fn])`` uses), so it is passed to the chat template as the model's tool list.
A turn without a tool call ends the episode (that turn is the answer). A call to an unknown tool, with wrong
arguments, or that raises, is answered with one line starting ``error:`` — the model sees it and may try again.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from tokalign.environments import calls as calls_mod
from tokalign.environments.base import Environment, Reply

RESULT_CHARS = 2000  # a tool result longer than this is cut (the model's context is short)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS] + " …(cut)"


class ToolEnvironment(Environment):
    """``functions``: the tools; ``parser``: the tool-call format (``tokalign.environments.calls.FAMILIES``)."""

    name = "tools"

    def __init__(self, functions: list[Callable], parser: str = "auto"):
        self.functions = {f.__name__: f for f in functions}
        self.parser = parser
        self._schemas: list[dict] | None = None

    def tools(self) -> list[dict]:
        if self._schemas is None:
            from transformers.utils import get_json_schema

            self._schemas = [get_json_schema(f) for f in self.functions.values()]
        return self._schemas

    def call(self, call: calls_mod.Call) -> str:
        if call.error is not None:
            return f"error: {call.error}. Write a call as <tool_call>{{\"name\": ..., \"arguments\": {{...}}}}</tool_call>."
        fn = self.functions.get(call.name or "")
        if fn is None:
            return f"error: no tool named {call.name!r}; the tools are: {', '.join(self.functions)}."
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: wrong arguments for {call.name}: {e}."
        try:
            return _text(fn(**call.arguments))
        except Exception as e:  # the tool's failure is the model's information, not the run's end
            return f"error: {call.name} failed: {type(e).__name__}: {e}"

    def step(self, state: Any, text: str) -> Reply:
        found = calls_mod.parse(text, self.parser)
        if not found:
            return Reply(done=True)
        results = [self.call(c) for c in found]
        messages = [{"role": "tool", "name": c.name or "error", "content": r} for c, r in zip(found, results)]
        return Reply(messages, info={"tool_calls": [c.as_dict() for c in found],
                                     "tool_errors": sum(r.startswith("error:") for r in results)})
