"""The bundled model's second phase: teach it the calculator tool-call format (``tool_arith``), keeping its arith.

After the arith SFT (``make.py``'s first phase), SFT with the real CLI on a mix of

* the first ``--tool-traces`` ``tool_arith`` train records' traces — ``[assistant <tool_call>{"name":"calculator",
  "arguments":{"expression":"a*b"}}</tool_call>, tool result, assistant answer]``, trained on the assistant turns only;
* as many of the model's **own** samples on arith train prompts (temperature 1, drawn once from the phase-1 model):
  training on its own answers leaves its arith distribution where phase 1 left it, so the arith band holds;

in chunks, evaluating after each on ``tool_arith`` test prompts **with the calculator** (``tokalign eval --env
calculator``), until pass@1 is inside a middle band: the format is learned, copying the operands into the call and the
result out of the tool's answer is not yet reliable — what online RL with the tool then improves.

**Experimental, off by default (``--tool-phase``)**: measured on 2 CPU cores, this mix learns the call format and the
operand copy within ~600 steps (100 % well-formed calls with the right expression) but not the copy of the result
into the answer: tool_arith pass@1 stayed ≤ 0.02 through 2,100 steps (lr 2e-3 then 1e-3 / 2e-3 chunks; the answers
keep the first and last digits and miss the middle ones; the arith replay seems to pull the answer turn toward
computing a sum). SFT on the traces alone learns it (pass@1 0.99 after ~1,150 steps) but destroys the arith skill
(pass@1 0.43 → 0.01, and a short replay chunk does not restore it). The shipped model is therefore still the
arith-only one.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

TOOL_FLAGS = ("--env", "calculator", "--max-turns", "2", "--max-new-tokens", "96")


def add_args(p) -> None:
    g = p.add_argument_group("tool phase (tool_arith)")
    g.add_argument("--tool-phase", action="store_true",
                   help="Experimental, off by default: also teach the calculator tool (see this module's docstring for "
                        "what it does not reach yet).")
    g.add_argument("--tool-traces", type=int, default=3000, help="tool_arith traces in the tool SFT mix.")
    g.add_argument("--tool-first-steps", type=int, default=500)
    g.add_argument("--tool-chunk-steps", type=int, default=100)
    g.add_argument("--tool-batch-size", type=int, default=64)
    g.add_argument("--tool-low", type=float, default=0.20, help="Stop once tool_arith pass@1 (with the calculator) ≥ low …")
    g.add_argument("--tool-high", type=float, default=0.55, help="… and ≤ high.")
    g.add_argument("--tool-eval-limit", type=int, default=100, help="tool_arith test prompts per eval.")
    g.add_argument("--tool-max-steps", type=int, default=3000)
    g.add_argument("--tool-chunk-lr", type=float, default=1e-3,
                   help="lr of the chunks after the first (each starts a fresh optimiser: a lower lr keeps the format stable).")
    g.add_argument("--tool-chunk-warmup", type=int, default=30)
    g.add_argument("--tool-resume", type=Path, default=None,
                   help="Continue the tool phase from this checkpoint of an earlier run's tool phase (with --tool-resume-steps).")
    g.add_argument("--tool-resume-steps", type=int, default=0, help="The tool SFT steps --tool-resume already had.")


def mix(start: Path, work: Path, a, cli) -> Path:
    """The SFT file: tool traces and the start model's own arith samples, shuffled."""
    from tokalign import artifacts
    from tokalign.data.tool_arith import ToolArith
    from tokalign.rows import loads

    prompts, replay = work / "replay-prompts", work / "replay"
    cli("prepare", "arith", "--split", "train", "--limit", str(a.tool_traces), "--model", str(start), "--out", str(prompts), "--overwrite")
    cli("rollout", str(prompts), "--model", str(start), "--n", "1", "--temperature", "1.0", "--max-new-tokens", "8",
        "--seed", str(a.seed), "--out", str(replay), "--overwrite")
    own = [{"prompt": loads(r["prompt"]), "completion": r["completion"]} for r in artifacts.read(replay, ["rollouts"]).rows()]
    traces = [{"prompt": r["prompt"], "completion": r["completion"]} for r in ToolArith().records("train")[: a.tool_traces]]
    rows = own + traces
    random.Random(a.seed).shuffle(rows)
    path = work / "tool-sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate_tool(model: Path, out: Path, a, cli, env: bool = True) -> dict:
    flags = TOOL_FLAGS if env else TOOL_FLAGS[4:]
    cli("eval", "--model", str(model), "--data", "tool_arith", "--limit", str(a.tool_eval_limit), "--n", "4", "--temperature", "1.0",
        "--seed", str(a.seed), *flags, "--out", str(out), "--overwrite", "--quiet")
    return json.loads((out / "results.json").read_text())


def run(start: Path, work: Path, a, cli, log) -> tuple[Path, list, tuple]:
    """(chosen checkpoint, history [(steps, pass@1)], (steps, pass@1))."""
    data = mix(start, work, a, cli)
    current, total, chunk, history, chosen = start, 0, 0, [], None
    steps = a.tool_first_steps
    if a.tool_resume is not None:
        current, total, chunk, steps = a.tool_resume.resolve(), a.tool_resume_steps, 1, a.tool_chunk_steps
        score = evaluate_tool(current, work / f"eval-tool-{total:05d}", a, cli)["pass@1"]
        history.append((total, score))
        log(f"tool phase resumed from {current} ({total} steps): tool_arith pass@1 {score:.3f}")
    while total < a.tool_max_steps:
        ckpt = work / f"tool-sft-{total + steps:05d}"
        t0 = time.time()
        lr, warmup = (a.lr, a.chunk_warmup) if chunk == 0 else (a.tool_chunk_lr, a.tool_chunk_warmup)
        cli("train", "sft", "--data", str(data), "--model", str(current), "--out", str(ckpt), "--overwrite", "--quiet",
            "--max-steps", str(steps), "--lr", str(lr), "--batch-size", str(a.tool_batch_size), "--seed", str(a.seed + 100 + chunk),
            "--set", f"train.warmup_steps={min(warmup, steps)}", "--set", "train.save_every=0", "--set", "train.packing=true")
        score = evaluate_tool(ckpt, work / f"eval-tool-{total + steps:05d}", a, cli)["pass@1"]
        log(f"tool SFT steps {total}+{steps} = {total + steps}: tool_arith pass@1 {score:.3f}  ({time.time() - t0:.0f} s)")
        if score > a.tool_high and steps > a.min_chunk_steps:
            steps = max(a.min_chunk_steps, steps // 2)
            log(f"overshot the band ({score:.3f} > {a.tool_high}); redoing this chunk with {steps} steps")
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        history.append((total + steps, score))
        current, total, chunk = ckpt, total + steps, chunk + 1
        if score >= a.tool_low:
            chosen = (total, score)
            break
        steps = max(a.min_chunk_steps, a.tool_chunk_steps // (2 if score > 0.5 * a.tool_low else 1))
    if chosen is None:
        raise SystemExit(f"tool_arith pass@1 never reached {a.tool_low} within {a.tool_max_steps} SFT steps; see {work}")
    return current, history, chosen
