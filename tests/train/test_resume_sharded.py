"""Resume from a sharded checkpoint (torch.distributed.checkpoint) on another number of processes: a run killed on
2 FSDP processes resumes on 1, one killed on 1 process resumes on 2, and both end at the uninterrupted run's weights
within the multi-process tolerance of tests/train/test_distributed.py. The optimiser state an FSDP run writes is
complete: every parameter's Adam moments, equal to the one-process run's at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, cli

from test_distributed import PAIRS, _free_port, _weights

pytestmark = pytest.mark.slow

STEPS = 6


def _torchrun_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tokalign"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
            "-m", "tokalign"]


def _run(nproc: int, args: list[str], cwd: Path) -> None:
    proc = subprocess.run([*_torchrun_cmd(nproc), *args], cwd=cwd, capture_output=True, text=True,
                          env={**CLI_ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run_and_kill(nproc: int, args: list[str], out: str, cwd: Path, timeout: float = 300) -> Path:
    """SIGKILL the whole run (every process) as soon as its first checkpoint exists; that checkpoint."""
    proc = subprocess.Popen([*_torchrun_cmd(nproc), *args, "--out", out], cwd=cwd, env={**CLI_ENV, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = cwd / f"{out}.partial" / "checkpoint-2"
    deadline = time.time() + timeout
    while not ckpt.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    for pid in _tree(proc.pid):  # torchrun's workers run in process groups of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return ckpt


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _shards(ckpt: Path, tmp: Path) -> dict:
    """A checkpoint's DCP shards as one plain state dict (read in this single process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp / f"{ckpt.parent.name}.pt"
    dcp_to_torch_save(ckpt / "dcp", dest)
    return torch.load(dest, weights_only=False)


def _flat(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def test_fsdp_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for q, c, r in PAIRS))
    args = ["train", "dpo", "--data", str(data), "--max-steps", str(STEPS), "--batch-size", "4", "--set", "train.lr=1e-3",
            "--set", "train.save_every=2", "--set", "train.distributed=fsdp", "--quiet"]
    _run(1, [*args, "--out", "full"], tmp_path)
    one = _run_and_kill(1, args, "one_to_two", tmp_path)
    two = _run_and_kill(2, [*args, "--set", "train.micro_batch_size=2"], "two_to_one", tmp_path)

    # the 2-process FSDP checkpoint holds every parameter's weights and Adam moments (each process wrote its shard),
    # equal to the 1-process run's at the same step
    a, b = _flat(_shards(one, tmp_path)), _flat(_shards(two, tmp_path))
    assert a.keys() == b.keys()
    weights = {k.removeprefix("model.") for k in a if k.startswith("model.")}
    for moment in ("exp_avg", "exp_avg_sq"):  # every trained tensor has both moments (the tied LM head is the embedding)
        held = {k.removeprefix("optimizer.state.").removesuffix(f".{moment}") for k in a if k.endswith(f".{moment}")}
        assert held <= weights and weights - held == {"policy.lm_head.weight"}
    for k in a:
        scale = float(a[k].abs().max()) if a[k].numel() else 0.0
        assert float((a[k] - b[k]).abs().max()) <= 1e-3 * scale + 1e-9, k

    # 1 -> 2 processes (and another micro-batch size), 2 -> 1
    _run(2, [*args, "--set", "train.micro_batch_size=2", "--out", "one_to_two", "--resume"], tmp_path)
    _run(1, [*args, "--out", "two_to_one", "--resume"], tmp_path)
    full = _weights(tmp_path / "full")
    for run in ("one_to_two", "two_to_one"):
        w = _weights(tmp_path / run)
        assert w.keys() == full.keys()
        d = max(float((full[k] - w[k]).abs().max()) for k in full)
        assert d < 2e-4, run
        assert not (tmp_path / f"{run}.partial").exists()


def test_changing_what_a_step_computes_is_still_refused(tmp_path):
    """Execution settings (strategy, micro-batch size, save_every) may change on resume; the maths may not."""
    args = ["train", "grpo", "--data", "arith", "--max-steps", "4", "--batch-size", "2", "--n", "2", "--set",
            "rollout.max_new_tokens=4", "--set", "train.save_every=2", "--quiet"]
    _run_and_kill(1, args, "cut", tmp_path)
    proc = cli(*args, "--lr", "1e-3", "--out", "cut", "--resume", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "configuration differs" in proc.stderr
    cli(*args, "--set", "train.micro_batch_size=2", "--set", "train.save_every=1", "--out", "cut", "--resume", cwd=tmp_path)
    assert (tmp_path / "cut" / "model.safetensors").is_file()
