"""Verifier ``reasoning_gym``: score a completion with the reasoning-gym task's own ``score_answer``.

reasoning-gym (``pip install reasoning-gym``, https://github.com/open-thought/reasoning-gym) generates
procedural reasoning tasks offline and ships a scorer with each. The task ``reasoning_gym:NAME``
(``tokalign.data.reasoning_gym``) stores, as each record's ``reference``, what that scorer needs:
``{"task": NAME, "config": {seed, size, options}, "index": i, "question", "answer", "metadata"}``.

Scoring: the answer is extracted from the completion (below) and passed to
``score_answer(answer, entry)`` of the dataset rebuilt from ``task`` and ``config`` (built once per
process and cached). ``entry`` is the original record regenerated from that dataset at ``index``
when it still has the stored question and answer — a JSON round trip turns tuples into lists, which
some scorers (``arc_agi``, ``rearc``) compare against — and the stored reference otherwise (a task
whose generation varies between processes). Score: the scorer's value in [0, 1] (many give partial
credit); passed when it is 1.

Answer extraction (reasoning-gym's own convention, ``reasoning_gym.utils.extract_answer``): the text
of the last ``<answer>…</answer>``; without one, the text after the last ``Answer:``, else the whole
completion after any ``</think>``, stripped. Option ``strict`` (``--reward-opt
reasoning_gym.strict=true``): only an ``<answer>`` tag counts (none: no answer, score 0).

``answer(sample)``: that extracted answer, whitespace-collapsed, for ``eval``'s maj@k votes.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from tokalign.errors import UserError
from tokalign.protocols import Sample, Verdict

INSTALL = "pip install reasoning-gym"
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)


def require():
    """The ``reasoning_gym`` module, or one line saying how to install it."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise UserError(f"reasoning_gym tasks need the reasoning-gym package: {INSTALL}") from e
    return reasoning_gym


def names() -> list[str]:
    """Every task name reasoning-gym registers."""
    require()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def dataset(name: str, config: dict):
    """The reasoning-gym dataset ``name`` built with ``config`` (seed, size, task options), cached per process."""
    return _dataset(name, json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str):
    rg = require()
    if name not in names():
        raise UserError(f"Unknown reasoning-gym task '{name}'.")
    try:
        return rg.create_dataset(name, **json.loads(config_json))
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(f"reasoning_gym:{name}: cannot build the task with {config_json}: {type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=4096)
def _regenerated(name: str, config_json: str, index: int) -> dict:
    return _dataset(name, config_json)[index]


def extract_answer(completion: str, strict: bool = False) -> str | None:
    """The final answer in a completion (see the module docstring), None when there is none."""
    from reasoning_gym.utils import extract_answer as tagged

    found = tagged(completion)
    if found is not None or strict:
        return found
    text = completion.rsplit("</think>", 1)[-1]
    marks = list(_ANSWER_LINE.finditer(text))
    if marks:
        text = text[marks[-1].end():]
    return text.strip() or None


def _entry(ref: dict) -> dict:
    """The original record when regenerating it gives the stored one, else the stored reference."""
    index = ref.get("index")
    if isinstance(index, int) and isinstance(ref.get("config"), dict):
        try:
            fresh = _regenerated(ref["task"], json.dumps(ref["config"], sort_keys=True), index)
        except Exception:  # noqa: BLE001 - any failure: score with the stored entry
            fresh = None
        if isinstance(fresh, dict) and fresh.get("question") == ref.get("question") and fresh.get("answer") == ref.get("answer"):
            return fresh
    return ref


class ReasoningGymVerifier:
    @dataclass
    class Config:
        strict: bool = False  # only an <answer>…</answer> tag counts as an answer

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        require()

    def answer(self, sample: Sample) -> str | None:
        found = extract_answer(sample.completion, self.config.strict)
        return (" ".join(found.split()) or None) if found is not None else None

    def verify(self, sample: Sample) -> Verdict:
        ref = sample.reference
        if not isinstance(ref, dict) or not isinstance(ref.get("task"), str) or "question" not in ref:
            raise ValueError("the reference is not a reasoning-gym entry; prepare the data as reasoning_gym:NAME")
        ds = dataset(ref["task"], ref.get("config") or {})
        found = extract_answer(sample.completion, self.config.strict)
        score = float(ds.score_answer(found, _entry(ref)) or 0.0)
        score = min(max(score, 0.0), 1.0)
        ok = score >= 1.0
        detail = "" if ok else f"expected {str(ref.get('answer'))[:80]!r}, got {(found or '')[:80]!r}"
        return Verdict(ok, score, detail)
