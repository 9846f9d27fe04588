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
