"""CLI start-up: wall time of ``tokalign --help`` and ``tokalign train --help`` vs ``trl --help`` (and ``trl dpo --help``).

Each command runs --runs times as a fresh subprocess (stdout/stderr discarded, ``COLUMNS=100`` so the
help is rendered the same way each time) after one untimed run of each (warm file cache); the runs of
the commands are interleaved so load changes hit all of them alike. Reported: the median wall time
per command and the ratio tokalign / ``trl --help`` (< 1 means tokalign is faster). The console
scripts are taken from the running interpreter's bin directory (both are installed in the dev venv).
Usage:

    python benchmarks/help_latency.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    bin_dir = Path(sys.executable).parent
    commands = {
        "tokalign --help": [str(bin_dir / "tokalign"), "--help"],
        "tokalign train --help": [str(bin_dir / "tokalign"), "train", "--help"],
        "trl --help": [str(bin_dir / "trl"), "--help"],
        "trl dpo --help": [str(bin_dir / "trl"), "dpo", "--help"],
    }
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    for name, cmd in commands.items():
        if not Path(cmd[0]).exists():
            sys.exit(f"{cmd[0]} not found: run with the interpreter of a venv that has tokalign and trl installed")
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
            times[name].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["trl --help"]
    print(f"median of {args.runs} runs each; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| command | median s | min s | / trl --help |")
    print("|---|---|---|---|")
    for name in commands:
        print(f"| `{name}` | {med[name]:.3f} | {min(times[name]):.3f} | {med[name] / base:.2f}× |")
    print(json.dumps({"load": [load0[0], load1[0]], **med}))


if __name__ == "__main__":
    main()
