from __future__ import annotations

from typing import List, Optional

import typer

from tokalign.cli.common import (ENV_HELP, MAX_TURNS_HELP, OUT_HELP, OVERWRITE, PROCESSOR_HELP, PROCESSOR_OPT_HELP, REWARD_OPT_HELP,
                                 default_out, emit, episode_spec, err_console, input_path, processor_chain, sampling_spec)


def evaluate(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="A prompts artifact, task (arith, or module:Class), data file or hub id, with reference answers; omitted: stdin."),
    split: str = typer.Option("test", "--split", help="Split of a task or hub dataset given to --data (tasks: train/test)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N prompts."),
    model: str = typer.Option("", "--model", "-m", help="Model dir, tokalign checkpoint or hub id (default: the bundled tiny model)."),
    verifier: Optional[str] = typer.Option(None, "--verifier", help="Verifier (or reward) deciding pass/fail (default: the task's, else exact_match)."),
    reward_opt: List[str] = typer.Option([], "--reward-opt", help=REWARD_OPT_HELP),
    workers: int = typer.Option(1, "--workers", "-j", min=0, help="Verifier worker processes (1 = in-process, 0 = one per CPU), as in `score`."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.0, help="Seconds per sample; past it the sample counts as failed (0 = no limit)."),
    n: int = typer.Option(4, "--n", min=1, help="Samples per prompt; pass@k is reported for k = 1, 2, 4, … ≤ n."),
    backend: str = typer.Option("hf", "--backend", help="hf or vllm."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the model's tokalign.yaml, else 256."),
    seed: int = typer.Option(0, "--seed"),
    env: Optional[str] = typer.Option(None, "--env", help=ENV_HELP),
    max_turns: int = typer.Option(4, "--max-turns", min=1, help=MAX_TURNS_HELP),
    logits_processor: List[str] = typer.Option([], "--logits-processor", help=PROCESSOR_HELP),
    processor_opt: List[str] = typer.Option([], "--processor-opt", help=PROCESSOR_OPT_HELP),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference model: also report KL(policy ‖ ref) over the sampled tokens."),
    entropy: bool = typer.Option(True, "--entropy/--no-entropy", help="Report the policy's mean per-token entropy (one extra forward pass)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    overwrite: bool = OVERWRITE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the results table on stderr."),
    compare: bool = typer.Option(False, "--compare", help="Instead of evaluating: compare RESULTS side by side, with deltas against the first."),
    compared: Optional[List[str]] = typer.Argument(None, metavar="RESULTS", help="With --compare: eval artifacts or their results.json files."),
    as_json: bool = typer.Option(False, "--json", help="With --compare: print the comparison as JSON."),
):
    """Evaluate a model: pass@k (unbiased), maj@k, mean reward, length, entropy, KL to --ref → `eval` artifact with results.json.

    `tokalign eval --compare A B` prints A's and B's results side by side instead."""
    if compare or compared or as_json:
        given = [flag for flag, value in (("--data", data), ("--model", model), ("--verifier", verifier), ("--ref", ref),
                                          ("--out", out)) if value]
        if compare and given:  # they would be silently ignored: the user meant one of the two
            from tokalign.errors import UserError

            raise UserError(f"--compare only reads existing results, so {', '.join(given)} would do nothing: drop "
                            f"{'it' if len(given) == 1 else 'them'}, or evaluate without --compare.")
        return _compare(compare, compared or [], as_json)
    from tokalign.stages.evaluate import evaluate as run

    src = input_path(data, "prompts artifact")
    spec = sampling_spec(model, n, temperature, top_p, max_new_tokens, seed, data)
    episodes = episode_spec(env, max_turns)
    processors = processor_chain(logits_processor, processor_opt)
    from tokalign.rewards import parse_options

    options = parse_options(list(reward_opt))
    path, results = run(src, default_out("eval", out), model=model, verifier=verifier, backend=backend, spec=spec, overwrite=overwrite,
                        reward_options=options, workers=workers, timeout=timeout, ref=ref or "", entropy=entropy,
                        split=split, limit=limit, episodes=episodes, processors=processors)
    if not quiet:
        from tokalign.inspect.compare import render_results

        render_results(results, f"eval {model or '(bundled model)'}: {results['num_prompts']} prompts × {n}", err_console())
    emit(path)


def _compare(compare: bool, results: list[str], as_json: bool) -> None:
    import json
    import sys

    from tokalign.errors import UserError
    from tokalign.inspect.compare import compare as run, render

    if not compare:
        raise UserError("Paths after `tokalign eval` and --json are for --compare (`tokalign eval --compare A B`); "
                        "to evaluate, pass the prompts artifact with --data.")
    cmp = run(results)
    if as_json:
        sys.stdout.write(json.dumps(cmp, indent=2) + "\n")
        return
    from rich.console import Console

    render(cmp, Console(highlight=False))
