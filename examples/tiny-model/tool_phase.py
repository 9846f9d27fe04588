"""The bundled model's second phase: teach it the calculator tool-call format (``tool_arith``), keeping its arith.

After the arith SFT (``make.py``'s first phase), two SFT runs with the real CLI:

1. **The tool mix** (``--tool-steps``, lr 2e-3, batch 64, 100 warmup steps, packed), on

   * every ``tool_arith`` train record's trace — ``[assistant <tool_call>{"name":"calculator",
     "arguments":{"expression":"a*b"}}</tool_call>, tool result, assistant answer]``, trained on the assistant turns
     only (20,000 distinct products, so the copy of the result generalises instead of being memorised);
   * the same prompts once more with a **direct answer** (the product, no call; ``--tool-direct`` of them): the
     model sees both ways to answer equally often, so it calls the tool on about half the prompts — a decision that
     online RL with the calculator then learns to make (the direct answers of a 1M-parameter model to four-digit
     products are wrong, so only a call earns the reward);
   * two of the start model's **own** samples per arith train prompt (temperature 1): keeps the arith skill from
     drifting far while the tool format is learnt.

2. **A short repair** (``--tool-repair-steps``, lr 1e-3, batch 128, no warmup), on gold arith answers and tool rows
   (half traces, half direct answers) 50/50: the tool mix costs arith accuracy (0.44 → 0.29 measured); a few steps
   of gold sums bring it back into make.py's band while the tool skill holds.

Then tool_arith pass@1 with ``--env calculator`` is checked against ``[--tool-low, --tool-high]`` and arith against
make.py's band; out of band is a warning (the run is deterministic, so the numbers are in the model card).

Measured on 2 CPU cores (from the shipped arith model; examples/tiny-model/README.md has the table): after the
mix, tool_arith pass@1 0.40 with 0.51 calls per episode and arith 0.29; after 4 repair steps 0.45 / 0.57 calls /
arith 0.50; then ``tokalign train grpo --data tool_arith --env calculator`` with the shipped defaults (40 steps) →
0.77 with 0.96 calls, and the same run without the tool 0.00 → 0.00. Earlier schedules (3,000 traces, the model's
own samples only, chunked) learnt the call format but not the copy of the result, or lost the arith skill.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOOL_FLAGS = ("--env", "calculator", "--max-turns", "2", "--max-new-tokens", "96")


def add_args(p) -> None:
    g = p.add_argument_group("tool phase (tool_arith)")
    g.add_argument("--no-tool-phase", dest="tool_phase", action="store_false",
                   help="Ship the arith-only model (no calculator tool-call skill).")
    g.add_argument("--tool-direct", type=float, default=1.0,
                   help="Share of the tool_arith prompts that appear a second time with a direct answer (no call).")
    g.add_argument("--tool-steps", type=int, default=2000, help="SFT steps on the tool mix.")
    g.add_argument("--tool-batch-size", type=int, default=64)
    g.add_argument("--tool-repair-steps", type=int, default=4, help="SFT steps on gold arith + tool rows afterwards.")
    g.add_argument("--tool-low", type=float, default=0.20, help="Warn unless tool_arith pass@1 (with the calculator) ≥ low …")
    g.add_argument("--tool-high", type=float, default=0.60, help="… and ≤ high.")
    g.add_argument("--tool-eval-limit", type=int, default=100, help="tool_arith test prompts per eval.")


def _write(rows: list[dict], path: Path, seed: int) -> Path:
    random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _direct(record: dict) -> dict:
    return {"prompt": record["prompt"], "completion": [{"role": "assistant", "content": record["reference"]}]}


def mix(start: Path, work: Path, a, cli) -> Path:
    """The tool-mix SFT file: every trace, direct answers, and the start model's own arith samples, shuffled."""
    from tokalign import artifacts
    from tokalign.data.tool_arith import ToolArith
    from tokalign.rows import loads

    prompts, replay = work / "replay-prompts", work / "replay"
    cli("prepare", "arith", "--split", "train", "--model", str(start), "--out", str(prompts), "--overwrite")
    cli("rollout", str(prompts), "--model", str(start), "--n", "2", "--temperature", "1.0", "--max-new-tokens", "8",
        "--seed", str(a.seed), "--out", str(replay), "--overwrite")
    own = [{"prompt": loads(r["prompt"]), "completion": r["completion"]} for r in artifacts.read(replay, ["rollouts"]).rows()]
    records = ToolArith().records("train")
    traces = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    rng = random.Random(a.seed + 7)
    direct = [_direct(r) for r in records if rng.random() < a.tool_direct]
    return _write(own + traces + direct, work / "tool-sft.jsonl", a.seed)


def repair_mix(work: Path, a) -> Path:
    """Gold arith answers and as many tool rows (each a trace or a direct answer, even odds), shuffled."""
    from tokalign.data.arith import Arith
    from tokalign.data.tool_arith import ToolArith

    gold = [{"prompt": r["prompt"], "completion": r["completion"]} for r in Arith().records("train")]
    rng = random.Random(a.seed + 11)
    tool = [{"prompt": r["prompt"], "completion": r["completion"]} if rng.random() < 0.5 else _direct(r)
            for r in rng.sample(ToolArith().records("train"), len(gold))]
    return _write(gold + tool, work / "tool-repair.jsonl", a.seed + 1)


def evaluate_tool(model: Path, out: Path, a, cli, env: bool = True) -> dict:
    flags = TOOL_FLAGS if env else TOOL_FLAGS[2:]
    cli("eval", "--model", str(model), "--data", "tool_arith", "--limit", str(a.tool_eval_limit), "--n", "4", "--temperature", "1.0",
        "--seed", str(a.seed), *flags, "--out", str(out), "--overwrite", "--quiet")
    return json.loads((out / "results.json").read_text())


def _sft(cli, data: Path, model: Path, out: Path, steps: int, lr: float, batch: int, seed: int, warmup: int) -> None:
    cli("train", "sft", "--data", str(data), "--model", str(model), "--out", str(out), "--overwrite", "--quiet",
        "--max-steps", str(steps), "--lr", str(lr), "--batch-size", str(batch), "--seed", str(seed),
        "--set", f"train.warmup_steps={min(warmup, steps)}", "--set", "train.save_every=0", "--set", "train.packing=true")


def run(start: Path, work: Path, a, cli, log) -> tuple[Path, list]:
    """(the tool-phase model, history [(stage, tool_arith pass@1, calls per episode)])."""
    mixed, repaired = work / f"tool-sft-{a.tool_steps:05d}", work / f"tool-repair-{a.tool_repair_steps:03d}"
    _sft(cli, mix(start, work, a, cli), start, mixed, a.tool_steps, 2e-3, a.tool_batch_size, a.seed + 100, 100)
    history = []
    res = evaluate_tool(mixed, work / "eval-tool-mix", a, cli)
    history.append((f"tool mix, {a.tool_steps} steps", res["pass@1"], res["mean_tool_calls"]))
    log(f"tool mix: {a.tool_steps} steps, tool_arith pass@1 {res['pass@1']:.3f}, {res['mean_tool_calls']:.2f} calls per episode")
    _sft(cli, repair_mix(work, a), mixed, repaired, a.tool_repair_steps, 1e-3, 128, a.seed + 200, 0)
    res = evaluate_tool(repaired, work / "eval-tool-repair", a, cli)
    history.append((f"+ repair, {a.tool_repair_steps} steps", res["pass@1"], res["mean_tool_calls"]))
    log(f"repair: {a.tool_repair_steps} steps, tool_arith pass@1 {res['pass@1']:.3f}, {res['mean_tool_calls']:.2f} calls per episode")
    if not a.tool_low <= res["pass@1"] <= a.tool_high:
        log(f"warning: tool_arith pass@1 {res['pass@1']:.3f} is outside [{a.tool_low}, {a.tool_high}]")
    return repaired, history
