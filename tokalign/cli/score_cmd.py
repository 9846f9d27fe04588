from __future__ import annotations

from typing import List, Optional

import typer

from tokalign.cli.common import OUT_HELP, OVERWRITE, default_out, emit, input_path


def score(
    rollouts: Optional[str] = typer.Argument(None, help="A rollouts (or scored, to re-score) artifact; '-' or omitted: stdin."),
    reward: List[str] = typer.Option(..., "--reward", "-r", help="Reward or verifier name (repeatable); name*weight to weight it; module:attr for your own."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    overwrite: bool = OVERWRITE,
):
    """Score rollouts with reward functions / verifiers into a `scored` artifact (per-token rewards kept)."""
    from tokalign.stages.score import score as run

    src = input_path(rollouts, "rollouts artifact")
    emit(run(src, default_out("scored", out), reward=list(reward), overwrite=overwrite))
