"""Verifier ``exact_match``: the completion, stripped and whitespace-collapsed, equals the reference
(or one of a list of references). Score 1.0 or 0.0. ``answer``: that normalised completion (what
``eval``'s maj@k votes on)."""

from __future__ import annotations

from tokalign.protocols import Sample, Verdict


def _norm(x) -> str:
    return " ".join(str(x).split())


class ExactMatch:
    def answer(self, sample: Sample) -> str | None:
        return _norm(sample.completion) or None

    def verify(self, sample: Sample) -> Verdict:
        if sample.reference is None:
            return Verdict(False, 0.0, "no reference answer for this sample")
        refs = sample.reference if isinstance(sample.reference, list) else [sample.reference]
        got = _norm(sample.completion)
        ok = any(got == _norm(r) for r in refs)
        return Verdict(ok, 1.0 if ok else 0.0, "" if ok else f"expected {_norm(refs[0])!r}, got {got[:80]!r}")
