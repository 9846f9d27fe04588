"""A greedy baseline (ReMax, arXiv:2310.10505): one greedy completion per prompt, scored with the run's rewards, in
every row's ``fields["baseline"]``. Greedy decoding draws no random numbers, so a resumed run is unaffected."""

from __future__ import annotations

from tokalign.sampling.base import Hook, set_field


class GreedyBaseline(Hook):
    name = "greedy_baseline"

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        firsts: dict[int, dict] = {}
        for r in rows:
            firsts.setdefault(r["group_id"], r)
        scores = ctx.sample([firsts[g] for g in sorted(firsts)], n=1, temperature=0.0)
        by_group = {g: s["reward"] for g, s in zip(sorted(firsts), scores)}
        for r in rows:
            set_field(r, "baseline", by_group[r["group_id"]])
        return {"reward/greedy_baseline": sum(by_group.values()) / len(by_group)}
