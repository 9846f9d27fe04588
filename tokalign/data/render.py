"""Prompt and completion text <-> token ids with the model's tokenizer and chat template."""

from __future__ import annotations

import sys
from typing import Any

from tokalign.errors import UserError

# Tasks whose records have plain-string prompts -> warned yet. The loader notes them; the warning needs the
# tokenizer, which the train loop only loads long after (and far from) loading the data.
_plain_prompt_tasks: dict[str, bool] = {}


def note_plain_prompts(task: str) -> None:
    """``task`` (e.g. "task 'my_mod:Task'") gave string prompts: warn once if a chat-template tokenizer renders them."""
    _plain_prompt_tasks.setdefault(task, False)


def _warn_plain_prompts(tokenizer, prompts: list[Any]) -> None:
    pending = [t for t, warned in _plain_prompt_tasks.items() if not warned]
    if not pending or not getattr(tokenizer, "chat_template", None) or not any(isinstance(p, str) for p in prompts):
        return
    for task in pending:
        _plain_prompt_tasks[task] = True
        sys.stderr.write(f"warning: {task} gives plain-string prompts: they are not chat-templated, though the model has "
                         "a chat template (a task returning [{\"role\": \"user\", \"content\": ...}] messages gets it).\n")


def prompt_text(tokenizer, prompt: Any, tools: list[dict] | None = None) -> str:
    """Conversational prompts go through the chat template (with the generation prompt, and the ``tools`` an
    environment offers); plain-text prompts are used as they are (TRL's standard format)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("The data has conversational prompts but the model's tokenizer has no chat template; use text prompts or a chat model.")
    return tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=False)


def render_prompts(tokenizer, prompts: list[Any], tools: list[dict] | None = None) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt, tokenised in one batched call per kind."""
    _warn_plain_prompts(tokenizer, prompts)
    texts = [prompt_text(tokenizer, p, tools) for p in prompts]
    ids: list[list[int] | None] = [None] * len(prompts)
    # The chat template already carries the special tokens; plain text gets the tokenizer's own.
    for plain in (True, False):
        idx = [i for i, p in enumerate(prompts) if isinstance(p, str) == plain]
        if idx:
            encoded = tokenizer([texts[i] for i in idx], add_special_tokens=plain)["input_ids"]
            for i, e in zip(idx, encoded):
                ids[i] = e
    return list(zip(texts, ids))


def completion_ids(tokenizer, text: str) -> list[int]:
    """Completion tokens as the model would generate them: text then EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def retokenize(rows: list[dict], tokenizer, tools: list[dict] | None = None) -> list[dict]:
    """Render prompts (JSON-encoded in ``prompt``) with *this* model's tokenizer (an artifact may have been prepared
    for another), with the ``tools`` of the run's environment, if any."""
    from tokalign.rows import loads

    for r, (text, ids) in zip(rows, render_prompts(tokenizer, [loads(r["prompt"]) for r in rows], tools)):
        r["prompt_text"], r["prompt_ids"] = text, ids
    return rows
