"""Online training with vLLM under torchrun: 2 gloo processes on CPU, each with its own whole engine (vLLM's external
launcher on torchrun's group), each sampling its own chunks of prompts; the weights of an FSDP2-sharded trainer go
into every engine one gathered tensor at a time. Run in the vllm venv (see .ci/vllm-venv.sh).

This file is also the worker that torchrun starts for the weight-sync check (``python test_vllm_torchrun.py sync``),
and its ``RankLog`` is the reward the CLI runs load (``test_vllm_torchrun:RankLog``, this folder on PYTHONPATH)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
RANKLOG = "test_vllm_torchrun:RankLog"


class RankLog:
    """Reward: 1 for the reference answer, else 0 (arith's exact match); one JSON line per sample in ``log``: [the
    scoring process's torchrun RANK, sample id, completion]. Online, each process scores the chunks it sampled, so the
    log says which process sampled what."""

    @dataclass
    class Config:
        log: str = ""

    def __init__(self, config: RankLog.Config):
        self.config = config

    def __call__(self, samples):
        from tokalign.protocols import Reward

        with open(self.config.log, "a") as f:
            f.writelines(json.dumps([int(os.environ.get("RANK", "0")), s.id, s.completion]) + "\n" for s in samples)
        return [Reward(float(s.completion.strip() == str(s.reference).strip())) for s in samples]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    from conftest import CLI_ENV

    return {**CLI_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *args],
                          capture_output=True, text=True, env=_env(), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]  # e.g. vLLM's teardown after the trainer's (see vllm_engine)
    return proc


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_weight_sync_makes_each_engine_match_the_trainer(tiny_model, tmp_path, lora):
    """Each process's engine, before a sync, disagrees with the perturbed FSDP2-sharded trainer on its own prompts;
    after one streamed sync (every parameter gathered whole, in turn, on both processes) it agrees to 1e-3."""
    if lora:
        pytest.importorskip("peft")
    _torchrun(str(HERE / "test_vllm_torchrun.py"), "sync", str(tiny_model), str(tmp_path), "lora" if lora else "full")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    for r in ranks:
        assert r["before"] > 1e-2 and r["after"] < 1e-3 and 0 < r["seconds"] < 30


def _sync_worker(model_dir: str, out: str, kind: str) -> None:
    import torch
    from test_vllm_train import _prompts, _trainer_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign.config import TrainSection
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine
    from tokalign.train import distributed, lora

    dist = distributed.init()
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = VLLMEngine(model_dir, tok, max_model_len=128)
    torch.manual_seed(0)  # the same trainer on both processes, away from the weights the engines were built with
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "lora":
        model = lora.wrap(model, TrainSection(lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind == "full" or "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    distributed.shard_model(model, dist, "fsdp")
    model.eval()
    prompts = _prompts(tok, 4)[2 * dist.rank : 2 * dist.rank + 2]  # each process its own prompts
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=3 + dist.rank)

    def gap() -> float:
        trainer, sampler = _trainer_logps(model, prompts, engine.generate(prompts, spec))  # the forward: a collective
        return float((trainer - sampler).abs().max())

    before = gap()
    seconds = engine.sync(model)
    result = {"before": before, "after": gap(), "seconds": seconds, "prompts": prompts}
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps(result))
    distributed.shutdown(dist)


def _log(path: Path) -> dict[int, list[list]]:
    by_rank: dict[int, list[list]] = {}
    for line in path.read_text().splitlines():
        rank, *sample = json.loads(line)
        by_rank.setdefault(rank, []).append(sample)
    return by_rank


STEPS, PROMPTS, N, CHUNK = 3, 4, 4, 2


def _train_args(out: Path, log: Path) -> list[str]:
    return ["-m", "tokalign", "train", "grpo", "--data", "arith", "--backend", "vllm", "--reward", RANKLOG, "--reward-opt",
            f"{RANKLOG}.log={log}", "--set", f"rollout.n={N}", "--set", f"rollout.sampling_chunk={CHUNK}", "--set", "train.lr=1e-3",
            "--max-steps", str(STEPS),
            "--batch-size", str(PROMPTS), "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process: its log holds every step's samples, chunk after chunk."""
    tmp = tmp_path_factory.mktemp("one")
    proc = subprocess.run([sys.executable, *_train_args(tmp / "out", tmp / "log.jsonl")], capture_output=True, text=True, env=_env(),
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _log(tmp / "log.jsonl")[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_grpo_with_vllm_backend(tmp_path, strategy, one_process):
    """`torchrun --nproc_per_node 2 -m tokalign train grpo --backend vllm`: it finishes and writes the artifact; losses
    are finite; the weights move (lr 1e-3) and every step syncs both engines (the logged sampler/trainer gap over the
    gathered batch — both processes' samples — stays < 1e-3; a stale engine: > 2). Each step's first chunk of prompts is sampled by process 0 alone and the second by
    process 1 alone, exactly the prompts a one-process run draws in that order; at the first step (the same starting
    weights) the very same completions."""
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    proc = _torchrun(*_train_args(out, log), "--set", f"train.distributed={strategy}")
    assert proc.stdout.strip() == str(out) and (out / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == STEPS and all(math.isfinite(m["loss"]) and m["time/weight_sync_s"] > 0 for m in metrics)
    assert any(m["grad_norm"] > 0 for m in metrics[:-1])  # the weights moved before a later step sampled: a stale engine would show
    assert max(m["mismatch/logp_gap_abs"] for m in metrics) < 1e-3
    by_rank, per_chunk = _log(log), CHUNK * N
    assert sorted(by_rank) == [0, 1] and all(len(samples) == STEPS * per_chunk for samples in by_rank.values())
    for step in range(STEPS):
        one = one_process[step * 2 * per_chunk : (step + 1) * 2 * per_chunk]
        for rank in (0, 1):
            mine = by_rank[rank][step * per_chunk : (step + 1) * per_chunk]
            theirs = one[rank * per_chunk : (rank + 1) * per_chunk]
            assert [s[0] for s in mine] == [s[0] for s in theirs]  # sample ids: prompt id # sample index
            if step == 0:
                assert mine == theirs


if __name__ == "__main__" and sys.argv[1] == "sync":  # the worker torchrun starts
    sys.path.insert(0, str(HERE.parent))  # conftest, for test_vllm_train
    _sync_worker(*sys.argv[2:5])
