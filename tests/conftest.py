"""Shared fixtures: seeded tiny random models and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded random tiny Qwen2 + tokenizer (head_dim 32), saved once per session."""
    from tokalign.tiny import make_random

    return make_random(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def cli(*args: str, cwd: Path | None = None, stdin: str | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `tokalign ARGS` as a user would; returns the completed process (text mode). ``env`` adds variables."""
    proc = subprocess.run(
        [sys.executable, "-m", "tokalign", *args], cwd=cwd, input=stdin, capture_output=True, text=True, env={**CLI_ENV, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tokalign {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a bash pipeline with the venv's `tokalign` on PATH."""
    env = {**CLI_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{CLI_ENV.get('PATH', '')}"}
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True, env=env)


def token_batch(mask, fields=None, totals=None):
    """A TokenBatch around a per-token mask [B, T] (hand-made loss tests); input ids are dummies of width T + 1."""
    import torch

    from tokalign.protocols import TokenBatch

    mask = torch.as_tensor(mask, dtype=torch.float32)
    b, t = mask.shape
    return TokenBatch(torch.ones(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long), mask,
                      dict(fields or {}), dict(totals or {}))


def leaf(x):
    """A float32 tensor that collects gradients (stands in for the policy's per-token log-probs)."""
    import torch

    return torch.as_tensor(x, dtype=torch.float32).clone().requires_grad_(True)


def micro_batch_check(algo, batch, size: int = 2, logps=lambda b: b.fields["pol"], entropy=None):
    """The loss and per-token gradients of the whole batch against those of its micro-batches of ``size`` rows.

    ``logps(b)`` / ``entropy(b)`` give a (micro-)batch's policy log-probs / entropies. Returns
    (full loss, sum of micro-batch losses, full gradient, micro-batch gradients, number of micro-batches), the
    gradients flattened over completion tokens."""
    import torch

    from tokalign.protocols import PolicyOutput
    from tokalign.batching import micro_batches

    def run(b):
        lp = leaf(logps(b))
        loss = algo.loss(b, PolicyOutput(lp, entropy=entropy(b) if entropy else None)).loss
        loss.backward()
        return loss.detach(), lp.grad[b.completion_mask.bool()]

    full, full_grad = run(batch)
    parts = [run(mb) for mb in micro_batches(batch, size)]
    return full, sum(p[0] for p in parts), full_grad, torch.cat([p[1] for p in parts]), len(parts)


def run_and_kill(args: list[str], out: str, checkpoint_name: str, cwd: Path, timeout: float = 300) -> None:
    """Start ``tokalign ARGS --out OUT`` and SIGKILL its whole process group as soon as
    ``OUT.partial/CHECKPOINT_NAME`` exists (a real kill mid-run, for resume tests)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tokalign", *args, "--out", out], cwd=cwd, env=CLI_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while not (cwd / f"{out}.partial" / checkpoint_name).exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Scripted:
    """A stand-in engine for episode tests: call k answers every prompt with ``texts[k]`` (the last one from then on),
    its ids tokenised and closed with EOS, log-prob −0.5 a token, ``spec.n`` copies per prompt."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, 0

    def generate(self, prompts, spec):
        from tokalign.rollout import Completion

        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [[Completion(list(ids), [-0.5] * len(ids), "stop", text) for _ in range(spec.n)] for _ in prompts]


class AlwaysCalculates:
    """An environment that answers every model turn with a calculator result, whatever the model said (a random
    model writes no tool calls of its own); each reply is worth 0.5."""

    name = "always"

    def tools(self):
        from tokalign.environments.builtin import Calculator

        return Calculator().tools()

    def start(self, row):
        return None

    def step(self, state, text):
        from tokalign.environments.base import Reply
        from tokalign.environments.builtin import calculator

        return Reply([{"role": "tool", "name": "calculator", "content": calculator("1234*5678")}], reward=0.5)


def often_stopping_model(path, tok) -> str:
    """A seeded random tiny model whose generation config lists a third of the vocabulary as stop tokens, so its
    turns end after a few tokens (a random model almost never samples its EOS)."""
    from transformers import GenerationConfig

    from tokalign import tiny

    tiny.make_random(path, seed=1)
    cfg = GenerationConfig.from_pretrained(path)
    cfg.eos_token_id = [tok.eos_token_id, *range(10, 10 + len(tok) // 3)]
    cfg.save_pretrained(path)
    return str(path)
