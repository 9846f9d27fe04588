"""Rollouts with transformers ``generate`` on an in-memory model (the live policy during online training).

Decoding hooks (``processors``, ``tokalign.decoding``) run as one logits processor before temperature and top-p."""

from __future__ import annotations

import torch

from tokalign.forward import autocast
from tokalign.rollout import ENTROPY_TOP, Completion, SamplingSpec, cut_at_stop, stop_ids


class SampledLogps:
    """A logits processor, after the temperature and top-p warpers: it sees the processed scores actually sampled from (temperature,
    top-p applied) and keeps only the log-prob of the token each sequence then took — read from the next call's
    input ids — so memory stays one [sequences, V] step (``output_scores`` would keep all of them: ~10 GB for 64 × 256
    tokens at a 152k vocabulary). ``entropy_tokens`` > 0: also the top-``ENTROPY_TOP`` entropy of the first that many
    steps (as vLLM's top-k log-probs give it)."""

    def __init__(self, prompt_width: int, entropy_tokens: int = 0):
        self.width, self.previous, self.taken = prompt_width, None, []
        self.entropy_tokens, self.entropies = entropy_tokens, []

    def _take(self, ids: torch.Tensor) -> None:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, ids[:, -1:]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids)
        self.previous = torch.log_softmax(scores.float(), -1)
        if len(self.entropies) < self.entropy_tokens:
            top = self.previous.topk(min(ENTROPY_TOP, scores.shape[-1]), dim=-1).values
            self.entropies.append(-(top.exp() * top.nan_to_num(neginf=0.0)).sum(-1))  # −inf (cut by top-p) adds 0
        return scores

    def entropy(self) -> list[list[float]] | None:
        """[sequences][first steps] top-k entropies (None when not recorded)."""
        if not self.entropy_tokens:
            return None
        return torch.stack(self.entropies, dim=1).tolist() if self.entropies else None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[sequences, new tokens] log-probs once generate returned its sequences."""
        self._take(sequences[:, : self.width + len(self.taken) + 1])
        self.previous = None
        return torch.stack(self.taken, dim=1) if self.taken else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)


class Steered:
    """The run's decoding hooks (a ``tokalign.decoding.Chain``) as one transformers logits processor, placed before
    the temperature and top-p warpers (so the recorder after them sees the steered distribution). Row r of generate's
    batch is a sample of prompt r // n (``num_return_sequences`` repeats each prompt n times in a row); its output ids
    are what follows the left-padded prompt block."""

    def __init__(self, chain, prompts: list[list[int]], n: int, width: int, temperature: float):
        self.chain, self.width, self.temperature = chain, width, temperature
        self.prompts = [p for p in prompts for _ in range(n)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.chain(scores, self.prompts, input_ids[:, self.width:].tolist(), self.temperature)


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, synced_gpus: bool = False, processors=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processors = processors  # a tokalign.decoding.Chain (bound to the tokenizer) or None: plain sampling
        self.batch_size = batch_size  # prompts per generate call (each expanded n times)
        # several processes generating through one FSDP-sharded model: every rank must run as many forward passes
        # (its gathers are collectives), so ranks that finished keep stepping until all have
        self.synced_gpus = synced_gpus

    def sync(self, model) -> None:
        """Nothing to push: this engine samples from the trained model itself (None: no sync time to report)."""
        return None

    def idle(self) -> None:
        """Nothing to free between samplings."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper

        stops = stop_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        sample = spec.temperature > 0
        # temperature and top-p as explicit processors (transformers' own), so the recorder after them sees the
        # distribution actually sampled from; generate itself then adds no warper
        warpers = ([TemperatureLogitsWarper(spec.temperature)] if spec.temperature != 1.0 else []) + (
            [TopPLogitsWarper(spec.top_p)] if spec.top_p < 1.0 else []) if sample else []
        gen_cfg = GenerationConfig(
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_p=1.0 if sample else None,
            top_k=0 if sample else None,  # the full distribution, like vLLM's default
            num_return_sequences=spec.n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(stops),
            return_dict_in_generate=True,
        )
        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[list[Completion]] = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                pad = self.tokenizer.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                # never run past the model's context: a longer request is cut (finish_reason "length")
                new_tokens = max(1, min(spec.max_new_tokens, limit - width))
                recorder = SampledLogps(width, spec.entropy_tokens)  # a fresh one per call: it holds this call's log-probs
                steer = [Steered(self.processors, chunk, spec.n, width, spec.temperature)] if self.processors else []
                with autocast(device):  # the trainer's mixed precision, if any
                    res = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, max_new_tokens=new_tokens,
                                              logits_processor=[*steer, *warpers, recorder], synced_gpus=self.synced_gpus)
                new = res.sequences[:, width:]
                logps = recorder.finish(res.sequences)
                ent = recorder.entropy()
                rows = [cut_at_stop(new[r].tolist(), logps[r].tolist(), stops, self.tokenizer, ent[r] if ent else None)
                        for r in range(new.shape[0])]
                out.extend(rows[i * spec.n : (i + 1) * spec.n] for i in range(len(chunk)))
        finally:
            self.model.train(was_training)
        return out
