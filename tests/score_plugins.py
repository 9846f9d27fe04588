"""Reward plug-ins for the score tests, loaded by the real CLI as ``score_plugins:Name`` (tests/ on
PYTHONPATH). They run in worker processes, so they count their calls by appending to a file."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from tokalign.protocols import Reward, Sample


def index(sample: Sample) -> int:
    return int(sample.id.lstrip("s"))  # the test rollouts are ids s0, s1, ...


def _log(path: str, line: str) -> None:
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # one small write: atomic across processes
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


class Counting:
    """Value: completion length × scale; one line per sample in ``log``."""

    @dataclass
    class Config:
        log: str = ""
        scale: float = 1.0

        def __post_init__(self):
            if self.scale < 0:
                raise ValueError(f"scale must be ≥ 0, got {self.scale}")

    def __init__(self, config: "Counting.Config"):
        self.config = config

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        for s in samples:
            _log(self.config.log, s.id)
        return [Reward(len(s.completion) * self.config.scale, info={"pid": os.getpid()}) for s in samples]


class Flaky:
    """Raises on every tenth sample (s0, s10, ...), else 1.0."""

    def __call__(self, samples: list[Sample]) -> list[float]:
        for s in samples:
            if index(s) % 10 == 0:
                raise ValueError(f"cannot score {s.id}")
        return [1.0 for _ in samples]


class Sleepy:
    """Sleeps ``sleep_s`` on samples whose index is a multiple of ``every``, else answers 1.0 at once."""

    @dataclass
    class Config:
        sleep_s: float = 60.0
        every: int = 10
        block_alarm: bool = False  # ignore the soft timeout, as code stuck in C would: only a kill stops it

    def __init__(self, config: "Sleepy.Config"):
        self.config = config

    def __call__(self, samples: list[Sample]) -> list[float]:
        for s in samples:
            if index(s) % self.config.every == 0:
                if self.config.block_alarm:
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(self.config.sleep_s)
        return [1.0 for _ in samples]


class Crashy:
    """Kills its own process on sample s3 (as a segfault would), else 1.0."""

    def __call__(self, samples: list[Sample]) -> list[float]:
        if any(index(s) == 3 for s in samples):
            os._exit(13)
        return [1.0 for _ in samples]


def make_rollouts(path, n: int) -> None:
    """A synthetic rollouts artifact of ``n`` rows (ids s0..s{n-1}, completion i+1 characters): no model needed."""
    import json

    from tokalign import artifacts

    rows = [{"id": f"s{i}", "prompt_id": f"p{i // 4}", "group_id": i // 4, "sample_idx": i % 4, "prompt": json.dumps(f"q{i // 4}"),
             "prompt_text": f"q{i // 4}", "prompt_ids": [1, 2], "reference": json.dumps("a"), "completion": "c" * (i + 1),
             "completion_ids": list(range(i + 1)), "sampler_logps": [0.0] * (i + 1), "finish_reason": "stop", "max_new_tokens": 64}
            for i in range(n)]
    with artifacts.writing(path, "rollouts", artifacts.Provenance(config={"synthetic": True})) as w:
        w.write_rows(rows)


class Batched:
    """A batched reward (``batched = True``): logs each call's size; a call holding a multiple of
    ten raises (as a whole batch would on one bad sample), else each sample gets its index."""

    batched = True

    @dataclass
    class Config:
        log: str = ""

    def __init__(self, config: "Batched.Config"):
        self.config = config

    def __call__(self, samples: list[Sample]) -> list[float]:
        _log(self.config.log, str(len(samples)))
        if any(index(s) % 10 == 0 for s in samples):
            raise RuntimeError("a bad sample in the batch")
        return [float(index(s)) for s in samples]
