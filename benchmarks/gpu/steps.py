"""GRPO and DPO train steps on one GPU, tokalign vs TRL, on a random-initialised model of Qwen2.5-0.5B's shape, in
bf16-mixed: tokens/s and peak GPU memory (``torch.cuda.max_memory_allocated``) of each, and their ratios.

The approach is benchmarks/train_throughput.py's (the CPU benchmark), moved to the GPU: one fixed batch of
fixed-length sequences (no padding) reused at every step; tokalign runs its train loop's own step
(``tokalign.train.loop.step_once``) on a hand-built train state; TRL runs its real ``trainer.train()`` loop, timed
between its ``on_step_begin`` and ``on_step_end`` callbacks, with GRPO's generation and scoring replaced by the fixed
batch; both take the same settings (batch, micro-batches, lengths, lr 1e-6, weight decay 0, constant schedule, clip
norm 1.0; GRPO β 0, ε 0.2, token-mean ("dapo"); DPO sigmoid, β 0.1, a reference model evaluated at every step;
TRL keeps its default optimiser, adamw_torch_fused, tokalign its torch.optim.AdamW, as in the CPU benchmark).
(train_throughput.py keeps its code in one string run in a subprocess, so none of it can be imported; the pieces
here are functions it could import instead.)

What differs from the CPU benchmark, for the GPU:
- the model: Qwen2.5-0.5B's configuration, written out below from its config.json (494,032,768 parameters, checked),
  with seeded random weights built on the device — no download, no tokenizer of its own (token ids are drawn
  directly; the bundled tiny model's tokenizer stands in where TRL wants one: only its pad id is used);
- the precision: bf16-mixed on both sides — float32 master weights and AdamW state, bf16 autocast compute (TRL:
  ``bf16=True``, its accelerator's autocast; tokalign: ``train.precision=bf16-mixed``) — and the DPO reference held
  in bf16 by both (tokalign's bf16-mixed does so; TRL is handed a bf16 copy of the same initial weights);
- each framework runs in a process of its own (one per framework and algorithm), so that each peak memory is its
  own; the GPU is not shared, so the CPU benchmark's interleaving of the two is not needed for fairness.

Reported: the median step time over the timed steps (the first --warmup steps dropped: CUDA kernels' first launches,
AdamW's state being created), tokens/s = tokens per step / that median, the peak memory allocated from the end of
setup (models, and the reference, resident) to the end of the run, and tokalign / TRL ratios. Usage:

    python benchmarks/gpu/steps.py [--algos grpo dpo] [--steps 6] [--warmup 2] [--json OUT.json]
    python benchmarks/gpu/steps.py --device cpu --tiny     # a smoke run: tiny model, 2 steps, both frameworks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Qwen/Qwen2.5-0.5B config.json (the Qwen2.5 model card: 24 layers, 14 query / 2 KV heads, tied embeddings, 0.49B
# parameters, 0.36B without the embedding)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=24, attention_dropout=0.0,
                  initializer_range=0.02, bos_token_id=151643, eos_token_id=151643)
QWEN25_05B_PARAMS = 494_032_768
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, sliding_window=512, max_window_layers=2, bos_token_id=1, eos_token_id=2)
PAD = 0  # the bundled tokenizer's pad id; drawn token ids start at 10, so no sequence holds it


# ---------------------------------------------------------------------------------------------------------- shared


def build_model(cfg: dict, device: str, seed: int = 0):
    """A seeded random Qwen2 of this configuration, float32, built directly on ``device``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, pad_token_id=PAD)).float()
    return model


def frozen_copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


def fixed_batch(a: dict) -> dict:
    """The batch of every step: GRPO prompts × completions with random rewards, or DPO pairs; token ids from a seeded
    generator (the same on both sides)."""
    import torch

    g = torch.Generator().manual_seed(1)
    V, P, C = a["vocab"], a["prompt_len"], a["completion_len"]
    rand = lambda n: torch.randint(10, V, (n,), generator=g).tolist()
    if a["algo"] == "grpo":
        prompts = [rand(P) for _ in range(a["prompts"])]
        rows = [(i, prompts[i], rand(C), float(torch.rand((), generator=g) > 0.5)) for i in range(a["prompts"]) for _ in range(a["group"])]
        return {"rows": rows, "n_seqs": len(rows), "tokens": (P + C) * len(rows)}
    pairs = [(rand(P), rand(C), rand(C)) for _ in range(a["pairs"])]
    return {"pairs": pairs, "n_seqs": 2 * len(pairs), "tokens": (P + C) * 2 * len(pairs)}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def start_memory(device: str) -> int | None:
    """Reset the peak counter; the bytes allocated now (the resident models)."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


# ---------------------------------------------------------------------------------------------------------- tokalign


def run_tokalign(a: dict, data: dict) -> dict:
    """``a["steps"] + a["warmup"]`` calls of the train loop's step on the fixed batch."""
    from types import SimpleNamespace

    import torch

    from tokalign import components
    from tokalign import forward as fwd
    from tokalign.algorithms.dpo import DPO
    from tokalign.algorithms.grpo import GRPO
    from tokalign.batching import Seq
    from tokalign.config import TrainSection
    from tokalign.train import distributed, precision
    from tokalign.train.loop import step_once

    device, algo_name = a["device"], a["algo"]
    cls = {"grpo": GRPO, "dpo": DPO}[algo_name]  # what registry.load gives for the names (no entry points needed)
    algo = cls(cls.Config())
    if algo_name == "grpo":
        seqs = [Seq(p, c, gid, row={"rewards": r}, prompt_index=gid) for gid, p, c, r in data["rows"]]
    else:
        seqs = []
        for i, (p, c, r) in enumerate(data["pairs"]):
            seqs += [Seq(p, c, i, row={"is_chosen": 1.0}, prompt_index=i), Seq(p, r, i, row={"is_chosen": 0.0}, prompt_index=i)]

    class Fixed:
        def batch(self, step):
            return list(seqs), {}

    prec = precision.resolve(a["precision"], device)
    train = TrainSection(lr=1e-6, micro_batch_size=a["micro_rows"], max_length=8192, max_grad_norm=1.0, weight_decay=0.0,
                         precision=a["precision"])
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    policy = build_model(a["model"], device).to(dtypes[prec.weights]).train()
    ref = frozen_copy(policy, dtypes[prec.frozen]) if algo.needs.reference else None
    opt = torch.optim.AdamW(policy.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class BenchState(SimpleNamespace):  # the train loop's TrainState (one process), by hand around the benchmark's models
        def map_micro_batches(self, batch, fn, *models):
            return fwd.map_micro_batches(batch, train.micro_batch_size, train.micro_batch_tokens, fn)

        def frozen_logps(self, model, batch):
            return fwd.frozen_logps(model, batch, train.micro_batch_size, train.micro_batch_tokens)

        def reference_model(self):
            return ref

        def micro_batches(self, batch):
            from tokalign.batching import micro_batches

            return micro_batches(batch, train.micro_batch_size, train.micro_batch_tokens)

    state = BenchState(cfg=SimpleNamespace(train=train), plan=SimpleNamespace(algo_name=algo_name), algorithm=algo, needs=algo.needs,
                       source=Fixed(), policy=policy, tokenizer=SimpleNamespace(pad_token_id=PAD), device=torch.device(device),
                       dist=distributed.Dist(), precision=prec, resume_from=None,
                       max_completion_len=a["completion_len"] if algo_name == "grpo" else None, forward_outputs=set(), step=0, seqs=[],
                       params=list(policy.parameters()), optimizer=opt, scheduler=sched, train_model=policy, hand_reduced=[],
                       sharded_components=False)
    state.components = components.resolve(algo.needs)
    for c in state.components:
        c.setup(state)
    resident = start_memory(device)
    times, losses = [], []
    for step in range(a["warmup"] + a["steps"]):
        sync(device)
        t0 = time.perf_counter()
        m = step_once(state, step)
        sync(device)
        times.append(time.perf_counter() - t0 - m["time/batch_s"])  # the fixed batch's hand-over (~0) excluded
        losses.append(m["loss"])
        assert m["tokens"] == data["tokens"], (m["tokens"], data["tokens"])
    return {"times": times, "losses": losses, "resident_bytes": resident, "peak_bytes": peak_memory(device),
            "params": sum(p.numel() for p in policy.parameters()), "shapes": [[a["micro_rows"], a["prompt_len"] + a["completion_len"]]]}


# ---------------------------------------------------------------------------------------------------------- TRL


def run_trl(a: dict, data: dict) -> dict:
    """TRL's own ``trainer.train()`` for ``a["steps"] + a["warmup"]`` optimiser steps on the fixed batch."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from tokalign import models, ops

    device, algo_name = a["device"], a["algo"]
    P, C, n_seqs, total = a["prompt_len"], a["completion_len"], data["n_seqs"], a["warmup"] + a["steps"]
    tok = models.load_tokenizer(str(models.BUNDLED_MODEL))
    assert tok.pad_token_id == PAD
    times, losses, shapes = [], [], set()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    mixed = a["precision"] == "bf16-mixed"
    if a["precision"] not in ("bf16-mixed", "fp32"):
        raise SystemExit(f"TRL runs fp32 or bf16-mixed (bf16=True), not {a['precision']}")
    common = dict(output_dir=tempfile.mkdtemp(), use_cpu=device == "cpu", report_to="none", bf16=mixed, gradient_checkpointing=False,
                  disable_tqdm=True, seed=0, learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                  max_steps=total, save_strategy="no", logging_steps=1, gradient_accumulation_steps=n_seqs // a["micro_rows"])
    policy = build_model(a["model"], device)
    if algo_name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        rows = data["rows"]
        cfg = GRPOConfig(**common, per_device_train_batch_size=a["micro_rows"], num_generations=a["group"], max_completion_length=C,
                         beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, use_bias_correction_kl=False)
        ds = Dataset.from_dict({"prompt": ["hello world"] * (n_seqs * (total + 2))})
        trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                              train_dataset=ds, processing_class=tok)
        rewards, gids = torch.tensor([r for *_, r in rows]), torch.tensor([gid for gid, *_ in rows])
        fixed = {"prompt_ids": torch.tensor([p for _, p, _, _ in rows]), "prompt_mask": torch.ones(n_seqs, P, dtype=torch.long),
                 "completion_ids": torch.tensor([c for _, _, c, _ in rows]), "completion_mask": torch.ones(n_seqs, C, dtype=torch.long),
                 "advantages": ops.group_advantages(rewards, gids, "group", 1e-6), "num_items_in_batch": torch.tensor(float(n_seqs * C))}
        fixed = {k: v.to(device) for k, v in fixed.items()}
        trainer._generate_and_score_completions = lambda batch: {k: v.clone() for k, v in fixed.items()}  # generation excluded
    else:
        from trl import DPOConfig, DPOTrainer

        pairs = data["pairs"]
        cfg = DPOConfig(**common, per_device_train_batch_size=a["micro_rows"] // 2, beta=0.1, loss_type="sigmoid",
                        precompute_ref_log_probs=False, max_length=8192)
        tiny = Dataset.from_dict({"prompt": ["hello world"] * 2, "chosen": [" yes"] * 2, "rejected": [" no"] * 2})
        ref = frozen_copy(policy, torch.bfloat16 if mixed else torch.float32)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=tiny, processing_class=tok)
        reps = total + 2  # the same pairs at every step (pre-tokenised: TRL's collator pads them, outside the timing)
        trainer.train_dataset = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs] * reps, "chosen_ids": [c for _, c, _ in pairs] * reps,
                                                   "rejected_ids": [r for _, _, r in pairs] * reps})
    inner = trainer._compute_loss

    def recording(model, inputs, *args, **kw):  # the shapes TRL really trained on
        ids = inputs["input_ids"] if "input_ids" in inputs else torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        shapes.add(tuple(ids.shape))
        return inner(model, inputs, *args, **kw)

    trainer._compute_loss = recording
    trainer.add_callback(Timer())
    resident = start_memory(device)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert shapes == {(a["micro_rows"], P + C)}, shapes  # the same micro-batches as tokalign's, no padding
    assert len(times) == total, (len(times), total)
    return {"times": times, "losses": losses, "resident_bytes": resident, "peak_bytes": peak_memory(device),
            "params": sum(p.numel() for p in policy.parameters()), "shapes": sorted(shapes)}


# ---------------------------------------------------------------------------------------------------------- driver


def child(a: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if a["device"] == "cpu":
        torch.set_num_threads(a["threads"])
    data = fixed_batch(a)
    out = (run_tokalign if a["framework"] == "tokalign" else run_trl)(a, data)
    if a["model"]["vocab_size"] == QWEN25_05B["vocab_size"]:
        assert out["params"] == QWEN25_05B_PARAMS, out["params"]  # the hand-written config is Qwen2.5-0.5B's
    print(json.dumps({**out, "tokens": data["tokens"], "n_seqs": data["n_seqs"]}))


def run_child(a: dict, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if a["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(a["threads"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(a)], check=False, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - t0, 1)}


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, short sequences, 2 steps: a smoke run of both sides")
    p.add_argument("--algos", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    p.add_argument("--frameworks", nargs="+", default=["tokalign", "trl"], choices=["tokalign", "trl"])
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per run (default 6; --tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each run (default 2; --tiny 1)")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=None, help="default 128 (--tiny 8)")
    p.add_argument("--completion-len", dest="completion_len", type=int, default=None, help="default 384 (--tiny 8)")
    p.add_argument("--prompts", type=int, default=None, help="GRPO prompts per step (default 4; --tiny 2)")
    p.add_argument("--group", type=int, default=None, help="GRPO completions per prompt (default 8; --tiny 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--timeout", type=float, default=300, help="seconds per framework × algorithm process")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(json.loads(args.child))
    tiny = args.tiny
    for key, full, small in (("steps", 6, 1), ("warmup", 2, 1), ("prompt_len", 128, 8), ("completion_len", 384, 8),
                             ("prompts", 4, 2), ("group", 8, 2)):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    n_seqs = args.prompts * args.group
    if n_seqs % 2:
        p.error("--prompts × --group must be even (two micro-batches per step)")
    model = TINY if tiny else QWEN25_05B
    base = {k: getattr(args, k) for k in ("device", "precision", "steps", "warmup", "prompt_len", "completion_len", "prompts", "group",
                                          "threads")}
    # both algorithms: n_seqs sequences per step in two micro-batches (DPO: n_seqs / 2 pairs)
    base.update(model=model, vocab=model["vocab_size"], pairs=n_seqs // 2, micro_rows=n_seqs // 2)
    info = _versions(args.device)
    print(f"{'tiny Qwen2' if tiny else 'Qwen2.5-0.5B (random init)'} on {info['device_name']}; {args.precision}; torch {info['torch']}, "
          f"transformers {info['transformers']}, trl {info['trl']}", flush=True)
    results: dict = {"config": {k: v for k, v in base.items() if k != "model"}, "model": model, "versions": info, "runs": {}}
    failed = []
    for algo in args.algos:
        for fw in args.frameworks:
            r = run_child({**base, "algo": algo, "framework": fw}, args.timeout)
            results["runs"][f"{algo}/{fw}"] = r
            if "error" in r:
                failed.append(f"{algo}/{fw}")
                print(f"  {algo} {fw}: FAILED\n{r['error']}", file=sys.stderr, flush=True)
                continue
            t = statistics.median(r["times"][args.warmup:])
            r.update(step_s=t, tokens_per_s=r["tokens"] / t)
            print(f"  {algo} {fw}: {t:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, peak {_gib(r['peak_bytes'])} GiB "
                  f"(resident at start {_gib(r['resident_bytes'])} GiB), losses {[round(x, 4) for x in r['losses']]}, process {r['wall_s']} s",
                  flush=True)
    print(f"{n_seqs} sequences × {args.prompt_len + args.completion_len} tokens per step in 2 micro-batches of {n_seqs // 2}; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up steps")
    print("| algorithm | tokalign tokens/s | TRL tokens/s | tokalign / TRL (tokens/s) | tokalign peak GiB | TRL peak GiB | "
          "tokalign / TRL (peak memory) |")
    print("|---|---|---|---|---|---|---|")
    for algo in args.algos:
        tk, trl = results["runs"].get(f"{algo}/tokalign", {}), results["runs"].get(f"{algo}/trl", {})
        speed = f"{tk['tokens_per_s'] / trl['tokens_per_s']:.2f}×" if "tokens_per_s" in tk and "tokens_per_s" in trl else "n/a"
        mem = f"{tk['peak_bytes'] / trl['peak_bytes']:.2f}×" if tk.get("peak_bytes") and trl.get("peak_bytes") else "n/a"
        results.setdefault("ratios", {})[algo] = {"tokens_per_s": speed, "peak_memory": mem}
        print(f"| {algo} | {tk.get('tokens_per_s', float('nan')):,.0f} | {trl.get('tokens_per_s', float('nan')):,.0f} | {speed} | "
              f"{_gib(tk.get('peak_bytes'))} | {_gib(trl.get('peak_bytes'))} | {mem} |")
    print(json.dumps({"ratios": results.get("ratios"), "failed": failed}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def _versions(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"device_name": name, "torch": torch.__version__, "transformers": v("transformers"), "trl": v("trl"), "datasets": v("datasets")}


if __name__ == "__main__":
    main()
