"""Run untrusted Python (model-written code) in a throw-away sandbox on Linux.

Each run is one child process tree. What is enforced:

* **No network** — the child gets a fresh network namespace (only a loopback interface, left
  down): the internet *and* localhost are unreachable, and abstract Unix sockets are the
  namespace's own. Without namespaces the sandbox refuses to run unless ``allow_network=True``.
* **Writes only in a fresh temp dir** — the child gets its own mount namespace in which every
  mount is remounted read-only, and its working directory (also ``HOME`` and ``TMPDIR``) is a new
  tmpfs of ``disk_mb`` MB that vanishes with the run. A root parent also drops the child to an
  unprivileged uid of its own (random, from a high range) with no capabilities and
  ``no_new_privs``, so it cannot undo the read-only mounts, open root-only devices or sockets, or
  signal anyone else's processes. A non-root parent uses an unprivileged user namespace instead
  (same mounts; the child keeps the user's uid, so what hides the user's files is the next point).
* **Private places hidden** — in the mount namespace (either mode) each of these is covered by an
  empty read-only tmpfs before the program starts: ``/root``, ``/home``, the invoking user's home
  (``$HOME`` and the password-file entry), ``$XDG_CACHE_HOME``/``CONFIG``/``DATA``/``STATE``,
  ``$XDG_RUNTIME_DIR`` and ``/run/user/UID`` (agent sockets), ``$HF_HOME`` and the directory of
  ``$HF_TOKEN_PATH`` and of ``$SSH_AUTH_SOCK``, where they exist; so ``~/.ssh``, ``~/.netrc`` and
  the Hugging Face token cannot be read, wherever they live. A system or shared directory (``/``,
  ``/tmp``, ``/usr``…, as the "home" of a service account) is never hidden. Only what the run
  needs is put back, read-only, at its own path: the interpreter's binary, every symlink on
  the way to it (made again), its prefixes (``sys.prefix``/``base_prefix``/``exec_prefix``: the venv and the
  Python install, not the project around them) and the sandbox's own temp dir. So a venv or a
  pyenv below the hidden home still runs (as root, a directory on those paths that other uids
  cannot traverse is hidden the same way, so the private uid can reach the interpreter). An
  interpreter whose prefix *is* a hidden place (a Python installed straight into ``$HOME``) is
  refused with a message. The program's ``/proc`` is its own PID namespace's (its init is not
  dumpable); where the kernel refuses that mount in a user namespace, an empty ``/proc`` is used.
* **Resources** — ``resource`` limits in the child: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address
  space), RLIMIT_FSIZE (size of any written file, stdout/stderr included: they go to files),
  RLIMIT_NPROC (processes of the sandbox uid), RLIMIT_NOFILE, RLIMIT_CORE = 0.
* **Wall time** — the whole process group is SIGKILLed at ``timeout_s``. The child also runs in its
  own PID namespace whose init is ours: when the program ends or is killed, every process it
  started dies with it, even one that left the process group (``setsid``). If the scoring process
  itself dies, PR_SET_PDEATHSIG takes the sandbox down too.

Where namespaces are impossible, the sandbox refuses with one line saying why and what to do. As
root that means no CAP_SYS_ADMIN (a default Docker container); as a normal user, unprivileged user
namespaces switched off (``kernel.unprivileged_userns_clone``, ``user.max_user_namespaces``) or
restricted by AppArmor (``kernel.apparmor_restrict_unprivileged_userns``). With
``allow_network=True`` it runs there anyway, but nothing can be mounted, so nothing is hidden:
only the resource limits, the wall clock and — as root — the private uid apply; world-writable
places such as /tmp are then writable, and the interpreter must be reachable by that uid
(``python`` option). As root, the private uid still cannot read the invoking user's private
places as long as other uids cannot traverse them (``/root`` is 0700): the sandbox checks that
and refuses if one is open (e.g. a 0755 ``$HOME``). A non-root user's program would run as that
user and could read all their files, so without namespaces a non-root sandbox refuses even with
``allow_network=True``, unless ``allow_home_access=True`` accepts exactly that.

Not enforced: reading files outside the hidden places (whatever is world-readable stays
readable; in user-namespace mode, also what the user owns elsewhere, e.g. a project directory
outside ``$HOME``; without namespaces, other users' homes keep only their own permissions), CPU
share and memory bandwidth (no cgroups), and Unix sockets on the filesystem outside the hidden
places that the sandbox uid may open. It is a guard against accidents and sloppy or greedy
programs, not a hardened jail against an attacker with a kernel exploit.

The module is also the launcher script: ``python -I -S sandbox.py CONFIG.json`` (stdlib only, so
no import of tokalign or its dependencies happens in the child).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

SETUP_FAILED = 125  # launcher exit code when the sandbox could not be set up (details on the status pipe)
_UID_BASE, _UID_SPAN = 1_900_000_000, 50_000_000  # sandbox uids (root parent): far above any real account

# never hidden, even when named as someone's home (service accounts have homes such as / or /usr/sbin):
# shared places, and anything inside the system trees
_SHARED_DIRS = {"/", "/tmp", "/var", "/var/tmp", "/var/lib", "/run", "/dev/shm", "/opt", "/srv", "/mnt", "/media",
                "/nonexistent"}
_SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys", "/dev",
                 "/boot")

# pseudo file systems whose remount may be refused; their files are root-owned (the sandbox uid
# cannot write them) and they hold no user data
_PSEUDO_FS = {
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs", "nsfs", "rpc_pipefs",
}


@dataclass
class Limits:
    timeout_s: float = 5.0  # wall clock per run; the process group is killed at this point
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS (address space: Python itself takes ~30 MB of it)
    file_size_mb: int = 16  # RLIMIT_FSIZE, also bounds captured stdout/stderr
    disk_mb: int = 64  # size of the tmpfs working directory
    max_processes: int = 32  # RLIMIT_NPROC for the sandbox uid
    max_open_files: int = 256  # RLIMIT_NOFILE
    allow_network: bool = False  # True: no network namespace (and run even where namespaces are impossible)
    allow_home_access: bool = False  # True: run even where nothing can hide the user's files (non-root, no namespaces)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "disk_mb", "max_processes", "max_open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")
        for name in ("cpu_s", "memory_mb", "file_size_mb", "disk_mb", "max_processes", "max_open_files"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"sandbox limit {name} must be a whole number, got {getattr(self, name)!r}")
            setattr(self, name, int(getattr(self, name)))
        for name in ("allow_network", "allow_home_access"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class Job:
    """One program run: ``files`` (name -> text) are placed in the working directory, then
    ``python -I -B script`` runs there with ``stdin``. ``secret`` (bytes), when given, is readable
    once on file descriptor 3 (a harness can prove it ran to its end by echoing it)."""

    files: dict[str, str]
    script: str
    stdin: str = ""
    secret: bytes | None = None


@dataclass
class Result:
    exit_code: int | None  # None when killed by a signal
    signal: int | None  # the signal that ended the program, if any
    timed_out: bool  # killed at the wall-clock limit
    stdout: str
    stderr: str
    wall_s: float
    isolation: str = ""  # what the launcher set up, e.g. "netns,mountns,pidns,uid"
    setup_error: str | None = None  # the sandbox could not be built (not the program's fault)
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.setup_error is None

    def reason(self) -> str:
        """One short phrase for a failed run."""
        import signal as _signal

        if self.setup_error:
            return f"sandbox error: {self.setup_error}"
        if self.timed_out:
            return "wall-clock timeout"
        if self.signal is not None:
            name = {_signal.SIGXCPU: "CPU time limit", _signal.SIGXFSZ: "file size limit",
                    _signal.SIGKILL: "killed (SIGKILL)", _signal.SIGSEGV: "segfault"}.get(self.signal)
            return name or f"killed by signal {self.signal}"
        last = [line for line in self.stderr.strip().splitlines() if line.strip()]
        tail = last[-1].strip()[:200] if last else ""
        return f"exit code {self.exit_code}" + (f": {tail}" if tail else "")


# ------------------------------------------------------------------ parent side


def _within(path: str, top: str) -> bool:
    """``path`` is ``top`` or lies below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _private_places() -> tuple[list[str], list[str]]:
    """(places, own): the existing directories to hide from a sandboxed program (real paths), and
    those of them that are the invoking user's own (the fallback without namespaces checks these)."""
    import pwd

    env = os.environ
    uid = os.getuid()
    own = ["/root", env.get("HOME"), *(env.get(f"XDG_{k}_HOME") for k in ("CACHE", "CONFIG", "DATA", "STATE")),
           env.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}", env.get("HF_HOME")]
    try:
        own.append(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        pass
    for name in ("HF_TOKEN_PATH", "SSH_AUTH_SOCK"):  # a file: hide the directory that holds it
        if env.get(name):
            own.append(os.path.dirname(os.path.abspath(env[name])))

    def usable(p: str | None) -> str | None:
        if not p or not os.path.isabs(p):
            return None
        real = os.path.realpath(p)
        if real in _SHARED_DIRS or any(_within(real, t) for t in _SYSTEM_TREES) or not os.path.isdir(real):
            return None
        return real

    own_real = sorted({r for r in map(usable, own) if r})
    everything = sorted({*own_real, *filter(None, [usable("/home")])})
    return everything, own_real


_PREFIXES: dict[str, list[str]] = {}


def _prefixes(python: str) -> list[str]:
    """sys.prefix, base_prefix, exec_prefix, base_exec_prefix of ``python`` (asked once per path)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    if python not in _PREFIXES:
        import subprocess

        ask = "import sys; print('\\n'.join((sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)))"
        try:
            out = subprocess.run([python, "-I", "-c", ask], check=False, capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}).stdout
            found = sorted({p for p in out.splitlines() if os.path.isabs(p)})
        except (OSError, ValueError, subprocess.SubprocessError):
            found = []
        # not a Python that answers: at least the directory above its bin/
        _PREFIXES[python] = found or [os.path.dirname(os.path.dirname(os.path.realpath(python)))]
    return _PREFIXES[python]


def _route(path: str) -> list[list[str]]:
    """How ``path`` is reached: ["link", where, target] for each symlink passed on the way (in
    order), then ["bind", real path]. Every ``where`` and the real path have no symlink above them."""
    steps: list[list[str]] = []
    todo = [p for p in os.path.abspath(path).split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        where = "/" + "/".join([*done, part])
        if os.path.islink(where) and hops < 40:
            hops += 1
            target = os.readlink(where)
            steps.append(["link", where, target])
            todo = [p for p in target.split("/") if p] + todo
            if target.startswith("/"):
                done = []
            continue
        done.append(part)
    steps.append(["bind", "/" + "/".join(done)])
    return steps


def _mount_plan(python: str, sandbox_dir: str, root: bool) -> dict:
    """What the launcher hides and what it puts back (see the module docstring): {"hide": [dir, ...],
    "keep": [["link", where, target] | ["bind", path], ...], "own": [dir, ...]}."""
    hide, own = _private_places()
    keep: list[list[str]] = []
    for p in [python, *_prefixes(python), sandbox_dir]:
        for step in _route(p):
            if step not in keep and os.path.lexists(step[1]):  # (a missing one fails later, as "cannot start")
                keep.append(step)
    if root:  # the private uid must be able to walk to what is kept: hide (and so open up) what it cannot traverse
        for step in keep:
            cur = ""
            for part in step[1].strip("/").split("/")[:-1]:
                cur += "/" + part
                try:
                    mode = os.stat(cur).st_mode
                except OSError:
                    break
                if not mode & 0o001:
                    if cur not in hide:
                        hide.append(cur)
                    break
    return {"hide": sorted(hide), "keep": keep, "own": own}


class _Running:
    def __init__(self, job: Job, limits: Limits, python: str):
        import secrets
        import subprocess
        import tempfile
        import time

        self.limits = limits
        self.dir = tempfile.mkdtemp(prefix="tokalign-sbx-")
        os.chmod(self.dir, 0o755)  # the sandbox uid must reach work/ below it
        indir = os.path.join(self.dir, "in")
        os.mkdir(indir, 0o755)
        os.mkdir(os.path.join(self.dir, "work"), 0o755)
        for name, text in job.files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file names are plain names, got {name!r}")
            with open(os.path.join(indir, name), "w", encoding="utf-8") as f:
                f.write(text)
        root = os.geteuid() == 0
        cfg = {
            "dir": self.dir,
            "python": python,
            "script": job.script,
            "files": sorted(job.files),
            "limits": {k: getattr(limits, k) for k in ("cpu_s", "memory_mb", "file_size_mb", "disk_mb",
                                                        "max_processes", "max_open_files")},
            "allow_network": limits.allow_network,
            "allow_home_access": limits.allow_home_access,
            "uid": _UID_BASE + secrets.randbelow(_UID_SPAN) if root else None,
            "namespaces": not _NO_NAMESPACES,
            **_mount_plan(python, self.dir, root),
        }
        self.uid = cfg["uid"]
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        self.out = tempfile.TemporaryFile(dir=self.dir)
        self.err = tempfile.TemporaryFile(dir=self.dir)
        stdin = tempfile.TemporaryFile(dir=self.dir)
        stdin.write(job.stdin.encode("utf-8"))
        stdin.seek(0)
        self.status_r, status_w = os.pipe()
        secret_r, secret_w = os.pipe()
        os.write(secret_w, job.secret or b"")
        os.close(secret_w)
        cfg_fds = {"status_fd": status_w, "secret_fd": secret_r}
        try:
            self.start = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), os.path.join(self.dir, "config.json"),
                 json.dumps(cfg_fds)],
                stdin=stdin, stdout=self.out, stderr=self.err, pass_fds=(status_w, secret_r),
                start_new_session=True, cwd=self.dir, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        finally:
            os.close(status_w)
            os.close(secret_r)
            stdin.close()
        self.deadline = self.start + limits.timeout_s

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, timed_out: bool) -> Result:
        import shutil
        import time

        if timed_out:
            self.kill()
        code = self.proc.wait()
        wall = time.monotonic() - self.start
        os.set_blocking(self.status_r, False)
        try:
            status = os.read(self.status_r, 65536).decode("utf-8", "replace")
        except BlockingIOError:
            status = ""
        os.close(self.status_r)
        cap = self.limits.file_size_mb << 20
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read(cap).decode("utf-8", "replace"))
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        setup_error, isolation = None, ""
        for line in status.splitlines():
            if line.startswith("ok "):
                isolation = line[3:].strip()
            elif line.startswith("error "):
                setup_error = line[6:].strip()
        if not status and not timed_out:  # died before it could report
            setup_error = f"the launcher exited with {code}: " + (texts[1].strip().splitlines() or ["no message"])[-1]
        if timed_out and self.uid is not None and "pidns" not in isolation:  # no PID namespace took the rest down
            import subprocess

            subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), "--kill-uid", str(self.uid)],
                           env={"PATH": "/usr/bin:/bin"}, timeout=30)
        if setup_error:
            return Result(None, None, False, texts[0], texts[1], wall, isolation, setup_error)
        sig = code - 128 if code > 128 and not timed_out else (-code if code < 0 else None)
        exit_code = None if (sig is not None or timed_out) else code
        return Result(exit_code, sig, timed_out, texts[0], texts[1], wall, isolation)


def run_many(jobs: list[Job], limits: Limits, *, workers: int = 1, python: str | None = None) -> list[Result]:
    """Run ``jobs`` (at most ``workers`` at a time) and return their results in order. Single
    threaded, so a SIGALRM-based timeout of the caller can interrupt it: every sandbox still
    running is then killed before the exception propagates."""
    import time

    python = python or sys.executable
    results: list[Result | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    running: dict[int, _Running] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                i = pending.pop()
                running[i] = _Running(jobs[i], limits, python)
            now = time.monotonic()
            for i, r in list(running.items()):
                if r.proc.poll() is not None:
                    results[i] = r.finish(False)
                    del running[i]
                elif now >= r.deadline:
                    results[i] = r.finish(True)
                    del running[i]
            if running:
                time.sleep(0.005)
    finally:
        for r in running.values():  # interrupted: leave nothing behind
            r.kill()
            try:
                r.finish(True)
            except Exception:
                pass
    return results  # type: ignore[return-value]


def run(job: Job, limits: Limits | None = None, *, python: str | None = None) -> Result:
    return run_many([job], limits or Limits(), python=python)[0]


_PROBED: dict[tuple, str] = {}
_NO_NAMESPACES = False  # tests set it to exercise the degraded path (allow_network=True, namespaces impossible)


def check_available(limits: Limits, python: str | None = None) -> str:
    """Run an empty program once (per process and setting) and return the isolation it got, or
    raise UserError naming why the sandbox cannot run here and what to do."""
    from tokalign.errors import UserError

    python = python or sys.executable
    key = (limits.allow_network, limits.allow_home_access, python, os.geteuid(), _NO_NAMESPACES, os.environ.get("HOME"))
    if key not in _PROBED:
        r = run(Job({"probe.py": "pass\n"}, "probe.py"),
                Limits(timeout_s=max(30.0, limits.timeout_s), allow_network=limits.allow_network,
                       allow_home_access=limits.allow_home_access), python=python)
        if r.setup_error:  # the launcher's message says why and what to do
            raise UserError(f"code sandbox unavailable: {r.setup_error}.")
        if not r.ok:
            raise UserError(f"code sandbox: the interpreter {python} does not run inside the sandbox ({r.reason()}); "
                            "set the option python=/path/to/a/world-readable/python.")
        _PROBED[key] = r.isolation
    return _PROBED[key]


# ------------------------------------------------------------------ launcher (child side, stdlib only)

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
       "relatime": 1 << 21, "strictatime": 1 << 24}
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38


class _SetupError(Exception):
    pass


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        e = ctypes.get_errno()
        raise _SetupError(f"{what}: {os.strerror(e)}")


def _mount(libc, src, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mountinfo() -> list[dict]:
    def unescape(s: str) -> str:
        import re

        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)

    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            out.append({"point": unescape(parts[4]), "opts": parts[5].split(","), "fstype": right.split()[0]})
    return out


def _visible(mounts: list[dict]) -> list[dict]:
    """Mounts not covered by a later mount on the same path or on one of its ancestors."""
    vis = []
    for i, m in enumerate(mounts):
        p = m["point"].rstrip("/") + "/"
        if not any((p.startswith(n["point"].rstrip("/") + "/")) for n in mounts[i + 1:]):
            vis.append(m)
    return vis


def _makedirs(path: str) -> None:
    """mkdir -p inside a fresh tmpfs, each new level 0755 whatever the umask (the private uid walks through)."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if not os.path.lexists(cur):
            os.mkdir(cur)
            os.chmod(cur, 0o755)


def _hide_private_places(libc, cfg: dict) -> None:
    """Cover each of cfg["hide"] with an empty tmpfs and put back, at its own path, what cfg["keep"]
    names: a symlink is made again, a directory or file is bind-mounted from a descriptor opened
    before anything was covered. Runs in the new mount namespace, before the read-only remount."""
    import stat

    hide, keep = cfg["hide"], cfg["keep"]
    for h in hide:
        if ["bind", h] in keep:  # (a place inside what is kept is hidden again, after the bind)
            raise _SetupError(f"cannot hide {h} from the program: the interpreter is installed right there (its "
                              "prefix); use a Python installed elsewhere (option python=...)")
    fds: dict[str, int] = {}
    try:
        for step in keep:
            if step[0] == "bind" and any(_within(step[1], h) for h in hide):
                fds[step[1]] = os.open(step[1], os.O_PATH | os.O_CLOEXEC)
        # outer paths first; at the same depth a hide first (equal paths were refused above)
        ops = sorted([(p.count("/"), 0, p, None) for p in hide] + [(s[1].count("/"), 1, s[1], s) for s in keep])
        done: list[tuple[str, str]] = []  # (path, "hide" | "keep") now in effect
        for _, order, path, step in ops:
            around = [d for d in done if d[0] != path and _within(path, d[0])]
            inner = max(around, key=lambda d: len(d[0]))[1] if around else None
            if order == 0:
                if inner == "hide":
                    continue  # inside an empty tmpfs already
                _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=1m,mode=0755")
                done.append((path, "hide"))
            elif inner == "hide":  # elsewhere it is visible as it is
                _makedirs(os.path.dirname(path))
                if step[0] == "link":
                    if not os.path.lexists(path):
                        os.symlink(step[2], path)
                    continue
                if stat.S_ISDIR(os.fstat(fds[path]).st_mode):
                    _makedirs(path)
                else:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                _mount(libc, f"/proc/self/fd/{fds[path]}", path, None, _MS_BIND | _MS_REC)
                done.append((path, "keep"))
    finally:
        for fd in fds.values():
            os.close(fd)


def _setup_mounts(libc, cfg: dict, uid: int | None) -> None:
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _hide_private_places(libc, cfg)
    failed = []
    for m in _mountinfo():
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for opt in m["opts"]:
            flags |= _MS.get(opt, 0)
        if libc.mount(None, m["point"].encode(), None, flags, None) != 0:
            failed.append(m["point"])
    writable = [m["point"] for m in _visible(_mountinfo()) if "ro" not in m["opts"] and m["fstype"] not in _PSEUDO_FS]
    if writable:
        raise _SetupError(f"could not make {', '.join(writable[:3])} read-only")
    work = os.path.join(cfg["dir"], "work")
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    _mount(libc, "tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['limits']['disk_mb']}m,mode=0700{owner}")


def _exec_program(cfg: dict, fds: dict, work: str, uid: int | None) -> None:
    """In the grandchild: limits, identity, then exec the interpreter. Never returns."""
    import resource

    lim = cfg["limits"]
    mb = 1 << 20
    os.chdir(work)
    for rl, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                      (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
                      (resource.RLIMIT_FSIZE, (lim["file_size_mb"] * mb,) * 2),
                      (resource.RLIMIT_NPROC, (lim["max_processes"],) * 2),
                      (resource.RLIMIT_NOFILE, (lim["max_open_files"],) * 2),
                      (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(rl, value)
    os.dup2(fds["secret_fd"], 3)
    os.closerange(4, 1 << 16)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    libc = _libc()
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(cfg["python"], [cfg["python"], "-I", "-B", cfg["script"]], env)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a sandbox's own uid): kill(-1) from a child running as it."""
    import signal

    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(3):
                try:
                    os.kill(-1, signal.SIGKILL)  # every process we may signal: ours, and this one last
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _no_namespaces(root: bool, uid: int, err: str) -> str:
    """The one-line refusal where the namespaces cannot be created: why, and what to do."""
    if root:
        return (f"cannot create network/mount namespaces (unshare: {err}); as root this needs CAP_SYS_ADMIN "
                "(in Docker: --cap-add SYS_ADMIN), or set allow_network=true to run with the limits and a "
                "private uid only")
    return (f"cannot create network/mount namespaces (unshare: {err}): unprivileged user namespaces are not "
            f"available to uid {uid}; enable them (sysctl kernel.unprivileged_userns_clone=1 where it exists, "
            "user.max_user_namespaces > 0, kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), or run as "
            "root, or set allow_network=true and allow_home_access=true to run with the limits only (the "
            "program could then read your files)")


def _open_to_others(path: str) -> bool:
    """Every directory from / down to ``path`` (itself included) can be searched by other uids."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        try:
            if not os.stat(cur).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _launch(cfg_path: str, fds_json: str) -> None:
    import ctypes
    import re  # noqa: F401  (used by _mountinfo: imported now, the interpreter's own files may be hidden later)
    import resource  # noqa: F401  (used by _exec_program, same reason)
    import shutil
    import signal
    import stat  # noqa: F401  (used by _hide_private_places, same reason)

    fds = json.loads(fds_json)
    status = fds["status_fd"]
    os.set_inheritable(status, False)
    libc = _libc()

    def report(line: str) -> None:
        os.write(status, (line + "\n").encode("utf-8", "replace"))

    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(pdeathsig)")
        if os.getppid() == 1:
            raise _SetupError("the scoring process is gone")
        root = os.geteuid() == 0
        uid = cfg["uid"] if root else None
        outer_uid, outer_gid = os.getuid(), os.getgid()  # before unshare: inside a new user namespace both read 65534
        flags = _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWPID | (0 if cfg["allow_network"] else _CLONE_NEWNET)
        if not root:
            flags |= _CLONE_NEWUSER
        isolation: list[str] = []
        work = os.path.join(cfg["dir"], "work")
        if not cfg["namespaces"] or libc.unshare(flags) != 0:
            err = os.strerror(ctypes.get_errno()) if cfg["namespaces"] else "disabled"
            if not cfg["allow_network"]:
                raise _SetupError(_no_namespaces(root, outer_uid, err))
            flags = 0  # opted out: run with limits only (and a dropped uid when root); nothing can be hidden
            if not cfg["allow_home_access"]:
                if not root:
                    raise _SetupError(
                        f"no namespaces here (unshare: {err}), so nothing can hide your files from the program: it "
                        f"would run as you (uid {outer_uid}) and could read your home; enable unprivileged user "
                        "namespaces, or run as root, or set allow_home_access=true to accept that")
                exposed = [p for p in cfg["own"] if _open_to_others(p)]
                if exposed:
                    raise _SetupError(
                        f"no namespaces here (unshare: {err}), so {exposed[0]} cannot be hidden, and other uids can "
                        f"enter it (the program could read its world-readable files); chmod 700 {exposed[0]}, or "
                        "set allow_home_access=true to accept that")
        if flags & _CLONE_NEWUSER:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{outer_uid} {outer_uid} 1"),
                               ("gid_map", f"{outer_gid} {outer_gid} 1")):
                try:
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                except OSError as e:
                    raise _SetupError(
                        f"a user namespace was made but its {name} could not be written ({e.strerror}); AppArmor's "
                        "kernel.apparmor_restrict_unprivileged_userns=1 does this (set it to 0, or give this Python an "
                        "AppArmor profile that allows userns), or run as root") from None
        if flags:
            try:
                _setup_mounts(libc, cfg, uid)
            except _SetupError as e:
                if root or "Operation not permitted" not in str(e):
                    raise
                raise _SetupError(f"{e} inside the user namespace; user namespaces look restricted here (AppArmor: "
                                  "sysctl kernel.apparmor_restrict_unprivileged_userns=0), or run as root") from None
            isolation += (["netns"] if flags & _CLONE_NEWNET else []) + ["mountns", "pidns"]
            isolation += ["userns"] if flags & _CLONE_NEWUSER else []
        elif uid is not None:
            os.chown(work, uid, uid)
            os.chmod(work, 0o700)
        if uid is not None:
            isolation.append("uid")
        for name in cfg["files"]:
            dst = os.path.join(work, name)
            shutil.copyfile(os.path.join(cfg["dir"], "in", name), dst)
            os.chmod(dst, 0o644)
        report("ok " + ",".join(isolation or ["limits-only"]))
    except Exception as e:
        report(f"error {e}")
        os._exit(SETUP_FAILED)

    init = os.fork()
    if init == 0:  # pid 1 of the new PID namespace (when there is one)
        try:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program cannot look into us (/proc/1/cwd, fd, mem)
            os.close(status)
            os.chdir("/")
            if flags & _CLONE_NEWPID:  # a /proc of our own: the program sees only its own processes
                ro = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY
                if libc.mount(b"proc", b"/proc", b"proc", ro, None) != 0 and uid is None:
                    # refused (a /proc with covered parts, as in containers): the host's /proc would show the
                    # scoring process, which runs as the same user; an empty one instead
                    _mount(libc, "tmpfs", "/proc", "tmpfs", ro, "size=4k,mode=0555")
            child = os.fork()
            if child == 0:
                try:
                    _exec_program(cfg, fds, work, uid)
                except BaseException as e:
                    os.write(2, f"tokalign sandbox: cannot start {cfg['python']}: {e}\n".encode())
                finally:
                    os._exit(127)
            while True:  # reap everything; leave when the program itself ends
                pid, st = os.wait()
                if pid == child:
                    if not flags & _CLONE_NEWPID and uid is not None:
                        _kill_uid(uid)  # no PID namespace: end whatever the program left running
                    os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
        except BaseException:
            os._exit(SETUP_FAILED)
    os.close(status)
    _, st = os.waitpid(init, 0)
    os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


if __name__ == "__main__":
    if sys.argv[1] == "--kill-uid":  # the parent's clean-up after a wall-clock kill without a PID namespace
        _kill_uid(int(sys.argv[2]))
    else:
        _launch(sys.argv[1], sys.argv[2])
