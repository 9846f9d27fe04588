from __future__ import annotations

from typing import List, Optional

import typer

from tokalign.cli.common import input_path

COLOURS = ("reward", "advantage", "logprob", "gap", "entropy")


def inspect(
    artifact: Optional[str] = typer.Argument(None, help="A rollouts, scored or eval artifact; '-' or omitted: read its path from stdin."),
    color: Optional[str] = typer.Option(None, "--color", "-c", help="Channel to colour by: reward, advantage, logprob, gap or entropy "
                                        "(default: advantage when the samples are scored, else logprob)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for the tokenizer and the trainer forward "
                                        "(default: the one recorded in the artifact's manifest)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Show at most N samples (default 10; 100 with --html)."),
    ids: Optional[List[str]] = typer.Option(None, "--id", help="Only this sample id (or prompt id: its whole group); repeatable."),
    html: Optional[str] = typer.Option(None, "--html", help="Write one self-contained HTML page with every channel switchable, instead of the terminal view."),
    forward: bool = typer.Option(True, "--forward/--no-forward", help="Run the model on the samples for the gap and entropy channels "
                                 "(default: with --html, or when --color needs it)."),
):
    """Per-token heatmap of rollouts/scored/eval samples: tokens coloured by reward, advantage, log-prob, gap or entropy."""
    from tokalign.errors import UserError, unknown

    if color is not None and color not in COLOURS:
        raise unknown("--color channel", color, COLOURS)
    src = input_path(artifact, "rollouts, scored or eval artifact")
    from tokalign.inspect.tokens import inspect as load

    # The forward pass costs a model load: the terminal view runs it only for the channels that need it.
    run_forward = forward and (html is not None or color in ("gap", "entropy"))
    result = load(src, model=model, ids=ids, limit=limit if limit is not None else (100 if html else 10), forward=run_forward)
    if color is None:
        color = "advantage" if result.channels["advantage"].available else "logprob"
    channel = result.channels[color]
    if not channel.available:
        raise UserError(f"Channel '{color}' is unavailable for '{src}': {channel.note}.")
    if html is not None:
        from tokalign.inspect.html import write

        path = write(result, color, html)
        from tokalign.cli.common import emit

        emit(path)
        return
    from rich.console import Console

    from tokalign.inspect.terminal import render

    render(result, color, Console(highlight=False))
