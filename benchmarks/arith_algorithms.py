"""Same budget, every online algorithm that fits `arith`: pass@1 on held-out `arith` before and after, through the real CLI.

Each online algorithm trains for --steps steps of 128 samples (16 prompts × 8; methods that sample pairs, 64 × 2) on
the bundled model with its recommended settings and exact_match as the reward; TDPO2 (token-level preference) trains
for the same number of steps on on-policy pairs (best vs worst of each group) formed from one rollout of the base
model over the same prompts. The algorithms left out, and why, are in SKIPPED. Usage:

    python benchmarks/arith_algorithms.py [--steps 40] [--seed 0] [--out runs/bench-arith] [--only grpo,dapo]

Prints a markdown table and writes it, with the raw numbers, to <out>/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

# algorithm -> its extra flags (beyond --data arith --n 8 --batch-size 16)
ONLINE: dict[str, list[str]] = {
    **{a: [] for a in ("grpo", "dapo", "dr_grpo", "dcpo", "bnpo", "rec", "opmd", "tempo", "gtpo", "hapo", "rloo",
                       "reinforce_pp_baseline", "reinforce_pp", "gspo", "ppo", "remax", "sspo", "prime", "thr", "thor",
                       "salt", "poad", "cispo", "steer", "rrhf", "reinforce_ada", "dars", "grpo_lambda", "par", "hicra",
                       "spo", "xrpo", "grao")},
    "p3o": ["--n", "2", "--batch-size", "64"],  # pairs: 64 prompts × 2, the same 128 samples per step
    "grpo_s": [],
    # length methods with budgets at arith's scale (completions of 2–4 tokens; their defaults are for long CoT)
    "e1": ["--set", "algorithm.effort=1.0"],
    "length_curriculum": ["--set", "algorithm.initial_budget=4", "--set", "algorithm.decay_interval=10"],
    "tldr": ["--set", "algorithm.budgets=[2,3,4]"],
    "d3s": [],
    "aepo": [],
    # arith completions hold no paragraphs: an episode boundary every 2 tokens, 2 forced answers per boundary
    "mrt": ["--set", "algorithm.boundary=tokens", "--set", "algorithm.episode_tokens=2", "--set", "algorithm.rollouts=2"],
    # budgets (2, 16): every 3–4-token answer is cut after 2 tokens and summarised there
    "brpo": ["--set", "algorithm.budgets=[2,16]"],
    # windows of 2 tokens, so answers span two steps (with the default 16 every answer finishes in one: PPO)
    "tppo": ["--set", "rollout.max_new_tokens=2"],
}
SKIPPED = {
    "pure": "needs a process reward model (per-step rewards); exact_match gives one outcome reward",
    "constrained": "needs constraint rewards with thresholds; arith has one objective",
    "dynamic_weights": "adapts weights between several reward objectives; arith has one",
    "rto": "needs a DPO-trained model for its token rewards",
    "arpo": "a tool-use method (branches after tool calls): multi-turn, see the multi-turn benchmarks",
    "portool": "a tool-use method (tool-call trees): multi-turn",
    "prm": "trains a process reward model, not a policy",
    "ada_grpo": "scales rewards by reasoning-format tags (<ANSWER>, <COT>, …) the bundled model never writes: on arith "
                "every completion is 'other', so it is GRPO exactly",
    "adacot": "penalises think-block decisions the bundled model never makes (no <think> tags): a constant format "
              "penalty, which the group advantage removes, so it is GRPO exactly",
    "adacot_ppo": "as adacot, on PPO: the constant penalty only shifts PPO's returns",
    "sapo_swarm": "shares rollouts between nodes: alone (no swarm directory) it is GRPO with ε_high 0.28",
    "inpo": "offline pairs labelled by a preference oracle (rollout → score judge_preference → train): needs a judge server",
}


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
    p.add_argument("--only", default="", help="comma-separated algorithms (default: all of ONLINE that are installed, and tdpo)")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--max-steps", str(args.steps), "--batch-size", "16", "--seed", str(args.seed), "--overwrite"]

    tokalign("prepare", "arith", "--split", "test", "--limit", "200", "--out", str(out / "test"))
    base = pass1(out / "eval-base", None, out / "test", args.seed)
    rows = []
    installed = installed_algorithms()
    for algo, extra in ONLINE.items():
        if algo not in installed or (only and algo not in only):
            continue
        flags = ["--data", "arith", "--n", "8", *common, *extra]  # later flags win: extra overrides --n / --batch-size
        shape = "64 prompts × 2" if "--n" in extra else "16 prompts × 8"
        try:
            secs = tokalign("train", algo, *flags, "--out", str(out / algo))
            after = pass1(out / f"eval-{algo}", str(out / algo), out / "test", args.seed)
        except subprocess.CalledProcessError as e:  # one failing method is a row of the table, not the end of the run
            rows.append({"algorithm": algo, "data": f"online, {shape} / step", "train_s": 0.0, "after": None, "error": str(e)})
            print(f"{algo}: failed ({e})", flush=True)
            continue
        rows.append({"algorithm": algo, "data": f"online, {shape} / step", "train_s": secs, "after": after})
        print(f"{algo}: {base:.3f} -> {after:.3f} ({secs:.0f} s)", flush=True)
    if only and "tdpo" not in only:
        return _report(out, args, base, rows)
    # TDPO2 on on-policy pairs from the base model's rollouts over the same number of prompts
    tokalign("prepare", "arith", "--limit", str(16 * args.steps), "--out", str(out / "train-prompts"))
    tokalign("rollout", str(out / "train-prompts"), "--n", "8", "--seed", str(args.seed), "--out", str(out / "rollouts"))
    tokalign("score", str(out / "rollouts"), "--reward", "exact_match", "--out", str(out / "scored"))
    secs = tokalign("train", "tdpo", "--data", str(out / "scored"), *common, "--out", str(out / "tdpo"))
    rows.append({"algorithm": "tdpo (TDPO2)", "data": "pairs: best vs worst of 8 base-model samples", "train_s": secs,
                 "after": pass1(out / "eval-tdpo", str(out / "tdpo"), out / "test", args.seed)})

    _report(out, args, base, rows)


def _report(out: Path, args, base: float, rows: list[dict]) -> None:
    lines = [f"pass@1 (n=4, T=1.0) on 200 held-out arith prompts; {args.steps} steps each, seed {args.seed}; base model {base:.3f}",
             "", "| algorithm | data | pass@1 before | after | Δ points | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["after"] is None:
            lines.append(f"| {r['algorithm']} | {r['data']} | {base:.3f} | failed | | |")
            continue
        lines.append(f"| {r['algorithm']} | {r['data']} | {base:.3f} | {r['after']:.3f} | {100 * (r['after'] - base):+.1f} | {r['train_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"base": base, "steps": args.steps, "seed": args.seed, "runs": rows,
                                                  "skipped": SKIPPED}, indent=2))


if __name__ == "__main__":
    main()
