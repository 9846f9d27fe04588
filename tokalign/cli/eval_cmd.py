from __future__ import annotations

from typing import Optional

import typer

from tokalign.cli.common import OUT_HELP, OVERWRITE, default_out, emit, sampling_spec, err_console, input_path


def evaluate(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="A prompts artifact (with reference answers); omitted: stdin."),
    model: str = typer.Option("", "--model", "-m", help="Model dir, tokalign checkpoint or hub id (default: the bundled tiny model)."),
    verifier: str = typer.Option("exact_match", "--verifier", help="Verifier (or reward) deciding pass/fail."),
    n: int = typer.Option(4, "--n", min=1, help="Samples per prompt; pass@k is reported for k = 1, 2, 4, … ≤ n."),
    backend: str = typer.Option("hf", "--backend", help="hf or vllm."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the model's tokalign.yaml, else 256."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    overwrite: bool = OVERWRITE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the results table on stderr."),
):
    """Evaluate a model: pass@k (unbiased), mean reward, length → `eval` artifact with results.json."""
    from tokalign.stages.evaluate import evaluate as run

    src = input_path(data, "prompts artifact")
    spec = sampling_spec(model, n, temperature, top_p, max_new_tokens, seed)
    path, results = run(src, default_out("eval", out), model=model, verifier=verifier, backend=backend, spec=spec, overwrite=overwrite)
    if not quiet:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in results.items() if k.startswith("pass@") or k == "mean_reward")
        err_console().print(f"[bold]eval[/] {model or '(bundled model)'}: {shown}  ({results['num_prompts']} prompts × {n})")
    emit(path)
