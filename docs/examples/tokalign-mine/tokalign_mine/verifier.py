"""``last_number``: the last number in the completion equals the reference, within a tolerance; its answer (for
``eval``'s maj@k votes) is that number."""

import re
from dataclasses import dataclass

from tokalign.protocols import Sample, Verdict

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Config:  # --reward-opt last_number.tolerance=0.01
    tolerance: float = 1e-6


class LastNumber:
    Config = Config

    def __init__(self, config: Config):
        self.config = config

    def answer(self, sample: Sample) -> str | None:
        found = _NUMBER.findall(sample.completion)
        return found[-1] if found else None

    def verify(self, sample: Sample) -> Verdict:
        got = self.answer(sample)
        if got is None or sample.reference is None:
            return Verdict(False, 0.0, "no number in the completion" if got is None else "no reference")
        ok = abs(float(got) - float(sample.reference)) <= self.config.tolerance * max(1.0, abs(float(sample.reference)))
        return Verdict(ok, float(ok), "" if ok else f"expected {sample.reference}, got {got}")
