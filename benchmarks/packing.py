"""Packed against padded micro-batches on a long-tailed completion-length mix: tokalign's train step, GRPO and DPO.

    python benchmarks/packing.py [--algos grpo dpo] [--steps 3] [--warmup 1] [--threads 2] [--micro-tokens 4096]

Model: the train-step benchmark's seeded random Qwen2 (vocabulary 32,768, hidden 384, 6 layers: 26.5M parameters),
float32. Data (``fixed_batch.long_tail_lengths``): prompts of 16–48 tokens; completions of 4–48 tokens, about one
in ten of 224–256 — most short, a few near the maximum, the shape of sampled chain-of-thought batches. GRPO: 8
prompts × 8 completions (random 0/1 rewards); DPO: 32 pairs whose chosen and rejected completions are drawn from the
same mix. The same batch is used at every step.

Two copies of the model (same seed), each with its own optimiser, train on that batch in one process, their steps
interleaved (load changes hit both alike): one with ``train.packing: false`` (right-padded micro-batches: groups
longest first while rows × longest ≤ ``--micro-tokens``, today's padded mode at its best), one with
``train.packing: true`` (micro-batches of whole groups within ``--micro-tokens`` real tokens, each packed into rows
1–2× the longest sequence). Printed per algorithm: median step time of each, useful (non-pad) tokens/s and their
ratio, the padding fraction of each (the share of computed positions that are padding), and how far the packed run's
losses and gradient norms are from the padded run's over all steps (both runs compute the same maths; only rounding
differs)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def batch(algo: str, args):
    import torch

    from fixed_batch import long_tail_lengths
    from tokalign.batching import Seq

    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(10, args.vocab, (n,), generator=g).tolist()  # noqa: E731
    if algo == "grpo":
        lengths = long_tail_lengths(args.prompts * args.group, seed=0)
        seqs = []
        for i in range(args.prompts):
            prompt = rand(lengths[i * args.group][0])
            for j in range(args.group):
                reward = float(torch.rand((), generator=g) > 0.5)
                seqs.append(Seq(prompt, rand(lengths[i * args.group + j][1]), i, row={"rewards": reward}, prompt_index=i))
        return seqs
    lengths = long_tail_lengths(2 * args.pairs, seed=0)
    seqs = []
    for i in range(args.pairs):
        prompt = rand(lengths[2 * i][0])
        seqs += [Seq(prompt, rand(lengths[2 * i][1]), i, row={"is_chosen": 1.0}, prompt_index=i),
                 Seq(prompt, rand(lengths[2 * i + 1][1]), i, row={"is_chosen": 0.0}, prompt_index=i)]
    return seqs


def measure(algo: str, args) -> dict:
    import torch

    from fixed_batch import bench_state, qwen2
    from tokalign.config import TrainSection
    from tokalign.train.loop import step_once

    torch.set_num_threads(args.threads)
    seqs = batch(algo, args)
    build = lambda: qwen2(args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)  # noqa: E731
    states = {}
    for packed in (False, True):
        train = TrainSection(lr=1e-6, micro_batch_tokens=args.micro_tokens, packing=packed, max_length=4096, max_grad_norm=1.0)
        ref = build().eval().requires_grad_(False) if algo == "dpo" else None
        longest = max(len(s.completion_ids) for s in seqs)
        states[packed] = bench_state(algo, train, build().train(), ref, seqs, longest if algo == "grpo" else None)
    times: dict[bool, list[float]] = {False: [], True: []}
    metrics: dict[bool, list[dict]] = {False: [], True: []}
    for step in range(args.warmup + args.steps):
        for packed in (False, True):
            t0 = time.perf_counter()
            m = step_once(states[packed], step)
            if step >= args.warmup:
                times[packed].append(time.perf_counter() - t0 - m["time/batch_s"])
            metrics[packed].append(m)
            print(f"  {algo} step {step + 1} {'packed' if packed else 'padded'}: {times[packed][-1] if step >= args.warmup else 0:.2f} s, "
                  f"loss {m['loss']:.6g}, padding {m['padding_fraction']:.3f}", file=sys.stderr)
    real = metrics[True][0]["tokens"]
    pad_s, pack_s = statistics.median(times[False]), statistics.median(times[True])
    diff = lambda k: max(abs(a[k] - b[k]) for a, b in zip(metrics[True], metrics[False]))  # noqa: E731
    rel = lambda k: max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(metrics[True], metrics[False]))  # noqa: E731
    return {"sequences": len(seqs), "tokens": real, "padded_s": pad_s, "packed_s": pack_s,
            "padded_tokens_per_s": real / pad_s, "packed_tokens_per_s": real / pack_s, "speedup": pad_s / pack_s,
            "padded_padding": metrics[False][0]["padding_fraction"], "packed_padding": metrics[True][0]["padding_fraction"],
            "loss_abs_diff": diff("loss"), "loss_rel_diff": rel("loss"), "grad_norm_rel_diff": rel("grad_norm"),
            "losses": [m["loss"] for m in metrics[False]]}


def main() -> None:
    from fixed_batch import add_model_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-tokens", dest="micro_tokens", type=int, default=4096, help="train.micro_batch_tokens of both sides")
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--pairs", type=int, default=32, help="DPO pairs per step")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load0 = os.getloadavg()
    res = {algo: measure(algo, args) for algo in args.algos}
    print(f"long-tailed completion lengths (4–48 tokens, ~1 in 10 of 224–256), Qwen2 vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, float32, {args.threads} threads; micro_batch_tokens {args.micro_tokens}; median of {args.steps} "
          f"steps per side ({args.warmup} warm-up dropped), padded and packed steps interleaved; load {load0[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print("| algorithm | sequences | real tokens | padded s/step | packed s/step | packed / padded (tokens/s) | padding padded | "
          "padding packed | max loss diff (abs, rel) | max grad-norm diff (rel) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for algo, r in res.items():
        print(f"| {algo} | {r['sequences']} | {r['tokens']} | {r['padded_s']:.2f} | {r['packed_s']:.2f} | {r['speedup']:.2f}× | "
              f"{r['padded_padding']:.1%} | {r['packed_padding']:.1%} | {r['loss_abs_diff']:.1e}, {r['loss_rel_diff']:.1e} | "
              f"{r['grad_norm_rel_diff']:.1e} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
