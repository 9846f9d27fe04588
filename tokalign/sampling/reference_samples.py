"""Reference samples (PAR, arXiv:2502.18770): ``count`` completions per prompt from the *reference* model, scored with
the run's rewards, in ``fields["ref_reward_0" … "ref_reward_{count-1}"]``. Sampled under an RNG seeded by (seed,
prompt) and cached, so they do not disturb the policy's sampling and a resumed run (which starts with an empty cache)
sees the same values."""

from __future__ import annotations

from dataclasses import replace

import torch

from tokalign.rows import rollout_rows
from tokalign.sampling.base import Hook, set_field


class ReferenceSamples(Hook):
    name = "reference_samples"

    def __init__(self, count: int):
        self.count = count
        self._cache: dict[int, list[float]] = {}

    def _rewards(self, prompt_index: int, ctx) -> list[float]:
        if prompt_index not in self._cache:
            prompt = ctx.rows[prompt_index]
            # the policy's sampling streams (CPU and this process's GPU) stay as they were
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                torch.manual_seed(ctx.seed * 1_000_003 + prompt_index)
                completions = ctx.reference_engine().generate([prompt["prompt_ids"]], replace(ctx.spec, n=self.count))
            scored = ctx.score(rollout_rows([prompt], completions, ctx.spec.max_new_tokens))
            self._cache[prompt_index] = [float(r["reward"]) for r in scored]
        return self._cache[prompt_index]

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        total = 0.0
        for r in rows:
            for k, v in enumerate(self._rewards(r["prompt_index"], ctx)):
                set_field(r, f"ref_reward_{k}", v)
                total += v
        return {"reward/reference_mean": total / (len(rows) * self.count)}
