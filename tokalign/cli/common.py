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
    path = out or str(Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    check_writable(path)
    return path


def check_writable(out: str) -> None:
    """Before any work: the output can be created where it is asked for (its nearest existing parent is a directory
    this process may write in), so a run does not compute for minutes to fail at the end."""
    import os

    from tokalign.errors import UserError

    parent = next((p for p in Path(out).parents if p.exists()), Path("."))  # named as the user wrote it
    if not parent.is_dir():
        raise UserError(f"Output '{out}' cannot be created: '{parent}' is a file, not a directory; choose another --out.")
    if not os.access(parent, os.W_OK | os.X_OK):
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise UserError(f"Output '{out}' cannot be created: '{parent}' is on a read-only file system; choose another --out.")
        raise UserError(f"Output '{out}' cannot be created: '{parent}' is not writable; check its permissions, or choose another --out.")


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


PROCESSOR_HELP = ("A decoding hook on every sampled token's logits (repeatable, applied in order): ban_tokens, cyclic_reflex, "
                  "or module:Class (see `tokalign plugins`).")
PROCESSOR_OPT_HELP = ("A --logits-processor's option: NAME.key=value (repeatable; values typed like --set), e.g. "
                      "--processor-opt 'ban_tokens.ids=[5,7]'. Keys: the fields of the processor's Config.")


def processor_chain(names: list[str] | None, options: list[str] | None):
    """The run's decoding hooks, resolved (names and options checked) before any model loads; None without any."""
    from tokalign import decoding

    chain = decoding.resolve(list(names or []), decoding.parse_options(list(options or [])))
    return chain or None


BRANCHING_HELP = ("With --env: grow each prompt's n episodes as a tree forking where the environment answered: entropy "
                  "(ARPO's entropy-triggered forks) or tree (PORTool's); default none.")


def episode_spec(env: str | None, max_turns: int, max_episode_tokens: int = 0, branching: str = "", branch_opts: list[str] | None = None):
    from tokalign import config
    from tokalign.errors import UserError
    from tokalign.rollout.episodes import EpisodeSpec

    if branch_opts and branching in ("", "none"):  # options of no strategy would be silently ignored
        raise UserError("--branch-opt sets an option of a --branching strategy: pass --branching NAME too (entropy or "
                        "tree), or drop it.")
    if max_episode_tokens and not env:
        raise UserError("--max-episode-tokens limits multi-turn episodes: pass --env NAME too (e.g. --env calculator), "
                        "or drop it.")
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
