"""Rollouts with transformers ``generate`` on an in-memory model (the live policy during online training)."""

from __future__ import annotations

import torch

from tokalign.forward import autocast
from tokalign.rollout import Completion, SamplingSpec, cut_at_stop, stop_ids


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # prompts per generate call (each expanded n times)

    def sync(self, model) -> None:
        """Nothing to push: this engine samples from the trained model itself (None: no sync time to report)."""
        return None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        from transformers import GenerationConfig

        stops = stop_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        sample = spec.temperature > 0
        gen_cfg = GenerationConfig(
            do_sample=sample,
            temperature=spec.temperature if sample else None,
            top_p=spec.top_p if sample else None,
            top_k=0 if sample else None,  # the full distribution, like vLLM's default
            num_return_sequences=spec.n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(stops),
            return_dict_in_generate=True,
            output_scores=True,
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
                with autocast(device):  # the trainer's mixed precision, if any
                    res = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, max_new_tokens=new_tokens)
                new = res.sequences[:, width:]
                # scores are the processed logits actually sampled from (temperature, top-p applied)
                logps = torch.stack(
                    [torch.log_softmax(s.float(), -1).gather(-1, new[:, i : i + 1]).squeeze(-1) for i, s in enumerate(res.scores)],
                    dim=1,
                )
                rows = [cut_at_stop(new[r].tolist(), logps[r].tolist(), stops, self.tokenizer) for r in range(new.shape[0])]
                out.extend(rows[i * spec.n : (i + 1) * spec.n] for i in range(len(chunk)))
        finally:
            self.model.train(was_training)
        return out
