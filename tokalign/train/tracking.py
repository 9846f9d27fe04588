"""Experiment trackers for the train loop's per-step metrics (``--log KIND``, config ``train.log: [KIND]``),
beside metrics.jsonl, which is always written.

* ``tensorboard`` — event files under ``<out>/tb/`` (``<out>.partial/tb/`` while training; the final
  checkpoint artifact keeps them): ``tensorboard --logdir <out>/tb``. Needs the ``tensorboard`` package
  (``pip install 'tokalign[log]'``). On ``--resume`` the events past the resume point are purged
  (``purge_step``), so the curves continue without the steps that were redone.
* ``wandb`` — Weights & Biases, when the user installed ``wandb``: ``wandb.init(project=$WANDB_PROJECT
  or "tokalign", name=<out dir name>, config=<resolved run config>)``. Everything else (login, API key,
  ``WANDB_MODE=offline``, ``WANDB_DIR``, entity) is wandb's own environment; a resumed run starts a new
  wandb run.

Every numeric metric is logged as a scalar at the step it belongs to (``metrics["step"]``, from 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokalign.errors import UserError, did_you_mean

KINDS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'tokalign[log]' (or pip install tensorboard)"),
             "wandb": ("wandb", "pip install wandb")}


def check(kinds: list[str]) -> None:
    """Unknown kinds and missing packages as one-line UserErrors, before any model loads."""
    import importlib.util

    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"Unknown --log '{kind}'.{did_you_mean(kind, list(KINDS))} Choose from: {', '.join(KINDS)}.")
        package, install = _PACKAGES[kind]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--log {kind} needs the {package} package, which is not installed: {install}.")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, out_dir: Path, run_config: dict, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError(f"--log tensorboard needs the tensorboard package: {_PACKAGES['tensorboard'][1]}.") from e
        self.writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None, flush_secs=10)
        if not start_step:
            self.writer.add_text("run_config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in _scalars(metrics).items():
            if k != "step":
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: Path, run_config: dict):
        try:
            import wandb
        except ImportError as e:
            raise UserError(f"--log wandb needs the wandb package: {_PACKAGES['wandb'][1]}.") from e
        name = out_dir.name.removesuffix(".partial")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tokalign", name=name, config=run_config)
        except Exception as e:  # typically no API key in a non-interactive shell
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--log wandb: wandb.init failed ({first}); run `wandb login`, or set WANDB_MODE=offline.") from e

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in _scalars(metrics).items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracking:
    """The trackers of one run: ``log(metrics, step)`` to all of them, ``close()`` once."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        errors = []
        for t in trackers:  # every tracker gets closed even when one fails
            try:
                t.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def start(kinds: list[str], out_dir: str | Path, run_config: dict, start_step: int = 0) -> Tracking:
    """Trackers for ``kinds`` (none: a Tracking that does nothing), writing under ``out_dir`` (the run's
    work dir). ``start_step``: the step a resumed run continues after (0 for a fresh run)."""
    check(list(kinds))
    out_dir, trackers = Path(out_dir), []
    try:
        for kind in dict.fromkeys(kinds):  # --log tensorboard twice is one tracker
            trackers.append(_TensorBoard(out_dir, run_config, start_step) if kind == "tensorboard" else _WandB(out_dir, run_config))
    except BaseException:
        Tracking(trackers).close()
        raise
    return Tracking(trackers)
