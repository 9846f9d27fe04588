"""Helpers shared by the command modules: default output paths, stdin inputs, emitting results."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import typer

from tokalign.artifacts import read_path_from_stdin

OUT_HELP = "Output artifact directory (default: runs/<stage>-<time>). Refused if it exists, unless --overwrite."
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out (the old one is removed only once the new one is complete).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output on stderr.")
REWARD_OPT_HELP = "A reward's option: NAME.key=value (repeatable; values typed like --set), e.g. --reward-opt math.tolerance=1e-6. Keys: the fields of the reward's Config."


def default_out(stage: str, out: str | None) -> str:
    if out:
        return out
    return str(Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def input_path(arg: str | None, what: str) -> str:
    return read_path_from_stdin(arg, what)


def emit(path) -> None:
    """The one line a stage prints on stdout: the artifact path, for the next stage in a pipe."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


ENV_HELP = "Multi-turn episodes: the environment answering the model between its turns (e.g. calculator, python; see `tokalign plugins`)."
MAX_TURNS_HELP = "With --env: model turns per episode."


BRANCHING_HELP = ("With --env: grow each prompt's n episodes as a tree forking where the environment answered: entropy "
                  "(ARPO's entropy-triggered forks) or tree (PORTool's); default none.")


def episode_spec(env: str | None, max_turns: int, max_episode_tokens: int = 0, branching: str = "", branch_opts: list[str] | None = None):
    from tokalign import config
    from tokalign.rollout.episodes import EpisodeSpec

    options = config.parse_set(list(branch_opts or []), flag="--branch-opt", example="forks=3")
    spec = EpisodeSpec.of(env or "", max_turns, max_episode_tokens, branching, options)
    spec.check()  # an unknown or broken environment, bad branching: one line before any model loads
    return spec


def sampling_spec(model: str, n: int, temperature: float | None, top_p: float | None, max_new_tokens: int | None, seed: int,
                  data: str | None = None):
    """Sampling settings: flags, else the model's recommended ``tokalign.yaml`` rollout section (for ``data``, if it
    names a task with settings of its own there), else defaults."""
    from tokalign import config, models
    from tokalign.rollout import SamplingSpec

    base = config.model_defaults(models.resolve_model(model)[1], data).get("rollout", {})
    flags = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    section = config.build(config.RolloutSection, {**{k: v for k, v in base.items() if k in flags}, **{k: v for k, v in flags.items() if v is not None}}, "rollout.")
    return SamplingSpec(n=n, temperature=section.temperature, top_p=section.top_p, max_new_tokens=section.max_new_tokens, seed=seed)
