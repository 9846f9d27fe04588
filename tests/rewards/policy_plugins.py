"""Rewards that read the policy, for tests/rewards/test_policy_rewards.py (loaded by the CLI as
``policy_plugins:Name`` with this directory on PYTHONPATH)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokalign.protocols import Reward


class OwnLikelihood:
    """Value: the policy's mean token log-prob of the sample's own completion after its prompt. With ``log`` set, one
    JSON line per call: the step and the policy's log-prob of a fixed probe continuation (token ids 25, 26 after the
    first sample's prompt), which moves exactly when the weights do."""

    batched = True

    @dataclass
    class Config:
        log: str = ""

    def __init__(self, config: Config):
        self.config, self.view = config, None

    def bind_policy(self, view) -> None:
        self.view = view

    def __call__(self, samples):
        prompts = [s.metadata["prompt_ids"] for s in samples]
        logps = self.view.logps(prompts, [s.completion_ids for s in samples])
        if self.config.log:
            probe = float(self.view.logps(prompts[:1], [[25, 26]])[0].sum())
            with open(self.config.log, "a") as f:
                f.write(json.dumps({"step": self.view.step, "probe": probe, "pid": os.getpid()}) + "\n")
        return [Reward(float(lp.mean()) if len(lp) else 0.0) for lp in logps]
