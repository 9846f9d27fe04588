"""What the train-step benchmarks share: a seeded random Qwen2, batches of random tokens (fixed lengths, or a
long-tailed completion-length mix), and the train loop's own state built by hand around a model, with a source
that hands back the same batch at every step (so ``tokalign.train.loop.step_once`` times exactly one optimiser step)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch


def qwen2(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, seed: int = 0,
          max_positions: int = 4096):
    """A float32 Qwen2 with tied embeddings, initialised from ``seed`` (identical in every process)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float()


def add_model_args(parser) -> None:
    """The seeded Qwen2's shape as command-line options (the train-step benchmarks' shared defaults: 26.5M params)."""
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)


def long_tail_lengths(n: int, seed: int = 0, prompt=(16, 48), short=(4, 48), long=(224, 256), long_share: float = 0.1):
    """(prompt, completion) lengths of ``n`` sequences: completions mostly short, about ``long_share`` of them near
    the maximum — the shape of sampled chain-of-thought batches."""
    rng = random.Random(seed)
    return [(rng.randint(*prompt), rng.randint(*long) if rng.random() < long_share else rng.randint(*short)) for _ in range(n)]


class Fixed:
    """A batch source that hands back the same sequences at every step."""

    def __init__(self, seqs):
        self.seqs = seqs

    def batch(self, step):
        return list(self.seqs), {}


def bench_state(algo_name: str, train, policy, reference, seqs, max_completion_len=None):
    """The train loop's TrainState, by hand around the benchmark's models: one process, fp32, AdamW at ``train.lr``,
    a constant schedule, the algorithm's default config and its components set up."""
    from tokalign import components, registry
    from tokalign.train import distributed
    from tokalign.train.precision import resolve as resolve_precision
    from tokalign.train.state import TrainState

    class BenchState(SimpleNamespace):
        map_micro_batches = TrainState.map_micro_batches  # one process: plain micro-batching
        frozen_logps = TrainState.frozen_logps
        micro_batches = TrainState.micro_batches

        def reference_model(self):
            return reference

    cls = registry.load("algorithm", algo_name)
    algo = cls(cls.Config())
    opt = torch.optim.AdamW(policy.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    state = BenchState(cfg=SimpleNamespace(train=train), plan=SimpleNamespace(algo_name=algo_name), algorithm=algo,
                       needs=algo.needs, source=Fixed(seqs), policy=policy, tokenizer=SimpleNamespace(pad_token_id=0),
                       device=torch.device("cpu"), dist=distributed.Dist(), max_completion_len=max_completion_len,
                       forward_outputs=set(), step=0, seqs=[], params=list(policy.parameters()), optimizer=opt,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), train_model=policy, hand_reduced=[],
                       precision=resolve_precision("fp32", "cpu"), sharded_components=False)
    state.components = components.resolve(algo.needs)
    for c in state.components:
        c.setup(state)
    return state
