"""A torchrun worker whose ranks share GPU 0 of a one-GPU machine (tests/gpu/test_two_processes_gpu.py starts it):

    python -m torch.distributed.run --nproc_per_node 2 tests/gpu/shared_gpu.py BACKEND collectives
    python -m torch.distributed.run --nproc_per_node 2 tests/gpu/shared_gpu.py BACKEND tokalign ARGS...

Each rank joins a process group of BACKEND (gloo or nccl) before tokalign's own ``distributed.init``, which then keeps
that group: tokalign alone picks NCCL on CUDA and puts rank r on cuda:LOCAL_RANK, which does not exist for rank 1 of a
one-GPU machine, so there LOCAL_RANK is 0 for every rank and all share cuda:0 (on a machine of several GPUs each rank
keeps its own; on the CPU when TOKALIGN_DEVICE=cpu). ``collectives`` runs tokalign.train.distributed's collectives
(max_count, sum_metrics, sum_gradients, gather_objects, gather_rows) and a DDP-wrapped module on that device and
checks their results; ``tokalign`` runs the CLI."""

from __future__ import annotations

import json
import os
import sys


def collectives(device: str) -> dict:
    import torch
    import torch.distributed as td

    from tokalign.train import distributed as d

    rank, world = td.get_rank(), td.get_world_size()
    dist = d.Dist(rank, world, torch.device(device).index or 0, device)
    assert d.max_count(rank + 3, dist) == world + 2
    assert d.sum_metrics({"a": float(rank + 1), "b": 0.5}, dist) == {"a": world * (world + 1) / 2, "b": 0.5 * world}
    params = [torch.nn.Parameter(torch.zeros(3, device=device)), torch.nn.Parameter(torch.zeros(2, 2, device=device))]
    params[0].grad = torch.full((3,), float(rank + 1), device=device)  # params[1] has no gradient on any rank: 0
    d.sum_gradients(params, dist, 0.5)
    assert all(p.grad.device.type == torch.device(device).type for p in params)
    assert torch.equal(params[0].grad.cpu(), torch.full((3,), world * (world + 1) / 4)) and not params[1].grad.any()
    assert d.gather_objects({"rank": rank}, dist) == [{"rank": r} for r in range(world)]
    rows = 5  # each rank its row_range share of a [5, 3] tensor; gather_rows gives every rank the whole of it
    whole = torch.arange(rows * 3.0).view(rows, 3)
    lo, hi = d.row_range(rows, dist)
    gathered = d.gather_rows(whole[lo:hi].to(device), rows, dist)
    assert gathered.device.type == torch.device(device).type and torch.equal(gathered.cpu(), whole)
    torch.manual_seed(0)  # the same module on every rank; DDP averages the ranks' gradients in the backward
    model = torch.nn.Linear(4, 2).to(device)
    ddp = d.wrap(model, dist, "ddp")
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and d.reduces_gradients(ddp)
    inputs = [torch.arange(4.0, device=device) * (r + 1) for r in range(world)]
    ddp(inputs[rank]).sum().backward()
    expected = torch.stack(inputs).mean(0)  # d(sum(Wx + b))/dW = x per output row, averaged over the ranks
    assert torch.allclose(model.weight.grad, expected.expand(2, 4)) and model.weight.grad.device.type == torch.device(device).type
    d.barrier(dist)
    return d.gather_objects({"rank": rank, "backend": td.get_backend(), "device": str(model.weight.grad.device)}, dist)


def main() -> None:
    backend, what, *args = sys.argv[1:]
    import torch
    import torch.distributed as td

    cuda = torch.cuda.is_available() and os.environ.get("TOKALIGN_DEVICE") != "cpu"
    if cuda and torch.cuda.device_count() < 2:  # one GPU: every rank on it (with several, each rank its own)
        os.environ["LOCAL_RANK"] = "0"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    td.init_process_group(backend=backend)
    if what == "collectives":
        ranks = collectives(device)
        if td.get_rank() == 0:
            print(json.dumps(ranks), flush=True)
        td.destroy_process_group()
        return
    from tokalign.cli.app import main as cli

    cli(args)


if __name__ == "__main__":
    main()
