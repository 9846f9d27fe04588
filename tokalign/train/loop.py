"""The one generic training loop, online and offline, as a fixed pipeline. Each step: the data source (with the
algorithm's sampling hooks) yields sequences; they are collated into a batch; every batch component fills its fields;
the algorithm's ``prepare`` computes advantages/targets; the policy's forward and backward run micro-batch by
micro-batch (components see each micro-batch's outputs), then one optimiser step. No algorithm maths here, no branch
on an algorithm's name, no probing of an algorithm for features."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from tokalign import artifacts, config, models, ops
from tokalign.batching import collate, padding_fraction, truncate
from tokalign.errors import UserError
from tokalign.forward import compute_in, forward, fused_head, packing, to_device
from tokalign.plugin_errors import call as call_plugin
from tokalign.train import checkpoint, distributed, lora, tracking
from tokalign.train.plan import Plan
from tokalign.train.state import TrainState


class _Progress:
    def __init__(self, total: int, start: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, metrics: dict) -> None:
        if self.bar is not None:
            info = f"loss {metrics['loss']:.4f}" + (f" reward {metrics['reward/mean']:.3f}" if "reward/mean" in metrics else "")
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _claim_work_dir(work: Path, resume: bool, overwrite: bool, dist: distributed.Dist) -> Path | None:
    """The checkpoint to resume from, or None to start; a work dir that holds no checkpoint (a run that failed or was
    killed before its first one) is cleared either way, so neither a rerun nor --resume trips over it."""
    ckpt = checkpoint.latest(work) if work.exists() else None
    if resume and not work.exists():
        raise UserError(f"Nothing to resume: '{work}' does not exist. Run without --resume to start.")
    if ckpt is None and work.exists() and resume:
        sys.stderr.write(f"note: '{work}' holds no checkpoint yet; starting from the beginning.\n")
    if not resume and ckpt is not None and not overwrite:
        raise UserError(f"'{work}' holds an interrupted run of this --out; pass --resume to continue it or --overwrite to start over.")
    if (ckpt is None or not resume) and work.exists() and dist.main:  # one process clears it (the others wait)
        checkpoint.discard(work)
    return ckpt if resume else None


def run(plan: Plan, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> Path:
    work = checkpoint.work_dir(plan.out)
    run_config = plan.run_config_dict()
    config_sha = checkpoint.identity(run_config)
    dist = distributed.init()
    ckpt = _claim_work_dir(work, resume, overwrite, dist)
    saved = checkpoint.load_state(ckpt, config_sha) if ckpt else None
    try:
        torch.manual_seed(plan.cfg.seed)
        random.seed(plan.cfg.seed)
        state = TrainState(plan, ckpt, dist)
        distributed.barrier(dist)
        work.mkdir(parents=True, exist_ok=True)
        _train(state, work, saved, run_config, config_sha, quiet)
        weights = distributed.full_state_dict(state.policy)
        distributed.barrier(dist)
        failed = None
        if dist.main:
            try:
                _finish(state, work, run_config, weights)
            except BaseException as e:  # raised after the others have left the barrier below, not before (they would hang)
                failed = e
        # Every process tears its process group down together: in CI a two-process CPU run was seen with rank 1
        # aborting (SIGABRT) while rank 0 was still writing the artifact, the one stretch where one rank ran ahead.
        distributed.barrier(dist)
        if failed is not None:
            raise failed
        return plan.out
    except BaseException:
        if dist.main and work.exists() and checkpoint.latest(work) is None:  # nothing to resume: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        distributed.shutdown(dist)


def _train(state: TrainState, work: Path, saved: dict | None, run_config: dict, config_sha: str, quiet: bool) -> None:
    t, dist = state.cfg.train, state.dist
    metrics_path = work / "metrics.jsonl"
    start = 0
    if saved is not None:
        checkpoint.restore(state, saved)
        start = saved["step"]
        if dist.main:
            checkpoint.trim_metrics(metrics_path, start)
    elif metrics_path.exists() and dist.main:
        metrics_path.unlink()
    model_bytes = _model_bytes(*state.held_models())
    tracker = tracking.start(t.log if dist.main else [], work, run_config, start)  # rank 0 logs, like metrics.jsonl
    progress = _Progress(t.max_steps, start, quiet or not dist.main)
    try:
        with open(metrics_path, "a") if dist.main else open(os.devnull, "w") as log:
            for step in range(start, t.max_steps):
                metrics = step_once(state, step)
                metrics["memory/model_bytes"] = model_bytes
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                tracker.log(metrics, step + 1)
                progress.update(metrics)
                if not math.isfinite(metrics["loss"]):
                    raise UserError(f"Loss became {metrics['loss']} at step {step + 1}; lower train.lr or check the data. Resume point: '{work}'.")
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.max_steps:
                    checkpoint.save(work, step + 1, state, config_sha)  # every process writes its shard
    finally:
        progress.close()
        if hasattr(state.source, "close"):  # a sampler thread (train.async_rollouts)
            state.source.close()
        tracker.close()


def _model_bytes(*modules) -> int:
    """Bytes of distinct parameter and buffer storage held by these models (a model seen twice counts once)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            if _is_dtensor(t):  # an FSDP shard: count what this process holds
                t = t.to_local()
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def step_once(state: TrainState, step: int) -> dict:
    """One training step: batch, components, prepare, update (every model call in the precision's compute dtype).
    Returns the step's metrics."""
    t = state.cfg.train
    with compute_in(state.precision.compute_dtype()), fused_head(t.fused_head), packing(t.packing):
        return _step(state, step)


def _step(state: TrainState, step: int) -> dict:
    t = state.cfg.train
    t0 = time.perf_counter()
    seqs, metrics = state.source.batch(step)
    t_batch = time.perf_counter() - t0
    state.step, state.seqs = step, [truncate(s, t.max_length) for s in seqs]
    batch = to_device(collate(state.seqs, state.tokenizer.pad_token_id, state.max_completion_len), state.device)
    for c in state.components:  # in order: a component may read the fields of those before it
        metrics = {**metrics, **call_plugin("batch component", c.name, "fill", c.fill, batch, state)}
    batch = call_plugin("algorithm", state.plan.algo_name, "prepare", state.algorithm.prepare, batch)
    sums, grad_norm, padding = _update(state, batch)
    elapsed = time.perf_counter() - t0
    tokens = int(batch.attention_mask.sum())
    return {
        "step": step + 1,
        **{k: v / t.updates_per_batch for k, v in sums.items()},
        **metrics,
        "padding_fraction": round(padding, 4),
        "grad_norm": float(grad_norm),
        "lr": state.scheduler.get_last_lr()[0],
        "tokens": tokens,
        "time/step_s": round(elapsed, 4),
        "time/batch_s": round(t_batch, 4),
        "tokens_per_s": round(tokens / max(elapsed - t_batch, 1e-9), 1),
    }


def _update(state: TrainState, batch) -> tuple[dict, torch.Tensor, float]:
    """``updates_per_batch`` optimiser steps on this process's share of the batch: (summed metrics, last grad norm,
    padding fraction of the micro-batches)."""
    t, dist = state.cfg.train, state.dist
    local = distributed.shard(batch, dist)  # this process's groups; the losses stay shares of the whole batch
    engine = distributed.reduces_gradients(state.train_model)
    # DDP and FSDP average the policy's gradients over the processes: the loss is scaled by their number so they sum
    scale = dist.world if engine else 1
    mbs = state.micro_batches(local)
    padding = padding_fraction(mbs, packed=t.packing)
    sharded = distributed.is_sharded(state.policy)
    # FSDP's gathers are collectives: every process runs as many forward/backward passes; extra ones count 0
    mbs = mbs + [None] * ((distributed.max_count(len(mbs), dist) if sharded else len(mbs)) - len(mbs))
    sums: dict[str, float] = {}
    for _ in range(t.updates_per_batch):
        state.optimizer.zero_grad(set_to_none=True)
        for k, mb in enumerate(mbs):
            with _sync_last(state.train_model, last=k == len(mbs) - 1):
                if mb is None:
                    _filler(state, local)
                    continue
                _accumulate(sums, _micro_step(state, mb, scale), len(mb) / len(batch))
        distributed.sum_gradients(state.hand_reduced, dist, 1 / scale)
        grad_norm = distributed.clip_grad_norm(state.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        state.optimizer.step()
        state.scheduler.step()
    return distributed.sum_metrics(sums, dist), grad_norm, padding


def _filler(state: TrainState, local) -> None:
    """A zero-weight forward and backward on one row, for a process with fewer micro-batches than the others: FSDP's
    gathers and reduce-scatters are collectives, so every process runs as many passes through each sharded model (the
    policy's, and those components run per micro-batch, e.g. a sharded reference's logits)."""
    mb = local.select(torch.tensor([0]))
    out = forward(state.train_model, mb, keep_logits=state.needs.full_vocab, keep_hidden="hidden" in state.forward_outputs)
    if state.sharded_components:
        for c in state.components:
            call_plugin("batch component", c.name, "on_forward", c.on_forward, mb, out, state)
    (out.logps.sum() * 0).backward()


def _sync_last(model, last: bool):
    """DDP all-reduces in the backward of the last micro-batch only (the others accumulate under ``no_sync``)."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()


def _micro_step(state: TrainState, mb, scale: float) -> tuple[float, float, dict]:
    """Forward, loss and backward of one micro-batch: (loss, mean entropy, the loss's metrics)."""
    out = forward(state.train_model, mb, with_entropy=True, keep_logits=state.needs.full_vocab, keep_hidden="hidden" in state.forward_outputs)
    for c in state.components:
        call_plugin("batch component", c.name, "on_forward", c.on_forward, mb, out, state)
    result = call_plugin("algorithm", state.plan.algo_name, "loss", state.algorithm.loss, mb, out)
    _check_loss(state.plan.algo_name, result)
    (result.loss * scale).backward()
    return float(result.loss.detach()), float(ops.masked_mean(out.entropy, mb.completion_mask)), result.metrics


def _accumulate(sums: dict, micro: tuple[float, float, dict], share: float) -> None:
    loss, entropy, metrics = micro
    sums["loss"] = sums.get("loss", 0.0) + loss
    sums["entropy"] = sums.get("entropy", 0.0) + entropy * share
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v) * share


def _check_loss(name: str, result) -> None:
    from tokalign.plugin_errors import contract
    from tokalign.protocols import LossOutput

    if not isinstance(result, LossOutput):
        contract("algorithm", name, "loss", f"it must return tokalign.protocols.LossOutput, got {type(result).__name__}")
    if not isinstance(result.loss, torch.Tensor) or result.loss.dim() != 0:
        shape = list(result.loss.shape) if isinstance(result.loss, torch.Tensor) else type(result.loss).__name__
        contract("algorithm", name, "loss", f"the loss must be a scalar tensor, got shape {shape}")


def _finish(state: TrainState, work: Path, run_config: dict, weights=None) -> Path:
    plan, policy, tokenizer = state.plan, state.policy, state.tokenizer
    prov = artifacts.Provenance(
        config=run_config,
        inputs=plan.extra.get("inputs", []),
        plugins=_plugins(plan),
        model=models.identity(plan.cfg.model),
        seed=plan.cfg.seed,
        extra={"models": {role: models.identity(path) for role, path in plan.cfg.models.items()}},
    )
    # --out was checked (or --overwrite given) before training began; replace whatever is there now
    with artifacts.writing(plan.out, "checkpoint", prov, overwrite=True) as w:
        if lora.is_lora(policy):  # the merged model (usable as is) + the adapter alone in adapter/
            lora.save(policy, tokenizer, w.path, weights)
        else:
            policy.save_pretrained(w.path, state_dict=weights)
        tokenizer.save_pretrained(w.path)
        for c in state.components:  # a value head, a trained PRM, ...: beside the model, each loadable on its own
            c.save(w.path)
        shutil.copy(work / "metrics.jsonl", w.path / "metrics.jsonl")
        if (work / "tb").is_dir():  # --log tensorboard's event files
            shutil.copytree(work / "tb", w.path / "tb")
        source_dir = models.resolve_model(plan.cfg.model)[1]
        if source_dir is not None and (source_dir / config.MODEL_DEFAULTS_FILE).is_file():  # the model's recommended settings travel with it
            shutil.copy(source_dir / config.MODEL_DEFAULTS_FILE, w.path / config.MODEL_DEFAULTS_FILE)
        w.counts["metrics.jsonl"] = sum(1 for _ in open(w.path / "metrics.jsonl"))
    checkpoint.discard(work)  # renamed away first: a kill while it is removed leaves no half resume point
    return plan.out


def _plugins(plan: Plan) -> list[dict]:
    from tokalign import registry
    from tokalign.data.loaders import plugin_refs as task_refs
    from tokalign.rewards import plugin_refs

    algo = registry.info("algorithm", plan.algo_name)
    return ([{"kind": "algorithm", "name": plan.algo_name, "distribution": algo.distribution, "version": algo.version}]
            + plugin_refs(plan.rewards) + task_refs(plan.data) + (plan.processors.plugin_refs() if plan.processors else []))
