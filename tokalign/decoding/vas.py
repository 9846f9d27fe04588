"""Logits processor ``vas`` — Value Augmented Sampling, from "Value Augmented Sampling for Language Model Alignment and
Personalization", Han, Shenfeld, Srivastava, Kim, Agrawal 2024, arXiv:2405.06639; official code
idanshen/Value-Augmented-Sampling (``vas_trainer.py``: ``VASLogitsProcessor``, ``VASTrainer.step``; ``vas_config.py``;
``tinyllama_hh.py``). Decode-time alignment of a frozen LM: a value model V_φ, trained on the frozen LM's scored samples
(``tokalign train vas``, ``tokalign.algorithms.vas``), re-weights the LM's top-k next tokens. The LM is never trained.

Value model: a causal LM trunk (any architecture sharing the policy's tokenizer; the official uses TinyLlama-1.1B to
steer Llama-2-7B) with a scalar head on its final hidden state — tokalign's critic head, ``value_head.safetensors``
(Linear(H, 1)) beside the ``save_pretrained`` weights, the directory ``train vas`` writes. V(s) is the head on the
hidden state after the last token of s.

Shapes, per step: ``logits`` z [B, V] (after the processors before this one, before temperature and top-p); the top-k
candidates K_b [B, k] of each row by z; the states s_b = prompt_b ⊕ output_b; Q [B, k]:

    Q(s_b, a)  = V_φ(s_b ⊕ a)                    for a ∈ K_b   (B·k sequences through the value model, one forward)
    Q̃(s_b, a) = Q(s_b, a) − mean_{a' ∈ K_b} Q(s_b, a')          (centred over the row's top-k, as the official)
    z'_ba      = z_ba + β Q̃(s_b, a)   for a ∈ K_b;   z'_ba = z_ba otherwise (left as they are, not −inf: the official)

so after the engine's temperature T, π(a | s) ∝ π_base(a | s)^{1/T} · exp(β Q̃ / T); at T = 1, π ∝ π_base · exp(β Q)
on the top-k (the centring is a constant per row there, but it moves the top-k's mass against the rest).

Defaults: ``topk`` 20 (``VASLogitsProcessor(topk=20)``), ``beta`` 1.0 (``VASTrainer.generate(beta=1.0)``; the
official example decodes with β = 3.0, and the paper sweeps β). ``batch_rows`` bounds the sequences per forward (the
official's ``topk_per_device_batch_size`` = 1 candidate per forward, memory only). Limiting case: β = 0 returns the
logits unchanged, bit for bit, without running the value model (plain sampling).

Engines: ``hf`` — supported and tested. ``vllm`` — the processor is a plain function of (logits, histories), so
tokalign's V1 processor runs it, with the value model in the engine's process beside vLLM on ``device`` (default: the
default device); ⚠ not run on vLLM here (no test), and vLLM's memory budget (``gpu_memory_utilization``) does not
know about the value model: lower it to make room.

Limits and departures:
* No KV cache: each step re-encodes every s_b ⊕ a from scratch (O(T²) per sample overall, ×k). The official keeps the
  value model's cache of the prefix between steps (for batch row 0's history only), which a stateless processor
  (``tokalign.protocols.LogitsProcessor``) cannot: the numbers are the same, the cost is not. Fine for small value
  models and short completions; a cached variant needs per-sequence state the engines do not give processors.
* Candidates whose logit is −inf (fewer than k allowed tokens, e.g. after ``ban_tokens``) stay −inf and are left out
  of the centring mean (the official includes them; it never has −inf logits in its top-k in practice).
* Left padding: sequences of one forward are left-padded with position ids from the attention mask (as transformers'
  generate does); ⚠ a value model whose attention ignores ``position_ids`` would see shifted positions.
* ⚠ unchecked: the paper's own equations were not read offline; the maths above is the official code's.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign.errors import UserError

HEAD_FILE = "value_head.safetensors"  # the critic head's file (tokalign.components.value_head.FILE; a test checks)


@dataclass
class VASConfig:
    model: str = ""  # the value model: a directory written by `tokalign train vas` (weights + value_head.safetensors)
    beta: float = 1.0  # β: weight of the value (official generate default 1.0; its example 3.0); 0 = plain sampling
    topk: int = 20  # k candidates per step re-weighted by the value (official default 20)
    batch_rows: int = 64  # at most this many candidate sequences per value-model forward (memory only)
    dtype: str = "float32"  # the value model's dtype
    device: str = ""  # the value model's device; empty: the default device (cuda when there is one)

    def __post_init__(self):
        if not self.model:
            raise ValueError("name the value model: model=PATH (a directory from `tokalign train vas`), e.g. "
                             "--processor-opt vas.model=V")
        if self.topk < 1:
            raise ValueError(f"topk must be ≥ 1 (the official asserts topk > 0), got {self.topk}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be ≥ 1, got {self.batch_rows}")


class ValueModel:
    """V(s) for token sequences: a causal LM trunk + the scalar head of ``value_head.safetensors``."""

    def __init__(self, model, head):
        self.model, self.head = model.eval(), head

    @classmethod
    def load(cls, path: str, dtype: str = "float32", device: str = "") -> ValueModel:
        from pathlib import Path

        import torch

        from tokalign import models

        head_file = Path(path) / HEAD_FILE
        if not head_file.is_file():
            raise UserError(f"vas: {path} has no {HEAD_FILE}; the value model is a directory written by "
                            "`tokalign train vas --data SCORED --model M --out V`.")
        model = models.load_model(path, dtype=dtype, device=device or None)
        from safetensors.torch import load_file

        state = load_file(str(head_file))
        head = torch.nn.Linear(state["weight"].shape[1], 1).to(device=next(model.parameters()).device,
                                                               dtype=state["weight"].dtype)
        head.load_state_dict(state)
        if head.in_features != model.config.hidden_size:
            raise UserError(f"vas: {head_file} is a head for hidden size {head.in_features}, the model's is "
                            f"{model.config.hidden_size}.")
        return cls(model, head.eval())

    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    def __call__(self, sequences: list[list[int]]):
        """V of each sequence [N] float32, on the model's device (one left-padded forward)."""
        import torch

        device = next(self.model.parameters()).device
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                             logits_to_keep=1)
            last = out.hidden_states[-1][:, -1]
            return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()


class VAS:
    Config = VASConfig

    def __init__(self, config: VASConfig | None = None):
        self.config = config if config is not None else VASConfig()  # no model: its ValueError names the fix
        self.value = None  # a callable: list of token-id sequences -> V [N]; loaded by bind (tests set their own)

    def bind(self, tokenizer) -> None:
        c = self.config
        if self.value is None and c.beta != 0:
            self.value = ValueModel.load(c.model, c.dtype, c.device)
        size = getattr(self.value, "vocab_size", None)
        if callable(size) and size() < len(tokenizer):
            raise UserError(f"vas: the value model {c.model} has {size()} token embeddings, fewer than this tokenizer's "
                            f"{len(tokenizer)}: the value model must share the policy's tokenizer.")

    def q_values(self, candidates, prompt_ids, output_ids):
        """Q(s_b, a) = V(prompt_b ⊕ output_b ⊕ a) for the candidates [B, k] -> [B, k] float32."""
        import torch

        rows, k = candidates.shape
        cand = candidates.tolist()
        seqs = [list(prompt_ids[b]) + list(output_ids[b]) + [a] for b in range(rows) for a in cand[b]]
        step = self.config.batch_rows
        parts = [self.value(seqs[i:i + step]).to(candidates.device) for i in range(0, len(seqs), step)]
        return torch.cat(parts).reshape(rows, k)

    def __call__(self, logits, prompt_ids, output_ids):
        import torch

        c = self.config
        if c.beta == 0:
            return logits
        if self.value is None:
            raise UserError("vas: the value model is not loaded (the engine did not call bind(tokenizer)).")
        k = min(c.topk, logits.shape[-1])
        top, cand = logits.topk(k, dim=-1)
        allowed = torch.isfinite(top)
        q = self.q_values(cand, prompt_ids, output_ids).to(logits.dtype)
        n = allowed.sum(-1, keepdim=True).clamp(min=1)
        centred = q - (q * allowed).sum(-1, keepdim=True) / n
        bonus = torch.where(allowed, c.beta * centred, torch.zeros_like(centred))
        logits.scatter_(1, cand, top + bonus)
        return logits
