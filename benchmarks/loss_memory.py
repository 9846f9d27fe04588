"""Peak memory of the loss path (logits → log-probs → loss → backward): tokalign vs TRL 1.16, vocab 32k and 128k.

One DPO micro-batch (default 4 pairs = 8 sequences of 32 prompt + 96 completion tokens, float32) on a
random Qwen2 whose trunk is tiny (hidden 64, 1 layer), so the memory measured is that of the
vocabulary-sized tensors, i.e. of the loss path. The reference log-probs are given (precomputed) on
every side, so no reference forward is measured. Three ways of computing the same loss:

- ``tokalign``: the train loop's ``forward(model, batch, with_entropy=True)`` (the model's logits,
  ``ops.selective_log_softmax``, ``ops.entropy_from_logits``) → ``DPO.loss`` → backward: exactly what
  ``tokalign train dpo`` runs per micro-batch.
- ``trl``: TRL 1.16's own DPO path, ``DPOTrainer._compute_loss`` (precompute_ref_log_probs=True): the
  model patched with TRL's fused LM head (``add_fused_lm_head``: per-token log-probs, entropy, mean
  logits and top-1 flags from tiles of ``hidden @ W_headᵀ``, recomputed in the backward) → sigmoid
  loss → backward. This is what ``DPOTrainer`` and ``GRPOTrainer`` run; it is the comparison the goal
  refers to.
- ``trl-selective``: the model's logits → ``trl.trainer.utils.selective_log_softmax`` (+ TRL's
  ``entropy_from_logits``) → sigmoid loss → backward: TRL's standalone log-softmax function on
  materialised logits (how TRL computed log-probs before its fused head), for reference.

Method: every measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc
serves every tensor larger than 64 KiB with its own mmap and returns it to the kernel on free (the
resident set then follows live tensors instead of keeping freed heap). After the model, the inputs
and the trainer are built, the kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``);
the step runs; the reported value is ``VmHWM`` (peak RSS after the reset) minus ``VmRSS`` just before
the step: the extra memory the loss path needed at its worst moment. (tracemalloc cannot be used: it
does not see torch's CPU allocations.) Each measurement is repeated --repeats times in fresh
processes; the median is reported. Usage:

    python benchmarks/loss_memory.py [--vocabs 32768 131072] [--pairs 4] [--prompt-len 32] [--completion-len 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024  # MiB

V, P, C = args["vocab"], args["prompt_len"], args["completion_len"]
cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg).train()
g = torch.Generator().manual_seed(1)
pairs = [(torch.randint(10, V, (P,), generator=g).tolist(), torch.randint(10, V, (C,), generator=g).tolist(),
          torch.randint(10, V, (C,), generator=g).tolist()) for _ in range(args["pairs"])]
ref_seq = -torch.rand(2 * len(pairs), generator=g) * 50 - 400  # [chosen..., rejected...] sequence log-probs of the reference
beta = 0.1
side = args["side"]
if side == "tokalign":
    from tokalign.algorithms.dpo import DPO, DPOConfig
    from tokalign.batching import Seq, collate
    from tokalign.forward import forward
    seqs = []
    for i, (p, c, r) in enumerate(pairs):
        seqs += [Seq(p, c, i, row={"is_chosen": 1.0}), Seq(p, r, i, row={"is_chosen": 0.0})]
    batch = collate(seqs, 0)
    ref = torch.zeros(batch.completion_mask.shape)  # DPO only uses each row's sum: put it on the first completion token
    ref[:, P - 1] = torch.stack([ref_seq[:len(pairs)], ref_seq[len(pairs):]], 1).reshape(-1)  # rows: chosen_i, rejected_i
    batch.fields["ref_logps"] = ref
    algo = DPO(DPOConfig(beta=beta))
    def step():
        out = forward(model, batch, with_entropy=True)
        return algo.loss(batch, out).loss
else:
    ids = torch.tensor([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs])
    attn = torch.ones_like(ids)
    cmask = torch.zeros_like(ids)
    cmask[:, P:] = 1
    if side == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
        from tokalign.tiny import build_tokenizer
        tok = build_tokenizer()
        ds = Dataset.from_dict({"prompt": ["hello world"] * 2, "chosen": [" yes"] * 2, "rejected": [" no"] * 2})
        targs = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True,
                          gradient_checkpointing=False, per_device_train_batch_size=2, beta=beta, loss_type="sigmoid",
                          precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok)
        trainer.model.train()
        inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask,
                  "ref_chosen_logps": ref_seq[:len(pairs)], "ref_rejected_logps": ref_seq[len(pairs):]}
        def step():
            return trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    else:
        import torch.nn.functional as F
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
        def step():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            logps = selective_log_softmax(logits, ids[:, 1:])
            entropy_from_logits(logits.detach())
            seq = (logps * cmask[:, 1:]).sum(-1) - ref_seq
            chosen, rejected = seq.chunk(2)
            return -F.logsigmoid(beta * (chosen - rejected)).mean()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
loss = step()
loss.backward()
peak = status("VmHWM")
grad = float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
assert grad > 0, "no gradient reached the model: the measurement would be meaningless"
n = ids.shape if side != "tokalign" else batch.input_ids.shape
print(json.dumps({"side": side, "loss": float(loss), "grad_norm": grad, "delta_mib": peak - before, "rows": list(n),
                  "logits_mib": n[0] * (n[1] - 1) * V * 4 / 2**20}))
"""

SIDES = ("tokalign", "trl", "trl-selective")


def run(side: str, vocab: int, args) -> dict:
    payload = json.dumps({"side": side, "vocab": vocab, "pairs": args.pairs, "prompt_len": args.prompt_len,
                          "completion_len": args.completion_len, "threads": args.threads})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{side} vocab {vocab} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
    p.add_argument("--completion-len", dest="completion_len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows, summary = [], {}
    for vocab in args.vocabs:
        res = {}
        for _ in range(args.repeats):
            for side in SIDES:
                res.setdefault(side, []).append(run(side, vocab, args))
        losses = {s: res[s][0]["loss"] for s in SIDES}
        assert max(losses.values()) - min(losses.values()) < 1e-3, f"the three paths disagree on the loss: {losses}"
        med = {s: statistics.median(r["delta_mib"] for r in res[s]) for s in SIDES}
        logits = res["tokalign"][0]["logits_mib"]
        summary[vocab] = {**med, "logits_mib": logits, "ratio_vs_trl": med["tokalign"] / med["trl"],
                          "ratio_vs_trl_selective": med["tokalign"] / med["trl-selective"]}
        rows.append(f"| {vocab:,} | {med['tokalign']:,.0f} | {med['trl']:,.0f} | {med['trl-selective']:,.0f} | {logits:,.0f} | "
                    f"{med['tokalign'] / med['trl']:.2f}× | {med['tokalign'] / med['trl-selective']:.2f}× |")
    print(f"DPO loss path, {args.pairs} pairs = {2 * args.pairs} sequences × {args.prompt_len + args.completion_len} tokens, "
          f"float32; peak RSS above the pre-step RSS, MiB, median of {args.repeats} fresh processes; load {os.getloadavg()[0]:.2f}")
    print("| vocab | tokalign | TRL (fused LM head, DPOTrainer._compute_loss) | TRL selective_log_softmax on logits | "
          "one [B, L-1, V] fp32 logits tensor | tokalign / TRL | tokalign / TRL selective |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
