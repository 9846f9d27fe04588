"""Scoring rows of the row schema (``tokalign.rows``): the score stage and the online train loop share it."""

from __future__ import annotations

from tokalign.rows import dumps, to_sample


def score_rows(rows: list[dict], rewards, *, workers: int = 1, timeout: float | None = None, cache=None, progress=None):
    """(rows + score columns, ``scoring.ScoreReport``). ``reward_errors`` is a JSON object {reward: why
    it failed on this row} ("{}" when none failed); a failed reward counts 0 in ``reward`` (see ``tokalign.scoring``)."""
    from tokalign.scoring import score_samples

    results, report = score_samples(rewards, [to_sample(r) for r in rows], workers=workers, timeout=timeout, cache=cache, progress=progress)
    out = []
    for r, s in zip(rows, results):
        out.append({**r, "reward": s["reward"], "rewards": s["rewards"], "verdicts": dumps(s["verdicts"]),
                    "token_rewards": s["token_rewards"], "reward_errors": dumps(s["reward_errors"])})
    return out, report


def scored_rows(rows: list[dict], rewards) -> list[dict]:
    """In-process scoring for the online train loop. A sample whose reward fails scores 0 for it (see
    ``reward_errors``); a reward failing on every sample of a batch is broken, not unlucky: the plug-in's one line."""
    from tokalign.scoring.calls import check_broken

    out, report = score_rows(rows, rewards)
    check_broken(report, rewards)
    return out
