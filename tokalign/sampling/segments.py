"""Segment rollouts (SPO, arXiv:2505.23564): Monte-Carlo values at each completion's cut points. V(c) = mean reward of
``rollouts`` continuations of prompt + completion[:c] (c = 0 is the prompt alone); V(end) = the row's own reward.
Each completion token gets the values at the start and the end of its segment, in the token fields
``segment_value_start`` / ``segment_value_end`` [B, T]. ``cut_points(sampler_logps) -> list[int]`` says where to cut."""

from __future__ import annotations

from typing import Callable

from tokalign.sampling.base import Hook, set_token_field


class SegmentRollouts(Hook):
    name = "segment_rollouts"

    def __init__(self, cut_points: Callable[[list[float]], list[int]], rollouts: int):
        self.cut_points, self.rollouts = cut_points, rollouts

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        cuts = [sorted({0, *self.cut_points(r["sampler_logps"])} - {len(r["completion_ids"])}) for r in rows]
        jobs = [(i, c) for i, cs in enumerate(cuts) for c in cs]
        conts = ctx.generate([rows[i]["prompt_ids"] + rows[i]["completion_ids"][:c] for i, c in jobs], n=self.rollouts)
        mc_rows = []
        for (i, c), samples in zip(jobs, conts):
            prefix, room = rows[i]["completion_ids"][:c], ctx.spec.max_new_tokens - c
            for k in samples:
                ids = prefix + k.ids[:room]
                mc_rows.append({**rows[i], "completion": ctx.tokenizer.decode(ids, skip_special_tokens=True), "completion_ids": ids,
                                "finish_reason": "length" if len(k.ids) > room else k.finish_reason})
        scores = [float(r["reward"]) for r in ctx.score(mc_rows)] if mc_rows else []
        values: dict[tuple[int, int], float] = {}
        for j, job in enumerate(jobs):
            part = scores[j * self.rollouts : (j + 1) * self.rollouts]
            values[job] = sum(part) / len(part)
        for i, r in enumerate(rows):
            n, bounds = len(r["completion_ids"]), cuts[i] + [len(r["completion_ids"])]
            start, end = [0.0] * n, [0.0] * n
            for a, b in zip(bounds[:-1], bounds[1:]):
                v_end = values[(i, b)] if b < n else float(r["reward"])
                for t in range(a, b):
                    start[t], end[t] = values[(i, a)], v_end
            set_token_field(r, "segment_value_start", start)
            set_token_field(r, "segment_value_end", end)
        return {"segments/per_completion": len(jobs) / len(rows)}
