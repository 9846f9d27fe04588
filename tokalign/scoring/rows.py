"""Scoring rows of the row schema (``tokalign.rows``): the score stage and the online train loop share it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokalign.rows import dumps, to_sample


def score_rows(rows: list[dict], rewards, *, workers: int = 1, timeout: float | None = None, cache=None, progress=None):
    """(rows + score columns, ``scoring.ScoreReport``). ``reward_errors`` is a JSON object {reward: why
    it failed on this row} ("{}" when none failed); a failed reward counts 0 in ``reward`` (see ``tokalign.scoring``)."""
    from tokalign.scoring import Scorer

    with Scorer(rewards, workers=workers, timeout=timeout, cache=cache, progress=progress) as scorer:
        return score_chunk(scorer, rows), scorer.report


def score_chunk(scorer, rows: list[dict]) -> list[dict]:
    """``rows`` + score columns, scored by a ``scoring.Scorer`` (whose report counts them): ``score_rows`` one chunk
    of a big artifact at a time."""
    out = []
    for r, s in zip(rows, scorer.score([to_sample(r) for r in rows])):
        out.append({**r, "reward": s["reward"], "rewards": s["rewards"], "verdicts": dumps(s["verdicts"]),
                    "token_rewards": s["token_rewards"], "reward_errors": dumps(s["reward_errors"])})
    return out


def group_chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive rows in chunks of about ``size``, cut only where ``group_id`` changes: a chunk holds whole groups
    (a group bigger than ``size`` is one chunk)."""
    chunk: list[dict] = []
    for r in rows:
        if len(chunk) >= size and r.get("group_id") != chunk[-1].get("group_id"):
            yield chunk
            chunk = []
        chunk.append(r)
    if chunk:
        yield chunk


def scored_rows(rows: list[dict], rewards) -> list[dict]:
    """In-process scoring for the online train loop. A sample whose reward fails scores 0 for it (see
    ``reward_errors``); a reward failing on every sample of a batch is broken, not unlucky: the plug-in's one line."""
    from tokalign.scoring.calls import check_broken

    out, report = score_rows(rows, rewards)
    check_broken(report, rewards)
    return out
