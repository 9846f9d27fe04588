"""Verifier and reward ``code``: run the completion's Python against unit tests in a sandbox
(``tokalign.sandbox``) — the execution-based code reward of PRIME ("Process Reinforcement through
Implicit Rewards", Cui et al. 2025, arXiv:2502.01456, coding problems scored by test cases) and of
the seed's tool-use RL papers.

Program: the last ```` ```python ```` (or ``py``/``python3``) fenced block of the completion; else
the last fenced block without a language; else the whole completion. A block left unclosed
(a truncated completion) runs to the end of the text.

Tests, from ``Sample.reference`` (a JSON string of these is decoded first):

* a list of assert strings — ``["assert add(1, 2) == 3", ...]``: each runs after the program, in
  its namespace;
* ``{"tests": [...]}`` — the same list under a key;
* a list of ``{"input": stdin, "output": expected_stdout}`` — the program runs with that stdin and
  its stdout must equal the expected one (trailing spaces on a line and blank lines at either end
  ignored); ``{"inputs": [...], "outputs": [...]}`` (APPS style) is accepted too.

Each test is its own sandboxed run. A test passes when the run exits 0 and the harness proves it
reached its end (it echoes a one-time secret read from a pipe before the program starts, so a
program that calls ``os._exit(0)`` early does not pass); ``sys.exit(0)`` inside the program is a
normal end. (A program written to defeat the harness, e.g. by reading the secret out of the
interpreter's memory, is beyond what this check guards against.) Score = fraction of tests passed (``partial_credit``, default) or 1.0 only when all
pass; ``Verdict.passed`` = all pass.

Options (``--reward-opt code.KEY=VALUE``): the sandbox limits ``timeout_s`` (wall, per test),
``cpu_s``, ``memory_mb``, ``file_size_mb``, ``disk_mb``, ``max_processes``, ``max_open_files``;
``allow_network`` (run without a network namespace, and where namespaces are impossible);
``allow_home_access`` (where nothing can hide the invoking user's files from the program — a
non-root user without user namespaces, with ``allow_network`` — run anyway; elsewhere ``$HOME``,
``/root``, ``/home`` and the other private places stay hidden whatever it says);
``workers`` (tests run at once); ``partial_credit``; ``python`` (the interpreter; default: the
one running tokalign).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, fields
from typing import Any

from tokalign import sandbox
from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample, Verdict

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:\n?```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}

_HARNESS = '''import os as _os, sys as _sys
def _tokalign_run():
    done = _os.read(3, 256)
    _os.close(3)
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    test = TEST
    if test is not None:
        exec(compile(test, "<test>", "exec"), namespace)
    _sys.stdout.flush()
    _sys.stderr.write("\\n" + done.decode() + "\\n")
    _sys.stderr.flush()
_tokalign_run()
'''


@dataclass
class CodeConfig:
    timeout_s: float = 5.0  # wall clock per test
    cpu_s: int = 5
    memory_mb: int = 1024
    file_size_mb: int = 16
    disk_mb: int = 64
    max_processes: int = 32
    max_open_files: int = 256
    allow_network: bool = False
    allow_home_access: bool = False  # run even where nothing can hide the user's files (see tokalign.sandbox)
    workers: int = 1  # tests (of one or several samples) run at the same time
    partial_credit: bool = True  # score = fraction of tests passed; False: 1.0 only if all pass
    python: str = ""  # interpreter for the programs; "" = the one running tokalign

    def __post_init__(self) -> None:
        self.limits()  # validates the sandbox limits
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number ≥ 1, got {self.workers!r}")
        if not isinstance(self.partial_credit, bool):
            raise ValueError(f"partial_credit must be true or false, got {self.partial_credit!r}")
        if not isinstance(self.python, str) or (self.python and not os.access(self.python, os.X_OK)):
            raise ValueError(f"python must be the path of an executable interpreter, got {self.python!r}")

    def limits(self) -> sandbox.Limits:
        names = {f.name for f in fields(sandbox.Limits)}
        return sandbox.Limits(**{k: getattr(self, k) for k in names})


def extract_program(completion: str) -> str:
    """The last ```python block, else the last untagged fenced block, else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [code for tag, code in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return completion


def parse_tests(reference: Any, sample_id: str = "?") -> list[dict]:
    """Normalise a reference to [{"kind": "assert", "code"} | {"kind": "io", "input", "output"}]."""
    ref = reference
    if isinstance(ref, str):
        try:
            ref = json.loads(ref)
        except ValueError:
            ref = [ref]  # one block of asserts
        if isinstance(ref, str):
            ref = [ref]
    if isinstance(ref, dict):
        if "tests" in ref:
            ref = ref["tests"]
        elif "inputs" in ref and "outputs" in ref and len(ref["inputs"]) == len(ref["outputs"]):
            ref = [{"input": i, "output": o} for i, o in zip(ref["inputs"], ref["outputs"])]
    tests = []
    if isinstance(ref, list):
        for t in ref:
            if isinstance(t, str):
                tests.append({"kind": "assert", "code": t})
            elif isinstance(t, dict) and "input" in t and "output" in t:
                tests.append({"kind": "io", "input": _text(t["input"]), "output": _text(t["output"])})
            else:
                tests = None
                break
    else:
        tests = None
    if tests is None:
        raise UserError(
            f"code verifier: sample '{sample_id}' has a reference it cannot read as tests ({type(reference).__name__}); "
            'give a list of assert strings, {"tests": [...]}, or a list of {"input": ..., "output": ...}.'
        )
    return tests


def _text(x: Any) -> str:
    if isinstance(x, list):
        return "\n".join(str(v) for v in x) + "\n"
    return x if isinstance(x, str) else str(x)


def _same_output(got: str, expected: str) -> bool:
    def lines(s: str) -> list[str]:
        out = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        while out and not out[0]:
            out.pop(0)
        return out

    return lines(got) == lines(expected)


class CodeVerifier:
    Config = CodeConfig

    def __init__(self, config: CodeConfig | None = None):
        self.config = config or CodeConfig()
        self.limits = self.config.limits()
        self.python = self.config.python or None
        self.isolation = sandbox.check_available(self.limits, self.python)  # fail now, not on every sample

    def _jobs(self, program: str, tests: list[dict]) -> list[tuple[sandbox.Job, dict]]:
        jobs = []
        for t in tests:
            secret = secrets.token_hex(16).encode()
            code = t["code"] if t["kind"] == "assert" else None
            harness = _HARNESS.replace("TEST", repr(code), 1)
            job = sandbox.Job({"solution.py": program, "harness.py": harness}, "harness.py",
                              stdin=t.get("input", ""), secret=secret)
            jobs.append((job, t))
        return jobs

    def _judge(self, job: sandbox.Job, test: dict, r: sandbox.Result) -> str | None:
        """None when the test passed, else why not."""
        if r.setup_error:
            raise UserError(f"code sandbox failed: {r.setup_error}")
        tail = r.stderr.rstrip().rsplit("\n", 1)[-1].strip()
        if not r.ok or tail != job.secret.decode():
            if r.ok:
                return "the program ended before the test ran"
            if r.exit_code == 1 and "MemoryError" in r.stderr:
                return "memory limit"
            return r.reason()
        if test["kind"] == "io" and not _same_output(r.stdout, test["output"]):
            return f"wrong output {r.stdout.strip()[:60]!r}, expected {test['output'].strip()[:60]!r}"
        return None

    def run(self, samples: list[Sample]) -> list[Verdict]:
        per_sample = []
        all_jobs: list[tuple[sandbox.Job, dict]] = []
        for s in samples:
            if s.reference is None:
                per_sample.append(None)
                continue
            tests = parse_tests(s.reference, s.id)
            jobs = self._jobs(extract_program(s.completion or ""), tests)
            per_sample.append((len(all_jobs), len(jobs)))
            all_jobs.extend(jobs)
        results = sandbox.run_many([j for j, _ in all_jobs], self.limits, workers=self.config.workers, python=self.python)
        verdicts = []
        for span in per_sample:
            if span is None:
                verdicts.append(Verdict(False, 0.0, "no tests (reference) for this sample"))
                continue
            start, n = span
            if n == 0:
                verdicts.append(Verdict(False, 0.0, "the reference holds no tests"))
                continue
            failures = []
            for k in range(start, start + n):
                why = self._judge(all_jobs[k][0], all_jobs[k][1], results[k])
                if why is not None:
                    failures.append(f"test {k - start + 1}: {why}")
            passed = n - len(failures)
            score = passed / n if self.config.partial_credit else float(passed == n)
            detail = f"{passed}/{n} tests passed" + (f"; {'; '.join(failures[:3])}" if failures else "")
            verdicts.append(Verdict(passed == n, score, detail[:500]))
        return verdicts

    def verify(self, sample: Sample) -> Verdict:
        return self.run([sample])[0]

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        return [Reward(v.score, None, {"passed": v.passed, "detail": v.detail}) for v in self.run(samples)]
