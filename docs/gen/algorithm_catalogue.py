"""Generate ``algorithms/catalogue.md`` from the plug-in registry: every installed algorithm, built-in or third-party.

For each: where it comes from (entry point, distribution, version), its docstring's first paragraph (paper title and
arXiv id), its ``Config`` defaults (the ``--set algorithm.KEY=VALUE`` keys), and what its ``Needs`` (with the default
``Config``) asks of the train loop: the data kinds, the batch components (in fill order, as ``tokalign.components.
resolve`` builds them) and the sampling hooks. Run by mkdocs-gen-files at build time; nothing here is hand-copied.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    code,
    default_of,
    field_comments,
    first_paragraph,
    md_text,
    package_path,
    show,
    type_name,
)

from tokalign import registry

PAGE = "algorithms/catalogue.md"
ROLE_FLAGS = {"teacher": "--teacher PATH", "dpo": "--dpo-model PATH", "reverse": "--reverse-model PATH"}
DATA_KINDS = {
    "online": "online (prompts: sampled and scored in the loop)",
    "scored": "scored (stored, scored rollouts)",
    "pairs": "pairs (chosen / rejected)",
    "triples": "triples (pairs + a gold reference)",
    "unpaired": "unpaired (completion + boolean label)",
    "completions": "completions (prompt + completion)",
}


def summary(cls: type) -> tuple[str, str]:
    """(the paragraph shown, its headline for the index). The class's own docstring's first paragraph, else its
    module's, which names the paper and its arXiv id; a variant class whose own paragraph names no paper gets both."""
    own = first_paragraph(cls.__dict__.get("__doc__"))
    module = first_paragraph(getattr(sys.modules.get(cls.__module__), "__doc__", None))
    if own and "arXiv" not in own and module and module not in own:  # a variant class: the module names the paper
        own = own if own.startswith(cls.__name__) else f"`{cls.__name__}`: {own}"
        return f"{module} — {own}", f"{headline(module)} — {headline(own)}"
    text = own or module
    return text, headline(text) if text else ""


def headline(text: str) -> str:
    """The text up to the paper's arXiv id (title, authors, id), else its first sentence."""
    m = re.search(r"arXiv:\s*\d{4}\.\d{4,5}\)?", text)
    if m:
        end = m.end()
        if text[:end].count("(") > text[:end].count(")"):  # "(arXiv:… — a remark)": close the parenthesis
            close = text.find(")", end)
            end = close + 1 if 0 <= close - end <= 80 else end
        return text[:end]
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= 160 else first[:159] + "…"


def config_table(cfg_cls: type) -> list[str]:
    fields = dataclasses.fields(cfg_cls)
    if not fields:
        return ["*No options.*", ""]
    notes = field_comments(cfg_cls)
    out = ["| key (`--set algorithm.KEY=VALUE`) | type | default | note |", "|---|---|---|---|"]
    for f in fields:
        out.append(f"| {code(f.name)} | {code(type_name(f))} | {show(default_of(f))} | {md_text(notes.get(f.name, ''))} |")
    return out + [""]


def needs_lines(needs) -> list[str]:
    from tokalign.components import resolve

    out = ["- **data**: " + ", ".join(DATA_KINDS.get(k, k) for k in needs.data)]
    flags = [name for name in ("reference", "groups", "old_logps", "full_vocab") if getattr(needs, name)]
    out.append("- **needs**: " + (", ".join(code(f) for f in flags) if flags else "nothing beyond the policy"))
    roles = {role: True for role in needs.models}
    try:
        components = resolve(needs)
    except Exception as e:  # a broken plug-in still gets its entry
        out.append(f"- **batch components**: cannot be resolved: {md_text(f'{type(e).__name__}: {e}')}")
        components = []
    for c in components:
        roles.update(c.roles())
    if roles:
        parts = []
        for role, required in roles.items():
            how = ROLE_FLAGS.get(role, f"--with {role}=PATH")
            parts.append(f"{code(role)} ({code(how)}{'' if required else ', optional: the starting model otherwise'})")
        out.append("- **model roles**: " + ", ".join(parts))
    if components:
        items = []
        for c in components:
            what = ", ".join(f"`fields[\"{p}\"]`" for p in c.provides) or "no field"
            extra = f"; forward outputs {', '.join(code(o) for o in c.forward_outputs)}" if c.forward_outputs else ""
            items.append(f"{code(type(c).__name__)} `{c.name}` → {what}{extra}")
        declared = [type(c).__name__ for c in needs.components]
        out.append("- **batch components** (fill order): " + "; ".join(items)
                   + (f" — declared in `Needs.components`: {', '.join(code(d) for d in declared)}" if declared else ""))
    else:
        out.append("- **batch components**: none")
    hooks = [f"{code(type(h).__name__)} `{h.name}`" for h in needs.hooks]
    out.append("- **sampling hooks**: " + (", ".join(hooks) if hooks else "none"))
    return out + [""]


USERS: dict[tuple[str, str], list[str]] = {}  # (kind, class name) -> algorithms using it, filled by entry()


def note_users(name: str, needs) -> None:
    from tokalign.components import resolve

    try:
        components = resolve(needs)
    except Exception:
        components = []
    for c in components:
        USERS.setdefault(("batch component", type(c).__name__), []).append(name)
    for h in needs.hooks:
        USERS.setdefault(("sampling hook", type(h).__name__), []).append(name)


def users_table() -> list[str]:
    out = ["## Who uses which component and hook", "",
           "With each algorithm's default `Config` (the shorthands `Needs.reference`, `.models` and `.old_logps` "
           "resolve to `Reference`, `FrozenModel` and `BehaviourLogps`):", "",
           "| kind | class | algorithms |", "|---|---|---|"]
    for (kind, cls), names in sorted(USERS.items()):
        out.append(f"| {kind} | {code(cls)} | {', '.join(f'[`{n}`](#{n})' for n in sorted(set(names)))} |")
    return out + [""]


def entry(name: str, info) -> tuple[list[str], str, str]:
    """(the algorithm's section, its headline, its data kinds) for the index table."""
    head = [f"## `{name}` {{ #{name} }}", ""]
    where = f"`tokalign train {name}` · entry point {code(info.value)} · {md_text(info.distribution)} {md_text(info.version)}"
    try:
        cls = registry.load("algorithm", name)
    except Exception as e:
        msg = md_text(f"{type(e).__name__}: {e}")
        return head + [where, "", f"!!! failure \"Does not load\"\n    {msg}", ""], "does not load", ""
    text, short = summary(cls)
    lines = head + [where, "", md_text(text) if text else "*No docstring.*", ""]
    cfg_cls = getattr(cls, "Config", None)
    try:
        algo = cls(cfg_cls())
        needs = algo.needs
    except Exception as e:
        lines += [f"!!! failure \"Cannot be built with its default Config\"\n    {md_text(f'{type(e).__name__}: {e}')}", ""]
        needs = None
    lines += ["**What it asks of the train loop** (with the default `Config`; some depend on options, e.g. a KL "
              "coefficient > 0 loads the reference model):", ""]
    lines += needs_lines(needs) if needs is not None else ["- unknown", ""]
    if needs is not None:
        note_users(name, needs)
    if cfg_cls is not None and dataclasses.is_dataclass(cfg_cls):
        lines += [f"**Options** ({code(cfg_cls.__name__)}):", ""] + config_table(cfg_cls)
    module = sys.modules.get(cls.__module__)
    doc = inspect.cleandoc(getattr(module, "__doc__", None) or "")
    if doc:
        path = getattr(module, "__file__", "") or ""
        label = package_path(path) if path else ""
        label = label if label and not label.startswith("/") else cls.__module__  # a third-party module: its name
        body = "\n".join(("    " + line) if line else "" for line in doc.splitlines())
        lines += [f'??? note "The module\'s notes: `{label}`"', "", "    ```text", body, "    ```", ""]
    kinds = ", ".join(needs.data) if needs is not None else ""
    return lines, short, kinds


def main() -> None:
    algorithms = registry.available("algorithm")
    sections, rows = [], []
    for name in sorted(algorithms):
        info = algorithms[name]
        lines, short, kinds = entry(name, info)
        sections += lines
        rows.append(f"| [`{name}`](#{name}) | {md_text(short)} | {md_text(kinds)} | {md_text(info.distribution)} |")
    page = [
        "# Algorithm catalogue",
        "",
        "Generated at build time from the plug-in registry (`tokalign.registry.available(\"algorithm\")`): every "
        f"algorithm installed where the docs were built — {len(algorithms)} here — with its paper, its options and "
        "what it asks of the train loop. `tokalign train NAME --dry-run` prints the same for a concrete run. To add one, "
        "see [Writing an algorithm](../plugins/algorithm.md); the pieces named under *batch components* and *sampling "
        "hooks* are described in [Components and hooks](../plugins/components.md).",
        "",
        "| algorithm | what | data | distribution |",
        "|---|---|---|---|",
        *rows,
        "",
        *users_table(),
        *sections,
    ]
    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write("\n".join(page) + "\n")
    mkdocs_gen_files.set_edit_path(PAGE, "gen/algorithm_catalogue.py")


main()
