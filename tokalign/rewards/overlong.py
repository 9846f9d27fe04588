"""``overlong``: DAPO's soft overlong punishment — "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale", Yu et al. 2025, arXiv:2503.14476, Eq. 13.

With L_max the sampler's ``max_new_tokens`` (recorded per rollout row) and a buffer
L_buf = ⌈buffer_fraction · L_max⌉:

    r = 0                                  if |y| ≤ L_max − L_buf
    r = ((L_max − L_buf) − |y|) / L_buf · f  if L_max − L_buf < |y| ≤ L_max
    r = −f                                 if |y| > L_max

Defaults: buffer_fraction 0.2 (DAPO: 4,096 of 20,480 tokens), f = 1. Add it to a correctness reward:
``--reward exact_match --reward overlong``. Rollouts without a recorded limit score 0.
"""

from __future__ import annotations

import math

from tokalign.protocols import Reward, Sample
from tokalign.rewards.length import completion_length, sampler_limit


class Overlong:
    buffer_fraction = 0.2
    factor = 1.0

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        return [self.score(completion_length(s), sampler_limit(s)) for s in samples]

    def score(self, length: int, max_len: int | None) -> Reward:
        if not max_len:
            return Reward(0.0, info={"detail": "no max_new_tokens recorded for this rollout"})
        buffer = max(1, math.ceil(self.buffer_fraction * max_len))
        free = max_len - buffer
        if length <= free:
            value = 0.0
        elif length <= max_len:
            value = (free - length) / buffer * self.factor
        else:
            value = -self.factor
        return Reward(value, info={"length": length, "max_new_tokens": max_len})
