"""Resume points inside ``<out>.partial/``: the trained weights and the optimiser state through
``torch.distributed.checkpoint`` (DCP: every process writes its own shard, and a checkpoint loads on any number of
processes, sharded or not), and beside them the scheduler, RNG, step and the state and files of the algorithm, its
components and hooks.

Only what trains is in the DCP part (all of a fully trained policy; a LoRA policy's adapter; a value head): frozen
weights come back from the starting model. Each checkpoint is written to a temp dir and renamed, so a kill never
leaves a half checkpoint; only the newest one is kept. The final artifact is a plain ``save_pretrained`` directory
(``loop._finish``), not this.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from tokalign import artifacts
from tokalign.artifacts import sha256_json
from tokalign.errors import UserError, no_space_error
from tokalign.protocols import Stateful
from tokalign.train import distributed

STATE = "trainer_state.pt"
SHARDS = "dcp"  # torch.distributed.checkpoint's directory: one .distcp file per process and a .metadata


# how a step is executed, not what it computes: a run may resume with other values (on fewer GPUs, a smaller
# micro-batch; another data-parallel strategy; checkpoints more often)
EXECUTION = ("distributed", "micro_batch_size", "micro_batch_tokens", "gradient_checkpointing", "fused_head", "packing", "save_every", "log")


def identity(run_config: dict) -> str:
    """What a checkpoint must match to be resumed: the run's configuration less its ``EXECUTION`` settings."""
    return sha256_json({**run_config, "train": {k: v for k, v in run_config["train"].items() if k not in EXECUTION}})


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def discard(work: Path) -> None:
    """Remove a work dir so that a kill midway never leaves half of one (a checkpoint without its state, say, which
    --resume would trip over): it is renamed to a temp dir of its output first, which the next write of that output
    clears if this removal is cut short."""
    if not work.exists():
        return
    gone = artifacts.temp_name(work.with_name(work.name.removesuffix(".partial")))
    work.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def latest(work: Path) -> Path | None:
    ckpts = sorted(work.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def states(state) -> dict:
    """The checkpointed state of everything stateful in a run: the batch source (batches sampled ahead; first, as it
    waits for samplings in flight, which move hooks' state), the algorithm, its components and hooks, and the source's
    rewards that keep state."""
    return {
        "source": state.source.state_dict() if isinstance(state.source, Stateful) else None,
        "algorithm": state.algorithm.state_dict() if isinstance(state.algorithm, Stateful) else None,
        "components": {c.name: c.state_dict() for c in state.components if isinstance(c, Stateful)},
        "hooks": {h.name: h.state_dict() for h in state.needs.hooks if isinstance(h, Stateful)},
        # rewards that keep state (MPO's evolving rubric), in this process (score workers hold their own)
        "rewards": {r.name: r.fn.state_dict() for r in _rewards(state) if isinstance(r.fn, Stateful)},
    }


def _rewards(state) -> list:
    return list(getattr(state.source, "rewards", None) or [])


class _Trained(torch.nn.Module):
    """Everything the optimiser steps, under stable names for DCP: the policy (unwrapped, so ``ddp``, ``fsdp`` and one
    process agree on the names) and each component's parameters (``value_head.0``, …)."""

    def __init__(self, state):
        super().__init__()
        self.policy = state.policy
        for c in state.components:
            if c.parameters():
                self.add_module(c.name, torch.nn.ParameterList(c.parameters()))


def _sharded_state(trained: _Trained, optimizer) -> tuple[dict, dict]:
    """(model, optimiser) state dicts of this process's shards (a collective under FSDP: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(trained, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save(work: Path, step: int, state, config_sha256: str) -> Path:
    """Every process calls it: each writes its shard of the weights and optimiser state; the main process the rest,
    then renames the finished checkpoint into place. A full disk is one line; the checkpoints before stay."""
    dist = state.dist
    final, tmp = work / f"checkpoint-{step}", work / f"checkpoint-{step}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier(dist)
    try:
        return _save(work, step, state, config_sha256, final, tmp)
    except BaseException as e:
        if not artifacts.disk_full(e, work):
            raise
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise no_space_error(work, e, "; --resume continues from the last complete checkpoint, if there is one") from e


def _save(work: Path, step: int, state, config_sha256: str, final: Path, tmp: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dist = state.dist
    model, optim = _sharded_state(_Trained(state), state.optimizer)
    # one process: no_dist (torch's single-process mode, without its "assuming the intent" warning on every save)
    dcp.save({"model": model, "optimizer": optim}, checkpoint_id=tmp / SHARDS, no_dist=not dist.active)
    if dist.main:
        for c in state.components:
            c.save(tmp)
        stateful = states(state)
        torch.save(
            {
                "step": step,
                "world": dist.world,
                "scheduler": state.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's GPU
                "python_rng": random.getstate(),
                "config_sha256": config_sha256,
                **stateful,
            },
            tmp / STATE,
        )
        tmp.rename(final)
        for old in work.glob("checkpoint-*[0-9]"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(dist)
    return final


def load_state(ckpt: Path, config_sha256: str) -> dict:
    if not (ckpt / SHARDS).is_dir():
        raise UserError(f"{ckpt} was written by an older tokalign (no '{SHARDS}/' shards); start over with --overwrite.")
    state = torch.load(ckpt / STATE, weights_only=False, map_location="cpu")
    if state["config_sha256"] != config_sha256:
        raise UserError(
            f"The configuration differs from the one that wrote {ckpt}; resume with the same command and config, "
            "or start over with --overwrite."
        )
    return {**state, "path": ckpt}


def restore(state, saved: dict) -> None:
    """Put a checkpoint back: weights and optimiser state resharded onto this run's processes (every process calls
    it), then the scheduler, RNG and ``states``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trained = _Trained(state)
    model, optim = _sharded_state(trained, state.optimizer)  # the structure to load into (a fresh optimiser's state is made first)
    dcp.load({"model": model, "optimizer": optim}, checkpoint_id=saved["path"] / SHARDS, no_dist=not state.dist.active)
    set_state_dict(trained, state.optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    state.scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved)
    if saved.get("algorithm") is not None:
        state.algorithm.load_state_dict(saved["algorithm"])
    if saved.get("source") is not None:
        state.source.load_state_dict(saved["source"])
    for group, objs in (("components", state.components), ("hooks", state.needs.hooks)):
        for obj in objs:
            if obj.name in (saved.get(group) or {}):
                obj.load_state_dict(saved[group][obj.name])
    restore_rewards(state, saved)


def restore_rewards(state, saved: dict) -> None:
    """Each stateful reward of the run's source back to its checkpointed state (by its name in the run's rewards)."""
    for r in _rewards(state):
        if r.name in (saved.get("rewards") or {}) and isinstance(r.fn, Stateful):
            r.fn.load_state_dict(saved["rewards"][r.name])


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    random.setstate(state["python_rng"])


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (the file replaced in one step: a kill midway
    leaves the old one, never a truncated one)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
