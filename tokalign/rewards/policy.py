"""Rewards that see the policy: a reward plug-in with a ``bind_policy(view)`` method is handed, before each scoring,
a ``PolicyView`` of the model whose samples it scores — online, the policy being trained, as it is at that step (so
the reward moves as the policy trains); in ``tokalign score``, the checkpoint named by ``--policy``. Through the view
it reads the policy's per-token log-probs of any continuation (``logps``) and its final hidden states (``hidden``),
without gradient, in the run's compute dtype.

Token in, token out: a sample's prompt ids are in ``sample.metadata["prompt_ids"]``; continuations are ids, never
re-tokenised text. The view reads the live weights: a reward must not keep it past the call it was bound for.

Where it cannot work, the run is refused before any model loads (``check``): under FSDP (the policy's forward is a
collective that every process would have to run in step, while each scores its own samples), with
``train.async_rollouts`` (sampling runs ahead of the weights the reward would read), and with score worker
processes (the model lives in this process). In ``score`` the policy's identity enters each such reward's cache key,
so scores of one checkpoint are never served for another."""

from __future__ import annotations

from typing import Any

import torch

from tokalign.errors import UserError


def sees_policy(fn: Any) -> bool:
    """The reward plug-in (its resolved callable) asks for the policy."""
    return callable(getattr(fn, "bind_policy", None))


def policy_rewards(rewards: list) -> list:
    """The resolved rewards among ``rewards`` that see the policy."""
    return [r for r in rewards if sees_policy(r.fn)]


class PolicyView:
    """Read-only access to a causal LM for a reward: ``logps`` and ``hidden`` of continuations after prefixes.

    ``step``: the training step whose samples are being scored (0 in ``score``)."""

    def __init__(self, model, tokenizer, step: int = 0, micro_batch_size: int = 16):
        self.model, self.tokenizer, self.step, self.micro_batch_size = model, tokenizer, step, max(1, micro_batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logps(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
        """log π(c_j | prefix, c_<j) for each continuation token: one float32 CPU tensor [len(c)] per pair."""
        return [out for out, _ in self._run(prefixes, continuations, hidden=False)]

    @torch.no_grad()
    def hidden(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
        """The final hidden state at each continuation token's position (the state that predicts it, as the log-probs
        do: position of c_j − 1): one float32 CPU tensor [len(c), H] per pair."""
        return [h for _, h in self._run(prefixes, continuations, hidden=True)]

    def _run(self, prefixes, continuations, hidden: bool):
        from tokalign.forward import forward
        from tokalign.protocols import TokenBatch

        if len(prefixes) != len(continuations):
            raise ValueError(f"{len(prefixes)} prefixes for {len(continuations)} continuations")
        if any(not p for p in prefixes):
            raise ValueError("every prefix needs at least one token (the first continuation token is predicted from it)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        results = []
        try:
            for lo in range(0, len(prefixes), self.micro_batch_size):
                pairs = list(zip(prefixes[lo : lo + self.micro_batch_size], continuations[lo : lo + self.micro_batch_size]))
                width = max(len(p) + len(c) for p, c in pairs)
                ids = torch.full((len(pairs), width), pad, dtype=torch.long)
                attention = torch.zeros((len(pairs), width), dtype=torch.long)
                mask = torch.zeros((len(pairs), width - 1))
                for i, (p, c) in enumerate(pairs):
                    ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
                    attention[i, : len(p) + len(c)] = 1
                    mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1
                batch = TokenBatch(ids.to(self.device), attention.to(self.device), mask.to(self.device), {}, {})
                out = forward(self.model, batch, keep_hidden=hidden)
                for i, (p, c) in enumerate(pairs):
                    span = slice(len(p) - 1, len(p) + len(c) - 1)
                    results.append((out.logps[i, span].float().cpu(),
                                    out.hidden[i, span].float().cpu() if hidden else None))
        finally:
            self.model.train(was_training)
        return results


def bind(rewards: list, view: PolicyView) -> None:
    """Hand ``view`` to every reward among ``rewards`` that sees the policy."""
    for r in policy_rewards(rewards):
        r.fn.bind_policy(view)


def check(rewards: list, *, distributed: str = "", world: int = 1, async_rollouts: int = 0, workers: int = 1) -> None:
    """Refuse, in one line each, the set-ups where a reward cannot read the policy (see the module docstring)."""
    seeing = policy_rewards(rewards)
    if not seeing:
        return
    names = ", ".join(f"'{r.name}'" for r in seeing)
    if world > 1 and distributed == "fsdp":
        raise UserError(f"reward {names} reads the policy, which FSDP shards across processes: train with "
                        "train.distributed=ddp (or one process) to use it.")
    if async_rollouts > 0:
        raise UserError(f"reward {names} reads the policy's current weights, which train.async_rollouts={async_rollouts} "
                        "samples ahead of: set train.async_rollouts=0 to use it.")
    if workers != 1:
        raise UserError(f"reward {names} reads the policy in this process: score without --workers (or with --workers 1).")
