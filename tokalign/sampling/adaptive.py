"""Adaptive multi-round sampling per prompt (Reinforce-Ada, arXiv:2510.04996): round after round, every prompt whose
pool of samples the ``select`` rule does not yet accept gets ``round_n`` more, for at most ``max_rounds`` rounds; each
group is then ``select``'s choice from its pool, and its rows carry the whole pool's reward statistics in
``fields["pool_mean"]``, ``["pool_std"]``, ``["pool_size"]``.

``select(pool, n, final) -> list[dict] | None``: the group of ``n`` rows to train on, or None to keep sampling
(``final``: the last chance; it must then return a group)."""

from __future__ import annotations

from typing import Callable

import torch

from tokalign.sampling.base import Hook, set_field


class AdaptiveSampling(Hook):
    name = "adaptive_sampling"

    def __init__(self, select: Callable[[list[dict], int, bool], list[dict] | None], max_rounds: int, round_n: int):
        self.select, self.max_rounds, self.round_n = select, max_rounds, round_n

    def collect(self, ctx):
        picked = ctx.pick(ctx.step, 0)
        pools: list[list[dict]] = [[] for _ in picked]
        done: dict[int, list[dict]] = {}
        rounds = 0
        for rounds in range(1, self.max_rounds + 1):
            active = [g for g in range(len(picked)) if g not in done]
            if not active:
                break
            rows = ctx.sample([ctx.rows[picked[g]] for g in active], n=self.round_n)
            for k, g in enumerate(active):
                pools[g] += [r for r in rows if r["group_id"] == k]
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
        return groups, [r for p in pools for r in p], metrics
