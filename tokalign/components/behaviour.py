"""Behaviour-policy log-probs ``fields["old_logps"]`` [B, T]: the policy's own before this step's updates.

With one update per batch they equal the training forward's (detached) log-probs, so they are taken from it per
micro-batch (ratio exactly 1, no extra pass), unless ``upfront``: then (and with several updates per batch) a frozen
pass computes them before ``prepare`` — for algorithms whose advantages use them (a KL term in the reward)."""

from __future__ import annotations

from tokalign.components.base import Component


class BehaviourLogps(Component):
    name = "behaviour"
    provides = ("old_logps",)

    def __init__(self, upfront: bool = False):
        self.upfront = upfront

    def fill(self, batch, ctx) -> dict:
        if "old_logps" not in batch.fields and (self.upfront or ctx.cfg.train.updates_per_batch > 1):
            batch.fields["old_logps"] = ctx.frozen_logps(ctx.policy, batch)
        return {}

    def on_forward(self, batch, out, ctx) -> None:
        if "old_logps" not in batch.fields:
            batch.fields["old_logps"] = out.logps.detach()  # one update per batch: on-policy, ratio 1
