from __future__ import annotations

from typing import Optional

import typer

from tokalign.cli.common import OUT_HELP, OVERWRITE, default_out, emit


def prepare(
    source: str = typer.Argument(..., help="Task: built-in (arith, gsm8k, math, ultrafeedback; TASK:PATH for a local copy of a task's dataset), installed, or module:Class; a .jsonl/.json/.parquet/.csv file, or a hub dataset id. TRL formats are accepted as they are."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("", "--model", "-m", help="Model whose tokenizer/chat template renders the prompts (default: the bundled tiny model)."),
    split: str = typer.Option("train", "--split", help="Dataset split (tasks: train/test; hub: any split name)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Keep only the first N records."),
    overwrite: bool = OVERWRITE,
):
    """Turn a dataset into a `prompts` or `pairs` artifact (prints its path)."""
    from tokalign.stages.prepare import prepare as run

    emit(run(source, default_out("prompts", out), model=model, split=split, limit=limit, overwrite=overwrite))
