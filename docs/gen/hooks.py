"""MkDocs hooks (``hooks:`` in mkdocs.yml), so that what the pages quote of the code never goes stale:

* a page line ``<!-- source: module:Qualified.name -->`` becomes a code block with that object's current source
  (``inspect.getsource``); an object that no longer exists fails the build;
* a page line ``<!-- importlinter -->`` becomes the layer table and the contracts of pyproject.toml's
  ``[tool.importlinter]`` (what CI's ``lint-imports`` enforces), read at build time.
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap

from mkdocs.exceptions import PluginError

_MARK = re.compile(r"^<!-- source: ([\w.]+):([\w.]+) -->$", re.MULTILINE)
_LAYERS = re.compile(r"^<!-- importlinter -->$", re.MULTILINE)


def _source(module_name: str, qualname: str) -> tuple[str, str]:
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    path = inspect.getsourcefile(obj) or module_name
    return textwrap.dedent(inspect.getsource(obj)).rstrip(), path


def _relative(path: str) -> str:
    """``tokalign/algorithms/prime.py``: the path from the package's parent directory."""
    from pathlib import Path

    import tokalign

    try:
        return str(Path(path).resolve().relative_to(Path(tokalign.__file__).resolve().parent.parent))
    except ValueError:
        return path


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(m: re.Match) -> str:
        try:
            text, path = _source(m[1], m[2])
        except Exception as e:
            raise PluginError(f"{page.file.src_uri}: cannot show the source of {m[1]}:{m[2]}: {type(e).__name__}: {e}") from e
        shown = _relative(path)
        return f'```python title="{shown} — {m[2]}"\n{text}\n```'

    markdown = _MARK.sub(replace, markdown)
    if _LAYERS.search(markdown):
        markdown = _LAYERS.sub(lambda m: _importlinter(config), markdown)
    return markdown


def _importlinter(config) -> str:
    """The layers of the ``layers`` contract as a table (top = may import everything below), then the whole
    ``[tool.importlinter]`` text of pyproject.toml, comments included."""
    from pathlib import Path

    path = Path(config.config_file_path).parent / "pyproject.toml"
    text = path.read_text()
    start = text.find("[tool.importlinter]")
    if start < 0:
        raise PluginError("pyproject.toml has no [tool.importlinter] section to show on the architecture page")
    section = text[start:]
    nxt = re.search(r"^\[(?!\[?tool\.importlinter)", section[1:], re.MULTILINE)  # the next table that is not ours
    section = section[: nxt.start() + 1] if nxt else section
    out = []
    try:
        import tomllib
    except ImportError:  # Python 3.10: the raw section below still shows everything
        tomllib = None
    if tomllib is not None:
        contracts = tomllib.loads(section).get("tool", {}).get("importlinter", {}).get("contracts", [])
        layers = next((c for c in contracts if c.get("type") == "layers"), None)
        if layers:
            out += ["| layer (top first) | modules of `tokalign` | siblings |", "|---|---|---|"]
            for i, layer in enumerate(layers["layers"], 1):
                sep = "|" if "|" in layer else ":" if ":" in layer else ""
                names = [n.strip() for n in layer.split(sep)] if sep else [layer.strip()]
                shown = ", ".join(f"`{n.strip('()')}`" for n in names)  # "(x)": import-linter's "may be absent"
                rel = {"|": "independent: may not import each other", ":": "may import each other (no cycles)"}.get(sep, "")
                out.append(f"| {i} | {shown} | {rel} |")
            out.append("")
        others = [c for c in contracts if c is not layers]
        for c in others:
            out.append(f"- **{c.get('name', c.get('id'))}** (`{c.get('type')}`)")
        if others:
            out.append("")
    out += ['??? note "pyproject.toml: `[tool.importlinter]`, as enforced"', "", "    ```toml"]
    out += [("    " + line) if line else "" for line in section.rstrip().splitlines()]
    out += ["    ```", ""]
    return "\n".join(out)
