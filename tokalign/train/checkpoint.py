"""Resume points inside ``<out>.partial/``: model (save_pretrained), optimiser, scheduler, RNG, step.

Each checkpoint is written to a temp dir and renamed, so a kill never leaves a half checkpoint;
only the newest one is kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from tokalign.errors import UserError

STATE = "trainer_state.pt"
VALUE_HEAD = "value_head.safetensors"


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def latest(work: Path) -> Path | None:
    ckpts = sorted(work.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def save(work: Path, step: int, model, tokenizer, optimizer, scheduler, config_sha256: str, algorithm=None,
         value_head=None, trained: dict | None = None, state_dict: dict | None = None) -> Path:
    """``trained``: {role: (model, optimizer)} of the algorithm's auxiliary trained models, saved in <ckpt>/<role>/."""
    final = work / f"checkpoint-{step}"
    tmp = work / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)  # state_dict: the gathered weights of a sharded model
    tokenizer.save_pretrained(tmp)
    if value_head is not None:
        from safetensors.torch import save_file

        save_file(value_head.state_dict(), tmp / VALUE_HEAD)
    for role, (aux, _) in (trained or {}).items():
        aux.save_pretrained(tmp / role)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "config_sha256": config_sha256,
            # algorithms with state across steps (running statistics per prompt, ...) resume it too
            "algorithm": algorithm.state_dict() if hasattr(algorithm, "state_dict") else None,
            "aux_optimizers": {role: opt.state_dict() for role, (_, opt) in (trained or {}).items()},
        },
        tmp / STATE,
    )
    tmp.rename(final)
    for old in work.glob("checkpoint-*[0-9]"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(ckpt: Path, config_sha256: str) -> dict:
    state = torch.load(ckpt / STATE, weights_only=False)
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
