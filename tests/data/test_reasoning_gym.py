"""Task ``reasoning_gym:NAME`` and verifier ``reasoning_gym``: deterministic, disjoint splits; the task's own
scorer gives the gold answer 1 and a wrong one less; bad names are one line (exit 2); the real CLI chains
prepare | rollout | score and runs eval with the task's default verifier."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import cli, sh

from tokalign import artifacts, registry
from tokalign.data.reasoning_gym import INSTRUCTION, TEST_SEED, TRAIN_SEED, ReasoningGym
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.verifiers.reasoning_gym import (
    ReasoningGymVerifier,
    extract_answer,
    require,
)

pytest.importorskip("reasoning_gym")  # the modules above import it only when used

TASKS = ("leg_counting", "basic_arithmetic", "letter_counting")


def stored(row: dict) -> Sample:
    """A sample of the gold completion, its reference as an artifact holds it (JSON)."""
    ref = json.loads(json.dumps(row["reference"]))
    return Sample(row["id"], row["prompt"], row["completion"][0]["content"], reference=ref)


def test_records_are_deterministic_conversational_and_json():
    rows = ReasoningGym("leg_counting?size=20").records("test")
    assert rows == ReasoningGym("leg_counting?size=20").records("test")
    assert len(rows) == 20 and rows[0]["id"] == "rg-leg_counting-test-0"
    r = rows[0]
    assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].endswith(INSTRUCTION)
    assert r["prompt"][0]["content"].startswith(r["reference"]["question"].rstrip())
    assert r["completion"] == [{"role": "assistant", "content": f"<answer>{r['reference']['answer']}</answer>"}]
    assert r["reference"]["config"] == {"seed": TEST_SEED, "size": 20} and r["reference"]["task"] == "leg_counting"
    assert json.loads(json.dumps(r["reference"])) == r["reference"]


def test_splits_are_disjoint():
    task = ReasoningGym("basic_arithmetic")  # small numbers: some questions recur between seeds
    train, test = task.records("train"), task.records("test")
    assert len(test) == 200 and 0 < len(train) <= 1000
    assert not {r["reference"]["question"] for r in train} & {r["reference"]["question"] for r in test}
    assert {r["reference"]["config"]["seed"] for r in train} == {TRAIN_SEED}


def test_options_after_a_question_mark():
    rows = ReasoningGym("leg_counting?size=5&max_animals=3").records("train")
    assert len(rows) <= 5 and all(r["reference"]["metadata"]["num_animals"] <= 3 for r in rows)
    with pytest.raises(UserError, match="no option 'sise'. Did you mean 'size'"):
        ReasoningGym("leg_counting?sise=5")
    with pytest.raises(UserError, match="size must be a whole number"):
        ReasoningGym("leg_counting?size=0")


@pytest.mark.parametrize("name", TASKS)
def test_the_task_scorer_gives_gold_one_and_wrong_less(name):
    verifier = ReasoningGymVerifier()
    for row in ReasoningGym(f"{name}?size=10").records("test"):
        gold = stored(row)
        v = verifier.verify(gold)
        assert v.passed and v.score == 1.0, (row["id"], v)
        wrong = Sample(gold.id, gold.prompt, "<answer>not the answer</answer>", reference=gold.reference)
        v = verifier.verify(wrong)
        assert not v.passed and v.score < 1.0 and "expected" in v.detail


def test_answer_extraction():
    assert extract_answer("I think <answer>1</answer> no, <answer> 292 </answer>") == "292"
    assert extract_answer("<think>Answer: 3</think> so\nAnswer: 292") == "292"
    assert extract_answer("  292 \n") == "292"
    assert extract_answer("292", strict=True) is None and extract_answer("") is None
    row = ReasoningGym("leg_counting?size=1").records("test")[0]
    s = stored(row)
    s.completion = f"Let me count.\nAnswer: {row['reference']['answer']}"
    assert ReasoningGymVerifier().verify(s).score == 1.0
    assert ReasoningGymVerifier(ReasoningGymVerifier.Config(strict=True)).verify(s).score == 0.0
    assert ReasoningGymVerifier().answer(Sample("x", "", "<answer>  1  2 </answer>")) == "1 2"


def test_a_reference_of_another_task_fails_that_sample():
    with pytest.raises(ValueError, match="not a reasoning-gym entry"):
        ReasoningGymVerifier().verify(Sample("x", "q", "4", reference="4"))


def test_registered_as_task_reward_and_verifier_with_itself_as_default():
    assert "reasoning_gym" in registry.available("task")
    assert "reasoning_gym" in registry.available("reward") and "reasoning_gym" in registry.available("verifier")
    assert registry.load("task", "reasoning_gym").default_reward == "reasoning_gym"


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install reasoning-gym"):
        require()


def test_unknown_name_via_the_cli_is_one_line_exit_2(tmp_path):
    proc = cli("prepare", "reasoning_gym:nope", "--out", "D", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: Unknown reasoning-gym task 'nope'.") and "leg_counting" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "" and not (tmp_path / "D").exists()


@pytest.mark.parametrize("source, expected", [("reasoning_gym:leg_countin", "Did you mean 'leg_counting'?"),
                                              ("reasoning_gym", "reasoning_gym needs a task name")])
def test_bad_names_through_the_loader(source, expected):
    from tokalign.data import loaders

    with pytest.raises(UserError, match=expected):
        loaders.load_records(source, "test")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["leg_counting", "basic_arithmetic", "letter_counting"])
def test_prepare_rollout_score_pipe_and_eval(tmp_path, name):
    """The task's scorer is `score`'s default: the prompts artifact records it and the rollouts carry it on."""
    task = f"reasoning_gym:{name}"
    proc = sh(f"tokalign prepare {task} --split test --limit 8 | tokalign rollout --n 2 --max-new-tokens 16 | "
              "tokalign score --out S", tmp_path)
    assert proc.returncode == 0 and proc.stdout == "S\n", proc.stderr
    rows = artifacts.read(tmp_path / "S", ["scored"]).rows()
    assert len(rows) == 16 and all(0.0 <= r["rewards"]["reasoning_gym"] <= 1.0 for r in rows)
    assert all(r["reward"] == r["rewards"]["reasoning_gym"] for r in rows)
    assert all(json.loads(r["reward_errors"] or "{}") == {} for r in rows)
    if name != "leg_counting":
        return
    cli("eval", "--data", task, "--split", "test", "--limit", "8", "--n", "2", "--max-new-tokens", "16", "--out", "E", cwd=tmp_path)
    results = json.loads((tmp_path / "E" / "results.json").read_text())
    assert results["verifier"] == "reasoning_gym" and results["num_prompts"] == 8 and results["n"] == 2
    assert 0.0 <= results["pass@1"] <= 1.0 and 0.0 <= results["mean_reward"] <= 1.0 and results["reward_failures"] == 0
