"""Resume points inside ``<out>.partial/``: model (save_pretrained), optimiser, scheduler, RNG, step, and the state and
files of the algorithm, its components and hooks.

Each checkpoint is written to a temp dir and renamed, so a kill never leaves a half checkpoint; only the newest one
is kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from tokalign.errors import UserError
from tokalign.protocols import Stateful

STATE = "trainer_state.pt"


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def latest(work: Path) -> Path | None:
    ckpts = sorted(work.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def states(state) -> dict:
    """The checkpointed state of everything stateful in a run: the algorithm, its components and hooks."""
    return {
        "algorithm": state.algorithm.state_dict() if isinstance(state.algorithm, Stateful) else None,
        "components": {c.name: c.state_dict() for c in state.components if isinstance(c, Stateful)},
        "hooks": {h.name: h.state_dict() for h in state.needs.hooks if isinstance(h, Stateful)},
    }


def restore(state, saved: dict) -> None:
    """Put a checkpoint's ``states`` back (and the optimiser, scheduler and RNG)."""
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved)
    if saved.get("algorithm") is not None:
        state.algorithm.load_state_dict(saved["algorithm"])
    for group, objs in (("components", state.components), ("hooks", state.needs.hooks)):
        for obj in objs:
            if obj.name in (saved.get(group) or {}):
                obj.load_state_dict(saved[group][obj.name])


def save(work: Path, step: int, state, config_sha256: str, weights: dict | None = None) -> Path:
    """``weights``: the gathered weights of a sharded model (None: the model's own state_dict)."""
    final = work / f"checkpoint-{step}"
    tmp = work / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    state.policy.save_pretrained(tmp, state_dict=weights)
    state.tokenizer.save_pretrained(tmp)
    for c in state.components:
        c.save(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "config_sha256": config_sha256,
            **states(state),
        },
        tmp / STATE,
    )
    tmp.rename(final)
    for old in work.glob("checkpoint-*[0-9]"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(ckpt: Path, config_sha256: str) -> dict:
    state = torch.load(ckpt / STATE, weights_only=False, map_location="cpu")
    if state["config_sha256"] != config_sha256:
        raise UserError(
            f"The configuration differs from the one that wrote {ckpt}; resume with the same command and config, "
            "or start over with --overwrite."
        )
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
