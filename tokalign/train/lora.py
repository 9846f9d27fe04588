"""LoRA / QLoRA training through PEFT (``train.lora_r > 0``).

- The policy is the base model with a LoRA adapter; only the adapter trains.
- The reference model, when an algorithm needs one and no ``--ref`` is given, is the *same* model with the adapter
  switched off (``AdapterOff``): no second copy of the weights.
- The artifact holds the merged model (so ``eval``, ``rollout`` and vLLM read it like any checkpoint) and the adapter
  alone in ``<out>/adapter/`` (loads with plain ``peft.PeftModel.from_pretrained``).
- vLLM rollouts get merged weights W + ΔW computed on the fly; the trained model is never merged in place.
- ``train.lora_4bit`` loads the base in 4-bit (QLoRA) through bitsandbytes, which needs a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokalign.errors import UserError
from tokalign.rollout.weights import is_lora, merged_state_dict  # noqa: F401  (the sampler syncs the same merged weights)

ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise UserError("train.lora_r > 0 needs PEFT: pip install peft (or tokalign[lora]).") from e
    return peft


def wrap(model, t):
    """The base model with a fresh trainable LoRA adapter (a resumed run's comes back through the checkpoint)."""
    peft = _peft()
    names = t.lora_target_modules
    targets = names if names == "all-linear" else [m.strip() for m in names.split(",") if m.strip()]
    cfg = peft.LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


class AdapterOff(torch.nn.Module):
    """The LoRA policy seen as its frozen base model: every call runs with the adapter disabled and no gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # a registered submodule, but the same object as the policy: nothing is copied

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def reference_or_none(policy, needs_reference: bool, explicit_ref: str):
    """The adapter-off view when a LoRA policy needs a reference and none was named; else None (load as usual)."""
    if needs_reference and not explicit_ref and is_lora(policy):
        return AdapterOff(policy)
    return None


def save(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """The merged model at ``path`` and the adapter alone in ``path/adapter``."""
    model.save_pretrained(path / ADAPTER_DIR)
    base = model.get_base_model()
    base.save_pretrained(path, state_dict=state_dict if state_dict is not None else merged_state_dict(model))
    tokenizer.save_pretrained(path / ADAPTER_DIR)


def quantisation_config(t):
    if not t.lora_4bit:
        return None
    if not torch.cuda.is_available():
        raise UserError("train.lora_4bit (QLoRA) needs a CUDA GPU (bitsandbytes); train plain LoRA on CPU.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
