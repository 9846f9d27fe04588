"""The ``code`` verifier and its sandbox: programs that escape, hog or hang are stopped and score 0.

Needs Linux namespaces (root, or unprivileged user namespaces); skipped where the sandbox reports
it cannot be built. Limits are small so that the must-stop programs end within a few seconds.
"""

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from tokalign import sandbox
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.verifiers.code import CodeConfig, CodeVerifier, extract_program, parse_tests

FAST = dict(timeout_s=5.0, cpu_s=3, memory_mb=512, max_processes=16)  # generous wall time: CI machines are shared


def _available() -> str | None:
    try:
        sandbox.check_available(sandbox.Limits())
        return None
    except UserError as e:
        return str(e)


_WHY_NOT = _available() if sys.platform.startswith("linux") else "Linux only"
needs_sandbox = pytest.mark.skipif(_WHY_NOT is not None, reason=f"no sandbox here: {_WHY_NOT}")


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(CodeConfig(**FAST))


ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def sample(program: str, reference=None, sid="s") -> Sample:
    return Sample(sid, "write add", f"Here you go:\n```python\n{program}\n```\n", reference=ADD_TESTS if reference is None else reference)


# ------------------------------------------------------------------ what the program and the tests are


def test_extract_program():
    assert extract_program("a\n```python\nx = 1\n```\nb\n```python\nx = 2\n```\n") == "x = 2"
    assert extract_program("```\nplain\n```\n```py\nchosen\n```") == "chosen"
    assert extract_program("text\n```\nuntagged\n```") == "untagged"
    assert extract_program("```python\ncut off at the end") == "cut off at the end"
    assert extract_program("print(1)") == "print(1)"


def test_parse_tests_formats():
    a = [{"kind": "assert", "code": "assert f(1) == 2"}]
    assert parse_tests(["assert f(1) == 2"]) == a
    assert parse_tests({"tests": ["assert f(1) == 2"]}) == a
    assert parse_tests('["assert f(1) == 2"]') == a  # a JSON string, as a dataset column may hold
    assert parse_tests("assert f(1) == 2") == a
    io = [{"kind": "io", "input": "1 2\n", "output": "3\n"}]
    assert parse_tests([{"input": "1 2\n", "output": "3\n"}]) == io
    assert parse_tests({"inputs": ["1 2\n"], "outputs": ["3\n"]}) == io
    with pytest.raises(UserError, match="cannot read as tests"):
        parse_tests({"nothing": 1}, "row-7")
    with pytest.raises(UserError, match="row-7"):
        parse_tests([1, 2], "row-7")


def test_config_validation():
    for bad in ({"timeout_s": 0}, {"memory_mb": -5}, {"cpu_s": 1.5}, {"workers": 0}, {"allow_network": "no"},
                {"partial_credit": 1}, {"python": "/no/such/python"}, {"allow_home_access": "yes"}):
        with pytest.raises(ValueError):
            CodeConfig(**bad)
    assert CodeConfig().limits() == sandbox.Limits()


# ------------------------------------------------------------------ scoring


@needs_sandbox
def test_correct_partial_and_io_programs(verifier):
    half = "def add(a, b):\n    return a + b if a > 0 else 99\n"
    io_prog = "a, b = map(int, input().split())\nprint(a + b)\nimport sys; sys.exit(0)"
    io_ref = [{"input": "3 4\n", "output": "7\n"}, {"input": "10 5", "output": "15   \n\n"}, {"input": "1 1", "output": "3"}]
    out = verifier([sample(ADD), sample(half), sample(io_prog, io_ref)])
    assert [r.value for r in out] == [1.0, 0.5, pytest.approx(2 / 3)]
    assert out[0].info["passed"] and not out[1].info["passed"]
    assert out[1].info["detail"].startswith("1/2 tests passed; test 2: exit code 1: AssertionError")
    assert "test 3: wrong output '2', expected '3'" in out[2].info["detail"]
    v = verifier.verify(sample(half))
    assert (v.passed, v.score) == (False, 0.5)


@needs_sandbox
def test_all_or_nothing_option():
    strict = CodeVerifier(CodeConfig(**FAST, partial_credit=False))
    half = "def add(a, b):\n    return a + b if a > 0 else 99\n"
    assert [r.value for r in strict([sample(ADD), sample(half)])] == [1.0, 0.0]


@needs_sandbox
def test_exiting_early_does_not_pass(verifier):
    """os._exit(0) before the tests ran must not count as passing them."""
    v = verifier.verify(sample("import os\nos._exit(0)", ["assert True"]))
    assert (v.score, v.detail) == (0.0, "0/1 tests passed; test 1: the program ended before the test ran")


@pytest.fixture
def outside_targets(tmp_path):
    """Paths outside the sandbox's temp dir, all writable by the scoring process itself."""
    name = f"tokalign-escape-{uuid.uuid4().hex}"
    paths = [Path("/tmp") / name, tmp_path / name, ROOT / name, Path.home() / name]
    yield paths
    for p in paths:
        if p.exists():
            p.unlink()


ESCAPES = {
    "write_outside": None,  # filled in by the test: writes to every outside target
    "internet": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n" + ADD,
    "localhost": None,  # filled in: connects to a server this test runs on 127.0.0.1
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "allocate_4gb": "block = bytearray(4 * 1024 ** 3)\n" + ADD,
    "sleep_forever": "import time\nwhile True:\n    time.sleep(3600)\n",
}


def _write_outside(paths) -> str:
    lines = ["import os", "for p in %r:" % [str(p) for p in paths], "    with open(p, 'w') as f:", "        f.write('escaped')"]
    return "\n".join(lines) + "\n" + ADD


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    yield srv.getsockname()[1]
    srv.close()


def _localhost(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD


@needs_sandbox
@pytest.mark.parametrize("kind", list(ESCAPES))
def test_each_escape_is_stopped_and_scores_zero(verifier, kind, outside_targets, listener):
    program = {"write_outside": _write_outside(outside_targets), "localhost": _localhost(listener)}.get(kind) or ESCAPES[kind]
    v = verifier.verify(sample(program))
    assert (v.passed, v.score) == (False, 0.0), v.detail
    expected = {
        "write_outside": "Read-only file system", "internet": "Network is unreachable",
        "localhost": "Network is unreachable", "fork_bomb": "wall-clock timeout",
        "allocate_4gb": "memory limit", "sleep_forever": "wall-clock timeout",
    }[kind]
    assert expected in v.detail, v.detail
    assert not any(p.exists() for p in outside_targets)


@needs_sandbox
def test_a_batch_with_every_escape_finishes(verifier, outside_targets, listener):
    programs = {**ESCAPES, "write_outside": _write_outside(outside_targets), "localhost": _localhost(listener)}
    batch = [sample(p, sid=k) for k, p in programs.items()] + [sample(ADD, sid="good")]
    out = verifier(batch)
    assert [r.value for r in out] == [0.0] * len(programs) + [1.0]
    assert not any(p.exists() for p in outside_targets)
    assert _all_sandbox_processes_gone()


def _sandbox_processes_left() -> list[int]:
    """Processes still running under a sandbox uid (root parent) after the runs ended."""
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                continue
            if sandbox._UID_BASE <= uid < sandbox._UID_BASE + sandbox._UID_SPAN:
                left.append(int(pid))
    return left


@needs_sandbox
def test_sandbox_limits_and_environment():
    lim = sandbox.Limits(timeout_s=30, cpu_s=1, file_size_mb=1, disk_mb=4)  # CPU limit first, even on a busy machine
    probe = "import os, sys\nprint(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, 2])"
    r = sandbox.run(sandbox.Job({"main.py": probe}, "main.py"), lim)
    assert r.ok and r.stdout.split() == ["True", "True"]  # own temp dir; own PID namespace
    r = sandbox.run(sandbox.Job({"main.py": "while True: pass"}, "main.py"), lim)
    assert r.reason() == "CPU time limit"
    r = sandbox.run(sandbox.Job({"main.py": "import sys\nwhile True: sys.stdout.write('x' * 65536)"}, "main.py"), lim)
    assert not r.ok and len(r.stdout) == 1 << 20 and "File too large" in r.stderr  # output is bounded
    r = sandbox.run(sandbox.Job({"main.py": "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * 900_000)"}, "main.py"), lim)
    assert not r.ok and "No space left on device" in r.stderr  # the temp dir has a quota
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\nprint('parent done')"
    r = sandbox.run(sandbox.Job({"main.py": escape}, "main.py"), lim)
    assert r.ok and _all_sandbox_processes_gone()  # a child that left the process group died too


@needs_sandbox
def test_allow_network_opts_out_of_the_network_namespace(listener):
    lim = sandbox.Limits(timeout_s=5, allow_network=True)
    r = sandbox.run(sandbox.Job({"main.py": _localhost(listener)}, "main.py"), lim)
    assert r.ok, r.stderr
    assert "netns" not in r.isolation and "mountns" in r.isolation


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and /usr/bin/python3")
@needs_sandbox
def test_without_namespaces_it_refuses_unless_opted_out(monkeypatch, tmp_path):
    """Where namespaces are impossible: an error naming the opt-out; with allow_network=true only the
    limits and (as root) the private uid apply: root-owned places stay unwritable, strays are killed."""
    monkeypatch.setattr(sandbox, "_NO_NAMESPACES", True)
    monkeypatch.setenv("HOME", str(tmp_path))  # below pytest's 0700 directory: other uids cannot enter it
    job = sandbox.Job({"main.py": "pass"}, "main.py")
    r = sandbox.run(job, sandbox.Limits(timeout_s=5), python="/usr/bin/python3")
    assert r.setup_error.startswith("cannot create network/mount namespaces (unshare: disabled); as root this needs "
                                    "CAP_SYS_ADMIN"), r.setup_error
    assert "allow_network=true" in r.setup_error and "\n" not in r.setup_error
    target = tmp_path / "outside.txt"  # root-owned directory
    prog = (f"import os, time\ntry:\n    open({str(target)!r}, 'w')\nexcept OSError as e:\n    print(e.errno)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n")
    r = sandbox.run(sandbox.Job({"main.py": prog}, "main.py"), sandbox.Limits(timeout_s=5, allow_network=True),
                    python="/usr/bin/python3")
    assert (r.ok, r.isolation, r.stdout.split()) == (True, "uid", ["13"])  # EACCES
    assert not target.exists()
    assert _all_sandbox_processes_gone()


def _all_sandbox_processes_gone(wait_s: float = 10.0) -> bool:
    """No live process under a sandbox uid; a SIGKILLed one may take a moment to finish dying."""
    import time

    deadline = time.monotonic() + wait_s
    while [pid for pid in _sandbox_processes_left() if _alive(pid)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # zombies are dead, only not yet reaped by init
    except OSError:
        return False


@needs_sandbox
def test_built_through_the_registry_with_options():
    from tokalign import rewards

    (r,) = rewards.resolve(["code"], {"code": {"timeout_s": 10, "workers": 2}})
    assert r.config["timeout_s"] == 10 and r.config["workers"] == 2
    assert r.fn([sample(ADD)])[0].value == 1.0
    with pytest.raises(UserError, match="timeout_s"):
        rewards.resolve(["code"], {"code": {"timeout_s": -1}})


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root, setpriv and a system /usr/bin/python3 to act as an unprivileged user")
@needs_sandbox
def test_unprivileged_user_gets_the_same_isolation():
    """Without root, the sandbox uses a user namespace: still no network and no writes outside. (uid 65534 is
    the overflow uid a process reads before its user namespace has a map, which once hid a bug: the tests with a
    real created user are in test_sandbox_private.py.)"""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # reachable by the unprivileged user (pytest's tmp_path is not)
    try:
        os.chmod(base, 0o755)
        shutil.copytree(ROOT / "tokalign", base / "src" / "tokalign", ignore=shutil.ignore_patterns("__pycache__"))
        mine = base / "nobody-owned"  # writable by the unprivileged user itself: only the sandbox stops the write
        mine.mkdir()
        os.chown(mine, 65534, 65534)
        target = mine / "outside.txt"
        script = (
            "import sys; sys.path.insert(0, %r)\n"
            "from tokalign import sandbox\n"
            "assert sandbox.__file__.startswith(%r)\n"
            "prog = \"import socket\\ntry:\\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\\nexcept OSError as e:\\n"
            "    print(e.errno)\\ntry:\\n    open(%r, 'w')\\nexcept OSError as e:\\n    print(e.errno)\"\n"
            "r = sandbox.run(sandbox.Job({'main.py': prog}, 'main.py'), sandbox.Limits(timeout_s=10))\n"
            "print(r.isolation, r.setup_error, r.stdout.split())\n"
        ) % (str(base / "src"), str(base / "src"), str(target))
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script],
                              capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
        if "cannot create" in proc.stdout:
            pytest.skip(f"no unprivileged namespaces here: {proc.stdout.strip()}")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["netns,mountns,pidns,userns", "None", "['101',", "'30']"]  # ENETUNREACH, EROFS
        assert not target.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@needs_sandbox
def test_score_cli_with_the_code_reward(tmp_path, outside_targets):
    import json

    from conftest import cli
    from verifier_helpers import write_rollouts
    from tokalign import artifacts

    fence = "```python\n{}\n```"
    write_rollouts(tmp_path / "R", [
        ("good", fence.format(ADD), ADD_TESTS),
        ("io", fence.format("print(sum(map(int, input().split())))"), {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "11\n"]}),
        ("hang", fence.format("import time\ntime.sleep(10 ** 6)"), ADD_TESTS),
        ("escape", fence.format(_write_outside(outside_targets)), ADD_TESTS),
    ])
    proc = cli("score", "R", "--reward", "code", "--reward-opt", "code.timeout_s=5", "--workers", "2", "--no-cache",
               "--out", "S", cwd=tmp_path)
    assert proc.stdout == "S\n"
    rows = artifacts.read(tmp_path / "S", ["scored"]).rows()
    assert [r["rewards"]["code"] for r in rows] == [1.0, 0.5, 0.0, 0.0]
    details = [json.loads(r["verdicts"])["code"]["detail"] for r in rows]
    assert details[2] == "0/2 tests passed; test 1: wall-clock timeout; test 2: wall-clock timeout"
    assert "Read-only file system" in details[3]
    assert not any(p.exists() for p in outside_targets)
