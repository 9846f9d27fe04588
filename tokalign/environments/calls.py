"""Tool calls parsed from a model's turn, in the chat-template families models are trained on.

* ``hermes`` (Qwen2.5/Qwen3, Hermes, and the many templates that copied them): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; several may follow each other.
* ``llama3`` (Llama 3.1-3.3 JSON tool calling): the turn is a JSON object ``{"name": ..., "parameters": {...}}``
  (``"arguments"`` is accepted too), optionally after ``<|python_tag|>``; several are separated by ``;``.

``auto`` (the default) takes ``hermes`` when the turn holds ``<tool_call>``, ``llama3`` when it starts with a JSON
object naming a tool, and no call otherwise. A call that cannot be read (bad JSON, no name, arguments that are not an
object, an unclosed ``<tool_call>``) is a ``Call`` with ``error`` set: the environment answers it with the error, so
the model sees what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tokalign.errors import unknown

FAMILIES = ("auto", "hermes", "llama3")
_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class Call:
    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "arguments": self.arguments if self.error is None else None}
        if self.error is not None:
            out["error"] = self.error
        return out


def _from_json(body: str, keys: tuple[str, ...]) -> Call:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return Call(None, {}, f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    return call_from_object(obj, keys)


def call_from_object(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> Call:
    """A decoded JSON value as a call (``error`` set when it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return Call(None, {}, 'a tool call must be a JSON object with a "name"')
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return Call(obj["name"], {}, f'the "{keys[0]}" of a tool call must be a JSON object')
    return Call(obj["name"], args)


def hermes(text: str) -> list[Call]:
    calls = []
    for m in _HERMES.finditer(text):
        if not m.group(2):
            calls.append(Call(None, {}, "a <tool_call> was not closed with </tool_call>"))
        else:
            calls.extend(_block(m.group(1).strip()))
    return calls


def _block(body: str) -> list[Call]:
    """One ``<tool_call>`` block: a call, a JSON list of calls, or one call per line (ToolRL's data writes several
    calls in one block that way)."""
    keys = ("arguments", "parameters")
    try:
        decoded = json.loads(body)
    except json.JSONDecodeError:
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) > 1 and all(line.strip().startswith("{") for line in lines):
            return [_from_json(line.strip(), keys) for line in lines]
        return [_from_json(body, keys)]
    if isinstance(decoded, list):
        return [call_from_object(o, keys) for o in decoded] or [Call(None, {}, "an empty list of tool calls")]
    return [call_from_object(decoded, keys)]


def llama3(text: str) -> list[Call]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return []
    parts = [p for p in _split_top_level(body) if p.strip()]
    return [_from_json(p.strip(), ("parameters", "arguments")) for p in parts]


def _split_top_level(body: str) -> list[str]:
    """``body`` cut at the semicolons outside JSON strings and braces."""
    parts, depth, start, in_str, escaped = [], 0, 0, False, False
    for i, ch in enumerate(body):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == ";" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return parts + [body[start:]]


def parse(text: str, family: str = "auto") -> list[Call]:
    """The tool calls in one model turn (empty: the model answered without calling a tool)."""
    if family not in FAMILIES:
        raise unknown("tool-call format", family, FAMILIES)
    if family == "hermes" or (family == "auto" and "<tool_call>" in text):
        return hermes(text)
    if family == "llama3" or (family == "auto" and re.match(r'\s*(<\|python_tag\|>)?\s*\{\s*"name"', text)):
        return llama3(text)
    return []


def hermes_text(name: str, arguments: dict) -> str:
    """One call written the Hermes way (for SFT traces and tests)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":")) + "</tool_call>"
