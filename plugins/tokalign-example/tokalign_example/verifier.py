"""``numeric_close``: the last number in the completion is within 1e-6 (relative) of the reference."""

import re

from tokalign.protocols import Sample, Verdict

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class NumericClose:
    def verify(self, sample: Sample) -> Verdict:
        found = _NUMBER.findall(sample.completion)
        if not found or sample.reference is None:
            return Verdict(False, 0.0, "no number in the completion" if not found else "no reference")
        got, want = float(found[-1]), float(sample.reference)
        ok = abs(got - want) <= 1e-6 * max(1.0, abs(want))
        return Verdict(ok, float(ok), "" if ok else f"expected {want:g}, got {got:g}")
