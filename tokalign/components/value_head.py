"""A critic V(s_t) on the policy's trunk (PPO, RTO): a linear head on the final hidden states, trained with the
policy's optimiser. Before ``prepare`` one frozen pass gives ``fields["old_values"]`` and ``fields["old_logps"]``
[B, T]; in each training micro-batch ``PolicyOutput.values`` [B, T] (with grad). Zero-initialised, so the first
values are 0; saved as ``value_head.safetensors`` beside the model (transformers ignores it), restored on resume."""

from __future__ import annotations

import torch

from tokalign.components.base import Component
from tokalign.forward import forward

FILE = "value_head.safetensors"


class ValueHead(Component):
    name = "value_head"
    provides = ("old_values", "old_logps")
    forward_outputs = ("hidden",)

    def __init__(self):
        self.head = None

    def describe(self) -> str:
        return "value head"

    def setup(self, ctx) -> None:
        self.head = build(ctx.policy, ctx.resume_from)

    def parameters(self) -> list:
        return list(self.head.parameters())

    def models(self) -> list:
        return [self.head]

    @torch.no_grad()
    def fill(self, batch, ctx) -> dict:
        def old(mb):
            out = forward(ctx.policy, mb, keep_hidden=True)
            return {"logps": out.logps, "values": self.values(out.hidden)}

        res = ctx.map_micro_batches(batch, old, ctx.policy)
        batch.fields["old_logps"], batch.fields["old_values"] = res["logps"], res["values"]
        return {}

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) [B, T] in float32 from hidden states of any dtype (bf16 ones under mixed precision)."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def on_forward(self, batch, out, ctx) -> None:
        out.values = self.values(out.hidden)

    def save(self, directory) -> None:
        from safetensors.torch import save_file

        save_file(self.head.state_dict(), directory / FILE)


def build(policy, resume_from=None) -> torch.nn.Linear:
    """A zero-initialised head on ``policy``'s hidden size; the checkpoint's, when ``resume_from`` holds one."""
    head = torch.nn.Linear(policy.config.hidden_size, 1).to(next(policy.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if resume_from is not None and (resume_from / FILE).is_file():
        from safetensors.torch import load_file

        head.load_state_dict(load_file(resume_from / FILE))
    return head
