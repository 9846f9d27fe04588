"""An environment's reply as token ids, tokenised once, with the chat template's own turn wrappers.

The conversation is never re-tokenised: the model's sampled ids stay as sampled, and each reply adds the ids of the
text the chat template puts between the end of an assistant turn and the start of the next assistant content — the
reply's messages in the template's wrappers, then the next assistant header (the generation prompt). That text is
found by rendering a fixed probe conversation without and with the reply and taking the difference, so it is what
the template itself writes (e.g. ``\\n<|im_start|>user\\n<tool_response>…</tool_response><|im_end|>\\n<|im_start|>
assistant\\n`` for Qwen2.5).
"""

from __future__ import annotations

from tokalign.errors import UserError

_USER, _ASSISTANT = "tokalign probe question", "tokalign probe answer"
_PROBE = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)


def reply_text(tokenizer, messages: list[dict], tools: list[dict] | None = None, ended_with: str = "") -> str:
    """The text that follows an assistant turn ended by the token whose text is ``ended_with`` (the stop token the
    model sampled, already in the episode's ids) when ``messages`` come next and the model speaks again."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("Multi-turn episodes need a chat template (the model's tokenizer has none): use a chat model.")
    base = _render(tokenizer, _PROBE, tools, False)
    full = _render(tokenizer, _PROBE + list(messages), tools, True)
    cut = base.rfind(_ASSISTANT)
    if cut < 0:
        raise UserError("The chat template does not render assistant turns as they are; multi-turn episodes cannot use it.")
    cut += len(_ASSISTANT)
    if ended_with and base.startswith(ended_with, cut):  # the stop token the model sampled is the template's end of turn
        cut += len(ended_with)
    if full[:cut] != base[:cut]:
        raise UserError("The chat template renders earlier turns differently once later ones follow, so an episode "
                        "cannot be extended token by token; use a template that only appends turns.")
    return full[cut:]


def reply_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, ended_with: str = "") -> list[int]:
    """``reply_text`` tokenised once (the template's text carries its own special tokens)."""
    return tokenizer(reply_text(tokenizer, messages, tools, ended_with), add_special_tokens=False)["input_ids"]


def conversation_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """A multi-turn completion given as messages (assistant turns and what answered them, e.g. an SFT trace) as
    (ids, loss mask): assistant content then the end-of-turn token with mask 1, everything else with mask 0 —
    the same ids an episode would hold."""
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token or ""
    pending: list[dict] = []
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
            continue
        if pending:
            if not ids:
                raise UserError("A multi-turn completion must start with an assistant turn.")
            part = reply_ids(tokenizer, pending, tools, eos)
            ids, mask, pending = ids + part, mask + [0] * len(part), []
        part = tokenizer(str(m["content"]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            part = part + [tokenizer.eos_token_id]
        ids, mask = ids + part, mask + [1] * len(part)
    if pending:
        raise UserError("A multi-turn completion must end with an assistant turn.")
    return ids, mask
