"""Data-parallel training with 2 CPU processes (torchrun, gloo): DDP-style (gradients summed) and FSDP2 (parameters
sharded) reproduce the single-process run on the same global batch — losses, gradient norms and final weights."""

from __future__ import annotations

import json
import re
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
    # the ranks' own errors come first in stderr and torchrun's summary last: show both
    errors = [line for line in proc.stderr.splitlines() if re.search(r"Error|error:|terminate|what\(\)|Traceback|Signal", line)]
    assert proc.returncode == 0, "\n".join(errors[:40]) + "\n…\n" + proc.stderr[-1500:]
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
    # the fused log-prob head under both engines (its head weight's gradient arrives outside the model's forward)
    for strategy in ("ddp", "fsdp"):
        _torchrun(0, *common, "--set", f"train.distributed={strategy}", "--set", "train.fused_head=always", "--out", str(tmp_path / f"{strategy}-fused"))
    one = _metrics(tmp_path / "one")
    w1 = _weights(tmp_path / "one")
    for run in ("ddp", "fsdp", "ddp-fused", "fsdp-fused"):
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


def test_two_process_packed_dpo_matches_one_process(tmp_path):
    """train.packing under ddp and fsdp (the once-per-model packing check is a forward on every process alike), on
    pairs of unequal lengths so the packed layout really differs from the padded one."""
    data = tmp_path / "pairs.jsonl"
    long = lambda c: f"{c} " + " ".join(["so the answer is", c] * 4)  # noqa: E731
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": long(c) if k % 2 else c}],
                                        "rejected": [{"role": "assistant", "content": r if k % 2 else long(r)}]}) + "\n"
                            for k, (q, c, r) in enumerate(PAIRS)))
    common = ["train", "dpo", "--data", str(data), "--max-steps", "3", "--batch-size", "4", "--set", "train.lr=1e-3", "--quiet"]
    cli(*common, "--out", str(tmp_path / "padded"))
    cli(*common, "--set", "train.packing=true", "--out", str(tmp_path / "one"))
    _torchrun(0, *common, "--set", "train.packing=true", "--out", str(tmp_path / "ddp"))
    _torchrun(0, *common, "--set", "train.packing=true", "--set", "train.distributed=fsdp", "--set", "train.micro_batch_tokens=64",
              "--out", str(tmp_path / "fsdp"))
    padded = _metrics(tmp_path / "padded")
    assert all(m["padding_fraction"] > 0.2 for m in padded)
    for run in ("one", "ddp", "fsdp"):
        other = _metrics(tmp_path / run)
        assert all(m["padding_fraction"] < 0.1 for m in other)
        for a, b in zip(padded, other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


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


def _in_gloo_group(rank: int, port: int, out, worker, *args) -> None:
    """Process ``rank`` of 2 in a gloo group: puts ``worker(rank, *args)``'s result on ``out``."""
    import os

    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out.put(worker(rank, *args))
    finally:
        td.destroy_process_group()


def _two_processes(worker, *args) -> list:
    """``worker(rank, *args)`` in 2 spawned processes of one gloo group: their results, sorted."""
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_in_gloo_group, args=(_free_port(), out, worker, *args), nprocs=2, start_method="spawn")
    return sorted(out.get() for _ in range(2))


def _shared_pass_worker(rank: int) -> tuple:
    from types import SimpleNamespace

    import torch

    from tokalign.batching import Seq, collate
    from tokalign.train import distributed
    from tokalign.train.state import TrainState

    seqs = [Seq([1, 2, 3][: 1 + g % 3], [4 + g] * (1 + g % 4), g) for g in range(7)]
    batch = collate(seqs, 0)
    seen = []

    def fn(mb):  # a stand-in for a frozen forward: a per-token value that depends on the row alone
        seen.extend(mb.input_ids[:, 0].tolist())
        return {"v": (mb.input_ids[:, 1:] * 10 + mb.attention_mask[:, 1:]).float()}

    ctx = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=2, micro_batch_tokens=0)),
                          dist=distributed.Dist(rank, 2))
    got = TrainState.map_micro_batches(ctx, batch, fn)["v"]
    want = (batch.input_ids[:, 1:] * 10 + batch.attention_mask[:, 1:]).float()
    return rank, bool(torch.equal(got, want)), len(seen)


def test_frozen_passes_are_shared_between_processes():
    """Each of 2 processes runs the frozen pass on its share of the 7 rows (3 and 4), and both end with every row's
    values, equal to one process's."""
    assert _two_processes(_shared_pass_worker) == [(0, True, 3), (1, True, 4)]


def _sharded_loading_worker(rank: int, model_path: str) -> tuple:
    import torch

    from tokalign import models
    from tokalign.train import distributed

    reads = []

    def whole():
        reads.append(rank)
        return models.load_model(model_path, "float32", device="cpu")

    model = distributed.load_sharded(whole, lambda: models.empty_model(model_path), distributed.Dist(rank, 2))
    local = sum(p.to_local().numel() for p in model.parameters())
    weights = distributed.full_state_dict(model)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    logits = model(input_ids=ids).logits.detach()
    if rank != 0:
        return rank, reads, True, local, 0
    ref = models.load_model(model_path, "float32", device="cpu")
    same = all(torch.equal(weights[k], v) for k, v in ref.state_dict().items() if k in weights)
    same_logits = bool(torch.allclose(logits, ref(input_ids=ids).logits, atol=1e-6))
    return rank, reads, same and same_logits, local, sum(p.numel() for p in ref.parameters())


def test_fsdp_loading_reads_the_weights_on_one_process(tiny_model):
    """Sharded loading: only rank 0 reads the checkpoint, rank 1 builds the model on the meta device; after the
    broadcast each holds half the parameters, and the sharded model's weights and logits equal the plain model's."""
    (r0, reads0, same, local0, total), (r1, reads1, _, local1, _) = _two_processes(_sharded_loading_worker, str(tiny_model))
    assert reads0 == [0] and reads1 == []
    assert same
    assert local0 + local1 == total and abs(local0 - local1) <= total // 10
