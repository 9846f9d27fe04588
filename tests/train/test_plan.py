"""`train --dry-run`: the derived batch arithmetic (micro-batches holding whole groups, per-process shares under
torchrun, models in memory) and the warnings on option combinations that run but do not do what was meant."""

from __future__ import annotations

import json
import os

from conftest import CLI_ENV, cli


def _dry(*args, env=None):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tokalign", "train", *args, "--dry-run"], capture_output=True, text=True,
                          env={**CLI_ENV, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_online_arithmetic_and_group_warning():
    out = _dry("thr", "--data", "arith", "--batch-size", "16", "--n", "8", "--set", "train.micro_batch_size=4")
    assert "prompts per step: 16" in out and "sequences per step: 128" in out
    assert "micro-batches per update: 16" in out  # 4 < 8: each micro-batch is one whole group (THR's loss needs it)
    assert "generated tokens per step (max): 1024" in out and "samples per prompt: 8" in out  # 128 × 8 new tokens
    assert "warning: train.micro_batch_size=4 < group size 8" in out
    split = _dry("grpo", "--data", "arith", "--batch-size", "16", "--n", "8", "--set", "train.micro_batch_size=4")
    assert "micro-batches per update: 32" in split and "< group size" not in split  # GRPO splits each group in two
    assert "models in memory: policy" in out


def test_lora_reference_and_processes(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}) + "\n" for i in range(6)))
    out = _dry("dpo", "--data", str(data), "--batch-size", "4", "--set", "train.lora_r=8", "--backend", "vllm", env={"WORLD_SIZE": "2"})
    assert "models in memory: policy (+ LoRA r=8), reference = policy with the adapter off" in out
    assert "processes: 2 (ddp)" in out and "pairs per process: 2" in out
    assert "warning: rollout.backend=vllm is ignored" in out
    out = _dry("dpo", "--data", str(data), "--batch-size", "1", env={"WORLD_SIZE": "4"})
    assert "4 processes but train.batch_size=1" in out
    assert os.environ.get("WORLD_SIZE") is None  # the test's own process is untouched


def test_dry_run_loads_no_model_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = cli("train", "prime", "--data", "arith", "--out", str(out), "--dry-run")
    assert "prm (trained)" in proc.stdout + proc.stderr and not out.exists()
