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


# click's ClickException as typer vendors it: ``typer._click`` is private, the public typer.BadParameter derives from it
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(e) -> int:
    """A click usage error (an unknown option, a flag's bad value, a missing argument) as one line with the command's
    help to see; ``tokalign`` alone prints the help (typer already did) and exits 2, as click does."""
    if type(e).__name__ == "NoArgsIsHelpError":  # typer's own test, its click being private
        return e.exit_code
    message = " ".join(e.format_message().split()) or type(e).__name__
    if message[-1] not in ".?!":
        message += "."
    ctx = getattr(e, "ctx", None)
    hint = f" See '{ctx.command_path} --help'." if ctx is not None else ""
    sys.stderr.write(f"error: {message}{hint}\n")
    return 2


def _unwritable(e: BaseException) -> str:
    """The one line for a path the run may not write (a read-only file system, no permission), '' for other errors."""
    import errno

    if not isinstance(e, OSError) or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ""
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno == errno.EROFS:
        return f"Cannot write{where}: the file system is read-only; choose another --out on a writable disk."
    return f"{e.strerror or 'Permission denied'}:{where or ' (no path given)'}; check its permissions, or choose another path."


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
        # not standalone: click's usage errors come here (its own report is a boxed panel of 5+ lines)
        code = app(args=argv, prog_name="tokalign", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)  # an int: a typer.Exit's code (--help, --version: 0)
    except _CLICK_ERROR as e:
        if debug:
            import traceback

            traceback.print_exc()
        sys.exit(_usage_error(e))
    except typer.Abort:  # an EOF at a prompt
        sys.stderr.write("aborted\n")
        sys.exit(1)
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
        from tokalign.errors import no_space, no_space_error

        if no_space(e):  # a full disk outside an artifact's writing (a checkpoint, a log): one line too, not a bug
            if debug:
                import traceback

                traceback.print_exc()
            sys.stderr.write(f"error: {no_space_error(getattr(e, 'filename', None))}\n")
            sys.exit(2)
        if _unwritable(e):  # a read-only disk or a directory the user may not write: theirs to fix, not a bug
            if debug:
                import traceback

                traceback.print_exc()
            sys.stderr.write(f"error: {_unwritable(e)}\n")
            sys.exit(2)
        if debug:
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback; please report it)\n")
        sys.exit(1)
