"""What the model-backed rewards share: a per-process model cache, prompt + completion rendering with
the scoring model's own tokenizer, and right-padded batched forwards.

torch and transformers are imported inside the functions: reward modules are imported by
``tokalign plugins`` and must stay light until they score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokalign.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")

# (loader kind, path, dtype, device) -> loaded object; a reward is built once per run, but the same
# model may back several rewards (or a reward re-built by a long-lived process), so load it once.
_CACHE: dict[tuple, Any] = {}


def need_model(reward: str, path: str, key: str = "model") -> str:
    """A required model option, checked when the reward is built (a local path must exist)."""
    from tokalign.models import resolve_model

    if not path:
        raise UserError(f"{reward} needs a model: --reward-opt {reward}.{key}=PATH")
    try:
        resolve_model(path)
    except UserError as e:
        raise UserError(f"{reward}.{key}: {e}") from None
    return path


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def cached(kind: str, path: str, dtype: str, device: str, load: Callable[[], Any]) -> Any:
    key = (kind, path, dtype, device)
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def device_for(device: str) -> str:
    from tokalign.models import default_device

    return device or default_device()


def load_tokenizer(reward: str, path: str):
    """The scoring model's tokenizer (cached), with a pad token."""

    def load():
        from transformers import AutoTokenizer

        from tokalign.models import resolve_model

        local, _ = resolve_model(path)
        try:
            tok = AutoTokenizer.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise UserError(f"{reward}: cannot load the tokenizer of '{path}': {str(e).splitlines()[0]}") from e
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    return cached("tokenizer", path, "", "", load)


def load_auto(reward: str, path: str, auto_class: str, dtype: str, device: str, *, suffix: str, what: str):
    """``transformers.<auto_class>.from_pretrained(path)`` in eval mode on ``device`` (cached).

    A checkpoint whose ``config.architectures`` has no class ending in ``suffix`` is refused: loading a
    causal LM as a classifier would silently give it a freshly initialised (random) head."""
    device = device_for(device)

    def load():
        import torch
        import transformers

        from tokalign.models import resolve_model

        local, _ = resolve_model(path)
        try:
            cfg = transformers.AutoConfig.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise UserError(f"{reward}: cannot load '{path}': {str(e).splitlines()[0]}") from e
        archs = list(getattr(cfg, "architectures", None) or [])
        if archs and not any(a.endswith(suffix) for a in archs):
            raise UserError(f"{reward}: '{path}' is a {', '.join(archs)}, not a {what} (*{suffix}); pass a {what} checkpoint.")
        try:
            model = getattr(transformers, auto_class).from_pretrained(local, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise UserError(f"{reward}: cannot load '{path}' as {auto_class}: {str(e).splitlines()[0]}") from e
        return model.to(device).eval()

    return cached(auto_class, path, dtype, device, load)


def plain_prompt(prompt: Any) -> str:
    """A prompt as text for a scorer without a chat template: message contents one per line."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['content']}\n" for m in prompt)


def conversation(tokenizer, prompt: Any, completion: str, use_template: bool = True) -> tuple[str, bool, int]:
    """(text, add_special_tokens, start of the completion in text) of prompt + completion as the scoring
    model reads it: its own chat template when it has one (the completion as the assistant turn), else
    the plain prompt followed by the completion."""
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        start = text.rfind(completion)
        if start < 0:
            raise UserError("the scoring model's chat template rewrites the completion text; "
                            "set --reward-opt NAME.chat_template=false to score plain prompt + completion.")
        return text, False, start
    head = plain_prompt(prompt)
    return head + completion, True, len(head)


def pad_right(seqs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) [B, L], padded on the right so positions match the unpadded rows."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def batched(model, seqs: list[list[int]], batch_size: int, pad_id: int, take: Callable) -> list:
    """Run ``model`` on ``seqs`` in chunks of ``batch_size`` rows (right-padded, no grad; logits in the model's dtype);
    ``take(logits, i, k)`` picks what to keep of row ``i`` of the chunk, which is ``seqs[k]``. Results in input order."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo: lo + batch_size]
            ids, mask = pad_right(chunk, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out.extend(take(logits, i, lo + i) for i in range(len(chunk)))
    return out
