"""The weights a rollout engine takes from the trainer's in-memory model (``VLLMEngine.sync``).

A LoRA (PEFT) policy is handed over as W + ΔW under the plain transformers names, computed on the fly: the
trained model is never merged in place. These are pure functions of the model object (no PEFT import), so the
rollout layer needs nothing from ``tokalign.train``; ``tokalign.train.lora`` builds on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_lora(model) -> bool:
    """A PEFT model (it carries a ``peft_config``)."""
    return hasattr(model, "peft_config")


def dense(weight) -> "torch.Tensor":
    """A layer's weight as a plain dense tensor: a QLoRA base's 4-bit packed weight (bitsandbytes ``Params4bit``, which
    carries its ``quant_state``) is dequantised first — adding ΔW to the packed bytes would be garbage."""
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    return weight.detach()


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA layer's W + ΔW, under the plain transformers names (no copy of the
    model; only the adapted matrices are materialised)."""
    base = model.get_base_model()
    out = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            w = dense(module.base_layer.weight)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach()
                    w = w.to(delta.dtype) + delta
            out[f"{name}.weight"] = w
            if getattr(module.base_layer, "bias", None) is not None:
                out[f"{name}.bias"] = module.base_layer.bias.detach()
    for key, value in base.state_dict().items():
        if "lora_" in key or ".base_layer." in key:
            continue
        out.setdefault(key, value.detach())
    return out


def state_dict(model) -> dict[str, torch.Tensor]:
    """What the engine loads: the merged W + ΔW of a LoRA policy, else the model's own state dict."""
    return merged_state_dict(model) if is_lora(model) else model.state_dict()
