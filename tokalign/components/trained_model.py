"""A second model trained beside the policy (PRIME's implicit PRM): it starts from ``--with ROLE=PATH`` or else the
starting model, has its own AdamW, and is updated once per step — before ``prepare`` — on the algorithm's
``loss(batch, out) -> LossOutput``. Its per-token log-probs from that update's forward pass (before the update) land
in ``fields["<role>_logps"]`` [B, T] and its metrics under ``<role>/``. Saved in ``<out>/<role>/`` (a model of its
own, loadable as is); its optimiser state is checkpointed."""

from __future__ import annotations

from typing import Callable

import torch

from tokalign.components.base import Component
from tokalign.forward import forward, map_micro_batches
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


class TrainedModel(Component):
    def __init__(self, role: str, lr: float, loss: Callable[[TokenBatch, PolicyOutput], LossOutput]):
        self.role, self.lr, self.loss = role, lr, loss
        self.name, self.provides = role, (f"{role}_logps",)
        self.model = self.optimizer = self.tokenizer = None

    def roles(self) -> dict[str, bool]:
        return {self.role: False}  # optional: the starting model otherwise

    def describe(self) -> str:
        return f"{self.role} (trained)"

    def setup(self, ctx) -> None:
        saved = ctx.resume_from / self.role if ctx.resume_from is not None else None
        source = saved if saved is not None and saved.is_dir() else (ctx.cfg.models.get(self.role) or ctx.cfg.model)
        self.model = ctx.load_model(str(source), trainable=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=ctx.cfg.train.weight_decay)
        self.tokenizer = ctx.tokenizer

    def models(self) -> list:
        return [self.model]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def fill(self, batch, ctx) -> dict:
        t = ctx.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}

        def update(mb):  # forward, loss and backward of one micro-batch; its log-probs from before the update
            out = forward(self.model, mb)
            result = self.loss(mb, out)
            result.loss.backward()
            share = len(mb) / len(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(result.loss.detach())
            for k, v in result.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * share
            return {"logps": out.logps.detach()}

        logps = map_micro_batches(batch, t.micro_batch_size, t.micro_batch_tokens, update)["logps"]
        grad = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        batch.fields[f"{self.role}_logps"] = logps
        return {f"{self.role}/{k}": v for k, v in {**sums, "grad_norm": float(grad)}.items()}

    def save(self, directory) -> None:
        self.model.save_pretrained(directory / self.role)
        self.tokenizer.save_pretrained(directory / self.role)
