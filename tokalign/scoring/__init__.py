"""Score samples with resolved rewards: cached, isolated per sample, in-process or in worker processes.

Failure policy: a reward that raises, breaks its contract, or runs past the timeout on a sample
gives that sample the value **0.0** for that reward (so totals, advantages and pass counts stay
finite; NaN would poison a whole batch's statistics) and records why in the row's
``reward_errors`` ({reward name: message}). The run goes on; the counts land in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from tokalign.scoring.calls import BATCH, ERROR, OK, TIMEOUT, Alarm, call_many

FAILED_VALUE = 0.0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """0 = one per available CPU; 1 = in-process."""
    from tokalign.errors import UserError

    if workers < 0:
        raise UserError(f"--workers must be ≥ 0 (0 = one per CPU, 1 = in-process), got {workers}.")
    return workers or available_cpus()


@dataclass
class RewardStats:
    computed: int = 0
    cached: int = 0
    errors: int = 0
    timeouts: int = 0
    first_error: str | None = None

    @property
    def failed(self) -> int:
        return self.errors + self.timeouts


@dataclass
class ScoreReport:
    samples: int
    workers: int
    timeout: float | None
    cache: str | None  # the cache file, None when disabled
    rewards: dict[str, RewardStats] = field(default_factory=dict)
    failed_samples: int = 0  # samples with at least one failed reward

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "workers": self.workers, "timeout_s": self.timeout, "cache": self.cache,
            "failed_samples": self.failed_samples, "failed_value": FAILED_VALUE,
            "rewards": {k: {"computed": v.computed, "cached": v.cached, "errors": v.errors, "timeouts": v.timeouts,
                            **({"first_error": v.first_error} if v.first_error else {})} for k, v in self.rewards.items()},
        }

    def summary(self) -> str:
        """One line for stderr."""
        computed = sum(s.computed for s in self.rewards.values())
        cached = sum(s.cached for s in self.rewards.values())
        where = "in-process" if self.workers <= 1 else f"{self.workers} workers"
        line = f"scored {self.samples} samples × {len(self.rewards)} reward(s) ({where}; {computed} computed, {cached} cached)"
        failing = [(n, s) for n, s in self.rewards.items() if s.failed]
        if not failing:
            return line + "; no failures"
        parts = []
        for name, s in failing:
            kinds = ", ".join(_count(k, w) for k, w in ((s.errors, "error"), (s.timeouts, "timeout")) if k)
            parts.append(f"'{name}' failed on {s.failed}/{self.samples} ({kinds}; first: {s.first_error})")
        return f"{line}; {_count(self.failed_samples, 'sample')} with failed rewards, scored {FAILED_VALUE:g} for them: " + "; ".join(parts)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def score_samples(rewards, samples: list, *, workers: int = 1, timeout: float | None = None, cache=None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], ScoreReport]:
    """Per-sample dicts (reward, rewards, verdicts, token_rewards, reward_errors) in sample order, and a report.

    ``workers`` ≤ 1 runs in this process; more spawns that many processes (fewer if there is less work).
    ``cache`` is a ``ScoreCache`` or None. ``progress(done, total)`` is called as (reward, sample) results arrive."""
    with Scorer(rewards, workers=workers, timeout=timeout, cache=cache, progress=progress) as scorer:
        return scorer.score(samples), scorer.report


class Scorer:
    """``score_samples`` chunk after chunk: one worker pool (kept from the first chunk that needs it to ``close``),
    one cache and one report (counts, first errors) over all the chunks, so a big artifact is scored in bounded
    memory with the results and report of scoring it whole. A chunk's fresh results go to the cache before the next
    chunk is looked up. ``total``: the (reward, sample) calls of all the chunks, for ``progress`` (else per chunk)."""

    def __init__(self, rewards, *, workers: int = 1, timeout: float | None = None, cache=None,
                 progress: Callable[[int, int], None] | None = None, total: int | None = None):
        self.rewards, self.workers, self.cache, self.progress, self.total = list(rewards), workers, cache, progress, total
        self.report = ScoreReport(0, max(1, workers), timeout if timeout and timeout > 0 else None,
                                  str(cache.path) if cache is not None else None, {r.name: RewardStats() for r in self.rewards})
        self._pool = None
        self._done = 0  # (reward, sample) results of the chunks before, for progress

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close(clean)

    def _progress(self, base: int) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        return lambda done, total: self.progress(base + done, self.total or total)

    def score(self, samples: list) -> list[dict]:
        """Per-sample dicts of one chunk, in sample order; the report counts them."""
        from tokalign.scoring import cache as cache_mod

        rewards, report, cache = self.rewards, self.report, self.cache
        report.samples += len(samples)
        results: dict[tuple[int, int], tuple[str, Any]] = {}
        keys: dict[tuple[int, int], str] = {}
        if cache is not None and samples and rewards:
            digests = [cache_mod.sample_digest(s) for s in samples]
            keys = {(ri, i): cache_mod.key(r.fingerprint, d) for ri, r in enumerate(rewards) for i, d in enumerate(digests)}
            hits = cache.get_many(list(keys.values()))
            for k, key in keys.items():
                if key in hits:
                    results[k] = (OK, hits[key])
                    report.rewards[rewards[k[0]].name].cached += 1
        base = self._done + (len(results) if self.total else 0)
        todo = [(ri, i, s) for ri in range(len(rewards)) for i, s in enumerate(samples) if (ri, i) not in results]
        if todo and self.workers > 1:
            if self._pool is None:
                from tokalign.scoring import pool

                refs = [(r.name, r.plugin.value, r.plugin.kind, r.options) for r in rewards]
                self._pool = pool.Pool(refs, self.workers, report.timeout)
            results.update(self._pool.run(todo, self._progress(base)))
        elif todo:
            done, progress = 0, self._progress(base)
            with Alarm(report.timeout) as alarm:
                for ri, r in enumerate(rewards):
                    mine = [(i, s) for rj, i, s in todo if rj == ri]
                    for k in range(0, len(mine), BATCH):
                        part = mine[k : k + BATCH]
                        for (i, _), result in zip(part, call_many(r.fn, r.name, [s for _, s in part], alarm)):
                            results[(ri, i)] = result
                        done += len(part)
                        if progress:
                            progress(done, len(todo))
        self._done += len(rewards) * len(samples)
        fresh = []
        for ri, i, _ in todo:
            status, payload = results[(ri, i)]
            stats = report.rewards[rewards[ri].name]
            if status == OK:
                stats.computed += 1
                if keys:
                    fresh.append((keys[(ri, i)], payload))
            else:
                stats.errors += status == ERROR
                stats.timeouts += status == TIMEOUT
                stats.first_error = stats.first_error or payload
        if cache is not None:
            cache.put_many(fresh)
        return _combine(rewards, samples, results, report)


def _combine(rewards, samples, results, report: ScoreReport) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        total, token_total, values, verdicts, errors = 0.0, None, {}, {}, {}
        for ri, r in enumerate(rewards):
            status, payload = results[(ri, i)]
            if status != OK:
                errors[r.name] = payload
                values[r.name] = FAILED_VALUE
                total += r.weight * FAILED_VALUE
                continue
            value, token_values, info = payload
            values[r.name] = value
            total += r.weight * value
            if info:
                verdicts[r.name] = info
            if token_values is not None:
                token_total = token_total or [0.0] * len(s.completion_ids)
                token_total = [a + r.weight * b for a, b in zip(token_total, token_values)]
        report.failed_samples += bool(errors)
        rows.append({"reward": total, "rewards": values, "verdicts": verdicts, "token_rewards": token_total, "reward_errors": errors})
    return rows
