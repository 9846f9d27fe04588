"""The one generic training loop, online and offline. No algorithm maths here and no branch on
algorithm names: the algorithm's ``needs`` say which inputs to compute, ``prepare`` and ``loss``
do the rest."""

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
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput, TokenBatch
from tokalign.train import checkpoint, distributed, lora, tracking
from tokalign.train.batching import collate, micro_batches, padding_fraction, truncate
from tokalign.train.plan import Plan


def forward(model, batch: TokenBatch, with_entropy: bool = False, keep_logits: bool = False, value_head=None,
            keep_hidden: bool = False) -> PolicyOutput:
    """Per-token log-probs of each next token, [B, L-1] (and the logits [B, L-1, V] if asked; the
    values V(s_t) [B, L-1] of a value head on the final hidden states, if one is given; the final
    hidden states [B, L-1, H], detached, if asked)."""
    res = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=value_head is not None or keep_hidden)
    logits = res.logits[:, :-1]
    logps = ops.selective_log_softmax(logits, batch.input_ids[:, 1:])
    entropy = ops.entropy_from_logits(logits.detach()) if with_entropy else None
    values = value_head(res.hidden_states[-1][:, :-1]).squeeze(-1).float() if value_head is not None else None
    hidden = res.hidden_states[-1][:, :-1].detach() if keep_hidden else None
    return PolicyOutput(logps=logps, entropy=entropy, logits=logits if keep_logits else None, values=values, hidden=hidden)


@torch.no_grad()
def reference_logits(model, batch: TokenBatch):
    """A frozen model's [B, L-1, V] logits as a HeadLogits (final hidden states + LM head, computed
    chunk by chunk later), or as a tensor when the head alone does not reproduce the model's logits
    (models that scale or soft-cap logits after the head)."""
    res = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True, logits_to_keep=1)
    hidden, head = res.hidden_states[-1], model.get_output_embeddings()
    if head is not None and torch.allclose(head(hidden[:, -1:]), res.logits[:, -1:], atol=1e-5, rtol=1e-5):
        return ops.HeadLogits(hidden[:, :-1], head)
    return forward(model, batch, keep_logits=True).logits


@torch.no_grad()
def frozen_outputs(model, batch: TokenBatch, micro: int, value_head=None, tokens: int = 0) -> PolicyOutput:
    """Log-probs (and values) without gradients, micro-batched (by rows, or by padded ``tokens``), back in the
    batch's row order and width."""
    width = batch.completion_mask.shape[1]
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    parts = micro_batches(_with_row_index(batch), micro, tokens)
    outs = [forward(model, mb, value_head=value_head) for mb in parts]
    order = torch.argsort(torch.cat([mb.fields["_row"] for mb in parts]))
    values = torch.cat([pad(o.values) for o in outs])[order] if value_head is not None else None
    return PolicyOutput(logps=torch.cat([pad(o.logps) for o in outs])[order], values=values)


def _with_row_index(batch: TokenBatch) -> TokenBatch:
    out = TokenBatch(batch.input_ids, batch.attention_mask, batch.completion_mask, dict(batch.fields), batch.totals)
    out.fields["_row"] = torch.arange(len(batch), device=batch.input_ids.device)
    return out


def frozen_logps(model, batch: TokenBatch, micro: int, tokens: int = 0) -> torch.Tensor:
    return frozen_outputs(model, batch, micro, tokens=tokens).logps


def _to(batch: TokenBatch, device) -> TokenBatch:
    batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    batch.completion_mask = batch.completion_mask.to(device)
    batch.fields = {k: v.to(device) for k, v in batch.fields.items()}
    return batch


def _schedule(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _source(plan: Plan, tokenizer, policy, ref=None):
    from tokalign.rollout import SamplingSpec
    from tokalign.stages.common import dumps, retokenize
    from tokalign.train import sources

    cfg, t = plan.cfg, plan.cfg.train
    rows = plan.rows
    if plan.extra.get("normalised"):  # records from a task/file: into artifact-row shape
        rows = [{**r, "prompt": dumps(r["prompt"]), "reference": dumps(r.get("reference"))} for r in rows]
    if plan.data_kind != "scored":  # scored rows keep the sampler's own token ids
        rows = retokenize(rows, tokenizer)
    if plan.data_kind == "online":
        from tokalign.rollout.hf import HFEngine

        r = cfg.rollout
        spec = SamplingSpec(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed)
        if r.backend == "vllm":  # sampling in vLLM; the trainer's weights are pushed into it before every step
            from tokalign.rollout.vllm_engine import VLLMEngine

            longest = max(len(x["prompt_ids"]) for x in rows) + r.max_new_tokens
            engine = VLLMEngine(models.resolve_model(cfg.model)[0], tokenizer, longest + 1, cfg.seed,
                                r.vllm_gpu_memory_utilization)
        else:
            engine = HFEngine(policy, tokenizer)
        return sources.OnlineSource(rows, engine, plan.rewards, spec, t.batch_size, cfg.seed,
                                    plan.needs.informative_groups, r.max_sampling_rounds, plan.needs.greedy_baseline,
                                    getattr(plan.algorithm, "prompt_weights", None), getattr(plan.algorithm, "adaptive_sampling", None),
                                    HFEngine(ref, tokenizer) if plan.needs.reference_samples else None,
                                    plan.needs.reference_samples, getattr(plan.algorithm, "segments", None)), r.max_new_tokens
    if plan.data_kind == "scored":
        return (sources.ScoredSource(rows, t.batch_size, cfg.seed, informative_only=plan.needs.informative_groups),
                plan.extra.get("max_new_tokens"))
    if plan.data_kind in ("pairs", "triples"):
        return sources.PairSource(rows, tokenizer, t.batch_size, cfg.seed, with_gold=plan.data_kind == "triples"), None
    if plan.data_kind == "unpaired":
        return sources.UnpairedSource(rows, tokenizer, t.batch_size, cfg.seed), None
    rows = [r for r in rows if r.get("completion")]
    return sources.CompletionSource(rows, tokenizer, t.batch_size, cfg.seed), None


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


def run(plan: Plan, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> Path:
    cfg, t = plan.cfg, plan.cfg.train
    out = plan.out
    work = checkpoint.work_dir(out)
    run_config = plan.run_config_dict()
    config_sha = artifacts.sha256_json(run_config)
    ckpt = checkpoint.latest(work) if resume else None
    if resume and ckpt is None:
        raise UserError(f"Nothing to resume: no checkpoint in '{work}'. Run without --resume to start.")
    dist = distributed.init()
    if not resume and work.exists():
        if not overwrite:
            raise UserError(f"'{work}' holds an interrupted run of this --out; pass --resume to continue it or --overwrite to start over.")
        if dist.main:  # one process clears it (the others wait below)
            shutil.rmtree(work)
    state = checkpoint.load_state(ckpt, config_sha) if ckpt else None

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    if t.lora_r > 0:  # the base from the starting model, the adapter fresh or from the checkpoint
        policy = lora.wrap(models.load_model(cfg.model, t.dtype, quantization_config=lora.quantisation_config(t)), t, ckpt)
    else:
        policy = models.load_model(str(ckpt) if ckpt else cfg.model, t.dtype)
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    policy.train()
    device = next(policy.parameters()).device
    ref = lora.reference_or_none(policy, plan.needs.reference, cfg.ref_model)
    if plan.needs.reference and ref is None:
        ref = models.load_model(cfg.ref_model or cfg.model, t.dtype).eval().requires_grad_(False)
    frozen = {role: models.load_model(cfg.models[role], t.dtype).eval().requires_grad_(False) for role in plan.needs.models}
    trained = _trained_models(plan, ckpt)
    source, max_completion_len = _source(plan, tokenizer, policy, ref)
    value_head = _value_head(policy, ckpt) if plan.needs.value_head else None
    distributed.shard_model(policy, dist, t.distributed)  # before the optimiser: it must see the sharded parameters
    params = [p for p in policy.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    model_bytes = _model_bytes(policy, ref, *frozen.values(), *(m for m, _ in trained.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(t.warmup_steps))
    start = 0
    distributed.barrier(dist)
    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.jsonl"
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng(state)
        if state.get("algorithm") is not None:
            plan.algorithm.load_state_dict(state["algorithm"])
        for role, opt_state in (state.get("aux_optimizers") or {}).items():
            trained[role][1].load_state_dict(opt_state)
        start = state["step"]
        if dist.main:
            checkpoint.trim_metrics(metrics_path, start)
    elif metrics_path.exists() and dist.main:
        metrics_path.unlink()

    tracker = tracking.start(t.log if dist.main else [], work, run_config, start)  # rank 0 logs, like metrics.jsonl
    progress = _Progress(t.max_steps, start, quiet or not dist.main)
    try:
        with open(metrics_path, "a") if dist.main else open(os.devnull, "w") as log:
            for step in range(start, t.max_steps):
                metrics = _step(plan, step, source, policy, ref, frozen, value_head, optimizer, scheduler, tokenizer,
                                max_completion_len, device, trained, dist)
                metrics["memory/model_bytes"] = model_bytes
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                tracker.log(metrics, step + 1)
                progress.update(metrics)
                if not math.isfinite(metrics["loss"]):
                    raise UserError(f"Loss became {metrics['loss']} at step {step + 1}; lower train.lr or check the data. Resume point: '{work}'.")
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.max_steps:
                    weights = distributed.full_state_dict(policy)  # every rank takes part in gathering a sharded model
                    if dist.main:
                        checkpoint.save(work, step + 1, policy, tokenizer, optimizer, scheduler, config_sha, plan.algorithm,
                                        value_head, trained, weights)
    finally:
        progress.close()
        tracker.close()
    weights = distributed.full_state_dict(policy)
    distributed.barrier(dist)
    if not dist.main:
        distributed.shutdown(dist)
        return plan.out
    try:
        return _finish(plan, work, policy, tokenizer, run_config, value_head, trained, weights)
    finally:
        distributed.shutdown(dist)


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


def _trained_models(plan: Plan, ckpt: Path | None) -> dict:
    """{role: (model, optimiser)} for the algorithm's auxiliary trained models (from the checkpoint when resuming)."""
    cfg, t, out = plan.cfg, plan.cfg.train, {}
    for role in plan.needs.trained_models:
        source = ckpt / role if ckpt is not None and (ckpt / role).is_dir() else (cfg.models.get(role) or cfg.model)
        model = models.load_model(str(source), t.dtype)
        model.train()
        out[role] = (model, torch.optim.AdamW(model.parameters(), lr=plan.algorithm.aux_lr(role), weight_decay=t.weight_decay))
    return out


def _variant_logps(plan: Plan, name: str, model, tokenizer, seqs: list, width: int) -> torch.Tensor:
    """The reference model's log-probs of each row's completion after the algorithm's variant of its prompt, placed
    at the row's own completion positions [B, width]."""
    from tokalign.data.render import render_prompts
    from tokalign.train.batching import move_completion_values, with_prompt

    if any(s.prompt is None for s in seqs):
        raise UserError(f"'{plan.algo_name}' rewrites prompts ({name}) but this data source does not keep them; train on preference data.")
    rendered = render_prompts(tokenizer, [plan.algorithm.prompt_variant(name, s.prompt) for s in seqs])
    variants = [truncate(with_prompt(s, ids), plan.cfg.train.max_length + len(ids) - len(s.prompt_ids)) for s, (_, ids) in zip(seqs, rendered)]
    device = next(model.parameters()).device
    t = plan.cfg.train
    logps = frozen_logps(model, _to(collate(variants, tokenizer.pad_token_id), device), t.micro_batch_size, t.micro_batch_tokens)
    return move_completion_values(logps.cpu(), variants, seqs, width)


def _train_aux(plan: Plan, role: str, model, optimizer, batch: TokenBatch) -> tuple[torch.Tensor, dict]:
    """One update of an auxiliary trained model on the algorithm's aux_loss; returns its per-token log-probs from the
    forward pass before the update (padded to the batch width) and its metrics under ``<role>/``."""
    t, width = plan.cfg.train, batch.completion_mask.shape[1]
    optimizer.zero_grad(set_to_none=True)
    logps, rows, sums = [], [], {}
    for mb in micro_batches(_with_row_index(batch), t.micro_batch_size, t.micro_batch_tokens):
        out = forward(model, mb)
        logps.append(torch.nn.functional.pad(out.logps.detach(), (0, width - out.logps.shape[1])))
        rows.append(mb.fields["_row"])
        result = plan.algorithm.aux_loss(role, mb, out)
        result.loss.backward()
        share = len(mb) / len(batch)
        sums["loss"] = sums.get("loss", 0.0) + float(result.loss.detach())
        for k, v in result.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * share
    grad = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    optimizer.step()
    return torch.cat(logps)[torch.argsort(torch.cat(rows))], {f"{role}/{k}": v for k, v in {**sums, "grad_norm": float(grad)}.items()}


def _value_head(policy, ckpt: Path | None):
    """A linear value head V(s) on the policy's final hidden states (PPO's critic, sharing the trunk);
    zero-initialised, so the first values are 0; restored from a checkpoint when resuming."""
    head = torch.nn.Linear(policy.config.hidden_size, 1).to(next(policy.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if ckpt is not None and (ckpt / checkpoint.VALUE_HEAD).is_file():
        from safetensors.torch import load_file

        head.load_state_dict(load_file(ckpt / checkpoint.VALUE_HEAD))
    return head


def _step(plan: Plan, step, source, policy, ref, frozen, value_head, optimizer, scheduler, tokenizer, max_completion_len, device,
          trained=None, dist: distributed.Dist | None = None) -> dict:
    dist = dist or distributed.Dist()
    t, algo = plan.cfg.train, plan.algorithm
    t0 = time.perf_counter()
    sync_s = source.engine.sync(policy) if hasattr(getattr(source, "engine", None), "sync") else None
    seqs, metrics = source.batch(step)
    if sync_s is not None:
        metrics = {**metrics, "time/weight_sync_s": round(sync_s, 4)}
    t_batch = time.perf_counter() - t0
    seqs = [truncate(s, t.max_length) for s in seqs]
    batch = collate(seqs, tokenizer.pad_token_id, max_completion_len)
    batch = _to(batch, device)
    if ref is not None:
        batch.fields["ref_logps"] = frozen_logps(ref, batch, t.micro_batch_size, t.micro_batch_tokens)
    for name in plan.needs.prompt_variants:
        batch.fields[f"{name}_logps"] = _variant_logps(plan, name, ref, tokenizer, seqs, batch.completion_mask.shape[1]).to(device)
    for role, model in frozen.items():
        batch.fields[f"{role}_logps"] = frozen_logps(model, batch, t.micro_batch_size, t.micro_batch_tokens)
    for role, (model, aux_opt) in (trained or {}).items():
        batch.fields[f"{role}_logps"], aux_metrics = _train_aux(plan, role, model, aux_opt, batch)
        metrics = {**metrics, **aux_metrics}
    if value_head is not None:  # the critic's values before the update, for GAE (and old log-probs with them)
        old = frozen_outputs(policy, batch, t.micro_batch_size, value_head, t.micro_batch_tokens)
        batch.fields["old_logps"], batch.fields["old_values"] = old.logps, old.values
    elif plan.needs.old_logps and (t.updates_per_batch > 1 or plan.needs.old_logps_upfront):
        batch.fields["old_logps"] = frozen_logps(policy, batch, t.micro_batch_size, t.micro_batch_tokens)
    batch = algo.prepare(batch)  # after the frozen log-probs, so advantages may use them (KL in the reward)
    sums: dict[str, float] = {}
    local = distributed.shard(batch, dist)  # this process's groups; the losses stay shares of the whole batch
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = distributed.is_sharded(policy)
    # FSDP averages its gradients over the processes: the loss is scaled by their number so that they sum
    scale = dist.world if sharded else 1
    replicated = [p for p in params if not (sharded and _is_dtensor(p))]
    mbs = micro_batches(local, t.micro_batch_size, t.micro_batch_tokens)
    metrics = {**metrics, "padding_fraction": round(padding_fraction(mbs), 4)}
    # FSDP's gathers are collectives: every process runs as many forward/backward passes; extra ones count 0
    mbs = mbs + [None] * ((distributed.max_count(len(mbs), dist) if sharded else len(mbs)) - len(mbs))
    for _ in range(t.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        for mb in mbs:
            if mb is None:
                out = forward(policy, local.select(torch.tensor([0])))
                (out.logps.sum() * 0).backward()
                continue
            out = forward(policy, mb, with_entropy=True, keep_logits=plan.needs.full_vocab, value_head=value_head,
                          keep_hidden=plan.needs.hidden_states)
            if plan.needs.full_vocab:  # per micro-batch, and chunk by chunk where possible
                out.ref_logits = reference_logits(ref, mb) if ref is not None else None
                out.extra_logits = {role: reference_logits(model, mb) for role, model in frozen.items()}
            if plan.needs.old_logps and "old_logps" not in mb.fields:
                mb.fields["old_logps"] = out.logps.detach()  # one update per batch: on-policy, ratio 1
            result = algo.loss(mb, out)
            (result.loss * scale).backward()
            share = len(mb) / len(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(result.loss.detach())
            sums["entropy"] = sums.get("entropy", 0.0) + float(ops.masked_mean(out.entropy, mb.completion_mask)) * share
            for k, v in result.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * share
        distributed.sum_gradients(replicated, dist, 1 / scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
    sums = distributed.sum_metrics(sums, dist)
    elapsed = time.perf_counter() - t0
    tokens = int(batch.attention_mask.sum())
    return {
        "step": step + 1,
        **{k: v / t.updates_per_batch for k, v in sums.items()},
        **metrics,
        "grad_norm": float(grad_norm),
        "lr": scheduler.get_last_lr()[0],
        "tokens": tokens,
        "time/step_s": round(elapsed, 4),
        "time/batch_s": round(t_batch, 4),
        "tokens_per_s": round(tokens / max(elapsed - t_batch, 1e-9), 1),
    }


def _finish(plan: Plan, work: Path, policy, tokenizer, run_config: dict, value_head=None, trained=None, weights=None) -> Path:
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
        if value_head is not None:  # beside the model: transformers ignores it, PPO can start from it
            from safetensors.torch import save_file

            save_file(value_head.state_dict(), w.path / checkpoint.VALUE_HEAD)
        for role, (model, _) in (trained or {}).items():  # e.g. PRIME's trained PRM: a model of its own, loadable as is
            model.save_pretrained(w.path / role)
            tokenizer.save_pretrained(w.path / role)
        shutil.copy(work / "metrics.jsonl", w.path / "metrics.jsonl")
        if (work / "tb").is_dir():  # --log tensorboard's event files
            shutil.copytree(work / "tb", w.path / "tb")
        source_dir = models.resolve_model(plan.cfg.model)[1]
        if source_dir is not None and (source_dir / config.MODEL_DEFAULTS_FILE).is_file():  # the model's recommended settings travel with it
            shutil.copy(source_dir / config.MODEL_DEFAULTS_FILE, w.path / config.MODEL_DEFAULTS_FILE)
        w.counts["metrics.jsonl"] = sum(1 for _ in open(w.path / "metrics.jsonl"))
    shutil.rmtree(work, ignore_errors=True)
    return plan.out


def _plugins(plan: Plan) -> list[dict]:
    from tokalign import registry
    from tokalign.stages.score import plugin_refs

    algo = registry.info("algorithm", plan.algo_name)
    return [{"kind": "algorithm", "name": plan.algo_name, "distribution": algo.distribution, "version": algo.version}] + plugin_refs(plan.rewards)
