"""Data-parallel training with 2 CPU processes (torchrun, gloo): DDP-style (gradients summed) and FSDP2 (parameters
sharded) reproduce the single-process run on the same global batch — losses, gradient norms and final weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CLI_ENV, cli

pytestmark = pytest.mark.slow

PAIRS = [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9"), ("3+5=", "8", "7"),
         ("6+1=", "7", "8"), ("2+2=", "4", "5"), ("9+0=", "9", "8"), ("1+7=", "8", "6")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(port: int, *args: str) -> None:
    """``port``: kept for readability of the callers; a free one is taken (a fixed port can still be held by the
    previous test's rendezvous)."""
    port = _free_port()
    env = {**CLI_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           "-m", "tokalign", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1  # one process prints the artifact path


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_two_process_dpo_matches_one_process(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for q, c, r in PAIRS))
    common = ["train", "dpo", "--data", str(data), "--max-steps", "5", "--batch-size", "4", "--set", "train.lr=1e-3", "--quiet"]
    cli(*common, "--out", str(tmp_path / "one"))
    _torchrun(29611, *common, "--out", str(tmp_path / "ddp"))
    _torchrun(29612, *common, "--set", "train.distributed=fsdp", "--set", "train.micro_batch_size=2", "--out", str(tmp_path / "fsdp"))
    one = _metrics(tmp_path / "one")
    w1 = _weights(tmp_path / "one")
    for run in ("ddp", "fsdp"):
        other = _metrics(tmp_path / run)
        assert len(other) == len(one) == 5
        for a, b in zip(one, other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        w2 = _weights(tmp_path / run)
        assert set(w2) == set(w1)
        # Adam turns float-rounding differences in near-zero gradients into full-size steps on a few weights; the
        # bound is 4% of the largest change training made (lr 1e-3 × 5 steps)
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 2e-4


@pytest.mark.parametrize("strategy,port", [("fsdp", 29613), ("ddp", 29617)])
def test_two_process_online_grpo_matches_one_process(tmp_path, strategy, port):
    """Online: each process samples and scores its chunks of 2 prompts (each chunk under its own seed) and the rows
    are gathered, so two processes draw what one process with the same chunks draws; each then trains on its half of
    the groups. (FSDP: the sharded model's generate calls run in lockstep.)"""
    common = ["train", "grpo", "--data", "arith", "--set", "rollout.n=4", "--set", "rollout.sampling_chunk=2", "--max-steps", "4",
              "--batch-size", "4", "--quiet"]
    cli(*common, "--out", str(tmp_path / "one"))
    _torchrun(port, *common, "--set", f"train.distributed={strategy}", "--out", str(tmp_path / strategy))
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / strategy), strict=True):
        assert b["reward/mean"] == a["reward/mean"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)


def test_more_processes_than_groups_is_one_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    env = {**CLI_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29614", "-m", "tokalign",
                           "train", "dpo", "--data", str(data), "--max-steps", "1", "--batch-size", "1", "--out", str(tmp_path / "x"), "--quiet"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "raise train.batch_size to at least 2" in proc.stderr


@pytest.mark.parametrize("strategy,port", [("ddp", 29615), ("fsdp", 29616)])
def test_two_process_ppo_with_micro_batches_matches_one_process(tmp_path, strategy, port):
    """ddp: torch's DDP for the policy (all-reduce in the last micro-batch's backward, ``no_sync`` before it); fsdp:
    FSDP2 shards, the gradient norm clipped over shards and the plain value head together. Either way the value head
    outside the engine is all-reduced by hand, and PPO's losses and gradient norms equal the one-process run's."""
    common = ["train", "ppo", "--data", "arith", "--set", "rollout.n=2", "--set", "rollout.sampling_chunk=2", "--set",
              "train.micro_batch_size=2", "--max-steps", "3", "--batch-size", "4", "--quiet"]
    cli(*common, "--out", str(tmp_path / "one"))
    _torchrun(port, *common, "--set", f"train.distributed={strategy}", "--out", str(tmp_path / strategy))
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / strategy), strict=True):
        assert b["reward/mean"] == a["reward/mean"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["vf_loss"] == pytest.approx(a["vf_loss"], rel=1e-4, abs=1e-7)
