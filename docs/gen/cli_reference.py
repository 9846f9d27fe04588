"""Generate ``reference/cli.md`` from the Typer app itself (``tokalign.cli.app:app``): the click command tree that
``typer.main.get_command`` builds, each command's help, usage, arguments and options exactly as ``--help`` shows them
(the same help records, defaults and ranges). Run by mkdocs-gen-files at build time; nothing here is hand-copied."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import mkdocs_gen_files
import typer

sys.path.insert(0, str(Path(__file__).parent))
from _common import md_text

from tokalign.cli.app import app

PAGE = "reference/cli.md"


def params_table(cmd, ctx) -> list[str]:
    rows = {"argument": [], "option": []}
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        name, help_text = record
        rows.setdefault(param.param_type_name, []).append(f"| `{name}` | {md_text(help_text)} |")
    out = []
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        if rows.get(kind):
            out += [f"**{title}**", "", f"| {kind} | description |", "|---|---|", *rows[kind], ""]
    return out


def command_section(cmd, ctx, path: str, level: int) -> list[str]:
    anchor = path.replace(" ", "-")
    out = [f"{'#' * level} `{path}` {{ #{anchor} }}", ""]
    if cmd.help:
        out += [md_text(p) + "\n" for p in inspect.cleandoc(cmd.help).split("\n\n")]
    out += ["```console", f"$ {path} {' '.join(cmd.collect_usage_pieces(ctx))}", "```", ""]
    return out + params_table(cmd, ctx)


def main() -> None:
    root = typer.main.get_command(app)
    root_ctx = typer.Context(root, info_name="tokalign", **root.context_settings)
    names = root.list_commands(root_ctx)
    page = [
        "# CLI reference",
        "",
        "Generated at build time from the Typer app (`tokalign.cli.app:app`): the same text as `tokalign COMMAND "
        "--help`. Every command exits 0 on success, 2 on bad input or a failing plug-in (one line on stderr; "
        "`--debug` anywhere on the line for the traceback, see [Errors](../concepts/errors.md)), 130 when "
        "interrupted. Configuration keys for `train --set` are in [Configuration keys](config.md); each "
        "algorithm's own `algorithm.*` keys are in the [catalogue](../algorithms/catalogue.md).",
        "",
        "| command | what |",
        "|---|---|",
    ]
    for name in names:
        page.append(f"| [`{name}`](#tokalign-{name}) | {md_text(root.get_command(root_ctx, name).get_short_help_str(limit=120))} |")
    page.append("")
    page += command_section(root, root_ctx, "tokalign", 2)
    for name in names:
        cmd = root.get_command(root_ctx, name)
        ctx = typer.Context(cmd, info_name=name, parent=root_ctx, **cmd.context_settings)
        page += command_section(cmd, ctx, f"tokalign {name}", 2)
    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write("\n".join(page) + "\n")
    mkdocs_gen_files.set_edit_path(PAGE, "gen/cli_reference.py")


main()
