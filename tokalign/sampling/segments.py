"""Monte-Carlo values at cut points of sampled completions, shared by the hooks that need them (SPO's segments, MRT's
episodes, BRPO's budgets): from prompt + completion[:c] (+ a tail text, e.g. one that closes the thinking) the live
policy samples ``n`` continuations, the run's rewards score them, and their mean is the value at c.

``SegmentRollouts`` (SPO, arXiv:2505.23564): V(c) = mean reward of ``rollouts`` continuations of prompt +
completion[:c] (c = 0 is the prompt alone); V(end) = the row's own reward. Each completion token gets the values at the
start and the end of its segment, in the token fields ``segment_value_start`` / ``segment_value_end`` [B, T].
``cut_points(sampler_logps) -> list[int]`` says where to cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tokalign.sampling.base import Hook, set_token_field


@dataclass
class PrefixAnswers:
    """One cut's continuations: ``head`` (completion[:c] + tail) and, per sample, the scored row (its
    ``completion_ids`` = head + the sampled answer, cut to its room), the answer's own ids and their sampler log-probs."""

    head: list[int]
    rows: list[dict]
    answers: list[list[int]]
    logps: list[list[float]]  # the sampler's log-probs of each answer's tokens

    @property
    def value(self) -> float:
        """The mean reward of the continuations."""
        return sum(float(r["reward"]) for r in self.rows) / len(self.rows)


def prefix_answers(rows: list[dict], jobs: list[tuple[int, int]], ctx, n: int, tail: list[int] = (),
                   answer_tokens: int = 0) -> list[PrefixAnswers]:
    """For each job (row i, cut c): ``n`` continuations sampled from prompt + completion[:c] + ``tail`` and scored by
    the run's rewards as completions head + answer. An answer's room is ``answer_tokens`` (> 0), or what the head leaves
    of ``rollout.max_new_tokens``; a longer sample is cut there (finish_reason "length")."""
    tail = list(tail)
    spec = {"n": n, **({"max_new_tokens": answer_tokens} if answer_tokens else {})}
    samples = ctx.generate([rows[i]["prompt_ids"] + rows[i]["completion_ids"][:c] + tail for i, c in jobs], **spec)
    heads, answers, logps, scored = [], [], [], []
    for (i, c), job_samples in zip(jobs, samples):
        head = rows[i]["completion_ids"][:c] + tail
        room = answer_tokens or max(ctx.spec.max_new_tokens - len(head), 0)
        heads.append(head)
        answers.append([k.ids[:room] for k in job_samples])
        logps.append([list(k.logps[:room]) for k in job_samples])
        scored += [{**rows[i], "completion": ctx.tokenizer.decode(head + a, skip_special_tokens=True), "completion_ids": head + a,
                    "finish_reason": "length" if len(k.ids) > room else k.finish_reason} for k, a in zip(job_samples, answers[-1])]
    scored = ctx.score(scored) if scored else []
    out, at = [], 0
    for head, job_answers, job_logps in zip(heads, answers, logps):
        out.append(PrefixAnswers(head, scored[at : at + len(job_answers)], job_answers, job_logps))
        at += len(job_answers)
    return out


def segment_values(n: int, bounds: list[int], values: list[float]) -> tuple[list[float], list[float]]:
    """Per token of an n-token completion cut at ``bounds`` (0 = b_0 < … < b_k = n) with a value at each bound: the
    value at the start and at the end of its segment."""
    start, end = [0.0] * n, [0.0] * n
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for t in range(a, b):
            start[t], end[t] = values[k], values[k + 1]
    return start, end


class SegmentRollouts(Hook):
    name = "segment_rollouts"

    def __init__(self, cut_points: Callable[[list[float]], list[int]], rollouts: int):
        self.cut_points, self.rollouts = cut_points, rollouts

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        cuts = [sorted({0, *self.cut_points(r["sampler_logps"])} - {len(r["completion_ids"])}) for r in rows]
        jobs = [(i, c) for i, cs in enumerate(cuts) for c in cs]
        values = {job: a.value for job, a in zip(jobs, prefix_answers(rows, jobs, ctx, self.rollouts))}
        for i, r in enumerate(rows):
            n = len(r["completion_ids"])
            start, end = segment_values(n, [*cuts[i], n], [*(values[(i, c)] for c in cuts[i]), float(r["reward"])])
            set_token_field(r, "segment_value_start", start)
            set_token_field(r, "segment_value_end", end)
        return {"segments/per_completion": len(jobs) / len(rows)}
