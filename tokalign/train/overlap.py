"""Overlapped rollouts (``train.async_rollouts: K``): the batches of steps n+1 … n+K are sampled in a background
thread while step n trains.

The sampler is a copy of the policy (HF backend; the vLLM engine gets its weights from that copy). Batch s is
sampled with the weights the policy had before step max(0, s−K) — a function of the step alone, so a run is the
same however the threads are scheduled — and each sampling seeds its own RNG (one seeded chunk per call), so the
samples do not depend on what the trainer draws meanwhile. Its log-probs are the sampler's (``sampler_logps``, the
behaviour policy); the trainer's own at train time stay ``old_logps``, and the algorithms' truncated importance
sampling (``algorithm.mismatch_correction``) weights the difference. ``async/staleness`` logs, per step, how many
optimiser steps the sampling weights are behind the trained ones; ``time/sampler_wait_s`` how long the trainer waited.

On CPU the trainer and the sampler each get half of the process's torch threads. Overlap pays where one side leaves
the machine idle: a sampler on its own GPU or in its own process (vLLM), slow rewards (a sandbox, a remote judge).
Two compute-bound phases on the same cores gain little.

Resume stays exact: a checkpoint waits for the samplings in flight and stores the batches sampled ahead, and a
resumed run trains on those before sampling with its own weights again.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tokalign.head import unwrapped


class Overlapped:
    """A batch source that samples ``ahead`` steps in advance with ``inner`` (an ``OnlineSource``)."""

    def __init__(self, inner, policy, ahead: int, max_steps: int):
        from tokalign.rollout.hf import HFEngine

        self.inner, self.ahead, self.max_steps = inner, ahead, max_steps
        self.policy = unwrapped(policy)
        self.sampler = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if isinstance(inner.engine, HFEngine):  # sample from the copy; the trained model stays the trainer's alone
            inner.engine = HFEngine(self.sampler, inner.engine.tokenizer, inner.engine.batch_size,
                                    processors=inner.engine.processors)
        inner.policy = self.sampler  # engines with their own weights (vLLM) are synced from the copy
        if inner.sharing.chunk <= 0:  # one seeded chunk per sampling call, not the global RNG stream
            inner.sharing.chunk = 1 << 30
        self.trained = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        self.copies = dict(self.sampler.named_parameters())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokalign-sampler")
        self.pending: dict[int, Future] = {}
        # on CPU the two threads share the cores: half each (one process's torch threads, split), else they oversubscribe
        self.threads = None
        if not any(p.is_cuda for p in self.policy.parameters()):
            self.restore_threads = n = torch.get_num_threads()
            self.threads = (max(1, n - n // 2), max(1, n // 2))  # (trainer, sampler)
            torch.set_num_threads(self.threads[0])

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trained}

    def _sample(self, step: int, weights: dict[str, torch.Tensor], version: int):
        if self.threads:  # OpenMP's thread count is per calling thread: this sets the sampler's alone
            torch.set_num_threads(self.threads[1])
        with torch.no_grad():
            for n, w in weights.items():
                self.copies[n].copy_(w)
        seqs, metrics = self.inner.batch(step)
        return seqs, metrics, version

    def _submit(self, upto: int, version: int) -> None:
        for s in range(upto - self.ahead, upto + 1):
            if 0 <= s < self.max_steps and s not in self.pending:
                self.pending[s] = self.pool.submit(self._sample, s, self._snapshot(), version)

    def batch(self, step: int):
        self._submit(step + self.ahead, step)  # with the weights the policy has now, before step `step`
        t0 = time.perf_counter()
        seqs, metrics, version = self.pending.pop(step).result()
        return seqs, {**metrics, "async/staleness": step - version, "time/sampler_wait_s": round(time.perf_counter() - t0, 4)}

    # -- resume: the batches sampled ahead travel with the checkpoint
    def state_dict(self) -> dict:
        """The batches sampled ahead (waiting for the samplings in flight: hooks' state is then settled too)."""
        return {"ahead": {s: f.result() for s, f in sorted(self.pending.items())}}

    def load_state_dict(self, saved: dict) -> None:
        for s, result in saved["ahead"].items():
            done: Future = Future()
            done.set_result(result)
            self.pending[int(s)] = done

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.threads:
            torch.set_num_threads(self.restore_threads)
