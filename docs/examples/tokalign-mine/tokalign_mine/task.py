"""``multiply``: one-digit-by-two-digit products, a task with a verifiable answer.

``tokalign prepare multiply`` / ``--data multiply``; ``multiply:20`` hands "20" to the constructor (factors up to 20).
"""

import random


class Multiply:
    splits = ("train", "test")  # the names --split accepts; `train --data` reads "train", `eval --data` "test"
    default_reward = "exact_match"  # what online training and eval use when no --reward / --verifier is given

    def __init__(self, largest: str = "12"):  # optional: a task taking one argument also answers NAME:ARG
        self.largest = int(largest)

    def records(self, split: str) -> list[dict]:
        pairs = [(a, b) for a in range(2, 10) for b in range(2, self.largest + 1)]
        random.Random(0).shuffle(pairs)  # a fixed split: the same prompts on every machine
        cut = len(pairs) // 5
        chosen = pairs[:cut] if split == "test" else pairs[cut:]
        return [
            {
                "id": f"multiply-{split}-{a}x{b}",  # stable and unique
                "prompt": [{"role": "user", "content": f"{a}*{b}="}],  # messages: rendered with the chat template
                "completion": str(a * b),  # optional: a gold completion (SFT trains on it)
                "reference": str(a * b),  # what verifiers compare against (Sample.reference)
            }
            for a, b in chosen
        ]
