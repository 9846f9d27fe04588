"""Same budget, several algorithms: pass@1 on held-out `arith` before and after, through the real CLI.

Online RL (GRPO, DAPO, Dr.GRPO, DCPO when installed) trains for --steps steps of 16 prompts × 8
samples on the bundled model; TDPO2 (token-level preference) trains for the same number of steps on
on-policy pairs (best vs worst of each group) formed from one rollout of the base model over the
same prompts. Every run uses the model's recommended settings otherwise. Usage:

    python benchmarks/arith_algorithms.py [--steps 40] [--seed 0] [--out runs/bench-arith]

Prints a markdown table and writes it, with the raw numbers, to <out>/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

ONLINE = ("grpo", "dapo", "dr_grpo", "dcpo")


def tokalign(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["tokalign", *args, "--quiet"] if args[0] in ("train", "eval") else ["tokalign", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def pass1(out: Path, model: str | None, test: Path, seed: int) -> float:
    tokalign("eval", *(["--model", model] if model else []), "--data", str(test), "--n", "4", "--seed", str(seed),
             "--out", str(out), "--overwrite")
    return json.loads((out / "results.json").read_text())["pass@1"]


def installed_algorithms() -> set[str]:
    out = subprocess.run(["tokalign", "plugins", "--names", "algorithm"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-arith")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--max-steps", str(args.steps), "--batch-size", "16", "--seed", str(args.seed), "--overwrite"]

    tokalign("prepare", "arith", "--split", "test", "--limit", "200", "--out", str(out / "test"))
    base = pass1(out / "eval-base", None, out / "test", args.seed)
    rows = []
    for algo in [a for a in ONLINE if a in installed_algorithms()]:
        secs = tokalign("train", algo, "--data", "arith", "--n", "8", *common, "--out", str(out / algo))
        rows.append({"algorithm": algo, "data": "online, 16 prompts × 8 / step", "train_s": secs,
                     "after": pass1(out / f"eval-{algo}", str(out / algo), out / "test", args.seed)})
    # TDPO2 on on-policy pairs from the base model's rollouts over the same number of prompts
    tokalign("prepare", "arith", "--limit", str(16 * args.steps), "--out", str(out / "train-prompts"))
    tokalign("rollout", str(out / "train-prompts"), "--n", "8", "--seed", str(args.seed), "--out", str(out / "rollouts"))
    tokalign("score", str(out / "rollouts"), "--reward", "exact_match", "--out", str(out / "scored"))
    secs = tokalign("train", "tdpo", "--data", str(out / "scored"), *common, "--out", str(out / "tdpo"))
    rows.append({"algorithm": "tdpo (TDPO2)", "data": "pairs: best vs worst of 8 base-model samples", "train_s": secs,
                 "after": pass1(out / "eval-tdpo", str(out / "tdpo"), out / "test", args.seed)})

    lines = [f"pass@1 (n=4, T=1.0) on 200 held-out arith prompts; {args.steps} steps each, seed {args.seed}; base model {base:.3f}",
             "", "| algorithm | data | pass@1 before | after | Δ points | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['data']} | {base:.3f} | {r['after']:.3f} | {100 * (r['after'] - base):+.1f} | {r['train_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"base": base, "steps": args.steps, "seed": args.seed, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
