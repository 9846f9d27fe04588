from __future__ import annotations

import json
from typing import Optional

import typer


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable list."),
    check: bool = typer.Option(False, "--check", help="Exit with code 1 if any plug-in is broken."),
    names: Optional[str] = typer.Option(None, "--names", hidden=True, help="Print bare names of these comma-separated kinds (for shell completion; imports nothing)."),
):
    """List algorithms, rewards, verifiers and tasks from every installed distribution, and whether each loads."""
    from tokalign import registry

    if names:
        typer.echo(" ".join(sorted({n for kind in names.split(",") if kind in registry.GROUPS for n in registry.available(kind)})))
        return
    rows = []
    for kind in registry.GROUPS:
        for name, info in sorted(registry.available(kind).items()):
            problem = registry.check(kind, name)  # imports it: a broken plug-in is reported, not fatal
            rows.append({"name": name, "kind": kind, "group": info.group, "value": info.value,
                         "distribution": info.distribution, "version": info.version,
                         "status": "ok" if problem is None else "broken", "error": problem})
        for clash in registry.collisions(kind):
            rows.append({"name": clash.split("'")[1], "kind": kind, "group": registry.GROUPS[kind], "value": "",
                         "distribution": "", "version": "", "status": "collision", "error": clash})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "name", "distribution", "version", "status")
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"[red]{r['status']}[/]: {r['error']}"
        table.add_row(r["kind"], r["name"], r["distribution"], r["version"], status)
    Console().print(table)
    broken = [r for r in rows if r["status"] != "ok"]
    if check and broken:
        raise typer.Exit(1)
