"""Shared by the GPU tests (tests/gpu, marker ``gpu``; benchmarks/gpu/check.sh runs them on a GPU machine): the marks
that skip them without CUDA, an in-process train state, recorders of what a step's tensors and models are, and the
environment of CLI subprocesses.

``TOKALIGN_GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU: a dry run of the test code itself on a machine
without a GPU (the checks that only mean something on CUDA are skipped then). The default is ``cuda``."""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("TOKALIGN_GPU_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


GPU = [pytest.mark.gpu, pytest.mark.skipif(ON_CUDA and not _cuda(), reason="needs a CUDA GPU (benchmarks/gpu/check.sh runs these)")]
CUDA_ONLY = pytest.mark.skipif(not ON_CUDA, reason="means something on CUDA only")
# the CLI and in-process runs train on DEVICE (tokalign.models.default_device reads it)
ENV = {"TOKALIGN_DEVICE": DEVICE}


def module_of(folder: str, name: str):
    """A test module of tests/<folder> (for its helpers), imported under the name pytest gives it (rootdir-relative
    folders are on sys.path in pytest's default import mode), so it is one module whichever imports it first."""
    path = str(TESTS / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def pairs_file(tmp_path: Path) -> str:
    """tests/train/test_distributed.py's 8 preference pairs as a chat-format JSONL file."""
    pairs = module_of("train", "test_distributed").PAIRS
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for q, c, r in pairs))
    return str(data)


def online(**train) -> dict:
    """Online training on the arith task (4 samples of at most 6 tokens per prompt)."""
    return {"data": "arith", "rollout": {"n": 4, "max_new_tokens": 6}, "train": {"batch_size": 2, "max_steps": 2, **train}}


def offline(data: str, **train) -> dict:
    return {"data": data, "train": {"batch_size": 4, "max_steps": 2, **train}}


def train_state(monkeypatch, algo: str, layer: dict, seed: int = 0):
    """The run's TrainState as ``tokalign train ALGO`` builds it (the bundled model's defaults under ``layer``), on
    DEVICE, in this process; its steps: ``tokalign.train.loop.step_once(state, step)``."""
    import torch

    from tokalign import config, models
    from tokalign.train import distributed
    from tokalign.train.plan import make_plan
    from tokalign.train.state import TrainState

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    plan = make_plan(algo, [config.model_defaults(models.BUNDLED_MODEL), layer], None)
    torch.manual_seed(seed)
    random.seed(seed)
    return TrainState(plan, None, distributed.Dist())


def batch_tensors(batch) -> dict:
    """name -> tensor of a TokenBatch."""
    out = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "completion_mask": batch.completion_mask}
    return {**out, **{f"fields[{k}]": v for k, v in batch.fields.items()}}


def output_tensors(out) -> dict:
    """name -> tensor of a PolicyOutput (a chunked HeadLogits by its hidden states and head)."""
    from tokalign.ops import HeadLogits

    found = {}
    logits = {"ref_logits": out.ref_logits, **{f"extra_logits[{k}]": v for k, v in out.extra_logits.items()}}
    for name, value in {"logps": out.logps, "entropy": out.entropy, "logits": out.logits, "values": out.values, "hidden": out.hidden,
                        **logits}.items():
        if isinstance(value, HeadLogits):
            found[f"{name}.hidden"], found[f"{name}.head.weight"] = value.hidden, value.head.weight
        elif value is not None:
            found[name] = value
    return found


class Recorder:
    """Wraps the algorithm's ``prepare`` and ``loss`` of a TrainState: keeps every batch, micro-batch, policy output
    and loss they saw (and the output dtype of every model's LM head, by forward hooks)."""

    def __init__(self, state):
        self.prepared, self.losses, self.head_dtypes = [], [], {}
        algo = state.algorithm
        prepare, loss = algo.prepare, algo.loss

        def recorded_prepare(batch):
            batch = prepare(batch)
            self.prepared.append(batch_tensors(batch))
            return batch

        def recorded_loss(mb, out):
            result = loss(mb, out)
            self.losses.append(({**batch_tensors(mb), **output_tensors(out)}, result.loss.detach()))
            return result

        algo.prepare, algo.loss = recorded_prepare, recorded_loss
        for role, model in models_of(state).items():
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is not None:
                head.register_forward_hook(lambda m, i, o, role=role: self.head_dtypes.setdefault(role, set()).add(o.dtype))


def models_of(state) -> dict:
    """role -> model of every model the run holds: the policy, the reference, frozen and trained models, a value head."""
    found = {"policy": state.policy}
    for c in state.components:
        for k, m in enumerate(c.models()):
            if m is not None and all(m is not other for other in found.values()):
                found[f"{c.name}" + (f"[{k}]" if k else "")] = m
    return found


def deterministic_env(tmp_path: Path) -> dict:
    """Variables that make a CLI subprocess's CUDA work deterministic: a ``sitecustomize`` first on PYTHONPATH turns
    on ``torch.use_deterministic_algorithms`` (warn-only: an op without a deterministic kernel warns on stderr), and
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for it."""
    d = tmp_path / "_deterministic"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text("import torch\ntorch.use_deterministic_algorithms(True, warn_only=True)\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(d), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
