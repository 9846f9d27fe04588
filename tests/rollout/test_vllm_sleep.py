"""rollout.vllm_sleep: the engine sleeps after a step's sampling and wakes weights first, then its KV cache, around
the weight load (the order checked on a recording stand-in for vLLM's LLM; sleep mode itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import cli
from tokalign.rollout.vllm_engine import VLLMEngine


class _RecordingLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, name, kwargs):
        self.calls.append((name, sorted(n for n, _ in kwargs["weights_iterator"])))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _engine(sleep: bool) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM here: the engine's own bookkeeping around a stand-in
    engine.llm, engine.sleep, engine.asleep = _RecordingLLM(), sleep, False
    return engine


def test_sleeping_engine_wakes_weights_then_kv_cache_around_the_weight_load():
    model = torch.nn.Linear(2, 2)
    engine = _engine(sleep=True)
    engine.sync(model)  # awake at the start: a plain load
    engine.idle()
    engine.idle()  # already asleep: nothing more
    engine.sync(model)
    assert engine.llm.calls == [
        ("reload_weights", ["bias", "weight"]), ("reset_prefix_cache",),
        ("sleep", 2),
        ("wake_up", ("weights",)), ("reload_weights", ["bias", "weight"]), ("wake_up", ("kv_cache",)), ("reset_prefix_cache",),
    ]
    assert not engine.asleep


def test_without_sleep_the_engine_never_sleeps():
    engine = _engine(sleep=False)
    engine.idle()
    engine.sync(torch.nn.Linear(2, 2))
    assert [c[0] for c in engine.llm.calls] == ["reload_weights", "reset_prefix_cache"]


def test_sleep_excludes_async_rollouts(tmp_path):
    bad = cli("train", "grpo", "--data", "arith", "--set", "rollout.vllm_sleep=true", "--set", "train.async_rollouts=1",
              "--dry-run", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "exclude each other" in bad.stderr and "Traceback" not in bad.stderr
    ignored = cli("train", "grpo", "--data", "arith", "--set", "rollout.vllm_sleep=true", "--dry-run", cwd=tmp_path)
    assert "rollout.vllm_sleep is ignored" in ignored.stdout + ignored.stderr  # the hf backend


@pytest.mark.vllm
def test_sleep_on_cpu_is_one_line(tmp_path):
    proc = cli("train", "grpo", "--data", "arith", "--backend", "vllm", "--max-steps", "1", "--batch-size", "2", "--n", "2",
               "--set", "rollout.vllm_sleep=true", "--out", "o", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "rollout.vllm_sleep needs a GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
