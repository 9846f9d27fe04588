"""The fault-injection harness: run a CLI stage, SIGKILL it at a chosen moment, and inspect what it left.

Two ways to run a stage:

* ``Lane`` — a fork server (``zygote.py``) that has imported torch, transformers and the stages once, forks one real
  ``tokalign`` run per request and kills it on demand: a run costs its work, not the ~10 s of imports, so a sweep
  affords many kills per stage;
* ``cold`` — a plain ``python -m tokalign`` subprocess, killed at a moment drawn over its whole life, Python start-up
  and imports included.

A kill moment is a ``Kill``: a delay after the start, or a delay after a file matching a glob appears (``<out>.tmp-*``:
the final write; ``<out>.partial/checkpoint-*.tmp``: a checkpoint being written), which puts kills inside the short
windows that matter most. ``cache_state`` checks and reads a score cache; ``tmpfs`` mounts a small file system.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ZYGOTE = Path(__file__).with_name("zygote.py")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Kill:
    """SIGKILL ``delay`` seconds after the start, or, with ``after``, ``delay`` seconds after a file matching that glob
    (relative to the run's cwd) first appears; None: let the run finish."""

    delay: float
    after: str | None = None
    gone: bool = False  # with ``after``: count from when the file, having appeared, is gone again (renamed, removed)

    def describe(self) -> str:
        event = f"{self.after} {'appears and is gone again' if self.gone else 'appears'}" if self.after else "start"
        return f"{self.delay:.3f}s after {event}"


@dataclass
class Result:
    rc: int | None  # exit code; None when killed
    killed: bool  # ended by our SIGKILL (False: it finished first)
    wall: float
    stdout: str
    stderr: str
    trigger_at: float | None = None  # with Kill.after: seconds from the start until the file appeared (None: never)


def env_for(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKALIGN_", "PYTEST_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKALIGN_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return env


def _wait_trigger(cwd: Path, pattern: str, ended, gone: bool = False) -> bool:
    """Poll (every ms) until a file matches ``pattern`` under ``cwd`` (``gone``: and then none does); False if
    ``ended()`` first."""
    for want in (True, False) if gone else (True,):
        while (next(iter(cwd.glob(pattern)), None) is not None) != want:
            if ended():
                return False
            time.sleep(0.001)
    return True


class Lane:
    """One fork server; runs one stage run at a time."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=ROOT, bufsize=0)
        self.buf = b""
        self.env = env
        msg = self._read(timeout=300)
        assert msg and msg.get("ready"), f"the fork server did not start: {msg}"

    def _read(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, kill: Kill | None = None, env: dict | None = None,
            timeout: float = 600) -> Result:
        tag = f".run-{time.monotonic_ns()}"
        out_f, err_f = cwd / f"{tag}.out", cwd / f"{tag}.err"
        req = {"argv": argv, "cwd": str(cwd), "env": {**self.env, **(env or {})}, "stdout": str(out_f), "stderr": str(err_f)}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        msg = self._read(timeout=60)
        assert msg and "pid" in msg, msg
        start = time.monotonic()
        done = None
        trigger_at = None
        if kill is not None:
            if kill.after:
                def ended():
                    nonlocal done
                    done = done or self._read(timeout=0)
                    return done is not None

                if _wait_trigger(cwd, kill.after, ended, kill.gone):
                    trigger_at = time.monotonic() - start
            if done is None:
                left = kill.delay if kill.after else kill.delay - (time.monotonic() - start)
                done = self._read(timeout=max(0.0, left))
            if done is None:
                self.proc.stdin.write(b"kill\n")
        if done is None:
            done = self._read(timeout=timeout)
            assert done is not None, f"tokalign {' '.join(argv)} ran past {timeout}s"
        text = lambda f: f.read_text(errors="replace") if f.exists() else ""
        res = Result(None if done["signal"] else done["rc"], done["signal"] == signal.SIGKILL, done["wall"],
                     text(out_f), text(err_f), trigger_at)
        out_f.unlink(missing_ok=True)
        err_f.unlink(missing_ok=True)
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cold(argv: list[str], cwd: Path, env: dict, kill: Kill | None = None, timeout: float = 600) -> Result:
    """``python -m tokalign ARGV`` as a fresh process (its own session), SIGKILLed at ``kill`` (delay after the start)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tokalign", *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    killed = False
    if kill is not None:
        assert kill.after is None, "cold runs are killed after a delay only"
        try:
            proc.wait(timeout=kill.delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
    out, err = proc.communicate(timeout=timeout)
    wall = time.monotonic() - start
    killed = killed and proc.returncode == -signal.SIGKILL
    return Result(None if killed else proc.returncode, killed, wall, out.decode(errors="replace"), err.decode(errors="replace"))


# ---------------------------------------------------------------- what a run left behind


def cache_state(directory: Path) -> dict[str, str]:
    """The score cache's entries (key -> value), after checking that SQLite finds the file intact; {} if there is none."""
    path = directory / "score-cache.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=30)
    try:
        (verdict,), = db.execute("PRAGMA integrity_check").fetchall()
        assert verdict == "ok", f"the score cache {path} is damaged: {verdict}"
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "results" not in tables:
            return {}
        entries = dict(db.execute("SELECT key, value FROM results"))
    finally:
        db.close()
    for k, v in entries.items():
        value, _tokens, info = json.loads(v)  # every entry is whole: a number, token values and info
        assert isinstance(float(value), float) and isinstance(info, dict), (k, v)
    return entries


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root only), unmounted afterwards; skips the test where mounting is not
    permitted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux's mount(8) to make a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
