"""`tokalign score --workers 1` (in-process) vs `--workers 2` (two worker processes) on a CPU-bound reward.

The reward (``Busy`` below) does pure-Python arithmetic, calibrated here to about ``--ms`` milliseconds
per sample, over ``--samples`` synthetic rollouts (no model needed). Both runs use ``--no-cache``.
Reported: wall time of the scoring call itself (``scoring.rows.score_rows``: process start-up,
chunking and result transfer included) and of the whole CLI command, best of ``--repeat``, and the
speed-ups. Other load on the machine depresses the speed-up, so the script also prints the load
average and a ceiling: the same work split over plain ``multiprocessing`` processes without tokalign.

    python benchmarks/score_workers.py [--samples 400] [--ms 20] [--repeat 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Busy:
    """A CPU-bound reward: ``iterations`` steps of integer arithmetic per sample (no I/O, holds the GIL)."""

    @dataclass
    class Config:
        iterations: int = 100_000

    def __init__(self, config: "Busy.Config"):
        self.config = config

    def __call__(self, samples):
        return [float(work(self.config.iterations, len(s.completion)) % 7) for s in samples]


def work(n: int, seed: int) -> int:
    x = seed
    for i in range(n):
        x = (x * 31 + i) % 1_000_003
    return x


def _half(iterations: int, seeds: list[int]) -> None:
    for s in seeds:
        work(iterations, s)


def ceiling(iterations: int, n: int, workers: int) -> tuple[float, float]:
    """(serial, parallel) seconds for the same work in this process vs ``workers`` bare spawned processes."""
    import multiprocessing as mp

    seeds = [1 + i % 50 for i in range(n)]
    t = time.perf_counter()
    _half(iterations, seeds)
    serial = time.perf_counter() - t
    ctx = mp.get_context("spawn")
    t = time.perf_counter()
    procs = [ctx.Process(target=_half, args=(iterations, seeds[k::workers])) for k in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return serial, time.perf_counter() - t


def calibrate(ms: float) -> int:
    n = 20_000
    while True:
        t = time.perf_counter()
        work(n, 1)
        dt = time.perf_counter() - t
        if dt > 0.05:
            return max(1, int(n * ms / 1000 / dt))
        n *= 2


def make_rollouts(path: Path, n: int) -> None:
    import json

    from tokalign import artifacts

    rows = [{"id": f"s{i}", "prompt_id": f"p{i // 8}", "group_id": i // 8, "sample_idx": i % 8, "prompt": json.dumps(f"q{i // 8}"),
             "prompt_text": f"q{i // 8}", "prompt_ids": [1], "reference": json.dumps("a"), "completion": "c" * (1 + i % 50),
             "completion_ids": [1] * (1 + i % 50), "sampler_logps": [0.0] * (1 + i % 50), "finish_reason": "stop"} for i in range(n)]
    with artifacts.writing(path, "rollouts", artifacts.Provenance(config={"synthetic": True})) as w:
        w.write_rows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--ms", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()

    sys.path.insert(0, str(HERE))  # workers import this module as `score_workers` (spawn passes sys.path on)
    from tokalign import artifacts, rewards
    from tokalign.scoring.rows import score_rows

    iterations = calibrate(a.ms)
    name = "score_workers:Busy"
    opts = {name: {"iterations": iterations}}
    resolved = rewards.resolve([name], opts)
    with tempfile.TemporaryDirectory() as tmp:
        make_rollouts(Path(tmp) / "R", a.samples)
        rows = artifacts.read(Path(tmp) / "R", ["rollouts"]).rows()
        t = time.perf_counter()
        resolved[0].fn([__import__("tokalign.rows", fromlist=["to_sample"]).to_sample(rows[0])])
        per_sample = time.perf_counter() - t
        print(f"reward: {iterations} iterations ≈ {per_sample * 1e3:.1f} ms/sample; {a.samples} samples; "
              f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        lib: dict[int, float] = {}
        cli: dict[int, float] = {}
        bare: dict[int, float] = {}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
        for rep in range(a.repeat):
            for w in (1, a.workers):
                t = time.perf_counter()
                out, report = score_rows(rows, resolved, workers=w, timeout=30.0)
                lib[w] = min(lib.get(w, float("inf")), time.perf_counter() - t)
                assert report.failed_samples == 0
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "tokalign", "score", str(Path(tmp) / "R"), "-r", name, "--reward-opt",
                                f"{name}.iterations={iterations}", "--workers", str(w), "--no-cache", "--out",
                                str(Path(tmp) / f"S{rep}-{w}")], check=True, env=env, capture_output=True)
                cli[w] = min(cli.get(w, float("inf")), time.perf_counter() - t)
            for w, seconds in zip((1, a.workers), ceiling(iterations, a.samples, a.workers)):
                bare[w] = min(bare.get(w, float("inf")), seconds)
        print(f"score_rows : workers 1 {lib[1]:.2f} s, workers {a.workers} {lib[a.workers]:.2f} s -> speed-up {lib[1] / lib[a.workers]:.2f}x")
        print(f"CLI (whole): workers 1 {cli[1]:.2f} s, workers {a.workers} {cli[a.workers]:.2f} s -> speed-up {cli[1] / cli[a.workers]:.2f}x")
        print(f"ceiling    : 1 process {bare[1]:.2f} s, {a.workers} bare processes {bare[a.workers]:.2f} s -> speed-up {bare[1] / bare[a.workers]:.2f}x "
              "(what this machine allows right now)")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
