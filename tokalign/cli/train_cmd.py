from __future__ import annotations

import os

import sys
from typing import List, Optional

import typer

from tokalign.cli.common import BRANCHING_HELP, OVERWRITE, PROCESSOR_HELP, PROCESSOR_OPT_HELP, QUIET, REWARD_OPT_HELP, default_out, emit


def _algorithms_help() -> str:
    from tokalign import registry

    names = sorted(registry.available("algorithm"))  # metadata only: nothing is imported
    return "Algorithm: " + ", ".join(names) + " (or module:Class)."


def train(
    algo: str = typer.Argument(..., help=_algorithms_help(), metavar="ALGO"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Task (arith, or module:Class), file, hub id, or artifact (prompts → online; scored; pairs). Omitted: from --config, else stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Starting model (default: the bundled tiny model)."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", "--ref", help="Reference model (default: the starting model)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output checkpoint directory (default: runs/checkpoint-<time>)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The 'teacher' model of algorithms that need one (e.g. TGDPO's token-reward model)."),
    dpo_model: Optional[str] = typer.Option(None, "--dpo-model", help="The 'dpo' model of algorithms that need one (e.g. RTO's dense reward)."),
    reverse_model: Optional[str] = typer.Option(None, "--reverse-model", help="The 'reverse' model (a DPO model trained with chosen/rejected swapped; AlignDistil)."),
    with_models: List[str] = typer.Option([], "--with", help="An extra model an algorithm needs, by role: --with ROLE=PATH (repeatable)."),
    config_file: Optional[str] = typer.Option(None, "--config", "-c", help="YAML run config; flags and --set override it."),
    sets: List[str] = typer.Option([], "--set", help="Override any config key: --set train.lr=1e-5 --set algorithm.beta=0.04 (repeatable)."),
    reward: List[str] = typer.Option([], "--reward", "-r", help="Online: reward/verifier (repeatable, name*weight). Default: the task's."),
    reward_opt: List[str] = typer.Option([], "--reward-opt", help=REWARD_OPT_HELP + " Config key: reward_options."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Training steps (batches)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts / groups / pairs / examples per step."),
    n: Optional[int] = typer.Option(None, "--n", help="Online: samples per prompt (group size)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Online rollout backend: hf (transformers generate) or vllm (vLLM, weights synced from the trainer every step)."),
    env: Optional[str] = typer.Option(None, "--env", help="Online: multi-turn episodes with this environment (e.g. calculator). Config key: rollout.env (and rollout.max_turns)."),
    branching: Optional[str] = typer.Option(None, "--branching", help=BRANCHING_HELP + " Default: the algorithm's (arpo: entropy, portool: tree). Config key: rollout.branching (options: rollout.branch_options)."),
    logits_processor: List[str] = typer.Option([], "--logits-processor", help="Online: " + PROCESSOR_HELP + " Config key: rollout.logits_processors."),
    processor_opt: List[str] = typer.Option([], "--processor-opt", help=PROCESSOR_OPT_HELP + " Config key: rollout.logits_processor_options."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    log: List[str] = typer.Option([], "--log", help="Also log metrics to: tensorboard (<out>/tb/), wandb (repeatable). Config key: train.log."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of this --out from its last checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the whole config and print the plan; loads no model."),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
):
    """Train ALGO on online prompts or offline artifacts; writes a `checkpoint` artifact."""
    from tokalign import config, decoding, models
    from tokalign.rewards import parse_options
    from tokalign.train.plan import make_plan

    extra = dict(_role(item) for item in with_models)
    if teacher:
        extra["teacher"] = teacher
    if dpo_model:
        extra["dpo"] = dpo_model
    if reverse_model:
        extra["reverse"] = reverse_model
    flags = {
        "data": data, "model": model, "ref_model": ref_model, "reward": list(reward) or None, "seed": seed,
        "reward_options": parse_options(list(reward_opt)) or None,
        "models": extra or None,
        "train": {"max_steps": max_steps, "lr": lr, "batch_size": batch_size, "log": list(log) or None},
        "rollout": {"n": n, "backend": backend, "env": env, "branching": branching,
                    "logits_processors": list(logits_processor) or None,
                    "logits_processor_options": decoding.parse_options(list(processor_opt)) or None},
    }
    flags = _drop_none(flags)
    user = config.load_yaml(config_file) if config_file else {}
    overrides = config.parse_set(list(sets))
    chosen_model = overrides.get("model") or flags.get("model") or user.get("model") or ""
    chosen_data = overrides.get("data") or flags.get("data") or user.get("data")
    base = config.model_defaults(models.resolve_model(chosen_model)[1], chosen_data)
    layers = [base, user, flags, overrides]
    if not any(layer.get("data") for layer in layers):
        if sys.stdin is not None and not sys.stdin.isatty():
            from tokalign.artifacts import read_path_from_stdin

            layers.append({"data": read_path_from_stdin(None, "training data")})
    out_path = default_out("checkpoint", out) if not dry_run else out
    plan = make_plan(algo, layers, out_path, overwrite=overwrite, resume=resume)
    from tokalign.train import tracking

    tracking.check(plan.cfg.train.log)  # an unknown or uninstalled tracker fails before any model loads
    if dry_run:
        typer.echo(plan.describe())
        return
    from tokalign.train.loop import run

    for w in plan.warnings:
        sys.stderr.write(f"warning: {w}\n")
    out_path = run(plan, resume=resume, overwrite=overwrite, quiet=quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process prints the artifact path
        emit(out_path)


def _role(item: str) -> tuple[str, str]:
    from tokalign.errors import UserError

    role, eq, path = item.partition("=")
    if not eq or not role or not path:
        raise UserError(f"--with expects ROLE=PATH (e.g. --with teacher=runs/dpo), got '{item}'.")
    return role, path


def _drop_none(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
