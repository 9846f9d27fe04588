"""`score` runs rewards per sample, in worker processes when asked, with a timeout and an on-disk cache:
a failing, hanging or crashing sample fails alone (value 0, reason in reward_errors, counted), the run exits 0."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, cli
from score_plugins import make_rollouts
from tokalign import artifacts

COUNTING, FLAKY, SLEEPY, CRASHY, BATCHED = (f"score_plugins:{n}" for n in ("Counting", "Flaky", "Sleepy", "Crashy", "Batched"))


@pytest.fixture
def work(tmp_path):
    make_rollouts(tmp_path / "R", 100)
    return tmp_path


def score(work, *args, out="S"):
    env = {"PYTHONPATH": str(ROOT / "tests"), "TOKALIGN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    proc = cli("score", "R", *args, "--out", out, cwd=work, env=env)
    art = artifacts.read(work / out, ["scored"])
    return proc, art.rows(), art.manifest


def errors(row) -> dict:
    return json.loads(row["reward_errors"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reward_raising_on_10_percent_leaves_90_percent_scored(work, workers):
    proc, rows, manifest = score(work, "-r", FLAKY, "-r", COUNTING, "--workers", workers, "--no-cache")
    assert proc.stdout.strip() == "S"
    failed = [r for r in rows if errors(r)]
    assert [r["id"] for r in failed] == [f"s{i}" for i in range(0, 100, 10)]
    assert all(errors(r) == {FLAKY: f"ValueError: cannot score {r['id']}"} for r in failed)
    assert all(r["rewards"][FLAKY] == 0.0 for r in failed) and all(r["rewards"][FLAKY] == 1.0 for r in rows if not errors(r))
    # the other reward is untouched, in row order whatever process computed it
    assert [r["rewards"][COUNTING] for r in rows] == [float(i + 1) for i in range(100)]
    assert [r["reward"] for r in rows] == [(i + 1) + (0.0 if i % 10 == 0 else 1.0) for i in range(100)]
    stats = manifest["scoring"]["rewards"][FLAKY]
    assert (stats["errors"], stats["timeouts"], stats["computed"]) == (10, 0, 90) and manifest["scoring"]["failed_samples"] == 10
    summary = proc.stderr.strip().splitlines()[-1]
    assert f"'{FLAKY}' failed on 10/100 (10 errors; first: ValueError: cannot score s0)" in summary


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reward_sleeping_past_the_timeout_is_cut_off(work, workers):
    proc, rows, manifest = score(work, "-r", SLEEPY, "--reward-opt", f"{SLEEPY}.every=25", "--timeout", "1", "--workers", workers, "--no-cache")
    assert {r["id"]: errors(r) for r in rows if errors(r)} == {f"s{i}": {SLEEPY: "timed out after 1s"} for i in (0, 25, 50, 75)}
    assert sum(r["reward"] for r in rows) == 96.0
    assert manifest["scoring"]["rewards"][SLEEPY]["timeouts"] == 4 and "4 timeouts" in proc.stderr


@pytest.mark.slow
def test_a_worker_stuck_beyond_the_alarm_is_killed_and_replaced(work):
    """The alarm is blocked (as in C code that never returns): the parent kills the worker at the hard deadline."""
    proc, rows, manifest = score(work, "-r", SLEEPY, "--reward-opt", f"{SLEEPY}.every=50", "--reward-opt", f"{SLEEPY}.block_alarm=true",
                                 "--timeout", "1", "--workers", "2", "--no-cache")
    assert {r["id"]: errors(r) for r in rows if errors(r)} == {f"s{i}": {SLEEPY: "timed out after 1s (worker killed)"} for i in (0, 50)}
    assert sum(r["reward"] for r in rows) == 98.0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_batched_reward_gets_lists_and_a_failing_batch_is_retried_sample_by_sample(work, workers):
    log = work / "sizes.log"
    _, rows, _ = score(work, "-r", BATCHED, "--reward-opt", f"{BATCHED}.log={log}", "--workers", workers, "--no-cache")
    assert {r["id"]: errors(r) for r in rows if errors(r)} == {f"s{i}": {BATCHED: "RuntimeError: a bad sample in the batch"} for i in range(0, 100, 10)}
    assert [r["reward"] for r in rows] == [0.0 if i % 10 == 0 else float(i) for i in range(100)]
    sizes = [int(x) for x in log.read_text().split()]
    assert max(sizes) > 1 and sizes.count(1) >= 10  # whole batches, and the failing ones once more sample by sample


def test_a_worker_dying_fails_only_the_sample_it_ran(work):
    proc, rows, _ = score(work, "-r", CRASHY, "-r", COUNTING, "--workers", "2", "--no-cache")
    assert {r["id"]: errors(r) for r in rows if errors(r)} == {"s3": {CRASHY: "the worker process died (exit code 13) on this sample"}}
    assert [r["rewards"][COUNTING] for r in rows] == [float(i + 1) for i in range(100)]


def test_cache_recomputes_only_what_changed(work):
    log = work / "calls.log"
    counting = ["-r", COUNTING, "--reward-opt", f"{COUNTING}.log={log}"]

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    _, first, _ = score(work, *counting, "--workers", "2", out="S1")
    assert calls() == 100
    proc, again, manifest = score(work, *counting, "-r", FLAKY, "--workers", "2", out="S2")  # one reward added
    assert calls() == 100 and manifest["scoring"]["rewards"][COUNTING] == {"computed": 0, "cached": 100, "errors": 0, "timeouts": 0}
    assert manifest["scoring"]["rewards"][FLAKY]["computed"] == 90
    assert [r["rewards"][COUNTING] for r in again] == [r["rewards"][COUNTING] for r in first]
    assert json.loads(again[5]["verdicts"])[COUNTING] == json.loads(first[5]["verdicts"])[COUNTING]  # info comes back too
    score(work, *counting, "--reward-opt", f"{COUNTING}.scale=2", out="S3")  # other options: other results
    assert calls() == 200
    score(work, *counting, "--no-cache", out="S4")
    assert calls() == 300
    # re-scoring a scored artifact reuses the cache as well
    env = {"PYTHONPATH": str(ROOT / "tests"), "TOKALIGN_CACHE": str(work / "cache")}
    cli("score", "S2", *counting, "--out", "S5", cwd=work, env=env)
    assert calls() == 300


def test_training_from_scored_rows_with_failures_warns(work):
    score(work, "-r", FLAKY, "--no-cache")
    proc = cli("train", "grpo", "--data", "S", "--dry-run", cwd=work)
    assert "warning: 10 of 100 scored rows had a reward fail on them (scored 0 for it)" in proc.stdout


def test_an_unusable_cache_is_skipped_with_one_warning(work):
    (work / "not-a-dir").write_text("")
    env = {"PYTHONPATH": str(ROOT / "tests"), "TOKALIGN_CACHE": str(work / "not-a-dir")}
    proc = cli("score", "R", "-r", COUNTING, "--out", "S", cwd=work, env=env)
    assert proc.stdout.strip() == "S" and proc.stderr.count("warning: score cache") == 1
    assert artifacts.read(work / "S", ["scored"]).manifest["scoring"]["rewards"][COUNTING]["computed"] == 100
