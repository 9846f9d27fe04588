"""Built-in task ``tool_arith``: four-digit products, which a small model cannot compute in its head but a
``calculator`` call solves (``tokalign train grpo --data tool_arith --env calculator``).

Pairs (a, b) with 1000 ≤ a, b ≤ 9999 drawn with a fixed seed: 500 ``test`` prompts and 20,000 ``train`` prompts,
disjoint. A prompt is ``[{"role": "user", "content": "1234*5678="}]`` and its reference the product ("7006652");
the default reward is ``exact_match`` on the final assistant turn. Each record's ``completion`` is the tool-using
trace — the call, the calculator's result, the answer — so ``tokalign train sft --data tool_arith`` teaches the
call format (trained on the assistant turns only; ``examples/tiny-model/make.py`` does this for the bundled model).
"""

from __future__ import annotations

import random

from tokalign.environments.calls import hermes_text

TEST_SIZE, TRAIN_SIZE = 500, 20_000
_SEED = 4321


def trace(a: int, b: int) -> list[dict]:
    """The tool-using completion for ``a*b=``: a Hermes-format calculator call, its result, the answer."""
    product = str(a * b)
    return [{"role": "assistant", "content": hermes_text("calculator", {"expression": f"{a}*{b}"})},
            {"role": "tool", "name": "calculator", "content": product},
            {"role": "assistant", "content": product}]


def pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, test) pairs: distinct, disjoint, fixed."""
    rng = random.Random(_SEED)
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < TEST_SIZE + TRAIN_SIZE:
        p = (rng.randrange(1000, 10000), rng.randrange(1000, 10000))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out[TEST_SIZE:], out[:TEST_SIZE]


class ToolArith:
    default_reward = "exact_match"
    splits = ("train", "test")

    def records(self, split: str = "train") -> list[dict]:
        train, test = pairs()
        return [{"id": f"tool_arith-{split}-{a}*{b}", "prompt": [{"role": "user", "content": f"{a}*{b}="}],
                 "completion": trace(a, b), "reference": str(a * b)}
                for a, b in (test if split == "test" else train)]
