"""The reference model's log-probs of each row's *same* completion after rewritten prompts (T-REG's contrastive
prompting): for every variant name, ``rewrite(name, prompt) -> prompt`` and ``fields["<name>_logps"]`` [B, T] at the
row's own completion positions. Needs data that keeps the raw prompt (preference pairs)."""

from __future__ import annotations

from typing import Any, Callable

from tokalign.batching import collate, move_completion_values, truncate, with_prompt
from tokalign.components.base import Component
from tokalign.errors import UserError
from tokalign.forward import to_device


class PromptVariants(Component):
    name = "prompt_variants"

    def __init__(self, names: tuple[str, ...], rewrite: Callable[[str, Any], Any]):
        self.names, self.rewrite = tuple(names), rewrite
        self.provides = tuple(f"{n}_logps" for n in self.names)
        self.model = None

    def describe(self) -> str:
        return "reference"

    def setup(self, ctx) -> None:
        self.model = ctx.reference_model()

    def models(self) -> list:
        return [self.model]

    def fill(self, batch, ctx) -> dict:
        for name in self.names:
            batch.fields[f"{name}_logps"] = self._logps(name, ctx, batch.completion_mask.shape[1]).to(ctx.device)
        return {}

    def _logps(self, name: str, ctx, width: int):
        from tokalign.data.render import render_prompts

        seqs = ctx.seqs
        if any(s.prompt is None for s in seqs):
            raise UserError(f"prompt variant '{name}' rewrites prompts but this data source does not keep them; train on preference data.")
        rendered = render_prompts(ctx.tokenizer, [self.rewrite(name, s.prompt) for s in seqs])
        room = ctx.cfg.train.max_length
        variants = [truncate(with_prompt(s, ids), room + len(ids) - len(s.prompt_ids)) for s, (_, ids) in zip(seqs, rendered)]
        logps = ctx.frozen_logps(self.model, to_device(collate(variants, ctx.tokenizer.pad_token_id), ctx.device))
        return move_completion_values(logps.cpu(), variants, seqs, width)
