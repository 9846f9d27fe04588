"""Generate ``reference/config.md`` from the run configuration's dataclasses (``tokalign.config``): every key of
``--set`` / ``--config run.yaml`` with its type, default and the comment beside it in the source. Run by
mkdocs-gen-files at build time; nothing here is hand-copied."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).parent))
from _common import code, default_of, field_comments, md_text, show, type_name

from tokalign import config

PAGE = "reference/config.md"


def table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    notes = field_comments(cls)
    out = ["| key | type | default | note |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        out.append(f"| {code(prefix + f.name)} | {code(type_name(f))} | {show(default_of(f))} | {md_text(notes.get(f.name, ''))} |")
    return out + [""]


def main() -> None:
    sections = {f.name: f for f in dataclasses.fields(config.RunConfig)}
    nested = [name for name, f in sections.items() if dataclasses.is_dataclass(default_of(f))]
    page = [
        "# Configuration keys",
        "",
        "Generated at build time from `tokalign.config` (`RunConfig` and its sections). Layers, lowest first: these "
        "defaults < the model directory's `tokalign.yaml` < `--config run.yaml` < flags < `--set KEY=VALUE`; see "
        "[Configuration](../concepts/configuration.md). `tokalign train ALGO --dry-run` prints them all, resolved.",
        "",
        "## Top level",
        "",
        *table(config.RunConfig, "", skip=tuple(nested)),
        "`algorithm.*` takes the algorithm's own `Config` fields: see each entry of the "
        "[algorithm catalogue](../algorithms/catalogue.md).",
        "",
    ]
    for name in nested:
        cls = type(default_of(sections[name]))
        page += [f"## `{name}.*`", "", *table(cls, f"{name}.")]
    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write("\n".join(page) + "\n")
    mkdocs_gen_files.set_edit_path(PAGE, "gen/config_reference.py")


main()
