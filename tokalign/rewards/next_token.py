"""Reward ``next_token``: RMT's next-token matching reward ("Reinforcement Mid-Training", Tian, Chen, Xu, Wang, Bi,
Han and Wang 2025, arXiv:2509.24375; the reward RPT introduced, "Reinforcement Pre-Training", Dong et al. 2025,
arXiv:2506.08007). The policy reasons, then states its prediction of the text's next word(s); the reward is 1 when the
prediction equals the reference continuation, else 0.

    prediction = the last <answer>…</answer> of the completion, else its last whitespace-separated word
    r = 1[norm(prediction) = norm(reference)]      norm: whitespace collapsed (``case_sensitive`` false: also lower-cased)

``answer`` (what ``eval``'s maj@k votes on) is the normalised prediction. The reference is a text (the
``next_token`` task's gold word(s)), a number, or a list of accepted texts.

⚠ departure: RPT (and, per summaries, RMT) accept a prediction that is a byte prefix of the gold continuation ending
on one of its token boundaries; the ``next_token`` task's targets are whole words, so here the rule is exact equality
with the gold word(s), which needs no tokenizer. The answer format (``<answer>`` tags, or a bare last word) is
tokalign's, not the paper's (its prompt template could not be read offline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokalign.protocols import Sample, Verdict

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def prediction(completion: str) -> str:
    """The predicted continuation in ``completion``: its last <answer>…</answer>, else its last word ("" if none)."""
    tags = _ANSWER.findall(completion or "")
    if tags:
        return " ".join(tags[-1].split())
    words = (completion or "").split()
    return words[-1] if words else ""


@dataclass
class NextTokenConfig:
    case_sensitive: bool = True


class NextToken:
    Config = NextTokenConfig

    def __init__(self, config: NextTokenConfig | None = None):
        self.config = config or NextTokenConfig()

    def _norm(self, x) -> str:
        s = " ".join(str(x).split())
        return s if self.config.case_sensitive else s.lower()

    def answer(self, sample: Sample) -> str | None:
        return self._norm(prediction(sample.completion)) or None

    def verify(self, sample: Sample) -> Verdict:
        if sample.reference is None:
            return Verdict(False, 0.0, "no reference continuation for this sample")
        refs = sample.reference if isinstance(sample.reference, list) else [sample.reference]
        got = self._norm(prediction(sample.completion))
        ok = bool(got) and any(got == self._norm(r) for r in refs)
        return Verdict(ok, 1.0 if ok else 0.0, "" if ok else f"expected {self._norm(refs[0])!r}, predicted {got[:80]!r}")
