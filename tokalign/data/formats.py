"""Normalise TRL dataset formats (standard or conversational; prompt-only, prompt-completion,
preference, language-modelling ``messages``) into tokalign rows.

A normalised row: ``id``, ``prompt`` (str or list of messages), ``reference`` (any JSON), and,
when present, ``completion`` / ``chosen`` / ``rejected`` as completion *text* (the assistant
content; the model's EOS is appended at tokenisation).
"""

from __future__ import annotations

from typing import Any

from tokalign.errors import UserError

REFERENCE_KEYS = ("reference", "answer", "solution", "ground_truth", "label")


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def completion_text(x: Any, where: str) -> str:
    """Assistant text of a completion given as a string or as assistant message(s)."""
    if isinstance(x, str):
        return x
    if _is_messages(x):
        return "".join(str(m["content"]) for m in x if m["role"] == "assistant") or "".join(str(m["content"]) for m in x)
    raise UserError(f"{where}: expected text or a list of {{role, content}} messages, got {type(x).__name__}.")


def _margins(value: Any, key: str, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where}: '{key}' must be a number or a list of numbers (one per other objective), got {value!r}.")
    return [float(v) for v in values]


def _split_implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """TRL's implicit-prompt preference format: the shared leading messages are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalise(records: list[dict], source: str) -> tuple[str, list[dict]]:
    """(format, rows). format is 'preference', 'unpaired' (prompt, completion, boolean label) or
    'prompts' (prompt-only or prompt-completion)."""
    if not records:
        raise UserError(f"{source}: no records.")
    keys = set(records[0])
    preference = {"chosen", "rejected"} <= keys
    unpaired = not preference and {"prompt", "completion", "label"} <= keys  # TRL's unpaired preference (KTO)
    rows = []
    for i, rec in enumerate(records):
        where = f"{source} record {i + 1}"
        row: dict[str, Any] = {"id": str(rec.get("id", rec.get("idx", i)))}
        ref = next((rec[k] for k in REFERENCE_KEYS if k in rec), None)
        row["reference"] = ref
        if preference:
            if "chosen" not in rec or "rejected" not in rec:
                raise UserError(f"{where}: preference data needs both 'chosen' and 'rejected'.")
            prompt, chosen, rejected = rec.get("prompt"), rec["chosen"], rec["rejected"]
            if prompt is None:
                if not (_is_messages(chosen) and _is_messages(rejected)):
                    raise UserError(f"{where}: no 'prompt' column and chosen/rejected are not conversations (implicit prompt needs messages).")
                prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
            row.update(prompt=_prompt(prompt, where), chosen=completion_text(chosen, where), rejected=completion_text(rejected, where))
            for side in ("chosen", "rejected"):  # other objectives' scores of each side (MODPO's margins)
                if f"{side}_margins" in rec:
                    row[f"{side}_margins"] = _margins(rec[f"{side}_margins"], f"{side}_margins", where)
        elif "prompt" in rec:
            row["prompt"] = _prompt(rec["prompt"], where)
            if "completion" in rec and rec["completion"] is not None:
                row["completion"] = completion_text(rec["completion"], where)
                if _is_messages(rec["completion"]) and any(m["role"] != "assistant" for m in rec["completion"]):
                    # a multi-turn completion (tool calls and results, feedback): trained on its assistant turns only
                    row["completion_messages"] = rec["completion"]
            if unpaired:
                if not isinstance(rec.get("label"), bool):
                    raise UserError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {rec.get('label')!r}.")
                row["label"] = rec["label"]
        elif "messages" in rec and _is_messages(rec["messages"]):
            msgs = rec["messages"]
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{where}: 'messages' must end with an assistant turn to train on it.")
            row.update(prompt=msgs[:-1], completion=str(msgs[-1]["content"]))
        else:
            raise UserError(
                f"{where}: cannot tell the format from columns {sorted(rec)}; expected 'prompt' "
                "(+ 'completion'), 'chosen'/'rejected' (+ 'prompt'), or 'messages'."
            )
        rows.append(row)
    return ("preference" if preference else "unpaired" if unpaired else "prompts"), rows


def _prompt(prompt: Any, where: str) -> Any:
    if isinstance(prompt, str) or _is_messages(prompt):
        return prompt
    raise UserError(f"{where}: 'prompt' must be text or a list of {{role, content}} messages.")
