"""Adaptive multi-round sampling per prompt (Reinforce-Ada, arXiv:2510.04996): round after round, every prompt whose
pool of samples the ``select`` rule does not yet accept gets ``round_n`` more, for at most ``max_rounds`` rounds; each
group is then ``select``'s choice from its pool, and its rows carry the whole pool's reward statistics in
``fields["pool_mean"]``, ``["pool_std"]``, ``["pool_size"]``.

``select(pool, n, final) -> list[dict] | None``: the group of ``n`` rows to train on, or None to keep sampling
(``final``: the last chance; it must then return a group).

``round_n`` is a number, or ``round_n(pool, n) -> int``: how many more samples an unfinished prompt draws given its
pool so far (DARS's difficulty schedule). ``keep(group) -> bool`` (optional) drops groups from the batch (DARS drops
prompts all right or all wrong); if it would drop every group, all are kept (zero advantages)."""

from __future__ import annotations

from typing import Callable

import torch

from tokalign.sampling.base import Hook, set_field


class AdaptiveSampling(Hook):
    name = "adaptive_sampling"

    def __init__(self, select: Callable[[list[dict], int, bool], list[dict] | None], max_rounds: int,
                 round_n: int | Callable[[list[dict], int], int], keep: Callable[[list[dict]], bool] | None = None):
        self.select, self.max_rounds, self.round_n, self.keep = select, max_rounds, round_n, keep

    def _draw(self, ctx, picked: list[int], pools: list[list[dict]], active: list[int]) -> None:
        """One round: ``round_n`` more samples for each active prompt, one engine call per distinct count."""
        counts = {g: self.round_n if isinstance(self.round_n, int) else int(self.round_n(pools[g], ctx.spec.n)) for g in active}
        for k in sorted({c for c in counts.values() if c > 0}):
            part = [g for g in active if counts[g] == k]
            rows = ctx.sample([ctx.rows[picked[g]] for g in part], n=k)
            for j, g in enumerate(part):
                pools[g] += [r for r in rows if r["group_id"] == j]

    def collect(self, ctx):
        picked = ctx.pick(ctx.step, 0)
        pools: list[list[dict]] = [[] for _ in picked]
        done: dict[int, list[dict]] = {}
        rounds = 0
        for rounds in range(1, self.max_rounds + 1):
            active = [g for g in range(len(picked)) if g not in done]
            if not active:
                break
            self._draw(ctx, picked, pools, active)
            for g in active:
                chosen = self.select(pools[g], ctx.spec.n, False)
                if chosen is not None:
                    done[g] = chosen
        groups = []
        for g, pool in enumerate(pools):
            rewards = torch.tensor([float(r["reward"]) for r in pool], dtype=torch.float64)
            stats = {"pool_mean": float(rewards.mean()), "pool_std": float(rewards.std()) if len(pool) > 1 else 0.0,
                     "pool_size": float(len(pool))}
            group = [{**r, "prompt_index": picked[g]} for r in (done.get(g) or self.select(pool, ctx.spec.n, True))]
            for r in group:
                for k, v in stats.items():
                    set_field(r, k, v)
            groups.append(group)
        metrics = {"sampling/rounds": rounds, "sampling/finished_prompts": len(done),
                   "sampling/pool_size_mean": sum(map(len, pools)) / len(pools)}
        if self.keep is not None:
            kept = [g for g in groups if self.keep(g)]
            metrics["sampling/kept_groups"] = len(kept)
            groups = kept or groups
        return groups, [r for p in pools for r in p], metrics
