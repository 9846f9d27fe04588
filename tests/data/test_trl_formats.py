"""Every dataset type of TRL's dataset-format guide (https://huggingface.co/docs/trl/dataset_formats), standard and
conversational, is read as it is by each algorithm it fits: the table in docs/concepts/data-formats.md is what
``make_plan`` accepts here, and one algorithm per format trains a step on it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tokalign import registry
from tokalign.errors import UserError

sys.path.insert(0, str(ROOT / "tests" / "train"))
import golden_runs  # noqa: E402

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

# TRL's own examples (the guide's), two records each; ``answer`` is an extra column the online rewards read
FORMATS: dict[str, list[dict]] = {
    "language modelling, standard": [{"text": "The sky is blue."}, {"text": "The sun is hot."}],
    "language modelling, conversational": [{"messages": [U("What color is the sky?"), A("It is blue.")]},
                                           {"messages": [U("Is the sun hot?"), A("Yes.")]}],
    "prompt-only, standard": [{"prompt": "The sky is", "answer": " blue."}, {"prompt": "The sun is", "answer": " hot."}],
    "prompt-only, conversational": [{"prompt": [U("What color is the sky?")], "answer": "blue"},
                                    {"prompt": [U("Is the sun hot?")], "answer": "yes"}],
    "prompt-completion, standard": [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "The sun is", "completion": " hot."}],
    "prompt-completion, conversational": [{"prompt": [U("What color is the sky?")], "completion": [A("It is blue.")]},
                                          {"prompt": [U("Is the sun hot?")], "completion": [A("Yes.")]}],
    "preference, standard": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                             {"prompt": "The sun is", "chosen": " hot.", "rejected": " cold."}],
    "preference, conversational": [{"prompt": [U("What color is the sky?")], "chosen": [A("It is blue.")], "rejected": [A("It is green.")]},
                                   {"prompt": [U("Is the sun hot?")], "chosen": [A("Yes.")], "rejected": [A("No.")]}],
    "preference (implicit prompt), standard": [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                               {"chosen": "The sun is hot.", "rejected": "The sun is cold."}],
    "preference (implicit prompt), conversational": [
        {"chosen": [U("What color is the sky?"), A("It is blue.")], "rejected": [U("What color is the sky?"), A("It is green.")]},
        {"chosen": [U("Is the sun hot?"), A("Yes.")], "rejected": [U("Is the sun hot?"), A("No.")]}],
    "unpaired preference, standard": [{"prompt": "The sky is", "completion": " blue.", "label": True},
                                      {"prompt": "The sun is", "completion": " cold.", "label": False}],
    "unpaired preference, conversational": [{"prompt": [U("What color is the sky?")], "completion": [A("It is blue.")], "label": True},
                                            {"prompt": [U("Is the sun hot?")], "completion": [A("No.")], "label": False}],
    "stepwise supervision, standard": [
        {"prompt": "Which number is larger, 9.8 or 9.11?",
         "completions": ["The fractional part of 9.8 is 0.8, while the fractional part of 9.11 is 0.11.",
                         "Since 0.11 is greater than 0.8, the number 9.11 is larger than 9.8."], "labels": [True, False]},
        {"prompt": "What is 2+3?", "completions": ["2+3 is 5.", "So the answer is 5."], "labels": [True, True]}],
}
# one algorithm per format that trains a real step on it
TRAINS = {"language modelling": "sft", "prompt-only": "grpo", "prompt-completion": "sft", "preference": "dpo",
          "preference (implicit prompt)": "dpo", "unpaired preference": "kto", "stepwise supervision": "prm"}
DOC = ROOT / "docs" / "concepts" / "data-formats.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("trl")
    out = {}
    for name, records in FORMATS.items():
        path = d / (re.sub(r"\W+", "_", name) + ".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        out[name] = str(path)
    return out


def _layers(algo: str, data: str, tmp: Path, extra: dict | None = None) -> list[dict]:
    from tokalign import config, models

    subst = {"@model": str(models.resolve_model("")[0])}
    run = {k: v for k, v in golden_runs.RUNS[algo].items() if k != "data"}  # its models and options, not its data
    return [config.model_defaults(models.resolve_model("")[1]), golden_runs.COMMON,
            golden_runs._resolve(run, subst), {"data": data, "reward": ["exact_match"]}, *([extra] if extra else [])]


def _accepts(algo: str, data: str, tmp: Path) -> bool:
    from tokalign.train.plan import make_plan

    try:
        make_plan(algo, _layers(algo, data, tmp), str(tmp / "out"))
    except UserError as e:
        if "trains on" in str(e):
            return False
        raise
    return True


def _doc_table() -> dict[str, set[str]]:
    """format -> algorithms, from the page's table (| format | algorithms |)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] in FORMATS:
            rows[cells[0]] = set(re.findall(r"`(\w+)`", cells[1]))
    return rows


@pytest.mark.slow
def test_the_docs_table_is_what_each_algorithm_accepts(files, tmp_path):
    builtin = sorted(n for n in registry.available("algorithm") if registry.info("algorithm", n).distribution == "tokalign")
    got = {name: {a for a in builtin if _accepts(a, files[name], tmp_path)} for name in FORMATS}
    assert all(got.values()), {k: v for k, v in got.items() if not v}  # every TRL format has an algorithm
    assert _doc_table() == got, "docs/concepts/data-formats.md's table is not what the algorithms accept: update its rows"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_trains_a_step_as_it_is(files, tmp_path, name):
    from tokalign.train.loop import run as train
    from tokalign.train.plan import make_plan

    algo = TRAINS[name.split(",")[0]]
    extra = {"train": {"max_steps": 1, "batch_size": 2}, "rollout": {"n": 2, "max_new_tokens": 4}}
    plan = make_plan(algo, _layers(algo, files[name], tmp_path, extra), str(tmp_path / "out"))
    out = train(plan, quiet=True)
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step["loss"] == step["loss"]  # finite
    # offline data always gives a gradient; sampled groups only where their rewards differ
    assert step["grad_norm"] > 0 if algo != "grpo" else "reward/mean" in step


def test_implicit_prompt_is_trls_extract_prompt():
    from tokalign.data.formats import split_implicit_prompt

    assert split_implicit_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    chosen, rejected = [U("q"), A("a")], [U("q"), A("b")]
    assert split_implicit_prompt(chosen, rejected) == ([U("q")], [A("a")], [A("b")])
    assert split_implicit_prompt("ab", "abc") == ("a", "b", "bc")  # one a prefix of the other: a piece stays


def test_kto_reads_a_paired_dataset_as_trl_does(files, tmp_path):
    from tokalign.train.plan import make_plan

    plan = make_plan("kto", _layers("kto", files["preference, standard"], tmp_path), str(tmp_path / "out"))
    assert plan.data_kind == "unpaired" and "chosen desirable" in plan.data["converted"]
    assert [(r["completion"], r["label"]) for r in plan.rows[:2]] == [(" blue.", True), (" green.", False)]


def test_stepwise_and_language_modelling_rows():
    from tokalign.data import formats

    fmt, rows = formats.normalise(FORMATS["stepwise supervision, standard"], "x")
    assert fmt == "stepwise" and rows[1]["steps"] == ["2+3 is 5.", "So the answer is 5."] and rows[1]["step_labels"] == [True, True]
    with pytest.raises(UserError, match="2 steps in 'completions' but 1 'labels'"):
        formats.normalise([{"prompt": "p", "completions": ["a", "b"], "labels": [True]}], "x")
    fmt, rows = formats.normalise(FORMATS["language modelling, standard"], "x")
    assert fmt == "prompts" and rows[0]["prompt"] == "" and rows[0]["completion"] == "The sky is blue."
    _, rows = formats.normalise([{"messages": [U("q"), A("a"), U("more?"), A("b")]}], "x")
    assert rows[0]["prompt"] == [U("q")] and rows[0]["completion_messages"] == [A("a"), U("more?"), A("b")]
