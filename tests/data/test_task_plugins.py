"""Tasks are plug-ins like the others: ``module:Class`` (and ``module:Class:ARG``) works for `prepare`, `train --data`
and `eval --data`, the task is recorded in the manifest's ``plugins``, and its failures are its own one line."""

from __future__ import annotations

import json

import pytest

from conftest import cli
from tokalign import artifacts

TASKS = '''
class Sums:
    """Conversational prompts; ARG (optional) is how many records."""
    splits = ("train", "test")
    default_reward = "exact_match"

    def __init__(self, n="6"):
        self.n = int(n)

    def records(self, split="train"):
        return [{"id": f"{split}-{i}", "prompt": [{"role": "user", "content": f"{i}+1="}], "reference": str(i + 1)}
                for i in range(self.n)]


class Plain:
    splits = ("train", "test")

    def records(self, split="train"):
        return [{"id": str(i), "prompt": f"{i}+1=", "completion": str(i + 1), "reference": str(i + 1)} for i in range(4)]


class Raises:
    splits = ("train",)

    def records(self, split="train"):
        raise KeyError("question")


class NotAList:
    splits = ("train",)

    def records(self, split="train"):
        return None


class NoSplits:
    def records(self, split="train"):
        return []


class BadInit:
    splits = ("train",)

    def __init__(self):
        raise OSError("no data here")

    def records(self, split="train"):
        return []
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("tasks")
    (w / "mytasks.py").write_text(TASKS)
    return w


def run(work, *args, check=True):
    return cli(*args, cwd=work, check=check, env={"PYTHONPATH": str(work)})


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0].removeprefix("error: ")


def test_prepare_a_module_attr_task_records_it_as_a_plugin(work):
    proc = run(work, "prepare", "mytasks:Sums", "--out", "P")
    assert proc.stdout == "P\n" and "warning" not in proc.stderr  # conversational prompts: no warning
    art = artifacts.read(work / "P", ["prompts"])
    assert [r["id"] for r in art.rows()] == [f"train-{i}" for i in range(6)]
    assert art.manifest["plugins"] == [{"kind": "task", "name": "mytasks:Sums", "distribution": "(local)", "version": "?"}]
    assert art.manifest["default_reward"] == "exact_match"


def test_a_builtin_task_is_recorded_too(work):
    run(work, "prepare", "arith", "--limit", "2", "--out", "PA")
    (ref,) = json.loads((work / "PA" / "manifest.json").read_text())["plugins"]
    assert (ref["kind"], ref["name"], ref["distribution"]) == ("task", "arith", "tokalign")


def test_module_attr_colon_arg_is_handed_to_the_constructor(work):
    run(work, "prepare", "mytasks:Sums:3", "--split", "test", "--out", "P3")
    assert [r["id"] for r in artifacts.read(work / "P3", ["prompts"]).rows()] == ["test-0", "test-1", "test-2"]


def test_string_prompts_warn_once_that_they_are_not_chat_templated(work):
    proc = run(work, "prepare", "mytasks:Plain", "--out", "PP")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: task 'mytasks:Plain' gives plain-string prompts: they are not chat-templated, though the model "
                        "has a chat template (a task returning [{\"role\": \"user\", \"content\": ...}] messages gets it)."]
    assert artifacts.read(work / "PP", ["prompts"]).rows()[0]["prompt_text"] == "0+1="


def test_train_and_eval_take_a_module_attr_task(work):
    proc = run(work, "train", "grpo", "--data", "mytasks:Sums", "--dry-run")
    assert '"task": "mytasks:Sums"' in proc.stdout and "exact_match" in proc.stdout  # the task's default reward
    proc = run(work, "eval", "--data", "mytasks:Sums:2", "--n", "1", "--max-new-tokens", "2", "--no-entropy", "--quiet", "--out", "E")
    assert json.loads((work / "E" / "results.json").read_text())["num_prompts"] == 2


def test_train_warns_once_about_string_prompts(work):
    proc = run(work, "train", "grpo", "--data", "mytasks:Plain", "--reward", "exact_match", "--max-steps", "1", "--batch-size", "2", "--n", "2",
               "--set", "rollout.max_new_tokens=2", "--quiet", "--out", "C")
    assert proc.stderr.count("warning: task 'mytasks:Plain' gives plain-string prompts") == 1, proc.stderr


@pytest.mark.parametrize("task, expected", [
    ("mytasks:Raises", "task 'mytasks:Raises' (module mytasks, no distribution) raised in records(): KeyError: 'question'"),
    ("mytasks:NotAList", "task 'mytasks:NotAList' (module mytasks, no distribution) broke the contract in records(): "
                         "it must return a list of dicts, got NoneType"),
    ("mytasks:NoSplits", "task 'mytasks:NoSplits' (module mytasks, no distribution) does not satisfy the task protocol: "
                         "task must have 'splits' (a tuple of names) and records(split) -> list[dict]."),
    ("mytasks:BadInit", "task 'mytasks:BadInit' (module mytasks, no distribution) raised in __init__(): OSError: no data here"),
    ("mytasks:Nope", "task 'mytasks:Nope' (module mytasks, no distribution) failed to load: module 'mytasks' has no attribute 'Nope'"),
    ("nosuchmod:Task", "Cannot import 'nosuchmod:Task': module 'nosuchmod' not found. Check the path or PYTHONPATH."),
    ("mytasks:Plain:x", "Task 'mytasks:Plain' takes nothing after a colon ('mytasks:Plain:x'); write 'mytasks:Plain'."),
])
def test_a_broken_task_is_one_line_naming_it(work, task, expected):
    assert error_line(run(work, "prepare", task, "--out", "X", check=False)) == expected
    assert not (work / "X").exists()


def test_train_data_from_a_raising_task_is_the_tasks_error(work):
    proc = run(work, "train", "grpo", "--data", "mytasks:Raises", "--dry-run", check=False)
    assert error_line(proc).startswith("task 'mytasks:Raises' (module mytasks, no distribution) raised in records()")


def test_a_missing_file_with_a_colon_is_still_a_missing_file(work):
    assert error_line(run(work, "prepare", "data:train.jsonl", "--out", "X", check=False)) == "Data file 'data:train.jsonl' does not exist."
