"""Load raw records from a built-in task, a local file (JSONL/JSON/Parquet/CSV) or a hub id.

``TASK:ARG`` hands ARG to the task's constructor (a task that takes one: e.g. ``gsm8k:data/gsm8k.jsonl``
loads a local copy instead of the hub's; see ``tokalign.data.tasks``). A task need not be registered:
``module:Class`` (and ``module:Class:ARG``) names one on the Python path, as for every other plug-in."""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokalign import registry
from tokalign.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
STREAMED = (".jsonl", ".parquet", ".csv")  # files ``iter_records`` reads a chunk at a time (the rest are read whole)


def load_records(source: str, split: str = "train") -> tuple[list[dict], dict]:
    """(records, info). ``info`` names the source, its content hash (``sha256``, for manifests) and,
    for tasks, the default reward."""
    from tokalign.artifacts import sha256_file, sha256_json

    records, info = _load(source, split)
    info["sha256"] = sha256_file(Path(info["path"])) if info["source"] == "file" else sha256_json(records)
    return records, info


def iter_records(source: str, split: str = "train", chunk: int = 10_000, limit: int | None = None) -> tuple[Iterator[list[dict]], dict]:
    """(chunks of at most ``chunk`` records, info): ``load_records`` in bounded memory, of the first ``limit`` records
    (all when None). A local JSONL, Parquet or CSV file is read as the chunks are consumed, and no further than the
    ``limit``-th record (an error in a later record surfaces when its chunk is read); a JSON file, a task or a hub
    dataset is loaded whole (``load_records``), then handed out in chunks. ``info["sha256"]`` is the whole source's."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in STREAMED:
        from tokalign.artifacts import sha256_file

        info = {"source": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
        return chunked(itertools.islice(iter_file(path), limit), chunk), info
    records, info = load_records(source, split)
    if limit is not None:
        records = records[:limit]
    return (records[i : i + chunk] for i in range(0, len(records), chunk)), info


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter), read from ``items`` as they are needed."""
    it = iter(items)
    while part := list(itertools.islice(it, max(1, size))):
        yield part


def _load(source: str, split: str) -> tuple[list[dict], dict]:
    path = Path(source).expanduser()
    if path.is_file():
        return load_file(path), {"source": "file", "path": str(path.resolve())}
    if path.is_dir():
        raise UserError(f"'{source}' is a directory but not a tokalign artifact; pass a data file, a task or an artifact.")
    task = _task_source(source)
    if task is not None:
        return _load_task(*task, split)
    if path.suffix in SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"Data file '{source}' does not exist.")
    if "/" in source:
        return load_hub(source, split), {"source": "hub", "id": source, "split": split}
    raise registry_unknown(source)


# module:Attr, optionally :ARG after it; an attribute ending like a data file is a missing file, not a plug-in.
_PLUGIN_PATH = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::(.*))?", re.S)


def _task_source(source: str) -> tuple[str, str | None] | None:
    """(task name, ARG or None) when ``source`` names a task: NAME, NAME:ARG, module:Attr or module:Attr:ARG."""
    tasks = registry.available("task")
    name, colon, arg = source.partition(":")
    if source in tasks or (colon and name in tasks):
        return (name, arg) if colon else (source, None)
    m = _PLUGIN_PATH.fullmatch(source)
    if m and not m[2].lower().endswith(SUFFIXES):
        return f"{m[1]}:{m[2]}", m[3]
    return None


def _load_task(name: str, arg: str | None, split: str) -> tuple[list[dict], dict]:
    """Records of a task plug-in; what its code raises is reported as the task's (``plugin_errors``)."""
    from tokalign.data import render

    task = _make_task(name, arg)
    if split not in task.splits:
        raise UserError(f"Task '{name}' has no split '{split}'. Available: {', '.join(task.splits)}.")
    records = _records(name, task, split)
    plugin = registry.info("task", name)
    info = {"source": "task", "task": name, "distribution": plugin.distribution, "version": plugin.version,
            "default_reward": getattr(task, "default_reward", None)}
    if arg and Path(arg).expanduser().exists():
        info["path"] = str(Path(arg).expanduser().resolve())
    elif arg:
        info["arg"] = arg
    if any(isinstance(r.get("prompt"), str) for r in records):  # warned about where a tokenizer renders them
        render.note_plain_prompts(f"task '{name}'")
    return records, info


def _records(name: str, task, split: str) -> list[dict]:
    from tokalign import plugin_errors

    with plugin_errors.guard("task", name, "records"):
        records = task.records(split)
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            plugin_errors.contract("task", name, "records", f"it must return a list of dicts, got {type(records).__name__}")
        records = list(records)  # a generator's own errors surface here, still inside the guard
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            plugin_errors.contract("task", name, "records", f"it must return a list of dicts; record {i + 1} is a {type(r).__name__}")
    return records


def plugin_refs(info: dict) -> list[dict]:
    """The manifest's ``plugins`` entry of the task that ``load_records`` read (none for files and hub data)."""
    if info.get("source") != "task":
        return []
    return [{"kind": "task", "name": info["task"], "distribution": info["distribution"], "version": info["version"]}]


def _make_task(name: str, arg: str | None):
    """The task plug-in built as ``Task()``, or ``Task(ARG)`` for ``NAME:ARG`` (only tasks whose constructor takes one)."""
    import inspect

    from tokalign import plugin_errors

    cls = registry.load("task", name)
    problem = registry.check_obj("task", cls)
    if problem:
        raise plugin_errors.PluginError(f"{plugin_errors.label('task', name)} does not satisfy the task protocol: {problem}.")
    if arg is None:
        return plugin_errors.call("task", name, "__init__", cls) if isinstance(cls, type) else cls
    try:
        takes_arg = bool(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        takes_arg = False
    if not takes_arg:
        raise UserError(f"Task '{name}' takes nothing after a colon ('{name}:{arg}'); write '{name}'.")
    if not arg:
        raise UserError(f"'{name}:' names no data after the colon; write {name}:PATH for a local copy, or '{name}'.")
    return plugin_errors.call("task", name, "__init__", cls, arg)


def registry_unknown(source: str) -> UserError:
    from tokalign.errors import did_you_mean

    tasks = sorted(registry.available("task"))
    return UserError(
        f"Unknown data '{source}'.{did_you_mean(source, tasks)} Pass a built-in task ({', '.join(tasks)}), "
        "a .jsonl/.json/.parquet/.csv file, a tokalign artifact, or a hub id like org/name."
    )


def load_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in STREAMED:
        return list(iter_file(path))
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the file as "
                            "UTF-8 (e.g. iconv -f latin1 -t utf-8).") from e
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}.") from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}).")
        return data
    raise UserError(f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(SUFFIXES)}.")


def iter_file(path: Path) -> Iterator[dict]:
    """The records of a JSONL, Parquet or CSV file, one at a time as they are read."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    if suffix == ".csv":
        return _iter_csv(path)
    raise ValueError(f"{path}: not a file read record by record ({', '.join(STREAMED)})")


def _iter_parquet(path: Path, batch: int = 4096) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet file ({e}).") from e
    with f:
        batches = f.iter_batches(batch_size=batch)
        while True:
            try:
                part = next(batches, None)
                records = None if part is None else part.to_pylist()
            except Exception as e:
                raise UserError(f"{path}: not a readable Parquet file ({e}).") from e
            if records is None:
                return
            yield from records


def _not_utf8(path: Path, line: int, e: UnicodeDecodeError) -> UserError:
    return UserError(f"{path} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); "
                     "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).")


def _iter_csv(path: Path) -> Iterator[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader, None)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8 "
                                "(e.g. iconv -f latin1 -t utf-8).") from e
            except csv.Error as e:
                raise UserError(f"{path} line {reader.line_num}: not valid CSV ({e}).") from e
            if row is None:
                return
            yield dict(row)


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, e) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or remove that line.") from e
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}.")
            yield row


def load_hub(repo_id: str, split: str, config: str | None = None,
             hint: str = "If you are offline, download it elsewhere and pass a local file.") -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UserError("Loading hub datasets needs the 'datasets' package: pip install datasets.") from e
    import logging

    for name in ("huggingface_hub", "datasets", "fsspec"):  # their retry chatter is not our one line
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(repo_id, config, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"Cannot load dataset '{repo_id}' (split '{split}') from the hub: {first[:200]}. {hint}"
        ) from e
    return [dict(r) for r in ds]
