"""MkDocs hooks (``hooks:`` in mkdocs.yml): a page line ``<!-- source: module:Qualified.name -->`` becomes a code
block with that object's current source (``inspect.getsource``), so excerpts of tokalign's own code on the plug-in
pages never go stale. An object that no longer exists fails the build."""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap

from mkdocs.exceptions import PluginError

_MARK = re.compile(r"^<!-- source: ([\w.]+):([\w.]+) -->$", re.M)


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

    return _MARK.sub(replace, markdown)
