"""Logits processor ``cyclic_reflex`` — CyclicReflex, "CyclicReflex: Improving Large Reasoning Models via Cyclical
Reflection Token Scheduling", Fan, Zhang, Jia, Hero, Liu 2025 (ICLR 2026), arXiv:2506.11077; official code
OPTML-Group/CyclicReflex (``Base/evaluate.py``, ``cyclical_processor``). A training-free decoding strategy: the logits
of *reflection tokens* ("wait", "but", "alternatively") get a bias that follows a triangular wave over the position
in the completion, so reflection is encouraged and discouraged in turn, as a cyclical learning-rate schedule would
(too much reflection and too little both hurt, the paper finds).

Shapes: ``logits`` [B, V]; ``output_ids[b]`` the ids row b generated so far, p = ``len(output_ids[b])`` the position of
the token being sampled (0 for the first); R the reflection token ids.

    c      = ((p + shift · period) mod period) / period                   phase in [0, 1)
    w(p)   = 4·A·c              for c ≤ 1/4                             0 → +A
           = A − 4·A·(c − 1/4)  for 1/4 < c ≤ 3/4                       +A → −A
           = −A + 4·A·(c − 3/4) for c > 3/4                             −A → 0
    logits[b, r] += w(p)   for r ∈ R, while p is inside one of ``windows`` and row b has not written ``end_token``

Defaults are the paper's recipe (``Base/run_cyclicreflex.sh``, DeepSeek-R1-Distill-Qwen-7B on MATH500 and AIME):
amplitude A = 5.0, period 1200 tokens (900 for AMC2023), shift 0; the reflection tokens and the stop at ``</think>``
are the official processor's (its function defaults, amplitude 3 and period 100, and its script's, 1.0 and 600, are
other settings of the same wave). ``windows`` are the official ``--wait_range_phi`` pairs [start, end) (default
[0, 8192]: all of an 8k-token completion; [] = every position). Limiting case: amplitude 0 changes nothing.

Token strings resolve as the official code's ``convert_tokens_to_ids`` does (vocabulary entries: in byte-level BPE
"Wait" is the token at a line start, "ĠWait" the one after a space) and, beyond it, as text of exactly one token;
strings that are neither are skipped (the official code would bias the unknown-token id), and a tokenizer with none of
them is refused. A tokenizer without ``end_token`` as one token never stops the wave. The bias acts only on sampling:
``sampler_logps`` hold the biased distribution, the trainer's log-probs stay the model's (``tokalign.decoding``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokalign.errors import UserError

REFLECTION_TOKENS = ("wait", "Wait", "but", "But", "Alternatively")  # the official processor's list


def wave(position: int, amplitude: float, period: float, shift: float = 0.0) -> float:
    """w(p): the triangular wave's bias at completion position ``position`` (see the module docstring)."""
    c = ((position + shift * period) % period) / period
    if c <= 0.25:
        return 4 * amplitude * c
    if c <= 0.75:
        return amplitude - 4 * amplitude * (c - 0.25)
    return -amplitude + 4 * amplitude * (c - 0.75)


@dataclass
class CyclicReflexConfig:
    amplitude: float = 5.0  # A, in logits (the paper's recipe; 0 = no change)
    period: float = 1200.0  # tokens per cycle (the paper's recipe for MATH500/AIME; 900 for AMC2023)
    shift: float = 0.0  # phase offset, in periods
    tokens: list[str] = field(default_factory=lambda: list(REFLECTION_TOKENS))  # the reflection tokens
    end_token: str = "</think>"  # once the row wrote it, no more bias ("" = never stop)
    windows: list[int] = field(default_factory=lambda: [0, 8192])  # [start, end) pairs of positions; [] = everywhere

    def __post_init__(self):
        if not self.period > 0:
            raise ValueError(f"period must be > 0 tokens, got {self.period}")
        if not self.tokens:
            raise ValueError("tokens: name at least one reflection token")
        if len(self.windows) % 2 or any(s >= e for s, e in zip(self.windows[::2], self.windows[1::2])):
            raise ValueError(f"windows are [start, end) pairs with start < end, e.g. [0, 8192], got {self.windows}")


class CyclicReflex:
    Config = CyclicReflexConfig

    def __init__(self, config: CyclicReflexConfig | None = None):
        self.config = config if config is not None else CyclicReflexConfig()
        self.ids: list[int] = []
        self.end_id: int | None = None
        self._index = None

    def bind(self, tokenizer) -> None:
        from tokalign.decoding import token_id

        ids = {i for i in (token_id(tokenizer, t) for t in self.config.tokens) if i is not None}
        if not ids:
            raise UserError(f"cyclic_reflex: none of its reflection tokens {list(self.config.tokens)} is one token of this "
                            "tokenizer; name some that are: --processor-opt 'cyclic_reflex.tokens=[...]'.")
        self.ids, self._index = sorted(ids), None
        self.end_id = token_id(tokenizer, self.config.end_token) if self.config.end_token else None

    def bias(self, output_ids) -> float:
        """The bias on the reflection tokens for a row that generated ``output_ids`` so far."""
        c, p = self.config, len(output_ids)
        if c.amplitude == 0 or (self.end_id is not None and self.end_id in output_ids):
            return 0.0
        if c.windows and not any(s <= p < e for s, e in zip(c.windows[::2], c.windows[1::2])):
            return 0.0
        return wave(p, c.amplitude, c.period, c.shift)

    def __call__(self, logits, prompt_ids, output_ids):
        import torch

        if not self.ids:
            raise RuntimeError("cyclic_reflex was not bound to a tokenizer (bind(tokenizer) resolves its tokens)")
        biases = [self.bias(out) for out in output_ids]
        if not any(biases):
            return logits
        if self._index is None or self._index.device != logits.device:
            self._index = torch.tensor(self.ids, dtype=torch.long, device=logits.device)
        shift = torch.tensor(biases, dtype=logits.dtype, device=logits.device)[:, None]
        logits[:, self._index] += shift
        return logits
