"""Entry point: ``tokalign``. User errors print one line and exit 2; --debug shows tracebacks."""

from __future__ import annotations

import os
import sys

import typer

from tokalign import __version__
from tokalign.cli import eval_cmd, inspect_cmd, plot_cmd, plugins_cmd, prepare_cmd, rollout_cmd, score_cmd, train_cmd

app = typer.Typer(
    name="tokalign",
    help="Token-level alignment of language models: prepare → rollout → score → train → eval, as artifacts on disk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("prepare")(prepare_cmd.prepare)
app.command("rollout")(rollout_cmd.rollout)
app.command("score")(score_cmd.score)
app.command("train", context_settings={"help_option_names": ["-h", "--help"]})(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)
app.command("plugins")(plugins_cmd.plugins)
app.command("inspect")(inspect_cmd.inspect)
app.command("plot")(plot_cmd.plot)


def _version(value: bool):
    if value:
        typer.echo(f"tokalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Read input artifacts whose files no longer match their "
                                   "manifest (size, sha256); the new artifact's manifest records it."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    if debug:
        os.environ["TOKALIGN_DEBUG"] = "1"
    if no_verify:
        os.environ["TOKALIGN_NO_VERIFY"] = "1"


def _quiet_libraries() -> None:
    # Progress bars and advice from HF libraries would interleave with ours on stderr.
    for key, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


def _take_switch(argv: list[str], switch: str) -> tuple[list[str], bool]:
    """Remove a global ``switch`` (``--debug``, ``--no-verify``) from anywhere before a ``--``, so ``tokalign train grpo
    … --debug`` works as well as ``tokalign --debug train …`` (Typer only knows them on the root command)."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != switch] + argv[end:]
    return kept, len(kept) != len(argv)


def debugging() -> bool:
    return os.environ.get("TOKALIGN_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    from tokalign.errors import UserError

    _quiet_libraries()
    argv, flag = _take_switch(list(sys.argv[1:] if argv is None else argv), "--debug")
    if flag:
        os.environ["TOKALIGN_DEBUG"] = "1"  # also seen by worker processes
    argv, flag = _take_switch(argv, "--no-verify")
    if flag:
        os.environ["TOKALIGN_NO_VERIFY"] = "1"
    debug = debugging()
    try:
        app(args=argv, prog_name="tokalign", standalone_mode=True)
    except UserError as e:
        if debug:  # the traceback, with the plug-in's original exception chained above it; same line, same exit code
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback; please report it)\n")
        sys.exit(1)
