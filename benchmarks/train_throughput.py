"""Train-step throughput: tokalign vs TRL 1.16 on the same model, data and batch (GRPO and DPO), in one run.

Model: a seeded random Qwen2 (default: vocabulary 32,768, hidden 384, 6 layers, 6 heads / 2 KV heads,
MLP 1,536, tied embeddings: 26.5M parameters), float32, built identically (same seed) in every process.

Data: one fixed batch, reused at every step, with no padding, so both sides see identical tensor shapes.

- GRPO: 4 prompts × 4 completions = 16 sequences of 32 prompt + 96 completion tokens, in two
  micro-batches of 8 rows (TRL: per_device_train_batch_size 8, gradient_accumulation_steps 2,
  num_generations 4). Random rewards; β = 0 (no reference model), clip ε = 0.2, token-mean
  aggregation (TRL loss_type "dapo"), one update per batch (the ratio is 1; behaviour log-probs are
  the detached current ones on both sides).
- DPO: 8 pairs of 32 prompt + 96 completion tokens (16 sequences), sigmoid loss, β = 0.1, a separate
  reference model (same initial weights) evaluated at every step, two micro-batches of 4 pairs
  (TRL: per_device_train_batch_size 4, gradient_accumulation_steps 2, precompute_ref_log_probs False).

What is timed, per optimiser step (wall clock; tokens/s = non-pad tokens of the batch / step time):

- tokalign: one call of the train loop's own step, ``tokalign.train.loop.step_once``, with a source that
  hands back the fixed batch (its time, ~0, is excluded as the loop's own ``tokens_per_s`` does):
  collate → (DPO: reference log-probs, micro-batched) → ``algorithm.prepare`` → per micro-batch
  ``forward`` (logits, chunked selective log-softmax, entropy) + ``algorithm.loss`` + backward →
  gradient clipping (max norm 1.0) → AdamW step → scheduler step → metrics.
- TRL: its real ``trainer.train()`` loop, timed between the ``on_step_begin`` and ``on_step_end``
  callbacks: for every micro-batch ``training_step`` (``_prepare_inputs`` → ``compute_loss`` with its
  fused LM head (log-probs, entropy; DPO: reference forward) → ``accelerator.backward``) → gradient
  clipping (max norm 1.0) → optimiser step → scheduler step → ``zero_grad``. Data loading and
  collation happen before ``on_step_begin`` and are not timed. For GRPO, generation and scoring are
  excluded by replacing ``_generate_and_score_completions`` with a function that returns the fixed
  batch (prompt/completion ids and masks, the advantages tokalign computes from the same rewards,
  ``num_items_in_batch``), exactly the dict TRL would have built.

Settings pinned on TRL because its defaults change the work done: ``bf16=False`` (its default runs
bf16 autocast) and ``gradient_checkpointing=False`` (its default recomputes activations; tokalign
does not checkpoint). TRL keeps its default optimiser (``adamw_torch_fused``); tokalign uses
``torch.optim.AdamW``; both lr 1e-6, weight decay 0, constant schedule.

Both frameworks run in one process per algorithm, their optimiser steps interleaved: TRL's loop
runs, and after each of its steps (in its ``on_step_end`` callback, after its timer stopped) one
tokalign step runs on tokalign's own copy of the model. On a shared machine load changes then hit
both sides alike. The first --warmup steps of each side are dropped; reported are the medians over
all timed steps of all runs (fresh processes), the median of the ratios of adjacent steps, and the
load average. The machine's fp32 matmul peak is measured before and after (2048 × 2048 products, same threads)
and each side's share of it printed: 6 · params · tokens/s / peak (DPO's reference forward, 2 · params per token
more, is not counted as work). Usage:

    python benchmarks/train_throughput.py [--algos grpo dpo] [--steps 6] [--warmup 2] [--rounds 2] [--threads 2] [--mix long-tail]

With ``--mix long-tail`` the sequences' lengths follow ``fixed_batch.long_tail_lengths`` (prompts 16-48 tokens,
completions 4-48 with about one in ten of 224-256): TRL pads (GRPO: prompts left-padded and completions right-padded
to the batch's longest, as its generation hands them over; DPO: its collator pads each micro-batch), tokalign packs
(``train.packing``, micro-batches of half the batch's real tokens). Throughput is then useful (non-pad) tokens/s,
each side counting its own steps' real tokens (TRL's DPO sampler shuffles the repeated pairs between steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()

sys.path.insert(0, args["bench_dir"])
from fixed_batch import bench_state, qwen2
build = lambda: qwen2(args["vocab"], args["hidden"], args["intermediate"], args["layers"], args["heads"], args["kv_heads"], max_positions=512)

algo_name = args["algo"]
g = torch.Generator().manual_seed(1)
V, P, C = args["vocab"], args["prompt_len"], args["completion_len"]
rand = lambda n: torch.randint(10, V, (n,), generator=g).tolist()
micro = args["micro_rows"]
long_tail = args["mix"] == "long-tail"
if long_tail:  # (prompt, completion) lengths: completions mostly short, about one in ten near the maximum
    from fixed_batch import long_tail_lengths
    lengths = long_tail_lengths(args["prompts"] * args["group"] if algo_name == "grpo" else 2 * args["pairs"], seed=0)
else:
    lengths = [(P, C)] * (args["prompts"] * args["group"] if algo_name == "grpo" else 2 * args["pairs"])
if algo_name == "grpo":
    G = args["group"]
    prompts = [rand(lengths[i * G][0]) for i in range(args["prompts"])]
    rows = [(i, prompts[i], rand(lengths[i * G + j][1]), float(torch.rand((), generator=g) > 0.5)) for i in range(args["prompts"]) for j in range(G)]
    n_seqs = len(rows)
    tokens = sum(len(p) + len(c) for _, p, c, _ in rows)
else:
    pairs = [(rand(lengths[2 * i][0]), rand(lengths[2 * i][1]), rand(lengths[2 * i + 1][1])) for i in range(args["pairs"])]
    n_seqs = 2 * len(pairs)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
total_steps = args["warmup"] + args["steps"]

# ---- tokalign: the train loop's own step on a fixed batch
from tokalign import ops
from tokalign.batching import Seq
from tokalign.config import TrainSection
from tokalign.train.loop import step_once
if algo_name == "grpo":
    seqs = [Seq(p, c, gid, row={"rewards": r}, prompt_index=gid) for gid, p, c, r in rows]
else:
    seqs = []
    for i, (p, c, r) in enumerate(pairs):
        seqs += [Seq(p, c, i, row={"is_chosen": 1.0}, prompt_index=i), Seq(p, r, i, row={"is_chosen": 0.0}, prompt_index=i)]
if long_tail:  # packed, in micro-batches of about half the batch's tokens (TRL: two micro-batches of half its rows, padded)
    train = TrainSection(lr=1e-6, micro_batch_tokens=-(-tokens // 2), packing=True, max_length=4096, max_grad_norm=1.0, weight_decay=0.0)
else:
    train = TrainSection(lr=1e-6, micro_batch_size=micro, max_length=4096, max_grad_norm=1.0, weight_decay=0.0)
tk_policy = build().train()
tk_ref = build().eval().requires_grad_(False) if algo_name == "dpo" else None  # DPO: a separate reference model
state = bench_state(algo_name, train, tk_policy, tk_ref, seqs, max(len(c) for _, _, c, _ in rows) if algo_name == "grpo" else None)
tk_times, tk_losses, tk_padding = [], [], []
def tokalign_step():
    step = len(tk_times)
    t0 = time.perf_counter()
    m = step_once(state, step)
    tk_times.append(time.perf_counter() - t0 - m["time/batch_s"])
    tk_losses.append(m["loss"])
    tk_padding.append(m["padding_fraction"])
    assert m["tokens"] == tokens, (m["tokens"], tokens)

# ---- TRL: its own trainer.train() loop; after each of its steps (outside its timing) one tokalign step runs
from datasets import Dataset
from tokalign.tiny import build_tokenizer
tok = build_tokenizer()
trl_times, trl_shapes = [], set()
class Interleave(TrainerCallback):
    def on_step_begin(self, a, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, a, state, control, **kw):
        trl_times.append(time.perf_counter() - self.t0)
        tokalign_step()
common = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", bf16=False, gradient_checkpointing=False,
              disable_tqdm=True, seed=0, learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
              max_steps=total_steps, save_strategy="no", logging_steps=1000, gradient_accumulation_steps=2)
trl_policy = build()
if algo_name == "grpo":
    from trl import GRPOConfig, GRPOTrainer
    Pm, Cm = max(len(p) for _, p, _, _ in rows), max(len(c) for _, _, c, _ in rows)
    cfg = GRPOConfig(**common, per_device_train_batch_size=n_seqs // 2, num_generations=args["group"], max_completion_length=Cm,
                     beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, use_bias_correction_kl=False)
    ds = Dataset.from_dict({"prompt": ["hello world"] * (n_seqs * (total_steps + 2))})
    trainer = GRPOTrainer(model=trl_policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                          train_dataset=ds, processing_class=tok)
    rewards, gids = torch.tensor([r for *_, r in rows]), torch.tensor([gid for gid, *_ in rows])
    # what TRL's generation hands its loss: prompts left-padded, completions right-padded, to the batch's longest
    fixed = {"prompt_ids": torch.tensor([[0] * (Pm - len(p)) + p for _, p, _, _ in rows]),
             "prompt_mask": torch.tensor([[0] * (Pm - len(p)) + [1] * len(p) for _, p, _, _ in rows]),
             "completion_ids": torch.tensor([c + [0] * (Cm - len(c)) for _, _, c, _ in rows]),
             "completion_mask": torch.tensor([[1] * len(c) + [0] * (Cm - len(c)) for _, _, c, _ in rows]),
             "advantages": ops.group_advantages(rewards, gids, "group", 1e-4),
             "num_items_in_batch": torch.tensor(float(sum(len(c) for _, _, c, _ in rows)))}
    trainer._generate_and_score_completions = lambda batch: {k: v.clone() for k, v in fixed.items()}  # generation excluded
else:
    from trl import DPOConfig, DPOTrainer
    cfg = DPOConfig(**common, per_device_train_batch_size=len(pairs) // 2, beta=0.1, loss_type="sigmoid",
                    precompute_ref_log_probs=False, max_length=4096)
    tiny = Dataset.from_dict({"prompt": ["hello world"] * 2, "chosen": [" yes"] * 2, "rejected": [" no"] * 2})
    trainer = DPOTrainer(model=trl_policy, ref_model=build().eval().requires_grad_(False), args=cfg, train_dataset=tiny,
                         processing_class=tok)
    reps = total_steps + 2  # the same 8 pairs at every step (pre-tokenised: TRL's collator pads them, outside the timing)
    trainer.train_dataset = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs] * reps,
                                               "chosen_ids": [c for _, c, _ in pairs] * reps,
                                               "rejected_ids": [r for _, _, r in pairs] * reps})
inner = trainer._compute_loss
trl_real, trl_positions = [], []  # per micro-batch: the real tokens and the positions TRL computed
def recording(model, inputs, *a, **kw):  # the shapes TRL really trained on
    ids = inputs["input_ids"] if "input_ids" in inputs else torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    trl_shapes.add(tuple(ids.shape))
    trl_positions.append(ids.numel())
    if "attention_mask" in inputs:
        trl_real.append(int(inputs["attention_mask"].sum()))
    elif "prompt_mask" in inputs:
        trl_real.append(int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
    return inner(model, inputs, *a, **kw)
trainer._compute_loss = recording
trainer.add_callback(Interleave())
trainer.train()
if not long_tail:
    assert trl_shapes == {(micro, P + C)}, trl_shapes
assert len(trl_times) == len(tk_times) == total_steps
w = args["warmup"]
# TRL's DPO sampler shuffles the repeated pairs, so its steps' real tokens vary: its throughput counts its own
trl_tokens = [sum(trl_real[2 * i : 2 * i + 2]) for i in range(total_steps)] if len(trl_real) == 2 * total_steps else [tokens] * total_steps
print(json.dumps({"tokalign": tk_times[w:], "trl": trl_times[w:], "tokens": tokens, "n_seqs": n_seqs, "trl_tokens": trl_tokens[w:],
                  "trl_padding": 1 - sum(trl_real) / max(sum(trl_positions), 1), "tokalign_padding": tk_padding[-1],
                  "params": sum(p.numel() for p in tk_policy.parameters()), "threads": torch.get_num_threads(),
                  "tokalign_first_loss": tk_losses[0]}))
"""


def run(algo: str, args) -> dict:
    payload = dict(vars(args), algo=algo, bench_dir=os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{algo} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PEAK = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
for _ in range(3):
    a @ b
best = 0.0
for _ in range(5):
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
print(json.dumps({"flops": best}))
"""


def matmul_peak(threads: int) -> float:
    """The machine's fp32 matmul rate (FLOP/s): the best of 5 × 5 products of two 2048 × 2048 matrices, in a fresh
    process with the benchmark's thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(threads)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["flops"]


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fixed_batch import add_model_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per framework and run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2, help="runs (fresh processes) per algorithm")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and OMP_NUM_THREADS) for both")
    add_model_args(p)
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
    p.add_argument("--completion-len", dest="completion_len", type=int, default=96)
    p.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--group", type=int, default=4, help="GRPO completions per prompt")
    p.add_argument("--pairs", type=int, default=8, help="DPO pairs per step")
    p.add_argument("--mix", choices=["fixed", "long-tail"], default="fixed",
                   help="fixed: every sequence --prompt-len + --completion-len, no padding; long-tail: prompts of 16-48 tokens, "
                        "completions of 4-48 with about one in ten of 224-256 (TRL pads them, tokalign packs)")
    args = p.parse_args()
    args.micro_rows = args.prompts * args.group // 2  # two micro-batches per optimiser step, for both algorithms
    if args.pairs != args.micro_rows:
        p.error("--pairs must equal --prompts × --group / 2 (both algorithms use micro-batches of the same row count)")
    load0 = os.getloadavg()
    peaks = [matmul_peak(args.threads)]
    res: dict = {}
    for rnd in range(args.rounds):
        for algo in args.algos:
            r = run(algo, args)
            acc = res.setdefault(algo, {**r, "tokalign": [], "trl": [], "trl_rates": [], "pair_ratios": []})
            acc["tokalign"] += r["tokalign"]
            acc["trl"] += r["trl"]
            rates = [n / t for n, t in zip(r["trl_tokens"], r["trl"])]  # TRL's real tokens per second, step by step
            acc["trl_rates"] += rates
            acc["pair_ratios"] += [r["tokens"] / a / b for a, b in zip(r["tokalign"], rates)]
            print(f"  round {rnd + 1} {algo}: tokalign {statistics.median(r['tokalign']):.3f} s/step, "
                  f"TRL {statistics.median(r['trl']):.3f} s/step", file=sys.stderr)
    load1 = os.getloadavg()
    peaks.append(matmul_peak(args.threads))
    peak = max(peaks)
    first = next(iter(res.values()))
    shape = (f"{args.prompt_len + args.completion_len} each" if args.mix == "fixed" else
             "long-tailed lengths: TRL pads, tokalign packs")
    print(f"Qwen2 {first['params'] / 1e6:.1f}M params, vocab {args.vocab}, float32, torch threads {first['threads']}; "
          f"{first['tokens']} real tokens per optimiser step ({first['n_seqs']} sequences, {shape}), "
          f"2 micro-batches; steps of the two frameworks interleaved in one process; median of {args.steps * args.rounds} "
          f"timed steps each ({args.rounds} runs × {args.steps}, {args.warmup} warm-up steps dropped per run)")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048² products, before {peaks[0] / 1e9:.1f}, after {peaks[1] / 1e9:.1f}); share of peak = 6 · params · tokens/s / peak")
    print("| algorithm | tokalign s/step | tokalign tokens/s | tokalign share of peak | TRL s/step | TRL tokens/s | TRL share of peak | "
          "tokalign / TRL (tokens/s) | median of adjacent-step ratios | padding tokalign | padding TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for algo in args.algos:
        r = res[algo]
        tk, trl = statistics.median(r["tokalign"]), statistics.median(r["trl"])
        tk_rate, trl_rate = r["tokens"] / tk, statistics.median(r["trl_rates"])
        pair = statistics.median(r["pair_ratios"])
        share = {side: 6 * r["params"] * rate / peak for side, rate in (("tokalign", tk_rate), ("trl", trl_rate))}
        summary[algo] = {"tokalign_s": tk, "trl_s": trl, "ratio": tk_rate / trl_rate, "pair_ratio": pair,
                         "tokalign_peak_share": share["tokalign"], "trl_peak_share": share["trl"],
                         "tokalign_padding": r["tokalign_padding"], "trl_padding": r["trl_padding"]}
        print(f"| {algo} | {tk:.3f} | {tk_rate:,.0f} | {share['tokalign']:.0%} | {trl:.3f} | {trl_rate:,.0f} | "
              f"{share['trl']:.0%} | {tk_rate / trl_rate:.2f}× | {pair:.2f}× | {r['tokalign_padding']:.1%} | {r['trl_padding']:.1%} |")
    print(json.dumps({"mix": args.mix, "load": [load0[0], load1[0]], "matmul_peak_flops": peak, **summary}))


if __name__ == "__main__":
    main()
