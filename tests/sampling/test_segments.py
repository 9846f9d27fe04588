"""The segment-rollouts hook (tokalign/sampling/segments.py, SPO's): segment values from the continuations' rewards, by
hand."""

from __future__ import annotations

import math

import pytest

from tokalign.algorithms.spo import cut_points


def test_online_source_segment_values_hand():
    """A completion (1, 2, 3, 4) with reward 0 cut at token 2 (the only π_old < 0.9); each continuation appends token 7
    and the test reward is len(completion_ids)/10: V(0) = 0.1 (prefix () + 7), V(2) = 0.3 (1, 2, 7), V(end) = R = 0.
    Tokens 0–1: (0.1 → 0.3); tokens 2–3: (0.3 → 0)."""
    from tokalign.protocols import Reward
    from tokalign.rewards import ResolvedReward
    from tokalign.rollout import Completion, SamplingSpec
    from tokalign.sampling import SegmentRollouts
    from tokalign.train.sources import OnlineSource

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Engine:
        tokenizer = Tok()

        def generate(self, prompts, spec):
            return [[Completion([7], [0.0], "stop", "7") for _ in range(spec.n)] for _ in prompts]

    reward = ResolvedReward("len", 1.0, lambda samples: [Reward(len(s.completion_ids) / 10) for s in samples], None, False)
    src = OnlineSource([], Engine(), [reward], SamplingSpec(n=1, max_new_tokens=8), 1, 0)
    hook = SegmentRollouts(lambda logps: cut_points(logps, 0.9, 1), 3)
    row = {"id": "a#0", "prompt": '"q"', "prompt_ids": [5], "reference": None, "completion": "1 2 3 4", "completion_ids": [1, 2, 3, 4],
           "sampler_logps": [math.log(p) for p in (0.99, 0.99, 0.5, 0.99)], "finish_reason": "stop", "reward": 0.0}
    assert hook.after_batch([row], src) == {"segments/per_completion": 2}
    assert row["token_fields"]["segment_value_start"] == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert row["token_fields"]["segment_value_end"] == pytest.approx([0.3, 0.3, 0.0, 0.0])
