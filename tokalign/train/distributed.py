"""Data-parallel training across processes started by ``torchrun`` (or ``accelerate launch``): one process per
device, on one node or many, through torch.distributed (NCCL on GPUs, gloo on CPUs).

How a step is split: every rank holds the same optimiser batch (offline sources index it by (seed, step); online,
each rank samples and scores its chunks of the prompts and the rows are gathered). The frozen passes are shared too
(each rank computes its ``row_range`` of the rows, ``gather_rows`` gives every rank all of them), and ``prepare``
runs on the whole batch, so whole-batch statistics (group advantages, whitening, totals) are exactly the
single-process ones. The policy's
forward and backward — the expensive part — run only on this rank's share of the groups; micro-batches never split
a group. Each loss is already its share of the *whole* batch, so the gradients are summed across ranks: by torch's
DistributedDataParallel for ``ddp`` (bucketed all-reduces overlapped with the backward of the last micro-batch; the
others run under ``no_sync``) or FSDP2's reduce-scatter for ``fsdp`` — both average, so the loss is scaled by the
number of processes — and by one flat all-reduce for parameters outside the policy (a value head). The step equals
the single-process step. Rank 0 alone writes metrics, checkpoints and the final artifact. Collectives run on the
training device (NCCL needs CUDA tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tokalign.errors import UserError
from tokalign.protocols import TokenBatch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this process's collectives run: its GPU under NCCL, else the CPU (gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init() -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    from tokalign.models import default_device

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = default_device().startswith("cuda")  # TOKALIGN_DEVICE=cpu on a GPU machine: gloo on the CPU
    if cuda and not td.is_initialized():  # (a launcher that made its own group placed its processes itself)
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1))), torch.cuda.device_count()
        if per_node > gpus:
            raise UserError(f"torchrun started {per_node} processes on this node, which has {gpus} GPU(s): one process per GPU; "
                            f"pass --nproc_per_node {gpus}.")
    if cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, f"cuda:{local}" if cuda else "cpu")


def check_batch(dist: Dist, groups: int) -> None:
    if dist.active and groups < dist.world:
        raise UserError(f"The batch has {groups} groups for {dist.world} processes; raise train.batch_size to at least {dist.world}.")


def shard(batch: TokenBatch, dist: Dist) -> TokenBatch:
    """This rank's share of the batch's groups (totals stay global), trimmed to its own longest sequence. The groups
    are dealt out longest first in snake order (0, 1, …, N-1, N-1, …, 0, 0, …), so every rank gets as many groups
    (within one) of similar lengths: a padded forward costs rows × longest sequence, and the slowest rank sets the
    step's pace (every rank waits for it in the gradient all-reduce). Rows keep the batch's order."""
    if not dist.active:
        return batch
    from tokalign.batching import select_trimmed

    groups: dict[int, list[int]] = {}
    for i, g in enumerate(batch.fields["group_ids"].tolist()):
        groups.setdefault(g, []).append(i)
    check_batch(dist, len(groups))
    lengths = batch.attention_mask.sum(-1).tolist()
    longest_first = sorted(groups.values(), key=lambda rows: -max(lengths[i] for i in rows))  # stable: ties keep order
    snake = [r if (k // dist.world) % 2 == 0 else dist.world - 1 - r for k in range(len(longest_first)) for r in [k % dist.world]]
    rows = sorted(i for members, rank in zip(longest_first, snake) if rank == dist.rank for i in members)
    return select_trimmed(batch, rows)


def shard_model(model, dist: Dist, strategy: str, compute_dtype=None):
    """FSDP2: each of the model's repeated blocks (transformers' ``_no_split_modules``, the decoder layers) and then the
    model itself become ``fully_shard`` units; with a ``compute_dtype`` (bf16-mixed) through FSDP2's
    MixedPrecisionPolicy: parameters gathered in it for compute, gradients reduced in float32, fp32 shards kept.
    A no-op for ddp or a single process."""
    if not dist.active or strategy != "fsdp" or is_sharded(model):
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)} if compute_dtype else {}
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **mp)
    fully_shard(model, **mp)
    return model


def load_sharded(load_whole, load_empty, dist: Dist, compute_dtype=None):
    """An FSDP2-sharded model that only the main process reads from disk: it loads the whole model on the CPU
    (``load_whole()``), the others build the architecture on the meta device (``load_empty()``); all shard it, and the
    main process's weights are broadcast shard by shard (``broadcast_from_rank0``), so no other process ever holds
    the whole model. Buffers (e.g. rotary frequencies, which no state dict holds) are broadcast as they are."""
    import torch.distributed as td
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = load_whole() if dist.main else load_empty()
    whole = model.state_dict() if dist.main else {}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if dist.main else {}
    shard_model(model, dist, "fsdp", compute_dtype)
    model.to_empty(device=dist.device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if dist.main:
                buffer.copy_(buffers[name])
            td.broadcast(buffer, src=0)
    return model


def wrap(model, dist: Dist, strategy: str):
    """The module the training forward runs through: torch's DistributedDataParallel around the policy for ``ddp``
    under several processes; the policy itself otherwise (FSDP2 shards it in place, see ``shard_model``)."""
    if not dist.active or strategy != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    # no buffer broadcast before each forward (every rank loaded the same model; the buffers — rotary frequencies — never
    # change): torch 2.13 renamed the switch; the gradients live in DDP's buckets (no copy in or out of them)
    import inspect

    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **buffers)


def reduces_gradients(model) -> bool:
    """The engine sums (averages) the policy's gradients itself: DDP or FSDP2."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel) or is_sharded(model)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model) -> dict | None:
    """The whole model's weights on CPU (a collective for a sharded model: every rank must call it); None = the
    model's own state_dict will do."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (e.g. lm_head = embed_tokens) come back as separate copies; keep one name, as save_pretrained does
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in weights.items() if k not in tied}


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, also over a mix of FSDP2 shards (DTensors) and plain parameters (a value head beside a
    sharded policy), which torch's own refuses: each kind's norm separately, the total from both."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    if not sharded or not plain:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = []
    for group in (sharded, plain):
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float())
    device = norms[0].device if norms else "cpu"
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])) if norms else torch.zeros((), device=device)
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def max_count(n: int, dist: Dist) -> int:
    if not dist.active:
        return n
    import torch.distributed as td

    t = torch.tensor([n], dtype=torch.long, device=dist.device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def row_range(rows: int, dist: Dist) -> tuple[int, int]:
    """This process's contiguous share [lo, hi) of ``rows`` rows (sizes differ by at most one)."""
    return dist.rank * rows // dist.world, (dist.rank + 1) * rows // dist.world


def gather_rows(local: torch.Tensor, rows: int, dist: Dist) -> torch.Tensor:
    """Every process's ``row_range`` share of a [rows, ...] tensor, concatenated in rank order: the whole tensor on
    every process (one all_gather of shares padded to the largest)."""
    import torch.distributed as td

    shares = [row_range(rows, Dist(r, dist.world)) for r in range(dist.world)]
    most = max(hi - lo for lo, hi in shares)
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dist.device)
    padded[: len(local)] = local.to(dist.device)
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    td.all_gather(parts, padded)
    return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, shares)]).to(local.device)


def sum_gradients(params: list[torch.nn.Parameter], dist: Dist, scale: float = 1.0) -> None:
    """All-reduce (sum) every gradient in one flat buffer, times ``scale``; a parameter without a gradient on this
    rank counts as 0. (Sharded FSDP parameters reduce themselves; pass only the others.)"""
    if not dist.active or not params:
        return
    import torch.distributed as td

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    td.all_reduce(flat)
    if scale != 1.0:
        flat.mul_(scale)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sum_metrics(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Sum per-rank partial metrics (each already weighted by its rows' share of the whole batch)."""
    if not dist.active:
        return values
    import torch.distributed as td

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dist.device)
    td.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_objects(obj, dist: Dist | None) -> list:
    """Every process's ``obj`` (picklable, small: rows of numbers and token ids), in rank order."""
    if dist is None or not dist.active:
        return [obj]
    import torch.distributed as td

    out = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def barrier(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        td.barrier()


def shutdown(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
