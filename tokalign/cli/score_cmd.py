from __future__ import annotations

from typing import List, Optional

import typer

from tokalign.cli.common import OUT_HELP, OVERWRITE, REWARD_OPT_HELP, default_out, emit, input_path


def score(
    rollouts: Optional[str] = typer.Argument(None, help="A rollouts (or scored, to re-score) artifact; '-' or omitted: stdin."),
    reward: List[str] = typer.Option([], "--reward", "-r", help="Reward or verifier name (repeatable); name*weight to weight it; module:attr for your own. Default: the data's own (a task's, recorded by prepare), or a scored artifact's."),
    reward_opt: List[str] = typer.Option([], "--reward-opt", help=REWARD_OPT_HELP),
    workers: int = typer.Option(1, "--workers", "-j", min=0, help="Reward worker processes: 1 = in-process, N > 1 = N processes for CPU-bound rewards, 0 = one per CPU."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.0, help="Seconds per sample and reward; past it the sample fails for that reward (0 = no limit)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="The model (checkpoint) whose samples these are, for rewards that read the policy's likelihoods or hidden states (e.g. r3)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the score cache ($TOKALIGN_CACHE, default ~/.cache/tokalign)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    overwrite: bool = OVERWRITE,
):
    """Score rollouts with reward functions / verifiers into a `scored` artifact (per-token rewards kept).

    A reward that raises or times out on a sample scores 0 there, is recorded in the row's
    `reward_errors`, and is counted in the summary line on stderr; the run goes on."""
    from tokalign.rewards import parse_options
    from tokalign.stages.score import score as run

    options = parse_options(list(reward_opt))
    src = input_path(rollouts, "rollouts artifact")
    emit(run(src, default_out("scored", out), reward=list(reward) or None, overwrite=overwrite, reward_options=options,
             workers=workers, timeout=timeout, cache=not no_cache, policy=policy))
