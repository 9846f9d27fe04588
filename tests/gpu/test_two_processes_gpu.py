"""Two processes on one GPU (torchrun --nproc_per_node 2, ddp, both ranks on cuda:0).

NCCL refuses two ranks on one device ("Duplicate GPU detected", ncclInvalidUsage, at the first collective; NCCL 2.x
has done so since at least 2.17), and tokalign puts rank r on cuda:LOCAL_RANK, which does not exist for rank 1 on a
one-GPU machine. So the ranks run through tests/gpu/shared_gpu.py: every rank on cuda:0, in a process group opened
before tokalign's, of gloo (whose all-reduce and broadcast take CUDA tensors, which is what DDP and tokalign's
collectives use) or of NCCL where NCCL accepts it. FSDP needs reduce-scatter and all-gather of CUDA tensors, which
gloo has not: it is not run here. With gloo, tokalign's DDP path on the GPU reproduces the one-process run on the same
global batch, as tests/train/test_distributed.py checks on the CPU (float32, so its tolerances apply)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, cli
from gpu_helpers import ENV, GPU, ON_CUDA, module_of, pairs_file

pytestmark = GPU
WORKER = Path(__file__).with_name("shared_gpu.py")
td_tests = module_of("train", "test_distributed")  # its free-port finder and artifact readers


def _torchrun(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(td_tests._free_port()), *args]
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, env={**CLI_ENV, **ENV, "OMP_NUM_THREADS": "1"}, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # exit status 124, as timeout(1) gives
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return subprocess.CompletedProcess(cmd, 124, "", f"{err}\ntorchrun {' '.join(args[:3])} hung for {timeout:.0f} s")


@functools.cache
def _collectives(backend: str) -> subprocess.CompletedProcess:
    return _torchrun(str(WORKER), backend, "collectives", timeout=90)


def _needs(backend: str) -> None:
    """Skip where the backend refuses two ranks on one GPU (NCCL), quoting its refusal."""
    if backend == "nccl" and not ON_CUDA:
        pytest.skip("NCCL needs CUDA")
    proc = _collectives(backend)
    refusal = [x.strip() for x in (proc.stdout + proc.stderr).splitlines() if re.search(r"Duplicated? GPU", x)]
    if backend == "nccl" and proc.returncode != 0 and refusal:
        pytest.skip(f"NCCL refuses two ranks on one GPU ({refusal[0][:200]}); the gloo variant runs them")
    if backend == "nccl" and proc.returncode == 124:
        pytest.skip("NCCL hung with two ranks on one GPU (no refusal within 90 s); the gloo variant runs them")


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_collectives_and_ddp_on_one_gpu(backend):
    _needs(backend)
    proc = _collectives(backend)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints what every rank saw
    assert [r["rank"] for r in ranks] == [0, 1]
    shared = torch.cuda.device_count() < 2  # several GPUs: each rank on its own
    assert all(r["backend"] == backend and r["device"] == (f"cuda:{0 if shared else r['rank']}" if ON_CUDA else "cpu") for r in ranks)


def _two_ranks(backend: str, *args: str) -> None:
    proc = _torchrun(str(WORKER), backend, "tokalign", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1  # one process prints the artifact path


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_process_dpo_on_one_gpu_matches_one_process(tmp_path, backend):
    _needs(backend)
    common = ["train", "dpo", "--data", pairs_file(tmp_path), "--max-steps", "5", "--batch-size", "4", "--set", "train.lr=1e-3",
              "--set", "train.precision=fp32", "--quiet"]
    cli(*common, "--out", str(tmp_path / "one"), env=ENV)
    _two_ranks(backend, *common, "--out", str(tmp_path / "ddp"))
    one, two = td_tests._metrics(tmp_path / "one"), td_tests._metrics(tmp_path / "ddp")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    w1, w2 = td_tests._weights(tmp_path / "one"), td_tests._weights(tmp_path / "ddp")
    assert set(w1) == set(w2)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 2e-4  # tests/train/test_distributed.py's bound


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_process_online_grpo_on_one_gpu_matches_one_process(tmp_path, backend):
    """Each rank samples its chunks of 2 prompts on the GPU under the chunk's seed: the same completions as one process."""
    _needs(backend)
    common = ["train", "grpo", "--data", "arith", "--set", "rollout.n=4", "--set", "rollout.sampling_chunk=2", "--max-steps", "4",
              "--batch-size", "4", "--set", "train.precision=fp32", "--quiet"]
    cli(*common, "--out", str(tmp_path / "one"), env=ENV)
    _two_ranks(backend, *common, "--out", str(tmp_path / "ddp"))
    for a, b in zip(td_tests._metrics(tmp_path / "one"), td_tests._metrics(tmp_path / "ddp"), strict=True):
        assert b["reward/mean"] == a["reward/mean"]
        assert b["tokens"] == a["tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)


@pytest.mark.skipif(not ON_CUDA or not torch.cuda.is_available() or torch.cuda.device_count() != 1, reason="a one-GPU machine")
def test_plain_torchrun_with_more_ranks_than_gpus_runs_or_says_so_in_one_line(tmp_path):
    proc = _torchrun("-m", "tokalign", "train", "dpo", "--data", pairs_file(tmp_path), "--max-steps", "1", "--batch-size", "2",
                     "--out", str(tmp_path / "x"), "--quiet", timeout=90)
    said = [x for x in proc.stderr.splitlines() if x.startswith("error: ") and "GPU" in x]
    assert proc.returncode == 0 or said, proc.stderr[-3000:]
