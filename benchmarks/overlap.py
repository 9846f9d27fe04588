"""Overlapped rollouts: online GRPO step time with ``train.async_rollouts: 1`` against the synchronous run.

    python benchmarks/overlap.py [--steps 8] [--rounds 3] [--latency 0.005]

Each case runs ``tokalign train grpo --data arith`` twice per round — synchronous, then with
``train.async_rollouts=1`` (and ``algorithm.mismatch_correction=token``) — and reports the median step time of each
(first step dropped: it samples before anything can overlap) and their ratio, median over rounds:

- ``quickstart``: the bundled model with its own settings (completions of ~4 tokens: training dominates).
- ``compute``: a seeded random tiny model (never stops early) sampling 32 new tokens, 8 prompts × 8: sampling and
  training take about the same time, both on this process's CPU cores.
- ``judge``: the same with a reward that takes ``--latency`` seconds per sample without using the CPU — what a remote
  judge or a sandbox service costs (``LatentReward`` below: the stripped completion equal to the reference).

On CPU the sampler thread and the trainer split the torch threads; the overlap can only hide time in which one of
them leaves the cores idle, so ``compute`` on a machine with few cores gains little, ``judge`` gains the latency."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class LatentReward:
    """Exact match, answered after a fixed delay (a remote judge; scoring calls it once per sample): wall time, no CPU."""

    latency = float(os.environ.get("TOKALIGN_BENCH_LATENCY", "0.005"))

    def __call__(self, samples):
        time.sleep(self.latency)
        return [float(s.completion.strip() == str(s.reference).strip()) for s in samples]


def run(case: str, asynchronous: bool, out: Path, args) -> list[float]:
    train = ["train", "grpo", "--data", "arith", "--max-steps", str(args.steps), "--set", "train.save_every=0", "--out", str(out), "--quiet"]
    if case != "quickstart":
        train += ["--model", str(args.random_model), "--batch-size", "8", "--n", "8", "--set", "rollout.max_new_tokens=32"]
    if case == "judge":
        train += ["--reward", "overlap:LatentReward"]
    if asynchronous:
        train += ["--set", "train.async_rollouts=1", "--set", "algorithm.mismatch_correction=token"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE),
           "TOKALIGN_BENCH_LATENCY": str(args.latency)}
    subprocess.run([sys.executable, "-m", "tokalign", *train], check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/step_s"] for r in rows][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency", type=float, default=0.005, help="seconds per scored sample in the judge case")
    p.add_argument("--cases", nargs="+", default=["quickstart", "compute", "judge"], choices=["quickstart", "compute", "judge"])
    args = p.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        from tokalign.tiny import make_random

        args.random_model = make_random(Path(tmp) / "random-tiny", seed=0)
        for case in args.cases:
            rounds = []
            for r in range(args.rounds):
                sync = statistics.median(run(case, False, Path(tmp) / f"{case}-sync-{r}", args))
                over = statistics.median(run(case, True, Path(tmp) / f"{case}-async-{r}", args))
                rounds.append({"sync_s": sync, "async_s": over, "ratio": over / sync})
                print(f"{case} round {r + 1}: sync {sync:.3f} s/step, async_rollouts=1 {over:.3f} s/step: {over / sync:.2f}×", file=sys.stderr)
            res[case] = {"ratio": statistics.median(x["ratio"] for x in rounds), "rounds": rounds}
    print(f"online GRPO, median step time of {args.steps - 1} steps per run (first dropped), median of {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("| case | sync s/step | async_rollouts=1 s/step | async / sync |")
    print("|---|---|---|---|")
    for case, r in res.items():
        sync = statistics.median(x["sync_s"] for x in r["rounds"])
        over = statistics.median(x["async_s"] for x in r["rounds"])
        print(f"| {case} | {sync:.3f} | {over:.3f} | {r['ratio']:.2f}× |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
