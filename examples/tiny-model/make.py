#!/usr/bin/env python
"""Rebuild tokalign's bundled default model, ``tokalign/assets/tiny-arith``.

A ~1M-parameter Qwen2 (tokalign.tiny) with its own byte-level BPE tokenizer and chat template,
SFT-trained on the built-in ``arith`` task (two-digit addition) until its sampled pass@1 lands in a
*middle* band (default 0.40–0.60): good enough that RL gets a learning signal from every batch, bad
enough that online GRPO visibly improves it within a few CPU minutes.

Everything goes through the real CLI (``tokalign train sft`` / ``tokalign eval``), in chunks:

1. build the tokenizer and a seeded random model with ``tokalign.tiny``;
2. SFT ``--first-steps`` steps from scratch (warmup, then constant lr);
3. eval (temperature 1.0, n=4, exact match, the 500-prompt test split);
4. below the band: SFT another ``--chunk-steps`` from the previous checkpoint (fresh optimiser,
   short warmup, a new data seed per chunk) and eval again;
   above the band (SFT accuracy has a sharp phase transition): drop that chunk and redo it from
   the previous checkpoint with half as many steps;
5. the tool phase (``tool_phase.py``; ``--no-tool-phase`` skips it): SFT on ``tool_arith`` calculator traces, direct
   answers and the model's own arith samples, then a few steps of gold arith, so the model calls the calculator on
   about half of the four-digit products and keeps its arith in the band;
6. copy the chosen checkpoint's model files to ``--out`` and write ``tokalign.yaml`` (recommended
   training defaults for this model) and ``README.md`` (model card).

Deterministic for a given --seed on a given machine/thread count (it is CPU float math, so a
different BLAS thread count can move the phase transition by a few steps; the band stop absorbs that).

    python examples/tiny-model/make.py                      # writes tokalign/assets/tiny-arith
    python examples/tiny-model/make.py --out /tmp/tiny --work /tmp/tiny-work
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tool_phase  # noqa: E402  (the second phase, beside this script)

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")

# Recommended settings shipped with the model (tokalign.yaml). Measured: see README.md in the
# output dir and examples/tiny-model/README.md.
RECOMMENDED = {
    "train": {"lr": 1e-4, "batch_size": 16, "max_steps": 60},
    "rollout": {"n": 8, "max_new_tokens": 8, "temperature": 1.0},
    # `--data tool_arith` (with `--env calculator`): a tool call is ~60 tokens, and an episode is call, result, answer
    "tasks": {"tool_arith": {"train": {"lr": 1e-4, "batch_size": 16, "max_steps": 40},
                             "rollout": {"max_new_tokens": 96, "max_turns": 2}}},
}


def log(msg: str) -> None:
    print(f"[make {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "tokalign", *args]
    log("$ tokalign " + " ".join(args))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def sft(model: Path, out: Path, steps: int, seed: int, a) -> None:
    warmup = a.warmup if model.name == "random" else a.chunk_warmup
    cli("train", "sft", "--data", "arith", "--model", str(model), "--out", str(out), "--overwrite", "--quiet",
        "--max-steps", str(steps), "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--seed", str(seed),
        "--set", f"train.warmup_steps={min(warmup, steps)}", "--set", "train.save_every=0")


def evaluate(model: Path, prompts: Path, out: Path, a) -> float:
    cli("eval", "--model", str(model), "--data", str(prompts), "--verifier", "exact_match", "--n", str(a.eval_n),
        "--max-new-tokens", "8", "--temperature", "1.0", "--seed", str(a.seed), "--out", str(out), "--overwrite", "--quiet")
    return float(json.loads((out / "results.json").read_text())["pass@1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "tokalign" / "assets" / "tiny-arith")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "tiny-model-work", help="Scratch dir for checkpoints and evals.")
    p.add_argument("--seed", type=int, default=0, help="Model init + data order (chunk i uses seed + i).")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=100, help="Warmup steps of the first chunk.")
    p.add_argument("--chunk-warmup", type=int, default=10, help="Warmup steps of each later chunk (fresh optimiser).")
    p.add_argument("--first-steps", type=int, default=200)
    p.add_argument("--chunk-steps", type=int, default=25)
    p.add_argument("--min-chunk-steps", type=int, default=3)
    p.add_argument("--max-total-steps", type=int, default=2000)
    p.add_argument("--low", type=float, default=0.40, help="Stop once pass@1 ≥ low …")
    p.add_argument("--high", type=float, default=0.60, help="… and ≤ high.")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-limit", type=int, default=0, help="0 = the whole split (500 test prompts).")
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--no-grpo-check", dest="grpo_check", action="store_false",
                   help="Skip the final check: `tokalign train grpo --data arith` with the shipped tokalign.yaml, then eval.")
    p.add_argument("--start-from", type=Path, default=None,
                   help="Skip the arith phase: take this model (e.g. a previous run's arith checkpoint) as its result.")
    tool_phase.add_args(p)
    a = p.parse_args()

    t_start = time.time()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from tokalign import tiny

    random_dir = work / "random"
    tok = tiny.build_tokenizer(seed=0)
    model = tiny.build_model(tok, seed=a.seed)
    tiny.save(model, tok, random_dir)
    n_params = sum(p_.numel() for p_ in model.parameters())
    log(f"random model: {n_params:,} params, vocab {len(tok)} -> {random_dir}")

    prompts = work / "eval-prompts"
    prep = ["prepare", "arith", "--split", a.eval_split, "--out", str(prompts), "--model", str(random_dir), "--overwrite"]
    cli(*prep, *(["--limit", str(a.eval_limit)] if a.eval_limit else []))

    history = []  # (total_steps, pass@1, checkpoint)
    current, total, chunk_idx, chosen = random_dir, 0, 0, None
    steps = a.first_steps
    if a.start_from is not None:  # the arith phase's result is given
        current = a.start_from.resolve()
        chosen = (None, evaluate(current, prompts, work / "eval-start", a))
        log(f"arith phase skipped: {current}, pass@1 {chosen[1]:.3f}")
    while chosen is None and total < a.max_total_steps:
        ckpt = work / f"sft-{total + steps:05d}"
        t0 = time.time()
        sft(current, ckpt, steps, a.seed + chunk_idx, a)
        score = evaluate(ckpt, prompts, work / f"eval-{total + steps:05d}", a)
        log(f"SFT steps {total}+{steps} = {total + steps}: pass@1 {score:.3f}  ({time.time() - t0:.0f} s)")
        if score > a.high and steps > a.min_chunk_steps:
            steps = max(a.min_chunk_steps, steps // 2)
            log(f"overshot the band ({score:.3f} > {a.high}); redoing this chunk with {steps} steps")
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        history.append((total + steps, score, ckpt.name))
        current, total, chunk_idx = ckpt, total + steps, chunk_idx + 1
        if score >= a.low:
            chosen = (total, score)
            break
        if score > 0.8 * a.low:  # close to the transition: smaller chunks
            steps = max(a.min_chunk_steps, a.chunk_steps // 2)
        else:
            steps = a.chunk_steps
    if chosen is None:
        sys.exit(f"pass@1 never reached {a.low} within {a.max_total_steps} SFT steps; see {work}")
    if chosen[1] > a.high:
        log(f"warning: pass@1 {chosen[1]:.3f} is above the band even at the smallest chunk")
    tools = None
    if a.tool_phase:  # the calculator tool-call skill (tool_arith): see tool_phase's docstring
        arith_ckpt = current
        current, tool_history = tool_phase.run(arith_ckpt, work, a, cli, log)
        arith_after = evaluate(current, prompts, work / "eval-after-tools", a)
        log(f"after the tool phase: arith pass@1 {chosen[1]:.3f} -> {arith_after:.3f}")
        if not a.low <= arith_after <= a.high:
            log(f"warning: arith pass@1 {arith_after:.3f} left the band [{a.low}, {a.high}] in the tool phase")
        tools = {"history": tool_history, "arith_before": chosen[1]}
        chosen = (chosen[0], arith_after)

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, "tokalign.yaml", "README.md", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)  # replace the previous model, touch nothing else
    for name in MODEL_FILES:
        shutil.copy(current / name, out / name)
        (out / name).chmod(0o644)  # save_pretrained writes safetensors 0600; this is a package asset
    (out / "tokalign.yaml").write_text(yaml_text(RECOMMENDED))
    wall = time.time() - t_start
    grpo = None
    if a.grpo_check:  # what a user gets from the shipped defaults (the output dir is the model)
        t0 = time.time()
        cli("train", "grpo", "--data", "arith", "--model", str(out), "--out", str(work / "grpo-check"), "--seed", str(a.seed),
            "--overwrite", "--quiet")
        grpo_wall = time.time() - t0
        after = evaluate(work / "grpo-check", prompts, work / "eval-grpo-check", a)
        grpo = (chosen[1], after, grpo_wall)
        log(f"GRPO check: pass@1 {chosen[1]:.3f} -> {after:.3f} ({grpo_wall:.0f} s incl. startup)")
        if tools is not None:
            tools["grpo"] = tool_grpo_check(out, work, a)
    (out / "README.md").write_text(model_card(a, n_params, len(tok), chosen, history, wall, grpo, tools))
    for name in ("tokalign.yaml", "README.md"):
        (out / name).chmod(0o644)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"done in {wall:.0f} s: {total} SFT steps, pass@1 {chosen[1]:.3f} -> {out} ({size / 1e6:.1f} MB)")


def tool_grpo_check(out: Path, work: Path, a) -> dict:
    """GRPO on tool_arith with the calculator, and the same run without it (eval with and without the tool)."""
    before = tool_phase.evaluate_tool(out, work / "eval-tool-before", a, cli)
    res = {"before": before["pass@1"], "calls_before": before["mean_tool_calls"],
           "before_no_tool": tool_phase.evaluate_tool(out, work / "eval-tool-before-notool", a, cli, env=False)["pass@1"]}
    for name, env in (("tool", ("--env", "calculator")), ("no_tool", ())):
        t0 = time.time()
        cli("train", "grpo", "--data", "tool_arith", *env, "--model", str(out), "--out", str(work / f"grpo-{name}"),
            "--seed", str(a.seed), "--overwrite", "--quiet")
        res[f"wall_{name}"] = time.time() - t0
        after = tool_phase.evaluate_tool(work / f"grpo-{name}", work / f"eval-grpo-{name}", a, cli, env=bool(env))
        res[f"after_{name}"] = after["pass@1"]
        if env:
            res["calls_after"] = after["mean_tool_calls"]
    log(f"tool GRPO check: with the calculator {res['before']:.3f} -> {res['after_tool']:.3f} ({res['wall_tool']:.0f} s); "
        f"without it {res['before_no_tool']:.3f} -> {res['after_no_tool']:.3f} ({res['wall_no_tool']:.0f} s)")
    return res


def yaml_text(d: dict) -> str:
    import yaml

    head = ("# Recommended tokalign settings for this model (override tokalign's defaults; your --config,\n"
            "# flags and --set override these). Tuned for `tokalign train grpo --data arith` on 2 CPU cores.\n")
    return head + yaml.safe_dump(d, sort_keys=False)


def tool_card(a, tools) -> str:
    if tools is None:
        return ""
    rows = "\n".join(f"| {stage} | {sc:.3f} | {calls:.2f} |" for stage, sc, calls in tools["history"])
    t = RECOMMENDED["tasks"]["tool_arith"]
    g = tools.get("grpo")
    grpo = "" if g is None else (
        f"- `tokalign train grpo --data tool_arith --env calculator --seed {a.seed}` with these defaults "
        f"({t['train']['max_steps']} steps × {t['train']['batch_size']} prompts, lr {t['train']['lr']}) took "
        f"{g['wall_tool']:.0f} s and moved tool_arith pass@1 (with the calculator) **{g['before']:.3f} → "
        f"{g['after_tool']:.3f}**, calls per episode {g['calls_before']:.2f} → {g['calls_after']:.2f}; the same run "
        f"without the tool (`--env` dropped, eval without it too): **{g['before_no_tool']:.3f} → {g['after_no_tool']:.3f}** "
        f"({g['wall_no_tool']:.0f} s)\n")
    return f"""
## The calculator tool (`tool_arith`)

It also knows the Hermes tool-call format: on `a*b=` (four-digit products, the `tool_arith` task) it writes
`<tool_call>{{"name":"calculator","arguments":{{"expression":"a*b"}}}}</tool_call>` on about half the prompts, and
after the calculator's answer it copies the result; on the others it answers directly (and wrongly: a 1M-parameter
model cannot multiply four-digit numbers). Online RL with `--env calculator` learns to call. The phase: SFT
{a.tool_steps} steps on every `tool_arith` train trace, the same prompts with direct answers and two of the model's own
samples per arith train prompt (assistant turns only), then {a.tool_repair_steps} steps of gold arith and tool rows
50/50 (arith pass@1 {tools['arith_before']:.3f} before the phase). tool_arith evals: {a.tool_eval_limit} test prompts,
n=4, temperature 1, `--env calculator --max-turns 2 --max-new-tokens 96`:

| stage | tool_arith pass@1 | tool calls per episode |
|---|---|---|
{rows}

{grpo}"""


def model_card(a, n_params: int, vocab: int, chosen, history, wall: float, grpo, tools=None) -> str:
    rows = "\n".join(f"| {s} | {sc:.3f} |" for s, sc, _ in history) or "| (arith phase taken from --start-from) | |"
    r = RECOMMENDED
    grpo_line = "" if grpo is None else (
        f"- `tokalign train grpo --data arith --seed {a.seed}` with these defaults ({r['train']['max_steps']} steps × "
        f"{r['train']['batch_size']} prompts × {r['rollout']['n']} samples, lr {r['train']['lr']}) took {grpo[2]:.0f} s "
        f"(process start included) and moved pass@1 (same eval) **{grpo[0]:.3f} → {grpo[1]:.3f}**\n")
    cmd = " ".join(["python examples/tiny-model/make.py", *sys.argv[1:]])
    return f"""# tiny-arith — tokalign's bundled default model

A {n_params / 1e6:.2f}M-parameter Qwen2 causal LM (hidden 128, 4 layers, 4 heads × head_dim 32, 2 KV heads,
tied embeddings, fp32) with its own byte-level BPE tokenizer (vocab {vocab}, one token per digit) and a
ChatML-style chat template. Built by `tokalign.tiny` from scratch, no downloaded weights or data.

It is deliberately **half-trained**: SFT on tokalign's built-in `arith` task (two-digit addition,
`[{{"role": "user", "content": "12+34="}}]` → `46`) was stopped inside a middle accuracy band, so that
online RL on it shows a clear improvement within minutes on a laptop CPU. It is a test/demo fixture,
not a useful model.

- SFT steps: **{chosen[0] if chosen[0] is not None else "(from --start-from)"}** (batch {a.batch_size}, lr {a.lr}, AdamW, seed {a.seed})
- pass@1 on the `arith` test split ({'all 500' if not a.eval_limit else a.eval_limit} prompts, temperature 1.0, n={a.eval_n},
  exact match, `--max-new-tokens 8`): **{chosen[1]:.3f}**
- recommended training settings: `tokalign.yaml` (read by `tokalign train` and `tokalign eval` for this model)
{grpo_line}
## How it was made

```
{cmd}
```

(wall time {wall:.0f} s before the GRPO check, on 2 shared CPU cores). The script builds the seeded random model, then runs the real CLI in chunks,
`tokalign train sft --data arith --model <previous> --max-steps <k> --lr {a.lr} --batch-size {a.batch_size} --seed <seed+i>`,
evaluating after each chunk with `tokalign eval --verifier exact_match --n {a.eval_n} --max-new-tokens 8`
and stopping once pass@1 ∈ [{a.low}, {a.high}]. Chunks kept:

| SFT steps | pass@1 |
|---|---|
{rows}

## Try RL on it

```
tokalign prepare arith --split test --limit 200 --out P
tokalign eval --data P --n 4 --out E0                 # the bundled model is the default --model
tokalign train grpo --data arith --out G              # settings from tokalign.yaml
tokalign eval --model G --data P --n 4 --out E1       # G carries tokalign.yaml too
```
{tool_card(a, tools)}"""


if __name__ == "__main__":
    main()
