"""A fork server for the fault sweep: it imports torch, transformers and tokalign's stages once, then forks one real
CLI run (``tokalign.cli.app.main``) per request, so a run that is killed a second in has done real work instead of
spending that second importing.

Run as ``python zygote.py``; it speaks one JSON object a line. Requests on stdin:
``{"argv": [...], "cwd": DIR, "env": {...}, "stdout": FILE, "stderr": FILE}`` starts a run and is answered
``{"pid": PID}``; then ``kill`` (a line) SIGKILLs it, and when it has ended (killed or not) the answer is
``{"rc": CODE, "signal": SIG or null, "wall": SECONDS}``. Only this process reaps its children, and it kills a
child only before reaping it, so a pid is never reused under the harness's feet. One run at a time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

PRELOAD = (
    "torch", "transformers", "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen2.tokenization_qwen2",
    "safetensors.torch", "pyarrow.parquet", "pyarrow.dataset", "pandas", "sqlite3", "fsspec", "torch.distributed.checkpoint",
    "tokalign.cli.app", "tokalign.stages.prepare", "tokalign.stages.rollout", "tokalign.stages.score",
    "tokalign.stages.evaluate", "tokalign.train.loop", "tokalign.data.arith", "tokalign.rollout.hf",
    "tokalign.scoring.cache", "tokalign.verifiers.exact_match", "tokalign.algorithms.grpo", "tokalign.sampling",
)


def preload() -> None:
    """Import what the stages would (a module missing here is only imported by each run instead)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def child(req: dict) -> None:
    """In the forked process: become `tokalign ARGV` run in CWD; never return."""
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        from tokalign.cli import app

        sys.argv = [app.__file__, *req["argv"]]
        try:
            app.main(list(req["argv"]))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - the harness reads it in the run's stderr file
        try:
            sys.stderr.write(f"zygote child: {type(e).__name__}: {e}\n")
        except Exception:
            pass
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)


class Lines:
    """Lines from a file descriptor, unbuffered beyond what was read (so ``select`` on it is truthful)."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.eof = fd, b"", False

    def pending(self) -> bool:
        return b"\n" in self.buf or self.eof

    def get(self, timeout: float | None) -> str | None:
        """The next line ('' at end of input), or None when none came within ``timeout``."""
        while not self.pending():
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            self.buf += chunk
            self.eof = not chunk
        if b"\n" not in self.buf:
            return ""
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode() + "\n"


def serve() -> None:
    out = sys.stdout
    say = lambda obj: (out.write(json.dumps(obj) + "\n"), out.flush())
    lines = Lines(0)
    say({"ready": True})
    while True:
        line = lines.get(None)
        if not line:
            return
        if not line.strip() or line.strip() == "kill":  # a kill that came after its run ended
            continue
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(req)
        say({"pid": pid})
        status = None
        while status is None:
            cmd = lines.get(0.002)
            if cmd is not None and (cmd.strip() == "kill" or not cmd):  # asked to, or the harness went away
                os.kill(pid, signal.SIGKILL)
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        say({"rc": os.waitstatus_to_exitcode(status), "signal": sig, "wall": time.monotonic() - start})


if __name__ == "__main__":
    preload()
    serve()
