"""Helpers shared by the page generators (run by mkdocs-gen-files at build time; not part of the site)."""

from __future__ import annotations

import dataclasses
import html
import inspect
import re

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?(?:#\s*(.+?))?\s*$")
_COMMENT = re.compile(r"^\s+#\s?(.*?)\s*$")


def md_text(text: str) -> str:
    """Plain help text as Markdown: code spans (`...`) kept, everything else escaped for tables and HTML."""
    out, pos = [], 0
    for m in re.finditer(r"(`+).+?\1", text or "", re.DOTALL):  # code spans, single or double backticks
        out += [_escape(text[pos:m.start()]), m[0]]  # a pipe inside a code span does not split a table cell
        pos = m.end()
    out.append(_escape((text or "")[pos:]))
    return "".join(out).replace("\n", " ")


def _escape(part: str) -> str:
    part = html.escape(part, quote=False).replace("\\", "\\\\")
    return re.sub(r"([*_|\[\]])", r"\\\1", part)


def code(value: str) -> str:
    """``value`` as an inline code span that survives a table cell."""
    value = str(value)
    return f"`` {value} ``" if "`" in value else f"`{value}`"


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field, read from the source of ``cls`` and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(inspect.getmro(cls)):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []  # a comment block on the lines just above a field
        for line in lines:
            c, m = _COMMENT.match(line), _FIELD.match(line)
            if c:
                above.append(c[1])
                continue
            if m and (m[2] or above):
                out[m[1]] = m[2] or " ".join(above)
            above = []
    return out


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def show(value) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    return code(repr(value) if isinstance(value, str) else value)


def type_name(f: dataclasses.Field) -> str:
    t = f.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def first_paragraph(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "")
    return " ".join(doc.split("\n\n", 1)[0].split()) if doc else ""


def package_path(path: str) -> str:
    """``tokalign/algorithms/grpo.py`` for a module file of the tokalign package (the path itself otherwise)."""
    from pathlib import Path

    import tokalign

    try:
        return str(Path(path).resolve().relative_to(Path(tokalign.__file__).resolve().parent.parent))
    except ValueError:
        return path
