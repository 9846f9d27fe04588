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


def render_prompts(tokenizer, prompts: list[Any]) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt, tokenised in one batched call per kind."""
    texts = [prompt_text(tokenizer, p) for p in prompts]
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
