"""Peak memory of the loss path: full-vocabulary TDPO and AlignDistil vs plain DPO on the same batch (vocab 32k).

Each method runs in a fresh process: a random tiny Qwen2 with a 32,768-token vocabulary, one batch of
preference pairs through tokalign's own train-loop pieces (collate → reference log-probs → policy
forward → loss → backward). Reported: the process's peak RSS above its RSS just before the step
(CPU; on CUDA the same script reports torch.cuda.max_memory_allocated). Usage:

    python benchmarks/fullvocab_memory.py [--pairs 8] [--len 64] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from tokalign import registry
from tokalign.batching import Seq, collate
from tokalign.forward import forward, frozen_logps, reference_logits
args = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=args["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
policy, ref = Qwen2ForCausalLM(cfg), Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
g = torch.Generator().manual_seed(1)
seqs = []
for i in range(args["pairs"]):
    prompt = torch.randint(0, args["vocab"], (16,), generator=g).tolist()
    for chosen in (1.0, 0.0):
        seqs.append(Seq(prompt, torch.randint(0, args["vocab"], (args["len"],), generator=g).tolist(), i, row={"is_chosen": chosen}))
batch = collate(seqs, 0)
cls = registry.load("algorithm", args["algo"])
algo = cls(cls.Config())
dev = "cuda" if torch.cuda.is_available() else "cpu"
policy, ref = policy.to(dev), ref.to(dev)
batch.input_ids, batch.attention_mask, batch.completion_mask = batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.completion_mask.to(dev)
batch.fields = {k: v.to(dev) for k, v in batch.fields.items()}
extra = {role: Qwen2ForCausalLM(cfg).to(dev).eval().requires_grad_(False) for role in algo.needs.models}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch.fields["ref_logps"] = frozen_logps(ref, batch, 0)
for role, m in extra.items():
    batch.fields[role + "_logps"] = frozen_logps(m, batch, 0)
out = forward(policy, batch, keep_logits=algo.needs.full_vocab)
if algo.needs.full_vocab:
    out.ref_logits = reference_logits(ref, batch)
    out.extra_logits = {role: reference_logits(m, batch) for role, m in extra.items()}
loss = algo.loss(batch, out).loss
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cuda = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
grad = float(torch.norm(torch.stack([p.grad.norm() for p in policy.parameters() if p.grad is not None])))
assert grad > 0, "no gradient reached the policy: the measurement would be meaningless"
print(json.dumps({"algo": args["algo"], "loss": float(loss), "grad_norm": grad, "peak_rss_delta_mib": (peak - before) / 1024, "cuda_peak_mib": cuda}))
"""


def run(algo: str, args) -> dict:
    payload = json.dumps({"algo": algo, "pairs": args.pairs, "len": args.len, "vocab": args.vocab})
    # Large blocks straight from mmap (and back to the OS when freed), one malloc arena: peak RSS then follows the
    # live tensors instead of glibc's caching, which otherwise makes repeated runs differ by ±30%.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    args = p.parse_args()
    rows = [run(a, args) for a in ("dpo", "tdpo", "tdpo1", "aligndistil")]
    base = rows[0]["peak_rss_delta_mib"]
    print(f"vocab {args.vocab}, {args.pairs} pairs × {args.len} completion tokens (+16 prompt)")
    for r in rows:
        print(f"  {r['algo']:11s} loss {r['loss']:.4f}  grad norm {r['grad_norm']:.3g}  peak RSS +{r['peak_rss_delta_mib']:8.1f} MiB  ({r['peak_rss_delta_mib'] / base:.2f}× DPO)")


if __name__ == "__main__":
    main()
