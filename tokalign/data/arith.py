"""Built-in task ``arith``: two-digit addition with a verifiable answer.

All 10,000 pairs (a, b) with 0 ≤ a, b ≤ 99, shuffled once with a fixed seed; the last 500 are
the ``test`` split, the rest ``train``. Records are in TRL's conversational prompt-completion
format plus a ``reference`` answer, so SFT, RL and eval all read the same rows.
"""

from __future__ import annotations

import random

TEST_SIZE = 500
_SHUFFLE_SEED = 1234


class Arith:
    default_reward = "exact_match"
    splits = ("train", "test")

    def records(self, split: str = "train") -> list[dict]:
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(_SHUFFLE_SEED).shuffle(pairs)
        chosen = pairs[-TEST_SIZE:] if split == "test" else pairs[:-TEST_SIZE]
        return [
            {
                "id": f"arith-{split}-{a}+{b}",
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "completion": [{"role": "assistant", "content": str(a + b)}],
                "reference": str(a + b),
            }
            for a, b in chosen
        ]
