"""The multi-turn pieces of the pipeline: the tool_arith task and its traces, multi-turn SFT completions with a
loss mask, collate's completion mask from it, per-task model defaults, `score` with the data's own reward, and the
one-line errors of --env."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from tokalign import config, models
from tokalign.batching import Seq, collate, truncate, with_prompt
from tokalign.data import formats
from tokalign.data.tool_arith import ToolArith, pairs, trace
from tokalign.train.sources import CompletionSource


def test_tool_arith_records_are_fixed_and_disjoint():
    train, test = pairs()
    assert len(train) == 20_000 and len(test) == 500 and not set(train) & set(test)
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, b in train + test)
    rec = ToolArith().records("test")[0]
    a, b = test[0]
    assert rec["prompt"] == [{"role": "user", "content": f"{a}*{b}="}] and rec["reference"] == str(a * b)
    assert rec["completion"] == trace(a, b) and trace(a, b)[1] == {"role": "tool", "name": "calculator", "content": str(a * b)}


def test_multi_turn_completion_trains_on_assistant_turns_only():
    tok = models.load_tokenizer("")
    fmt, rows = formats.normalise(ToolArith().records("test")[:2], "tool_arith")
    assert fmt == "prompts" and rows[0]["completion_messages"] == trace(*pairs()[1][0])
    # a single assistant message stays a plain completion
    _, plain = formats.normalise([{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}], "t")
    assert "completion_messages" not in plain[0] and plain[0]["completion"] == "y"
    for r in rows:
        r["prompt_ids"] = [1, 2, 3]
    seqs, _ = CompletionSource(rows, tok, batch_size=2, seed=0).batch(0)
    batch = collate(seqs, tok.pad_token_id)
    for i, s in enumerate(seqs):
        mask = s.token["loss_mask"]
        assert len(mask) == len(s.completion_ids) and 0 in mask and mask[0] == 1 and mask[-1] == 1
        got = batch.completion_mask[i, 2 : 2 + len(mask)]
        assert got.tolist() == [float(m) for m in mask] and batch.completion_mask[i].sum() == sum(mask)
        assert tok.decode([t for t, m in zip(s.completion_ids, mask) if not m]).startswith("\n<|im_start|>tool\n")
    assert batch.totals["tokens"] == sum(sum(s.token["loss_mask"]) for s in seqs)


def test_loss_mask_survives_truncation_and_prompt_variants():
    s = Seq([1, 2], [5, 6, 7, 8], 0, token={"loss_mask": [1, 0, 0, 1], "sampler_logps": [-1.0, 0.0, 0.0, -2.0]})
    cut = truncate(s, 5)
    assert cut.completion_ids == [5, 6, 7] and cut.token["loss_mask"] == [1, 0, 0]
    other = with_prompt(s, [9, 9, 9])
    assert other.token == {"loss_mask": [1, 0, 0, 1]}
    assert collate([other], 0).completion_mask[0].tolist() == [0, 0, 1, 0, 0, 1]


def test_per_task_model_defaults(tmp_path):
    (tmp_path / "tokalign.yaml").write_text("rollout:\n  max_new_tokens: 8\n  n: 8\ntasks:\n  tool_arith:\n    rollout:\n      max_new_tokens: 96\n")
    assert config.model_defaults(tmp_path)["rollout"] == {"max_new_tokens": 8, "n": 8}
    assert config.model_defaults(tmp_path, "tool_arith")["rollout"] == {"max_new_tokens": 96, "n": 8}
    assert config.model_defaults(tmp_path, "arith")["rollout"]["max_new_tokens"] == 8


@pytest.mark.slow
def test_env_errors_and_score_with_the_datas_reward(tmp_path):
    bad = cli("rollout", "P", "--env", "nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "environment" in bad.stderr and "Traceback" not in bad.stderr
    dry = cli("train", "grpo", "--data", "tool_arith", "--env", "nope", "--dry-run", cwd=tmp_path, check=False)
    assert dry.returncode == 2 and "environment" in dry.stderr and len(dry.stderr.strip().splitlines()) == 1
    turns = cli("train", "grpo", "--data", "tool_arith", "--env", "calculator", "--set", "rollout.max_turns=0", "--dry-run",
                cwd=tmp_path, check=False)
    assert turns.returncode == 2 and "rollout.max_turns" in turns.stderr
    cli("prepare", "tool_arith", "--split", "test", "--limit", "2", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--env", "calculator", "--n", "2", "--max-new-tokens", "8", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--out", "S", cwd=tmp_path)  # no --reward: the task's own (exact_match), carried by rollout
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert manifest["config"]["reward"] == ["exact_match"]
    rows = __import__("tokalign.artifacts", fromlist=["read"]).read(tmp_path / "S", ["scored"]).rows()
    assert all(len(r["loss_mask"]) == len(r["completion_ids"]) and "episode" in r for r in rows)
    assert torch.tensor([r["reward"] for r in rows]).isfinite().all()


def test_episode_token_fields_index_model_turns():
    from tokalign.rows import dumps, episode_token_fields
    from tokalign.train.sources import scored_seqs

    row = {"id": "x#0", "prompt_ids": [1, 2], "completion_ids": [5, 6, 7, 8, 9], "group_id": 0, "reward": 1.0,
           "loss_mask": [1, 1, 0, 0, 1], "sampler_logps": [-1.0, -1.0, 0.0, 0.0, -2.0],
           "episode": dumps({"turns": [[0, 2, "model"], [2, 4, "env"], [4, 5, "model"]]})}
    assert episode_token_fields(row) == {"turn_index": [0.0, 0.0, -1.0, -1.0, 1.0]}
    assert episode_token_fields({"completion_ids": [1]}) == {}
    batch = collate(scored_seqs([row], [0]), 0)
    assert batch.fields["turn_index"][0, 1:].tolist() == [0.0, 0.0, -1.0, -1.0, 1.0]
    assert batch.completion_mask[0, 1:].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.slow
def test_the_bundled_model_calls_the_calculator_and_needs_it(tmp_path):
    """The bundled model's tool phase (examples/tiny-model/tool_phase.py): on held-out four-digit products it calls the
    calculator on part of the prompts and copies the result, so the tool solves some; without the tool it solves none.
    Online RL then has a decision to learn (examples/tool-arith/run.sh measures the before → after)."""
    cli("prepare", "tool_arith", "--split", "test", "--limit", "16", "--out", "P", cwd=tmp_path)
    flags = ("--data", "P", "--n", "2", "--max-turns", "2", "--max-new-tokens", "96", "--quiet")
    cli("eval", *flags, "--env", "calculator", "--out", "E1", cwd=tmp_path)
    cli("eval", *flags, "--out", "E0", cwd=tmp_path)
    with_tool = json.loads((tmp_path / "E1" / "results.json").read_text())
    without = json.loads((tmp_path / "E0" / "results.json").read_text())
    assert 0.2 <= with_tool["mean_tool_calls"] <= 0.9  # some calls, not all: the call is what RL learns
    assert with_tool["pass@1"] >= 0.15 and without["pass@1"] == 0.0
