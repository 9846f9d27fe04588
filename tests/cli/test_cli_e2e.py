"""The issue's interface, driven through the real CLI in subprocesses and a real bash pipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, sh
from tokalign import artifacts

pytestmark = pytest.mark.slow
FAST = ["--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    proc = cli("prepare", "arith", "--limit", "16", "--out", "P", cwd=work)
    assert proc.stdout == "P\n"  # only the artifact path on stdout
    return work / "P"


@pytest.fixture(scope="module")
def scored(work, prompts) -> Path:
    cli("rollout", "P", "--n", "4", "--backend", "hf", "--out", "R", *FAST, cwd=work)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=work)
    return work / "S"


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_prepare_rollout_score_chain_with_provenance(work, prompts, scored):
    rows = artifacts.read(work / "R", ["rollouts"]).rows()
    assert len(rows) == 16 * 4
    assert all(len(r["sampler_logps"]) == len(r["completion_ids"]) > 0 for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    srows = artifacts.read(scored, ["scored"]).rows()
    assert all(r["reward"] in (0.0, 1.0) and r["rewards"]["exact_match"] == r["reward"] for r in srows)
    # each manifest names its input by the hash of that input's manifest
    assert manifest(work / "R")["inputs"][0]["manifest_sha256"] == artifacts.sha256_file(prompts / "manifest.json")
    assert manifest(scored)["inputs"][0]["manifest_sha256"] == artifacts.sha256_file(work / "R" / "manifest.json")
    assert manifest(scored)["plugins"][0]["name"] == "exact_match"


def test_train_grpo_offline_from_scored(work, scored):
    cli("train", "grpo", "--data", "S", "--out", "C1", "--max-steps", "2", cwd=work)
    m = manifest(work / "C1")
    assert m["kind"] == "checkpoint" and m["inputs"][0]["manifest_sha256"] == artifacts.sha256_file(scored / "manifest.json")
    lines = (work / "C1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert (work / "C1" / "model.safetensors").is_file() and not (work / "C1.partial").exists()


def test_train_dpo_on_pairs_formed_from_scored_rollouts(work, scored):
    proc = cli("train", "dpo", "--data", "S", "--dry-run", cwd=work)
    assert "best vs worst reward per group" in proc.stdout
    cli("train", "dpo", "--data", "S", "--out", "D", "--max-steps", "2", "--batch-size", "2", cwd=work, check=False)
    # the tiny model may get every sample right or wrong; pairs exist only where a group's rewards differ
    assert (work / "D").exists() or "no group with unequal rewards" in cli("train", "dpo", "--data", "S", "--out", "D",
                                                                          cwd=work, check=False).stderr


def test_train_grpo_online_then_eval(work, prompts):
    cli("train", "grpo", "--data", "arith", "--out", "C2", "--max-steps", "3", "--batch-size", "4", "--n", "4",
        "--set", "rollout.max_new_tokens=8", cwd=work)
    metrics = [json.loads(x) for x in (work / "C2" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all("reward/mean" in m and "loss" in m for m in metrics)
    assert manifest(work / "C2")["inputs"][0]["kind"] == "task"
    cli("eval", "--model", "C2", "--data", "P", "--verifier", "exact_match", "--n", "4", "--out", "E", *FAST, cwd=work)
    results = json.loads((work / "E" / "results.json").read_text())
    assert {"pass@1", "pass@2", "pass@4", "mean_reward"} <= set(results) and 0.0 <= results["pass@1"] <= 1.0
    assert len(artifacts.read(work / "E", ["eval"]).rows()) == 16 * 4


def test_train_dpo_on_trl_preference_jsonl(work):
    pairs = [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "chosen": [{"role": "assistant", "content": str(2 * a)}],
              "rejected": [{"role": "assistant", "content": str(2 * a + 1)}]} for a in range(6)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cli("train", "dpo", "--data", "pairs.jsonl", "--out", "C3", "--max-steps", "5", "--batch-size", "2", cwd=work)
    metrics = [json.loads(x) for x in (work / "C3" / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["loss"] - 0.6931) < 1e-3  # π = π_ref at step 1 ⇒ ln 2
    assert manifest(work / "C3")["inputs"][0]["sha256"] == artifacts.sha256_file(work / "pairs.jsonl")


def test_bash_pipe_of_all_stages(work):
    proc = sh("tokalign prepare arith --limit 64 | tokalign rollout --n 4 --max-new-tokens 8 | "
              "tokalign score --reward exact_match | tokalign train grpo --max-steps 2 --out C4", work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "C4\n"
    assert manifest(work / "C4")["inputs"][0]["kind"] == "scored"


def test_plugins_json(work):
    rows = json.loads(cli("plugins", "--json", cwd=work).stdout)
    names = {(r["kind"], r["name"]) for r in rows}
    assert {("algorithm", "grpo"), ("algorithm", "dpo"), ("algorithm", "sft"), ("verifier", "exact_match"), ("task", "arith")} <= names
    assert all(r["status"] == "ok" and r["distribution"] and r["version"] and r["group"].startswith("tokalign.") for r in rows
               if r["distribution"] == "tokalign")


def test_dry_run_loads_no_model_and_shows_batch_arithmetic(work):
    out = cli("train", "grpo", "--data", "arith", "--dry-run", "--batch-size", "4", "--n", "8", "--set", "train.micro_batch_size=8",
              cwd=work).stdout
    assert "prompts per step: 4" in out and "sequences per step: 32" in out and "micro-batches per update: 4" in out
    assert not (work / "runs").exists() or not any((work / "runs").glob("checkpoint-*"))
