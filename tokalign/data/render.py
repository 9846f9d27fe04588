"""Prompt and completion text <-> token ids with the model's tokenizer and chat template."""

from __future__ import annotations

from typing import Any

from tokalign.errors import UserError


def prompt_text(tokenizer, prompt: Any) -> str:
    """Conversational prompts go through the chat template (with the generation prompt);
    plain-text prompts are used as they are (TRL's standard format)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("The data has conversational prompts but the model's tokenizer has no chat template; use text prompts or a chat model.")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    text = prompt_text(tokenizer, prompt)
    # The chat template already carries the special tokens; plain text gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def completion_ids(tokenizer, text: str) -> list[int]:
    """Completion tokens as the model would generate them: text then EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids
