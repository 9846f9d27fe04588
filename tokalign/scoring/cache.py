"""On-disk cache of reward results, keyed by (reward fingerprint, sample content).

The fingerprint (``ResolvedReward.fingerprint``) covers the plug-in's entry point, distribution,
version, the hash of the module file defining it, and its resolved options; the sample part covers
everything a reward sees except the row id (prompt, completion, completion_ids, reference,
finish_reason, metadata). So re-scoring the same rollouts with one more reward computes only that
reward. Failures and timeouts are not cached: they are retried next time.

One SQLite file (``$TOKALIGN_CACHE``, else ``$XDG_CACHE_HOME/tokalign``, else ``~/.cache/tokalign``)
is safe for concurrent runs. A cache that cannot be opened or written is skipped with one warning:
it never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

FILE = "score-cache.sqlite"
_BATCH = 500  # keys per SELECT (SQLite's variable limit is 999 on old builds)


def default_dir() -> Path:
    if os.environ.get("TOKALIGN_CACHE"):
        return Path(os.environ["TOKALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokalign"


def sample_digest(sample) -> str:
    content = [sample.prompt, sample.completion, list(sample.completion_ids), sample.reference, sample.finish_reason, sample.metadata]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def key(fingerprint: str, digest: str) -> str:
    return hashlib.sha256(f"{fingerprint}\0{digest}".encode()).hexdigest()


class ScoreCache:
    def __init__(self, directory: Path | None = None):
        self.path = (directory or default_dir()) / FILE
        self._db = None
        self.broken: str | None = None

    def _warn(self, e: Exception) -> None:
        if self.broken is None:
            self.broken = f"{type(e).__name__}: {e}"
            sys.stderr.write(f"warning: score cache {self.path} unusable ({self.broken}); scoring without it\n")

    def _conn(self):
        if self._db is None and self.broken is None:
            import sqlite3

            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = self._open(sqlite3)
            except Exception as e:  # sqlite3.Error, OSError: a read-only home, a damaged file
                self._warn(e)
        return self._db

    def _open(self, sqlite3, patience: float = 30.0):
        """A connection to a cache in WAL mode with its table. Several processes opening a new cache at once get
        "database is locked" at once from the switch to WAL (SQLite returns it without calling the busy handler, to
        avoid a deadlock; seen with 6 processes on a loaded machine): wait and try again, up to ``patience`` s."""
        deadline, pause = time.monotonic() + patience, 0.01
        while True:
            db = sqlite3.connect(self.path, timeout=patience)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.commit()
                return db
            except sqlite3.OperationalError as e:
                db.close()
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            except BaseException:
                db.close()
                raise

    def get_many(self, keys: list[str]) -> dict[str, tuple[float, Any, dict]]:
        db = self._conn()
        found: dict[str, tuple[float, Any, dict]] = {}
        if db is None:
            return found
        try:
            for i in range(0, len(keys), _BATCH):
                part = keys[i : i + _BATCH]
                marks = ",".join("?" * len(part))
                for k, v in db.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", part):
                    value, token_values, info = json.loads(v)
                    found[k] = (float(value), token_values, info)
        except Exception as e:
            self._warn(e)
            return {}
        return found

    def put_many(self, entries: list[tuple[str, tuple[float, Any, dict]]]) -> None:
        db = self._conn()
        if db is None or not entries:
            return
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)",
                               [(k, json.dumps(list(v), default=str)) for k, v in entries])
        except Exception as e:
            self._warn(e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
