"""Bad input: exit code 2, one clear line on stderr, no traceback, no partial output directory."""

from __future__ import annotations

import pytest

from conftest import cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad")
    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=w)
    (w / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", chosen: 1}\n')
    return w


CASES = {
    "missing file": (["train", "dpo", "--data", "nope.jsonl", "--out", "X"], "Data file 'nope.jsonl' does not exist"),
    "missing artifact": (["rollout", "nope", "--out", "X"], "Input 'nope' does not exist"),
    "wrong artifact kind": (["score", "P", "--reward", "exact_match", "--out", "X"], "is a 'prompts' artifact, but this command needs 'rollouts'"),
    "malformed jsonl": (["train", "dpo", "--data", "bad.jsonl", "--out", "X"], "bad.jsonl line 2: invalid JSON"),
    "unknown algorithm": (["train", "grpoo", "--data", "arith", "--out", "X"], "Unknown algorithm 'grpoo'. Did you mean 'grpo'?"),
    "unknown reward": (["train", "grpo", "--data", "arith", "--reward", "exact_mach", "--out", "X"], "Did you mean 'exact_match'?"),
    "unknown --set key": (["train", "grpo", "--data", "arith", "--set", "train.lrr=1", "--out", "X"], "Unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
    "bad algorithm value": (["train", "grpo", "--data", "arith", "--set", "algorithm.kl_estimator=k9", "--out", "X"], "kl_estimator must be one of"),
    "output exists": (["prepare", "arith", "--out", "P"], "Output 'P' already exists. Pass --overwrite"),
    "wrong data for algorithm": (["train", "dpo", "--data", "arith", "--out", "X"], "'dpo' trains on pairs data"),
    "unknown backend": (["rollout", "P", "--backend", "vlm", "--out", "X"], "Did you mean 'vllm'?"),
    "missing model": (["rollout", "P", "--model", "./no-such-model", "--out", "X"], "Model './no-such-model' does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(work, case):
    args, expected = CASES[case]
    before = sorted(p.name for p in work.iterdir())
    proc = cli(*args, cwd=work, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in work.iterdir()) == before  # no partial output of any kind


def test_stdin_without_pipe_is_a_clear_error(work):
    proc = cli("rollout", cwd=work, check=False, stdin="")
    assert proc.returncode == 2 and "No prompts artifact on stdin" in proc.stderr
