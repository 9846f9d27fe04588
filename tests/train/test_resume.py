"""Kill `train` mid-run with SIGKILL, rerun with --resume: it continues from the last checkpoint and,
on CPU with a fixed seed, ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import cli, run_and_kill

pytestmark = pytest.mark.slow
ARGS = ["train", "grpo", "--data", "arith", "--max-steps", "8", "--batch-size", "4", "--n", "4", "--lr", "1e-3",
        "--set", "rollout.max_new_tokens=6", "--set", "train.save_every=2", "--quiet"]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    cli(*ARGS, "--out", "full", cwd=tmp_path)

    run_and_kill(ARGS, "cut", "checkpoint-4", tmp_path)
    assert not (tmp_path / "cut").exists()  # no half artifact, only the resume point

    again = cli(*ARGS, "--out", "cut", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    changed = cli(*ARGS, "--lr", "2e-3", "--out", "cut", "--resume", cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "configuration differs" in changed.stderr
    cli(*ARGS, "--out", "cut", "--resume", cwd=tmp_path)

    full, cut = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert full.keys() == cut.keys()
    for name in full:
        assert (full[name] == cut[name]).all(), name
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")  # same losses and rewards, step by step
    assert not (tmp_path / "cut.partial").exists()


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def test_resume_without_any_run_is_refused(tmp_path):
    proc = cli(*ARGS, "--out", "c", "--resume", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Nothing to resume" in proc.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("extra", [["train", "ppo"], ["train", "grpo", "--set", "train.lora_r=4"]], ids=["ppo-value-head", "lora"])
def test_resume_restores_what_trains_beside_a_full_policy(tmp_path, extra):
    """A value head (PPO) and a LoRA adapter come back from the sharded checkpoint too: exact weights again."""
    args = [*extra, "--data", "arith", "--max-steps", "4", "--batch-size", "4", "--n", "2", "--lr", "1e-3",
            "--set", "rollout.max_new_tokens=6", "--set", "train.save_every=2", "--quiet"]
    cli(*args, "--out", "full", cwd=tmp_path)
    run_and_kill(args, "cut", "checkpoint-2", tmp_path)
    cli(*args, "--out", "cut", "--resume", cwd=tmp_path)
    for f in sorted(p.name for p in (tmp_path / "full").glob("*.safetensors")):
        full, cut = load_file(tmp_path / "full" / f), load_file(tmp_path / "cut" / f)
        assert full.keys() == cut.keys() and all((full[k] == cut[k]).all() for k in full), f
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
