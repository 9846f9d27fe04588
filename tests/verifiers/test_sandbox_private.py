"""The code sandbox keeps the invoking user's private files away from the program, as root and as a normal user.

Non-root mode is tested for real: as root, the fixture creates a user (useradd) with a home holding known secrets
(~/.ssh/id_rsa, ~/.netrc, ~/.cache/huggingface/token, a project ~/proj with a copy of tokalign and a venv), drops to
that user's uid/gid with setpriv and runs the sandbox there (a user namespace); the user is removed (userdel -r)
afterwards, failed test or not. The escape attempts of test_code.py are repeated in that mode. Skipped where the
machine cannot (not root, no useradd/setpriv, no /usr/bin/python3).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from test_code import ADD, ESCAPES, _localhost, _write_outside, needs_sandbox

from tokalign import sandbox

CAN_CREATE_USERS = (sys.platform.startswith("linux") and os.geteuid() == 0 and os.path.exists("/usr/bin/python3")
                    and all(shutil.which(t) for t in ("useradd", "userdel", "setpriv")))
needs_a_test_user = pytest.mark.skipif(
    not CAN_CREATE_USERS, reason="needs root (to create a user), useradd/userdel, setpriv and /usr/bin/python3")
ONE_TEST = ["assert add(1, 2) == 3"]


@dataclass
class SandboxUser:
    name: str
    uid: int
    gid: int
    home: Path
    proj: Path  # ~/proj: the copy of tokalign and the venv
    python: str  # ~/proj/.venv/bin/python (or /usr/bin/python3 where venv is missing)
    base: Path  # /tmp/...: places of the user's outside the home (HF_HOME, XDG_CACHE_HOME, a writable dir)
    env: dict
    secrets: dict  # path -> the secret string in it

    def run(self, body: str, timeout: float = 120, **env: str) -> tuple[dict, str]:
        """Run Python ``body`` as this user (tokalign importable; ``env`` added to the user's environment); it
        prints one JSON line last. -> (that line, all the output)."""
        script = f"import json, sys\nsys.path.insert(0, {str(self.proj)!r})\n" + body
        proc = subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                               self.python, "-c", script], check=False, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **env}, cwd=self.home)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            os.lchown(os.path.join(dirpath, n), uid, gid)


def _put(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.fixture(scope="module")
def test_user():
    name = f"tka{uuid.uuid4().hex[:10]}"
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    subprocess.run(["useradd", "--create-home", "--user-group", "--shell", shell, "--comment", "tokalign sandbox test",
                    name], check=True, capture_output=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="tokalign-user-", dir="/tmp"))
    try:
        pw = pwd.getpwnam(name)
        home = Path(pw.pw_dir)
        proj = home / "proj"
        shutil.copytree(ROOT / "tokalign", proj / "tokalign", ignore=shutil.ignore_patterns("__pycache__"))
        tag = uuid.uuid4().hex
        secrets = {
            home / ".ssh" / "id_rsa": f"SSH-KEY-{tag}",
            home / ".netrc": f"NETRC-{tag}",
            home / ".cache" / "huggingface" / "token": f"HF-TOKEN-{tag}",
            proj / ".env": f"PROJECT-ENV-{tag}",
            base / "hf" / "token": f"HF-HOME-TOKEN-{tag}",  # $HF_HOME outside the home
            base / "xdg-cache" / "secret": f"XDG-CACHE-{tag}",  # $XDG_CACHE_HOME outside the home
        }
        for path, text in secrets.items():
            _put(path, text, 0o644 if path.name == "token" else 0o600)  # huggingface_hub writes the token 0644
        (base / "outside").mkdir()  # the user's own, outside the home: only the sandbox stops a write there
        _chown_tree(home, pw.pw_uid, pw.pw_gid)
        for d in ("hf", "xdg-cache", "outside"):
            _chown_tree(base / d, pw.pw_uid, pw.pw_gid)
            (base / d).chmod(0o700)
        base.chmod(0o755)
        home.chmod(0o700)
        (home / ".ssh").chmod(0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "HF_HOME": str(base / "hf"),
               "XDG_CACHE_HOME": str(base / "xdg-cache"), "HF_TOKEN": f"HF-ENV-{tag}"}
        secrets_by_path = {str(p): t for p, t in secrets.items()}
        secrets_by_path["$HF_TOKEN"] = env["HF_TOKEN"]
        made = subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                               "/usr/bin/python3", "-m", "venv", "--without-pip", str(proj / ".venv")],
                              check=False, capture_output=True, env=env, cwd=home, timeout=120)
        python = str(proj / ".venv" / "bin" / "python") if made.returncode == 0 else "/usr/bin/python3"
        yield SandboxUser(name, pw.pw_uid, pw.pw_gid, home, proj, python, base, env, secrets_by_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for _ in range(50):  # a sandbox of the user's that is still dying makes userdel refuse (exit 8)
            gone = subprocess.run(["userdel", "--remove", name], check=False, capture_output=True, text=True, timeout=60)
            if gone.returncode in (0, 6, 12):  # 6: no such user; 12: only the mail spool was missing
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"userdel {name}: {gone.stderr.strip()}")


def _no_secret_in(text: str, user: SandboxUser) -> None:
    leaked = [p for p, s in user.secrets.items() if s in text]
    assert not leaked, f"the secrets of {leaked} reached the output"


# ------------------------------------------------------------------ non-root mode (a user namespace), for real


SNOOP = """import json, os, sys
seen = {"uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), "read": {}, "walk": []}
for p in PATHS + ['/proc/1/root' + p for p in PATHS] + ['/proc/1/cwd/config.json', '/proc/1/environ']:
    try:
        with open(p) as f:
            seen["read"][p] = f.read(300)
    except OSError as e:
        seen["read"][p] = e.errno
for top in TOPS:
    for d, dirs, files in os.walk(top):
        seen["walk"] += [os.path.join(d, f) for f in files]
seen["listing"] = {top: sorted(os.listdir(top)) for top in TOPS}
seen["env"] = dict(os.environ)
seen["prefix"] = sys.prefix
print(json.dumps(seen))
"""


@needs_a_test_user
def test_a_normal_user_gets_namespaces_and_cannot_read_private_files(test_user):
    u = test_user
    tmpdir = u.home / "tmp"  # the sandbox's own temp dir below the hidden home: bound back, like the venv
    tmpdir.mkdir(mode=0o700)
    os.chown(tmpdir, u.uid, u.gid)
    paths = [p for p in u.secrets if p.startswith("/")]
    tops = [str(u.home), "/home", "/root", str(u.base / "hf"), str(u.base / "xdg-cache")]
    program = SNOOP.replace("PATHS", repr(paths)).replace("TOPS", repr(tops))
    out, text = u.run(
        "from tokalign import sandbox\n"
        f"r = sandbox.run(sandbox.Job({{'main.py': {program!r}}}, 'main.py'), sandbox.Limits(timeout_s=20))\n"
        "print(r.stdout + r.stderr)\n"
        "print(json.dumps({'isolation': r.isolation, 'error': r.setup_error, 'ok': r.ok, 'stdout': r.stdout,"
        " 'stderr': r.stderr}))\n", TMPDIR=str(tmpdir))
    if out["error"] and "user namespaces" in out["error"]:
        pytest.skip(f"no unprivileged user namespaces here: {out['error']}")
    assert out["ok"] and out["isolation"] == "netns,mountns,pidns,userns", out
    _no_secret_in(text, u)
    seen = json.loads(out["stdout"])
    assert seen["uid"] == u.uid and seen["pids"] == [1, 2]  # the user's uid, an own PID namespace
    assert seen["prefix"] == str(u.proj / ".venv") or u.python == "/usr/bin/python3"  # the venv below ~ runs
    for p in paths:  # hidden, not merely unreadable
        assert seen["read"][p] == 2, (p, seen["read"][p])
    assert all(v in (2, 13) for k, v in seen["read"].items() if k.startswith("/proc/1/")), seen["read"]
    assert seen["listing"][str(u.home)] == (["proj", "tmp"] if u.python != "/usr/bin/python3" else ["tmp"])
    kept = (str(u.proj / ".venv") + "/", str(tmpdir) + "/tokalign-sbx-")  # nothing else of the home shows
    assert seen["walk"] and not [f for f in seen["walk"] if not f.startswith(kept)], seen["walk"]
    assert seen["listing"]["/home"] == ([u.name] if u.python != "/usr/bin/python3" else [])
    assert seen["listing"][str(u.base / "hf")] == seen["listing"][str(u.base / "xdg-cache")] == []
    assert "HF_TOKEN" not in seen["env"] and seen["env"]["HOME"] != str(u.home)


@pytest.mark.slow  # ~6 s: two of the escapes run into the 5 s wall clock
@needs_a_test_user
def test_the_escapes_are_stopped_for_a_normal_user_too(test_user):
    """test_code.py's escape attempts, plus reading each secret, as a non-root user: each scores 0 for its reason."""
    u = test_user
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a server on 127.0.0.1 the program must not reach
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    name = f"tokalign-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, u.home / name, u.proj / name, u.base / "outside" / name]  # all writable by u
    try:
        programs = {**ESCAPES, "write_outside": _write_outside(targets), "localhost": _localhost(srv.getsockname()[1])}
        expected = {"write_outside": "Read-only file system", "internet": "Network is unreachable",
                    "localhost": "Network is unreachable", "fork_bomb": "wall-clock timeout",
                    "allocate_4gb": "memory limit", "sleep_forever": "wall-clock timeout"}
        for k, path in enumerate(p for p in u.secrets if p.startswith("/")):
            programs[f"read_{k}"] = f"print(open({path!r}).read())\n" + ADD
            expected[f"read_{k}"] = "FileNotFoundError"
        programs["good"] = ADD
        out, text = u.run(
            "from tokalign.errors import UserError\n"
            "from tokalign.protocols import Sample\n"
            "from tokalign.verifiers.code import CodeConfig, CodeVerifier\n"
            f"programs = {programs!r}\n"
            "try:\n"
            "    v = CodeVerifier(CodeConfig(timeout_s=5.0, cpu_s=3, memory_mb=512, max_processes=16, workers=6))\n"
            "except UserError as e:\n"
            "    print(json.dumps({'error': str(e)}))\n"
            "    sys.exit(0)\n"
            f"samples = [Sample(k, 'write add', '```python\\n' + p + '\\n```', reference={ONE_TEST!r}) for k, p in programs.items()]\n"
            "print(json.dumps({'isolation': v.isolation,"
            " 'verdicts': {s.id: [r.value, r.info['detail']] for s, r in zip(samples, v(samples))}}))\n")
    finally:
        srv.close()
        leftovers = [t for t in targets if t.exists()]
        for t in leftovers:
            t.unlink()
    if "user namespaces" in out.get("error", ""):
        pytest.skip(f"no unprivileged user namespaces here: {out['error']}")
    assert out.get("isolation") == "netns,mountns,pidns,userns", out
    verdicts = out["verdicts"]
    assert verdicts.pop("good")[0] == 1.0
    for kind, (score, detail) in verdicts.items():
        assert score == 0.0, (kind, detail)
        assert expected[kind] in detail, (kind, detail)
    assert not leftovers
    _no_secret_in(text, u)


@needs_a_test_user
def test_without_user_namespaces_a_normal_user_gets_one_clear_line(test_user):
    """Simulated (the probe's switch): the refusal says why and how to fix it; allow_network=true alone is not
    enough for a normal user (nothing could hide the home); allow_home_access=true too runs with limits only."""
    out, _ = test_user.run(
        "from tokalign import sandbox\n"
        "from tokalign.errors import UserError\n"
        "sandbox._NO_NAMESPACES = True\n"
        "said = {}\n"
        "for key, lim in [('default', sandbox.Limits()), ('network', sandbox.Limits(allow_network=True)),\n"
        "                 ('both', sandbox.Limits(allow_network=True, allow_home_access=True))]:\n"
        "    try:\n"
        "        said[key] = 'ran: ' + sandbox.check_available(lim)\n"
        "    except UserError as e:\n"
        "        said[key] = str(e)\n"
        "print(json.dumps(said))\n")
    default, network, both = out["default"], out["network"], out["both"]
    assert "\n" not in default and "\n" not in network
    assert default.startswith("code sandbox unavailable: cannot create network/mount namespaces (unshare: disabled): "
                              f"unprivileged user namespaces are not available to uid {test_user.uid}; enable them")
    for hint in ("kernel.unprivileged_userns_clone", "kernel.apparmor_restrict_unprivileged_userns=0", "run as root",
                 "allow_home_access=true"):
        assert hint in default, hint
    assert "nothing can hide your files from the program" in network and "allow_home_access=true" in network
    assert both == "ran: limits-only"


# ------------------------------------------------------------------ root mode (a private uid)


@pytest.fixture
def private_home(monkeypatch):
    """HOME, XDG_CACHE_HOME and HF_TOKEN_PATH in fresh directories below /tmp that every uid may enter and read
    (so that only hiding stops a read: pytest's tmp_path is 0700), each holding a secret; and one in /root (0700).
    -> {path: secret}."""
    tag = uuid.uuid4().hex
    top = Path(tempfile.mkdtemp(prefix="tokalign-private-", dir="/tmp"))
    home, cache, hf = top / "home", top / "cache", top / "hf"
    found = {home / ".netrc": f"NETRC-{tag}", home / ".ssh" / "id_rsa": f"SSH-{tag}", cache / "secret": f"XDG-{tag}",
             hf / "token": f"HF-{tag}", Path("/root") / f".tokalign-secret-{tag}": f"ROOT-{tag}"}
    try:
        for path, text in found.items():
            _put(path, text, 0o644)
        for d in (top, home, home / ".ssh", cache, hf):
            d.chmod(0o755)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        monkeypatch.setenv("HF_TOKEN_PATH", str(hf / "token"))
        yield {str(p): t for p, t in found.items()}
    finally:
        shutil.rmtree(top, ignore_errors=True)
        (Path("/root") / f".tokalign-secret-{tag}").unlink(missing_ok=True)


READ_ALL = "import json\nout = {}\nfor p in PATHS:\n    try:\n        out[p] = open(p).read()\n    except OSError as e:\n        out[p] = e.errno\nprint(json.dumps(out))\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="root mode: needs root")
@needs_sandbox
def test_as_root_the_home_and_private_places_are_hidden(private_home):
    r = sandbox.run(sandbox.Job({"main.py": READ_ALL.replace("PATHS", repr(sorted(private_home)))}, "main.py"),
                    sandbox.Limits(timeout_s=10))
    assert r.ok and "uid" in r.isolation, (r.setup_error, r.stderr)
    assert json.loads(r.stdout) == {p: 2 for p in private_home}  # ENOENT: hidden, not merely unreadable (EACCES)
    assert not any(s in r.stdout + r.stderr for s in private_home.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="root mode: needs root")
@needs_sandbox
def test_as_root_a_venv_below_the_hidden_home_still_runs(private_home):
    """Only the venv and its base Python come back; the rest of the home (the project around it) stays hidden."""
    home = Path(os.environ["HOME"])
    venv = home / "proj" / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=120)
    _put(home / "proj" / ".env", "PROJECT-SECRET", 0o644)
    prog = "import os, sys\nprint(sys.prefix)\nprint(sorted(os.listdir(os.path.dirname(sys.prefix))))\n" + \
        READ_ALL.replace("PATHS", repr(sorted(private_home)))
    r = sandbox.run(sandbox.Job({"main.py": prog}, "main.py"), sandbox.Limits(timeout_s=10), python=str(venv / "bin" / "python"))
    assert r.ok, (r.setup_error, r.stderr)
    prefix, listing, reads = r.stdout.splitlines()
    assert (prefix, listing) == (str(venv), "['.venv']")
    assert json.loads(reads) == {p: 2 for p in private_home}


@pytest.mark.skipif(os.geteuid() != 0, reason="root mode: needs root")
@needs_sandbox
def test_an_interpreter_whose_prefix_is_the_home_is_refused(monkeypatch):
    monkeypatch.setenv("HOME", sys.prefix)  # hiding it would hide the interpreter: said, not silently exposed
    r = sandbox.run(sandbox.Job({"main.py": "pass"}, "main.py"), sandbox.Limits(timeout_s=10))
    assert r.setup_error and r.setup_error.startswith(f"cannot hide {os.path.realpath(sys.prefix)} from the program")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and /usr/bin/python3")
@needs_sandbox
def test_as_root_without_namespaces_an_open_home_is_refused(monkeypatch):
    """No mount namespace, nothing hidden: the private uid is kept out only by permissions, so a home that other
    uids can enter is refused (unless allow_home_access=true); a 0700 one keeps its files unreadable."""
    monkeypatch.setattr(sandbox, "_NO_NAMESPACES", True)
    home = Path(tempfile.mkdtemp(prefix="tokalign-home-", dir="/tmp"))
    try:
        _put(home / ".netrc", "NETRC-SECRET", 0o644)
        monkeypatch.setenv("HOME", str(home))
        job = sandbox.Job({"main.py": READ_ALL.replace("PATHS", repr([str(home / ".netrc")]))}, "main.py")

        def run(**kw) -> sandbox.Result:
            return sandbox.run(job, sandbox.Limits(timeout_s=10, allow_network=True, **kw), python="/usr/bin/python3")

        home.chmod(0o755)
        r = run()
        assert r.setup_error and "cannot be hidden" in r.setup_error and f"chmod 700 {home}" in r.setup_error
        assert run(allow_home_access=True).ok
        home.chmod(0o700)
        r = run()
        assert (r.ok, r.isolation, json.loads(r.stdout)) == (True, "uid", {str(home / ".netrc"): 13}), r.setup_error
    finally:
        shutil.rmtree(home, ignore_errors=True)
