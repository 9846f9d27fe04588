"""Everything a run holds — config, models, components, optimiser, data source — in one object. It is the
``TrainContext`` components see (``tokalign.protocols``), and what the loop and checkpoints pass around instead of
long parameter lists."""

from __future__ import annotations

from pathlib import Path

import torch

from tokalign import components as components_mod
from tokalign import forward, models
from tokalign.batching import micro_batches
from tokalign.train import distributed, lora, precision
from tokalign.train.kinds import KINDS


class TrainState:
    def __init__(self, plan, resume_from: Path | None, dist: distributed.Dist):
        cfg, t = plan.cfg, plan.cfg.train
        self.plan, self.cfg, self.needs, self.algorithm = plan, cfg, plan.needs, plan.algorithm
        self.resume_from, self.dist = resume_from, dist
        self.step, self.seqs = 0, []
        self._reference = None
        self.precision = precision.resolve(t.precision, models.default_device())
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.policy = self._policy()  # a checkpoint's trained weights: checkpoint.restore
        self.device = next(self.policy.parameters()).device
        self.components = components_mod.resolve(plan.needs)
        for c in self.components:
            c.setup(self)
        self.source = KINDS[plan.data_kind].source(plan, _rows(plan, self.tokenizer), self)
        self.max_completion_len = KINDS[plan.data_kind].length_limit(plan)
        self.forward_outputs = {o for c in self.components for o in c.forward_outputs}
        # components whose models are sharded: a process's filler micro-batches (see loop._filler) must run them too
        self.sharded_components = any(distributed.is_sharded(m) for c in self.components for m in c.models())
        # before the optimiser: it must see the sharded parameters
        distributed.shard_model(self.policy, dist, t.distributed, self.precision.compute_dtype())
        self.train_model = distributed.wrap(self.policy, dist, t.distributed)  # what the training forward runs through
        self.params = [p for p in self.policy.parameters() if p.requires_grad] + [p for c in self.components for p in c.parameters()]
        # parameters whose gradients are summed by hand across processes: all of them, unless an engine (DDP, FSDP2)
        # reduces the policy's; then the others (a value head). Taken now: FSDP2 later swaps in unsharded parameters
        policy_ids = {id(p) for p in self.policy.parameters()} if distributed.reduces_gradients(self.train_model) else set()
        self.hand_reduced = [p for p in self.params if id(p) not in policy_ids]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, fused=_fused_adamw(self.params) or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(t.warmup_steps))

    # -- the TrainContext of components
    def load_model(self, source: str, trainable: bool = False):
        """Trained models keep the precision's master dtype, frozen ones its compute dtype; under FSDP frozen models
        are sharded like the policy. (A trained one is not: it is saved whole by the main process alone.)"""
        if trainable:
            return models.load_model(source, self.precision.weights).train()
        return self._load(source, self.precision.frozen).eval().requires_grad_(False)

    def _load(self, source: str, dtype: str, compute_dtype=None):
        """A model in ``dtype``; under FSDP sharded, read from disk by the main process alone."""
        if self.dist.active and self.cfg.train.distributed == "fsdp":
            return distributed.load_sharded(lambda: models.load_model(source, dtype, device="cpu"),
                                            lambda: models.empty_model(source, dtype), self.dist, compute_dtype)
        return models.load_model(source, dtype)

    def _policy(self):
        t, dtype = self.cfg.train, self.precision.weights
        if t.lora_r > 0:  # the base from the starting model, a fresh adapter (sharded below, after wrapping)
            policy = lora.wrap(models.load_model(self.cfg.model, dtype, quantization_config=lora.quantisation_config(t)), t)
        else:
            policy = self._load(self.cfg.model, dtype, self.precision.compute_dtype())
        if t.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(policy, "enable_input_require_grads"):  # a transformers model feature, not an algorithm's
                policy.enable_input_require_grads()
        return policy.train()

    def reference_model(self):
        """The frozen reference, loaded once (LoRA without --ref-model: the policy with its adapter off, no copy)."""
        if self._reference is None:
            self._reference = lora.reference_or_none(self.policy, True, self.cfg.ref_model) or self.load_model(
                self.cfg.ref_model or self.cfg.model)
        return self._reference

    def micro_batches(self, batch):
        t = self.cfg.train
        return micro_batches(batch, t.micro_batch_size, t.micro_batch_tokens, t.packing, self.needs.split_groups)

    def map_micro_batches(self, batch, fn, *models) -> dict[str, torch.Tensor]:
        """``forward.map_micro_batches`` with the run's micro-batching, shared between processes: each computes its
        1/N of the rows and the results are gathered, so every process holds them for the whole batch. ``models``:
        those ``fn`` runs (processes sharing a sharded one make as many calls)."""
        t, dist = self.cfg.train, self.dist
        # frozen passes compute row by row: a group larger than a micro-batch is split whatever the algorithm
        if not dist.active or len(batch) < dist.world:
            return forward.map_micro_batches(batch, t.micro_batch_size, t.micro_batch_tokens, fn, split_groups=True)
        lo, hi = distributed.row_range(len(batch), dist)
        part = batch.select(torch.arange(lo, hi))
        calls = 0
        if any(distributed.is_sharded(m) for m in models):
            calls = distributed.max_count(len(micro_batches(part, t.micro_batch_size, t.micro_batch_tokens, t.packing, True)), dist)
        local = forward.map_micro_batches(part, t.micro_batch_size, t.micro_batch_tokens, fn, calls, split_groups=True)
        return {k: distributed.gather_rows(v, len(batch), dist) for k, v in local.items()}

    @torch.no_grad()
    def frozen_logps(self, model, batch) -> torch.Tensor:
        return self.map_micro_batches(batch, lambda mb: {"logps": forward.forward(model, mb).logps}, model)["logps"]

    # -- what the loop reads
    def held_models(self) -> list:
        return [self.policy, *(m for c in self.components for m in c.models())]


def _rows(plan, tokenizer) -> list[dict]:
    from tokalign.data.render import retokenize
    from tokalign.rows import dumps

    rows = plan.rows
    if plan.extra.get("normalised"):  # records from a task/file: into artifact-row shape
        rows = [{**r, "prompt": dumps(r["prompt"]), "reference": dumps(r.get("reference"))} for r in rows]
    if KINDS[plan.data_kind].keeps_ids:
        return rows
    tools = plan.episodes.tools() if KINDS[plan.data_kind].sampled else None
    return retokenize(rows, tokenizer, tools)


def _schedule(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _fused_adamw(params: list) -> bool:
    """torch's fused AdamW (one kernel over all parameters; the HF Trainer's default on CUDA) where it applies: plain
    float32 tensors (the master weights of every precision but pure bf16, whose rounding it would change) on one CPU
    or CUDA device type. It equals the per-parameter loop to the last bit or two."""
    from torch.distributed.tensor import DTensor

    kinds = {p.device.type for p in params}
    return bool(params) and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(
        p.dtype == torch.float32 and not isinstance(p, DTensor) for p in params)

