"""The value head component (tokalign/components/value_head.py, PPO's critic): zero-initialised, restored from a
checkpoint."""

from __future__ import annotations

import torch
from torch.testing import assert_close


def test_value_head_is_restored_from_a_checkpoint(tmp_path, tiny_model):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tokalign.components import value_head

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    head = value_head.build(policy, None)
    assert float(head.weight.detach().abs().sum()) == 0.0  # zero-initialised: first values are 0
    state = {"weight": torch.full_like(head.weight, 0.5), "bias": torch.tensor([1.5])}
    save_file(state, tmp_path / value_head.FILE)
    restored = value_head.build(policy, tmp_path)
    assert_close(restored.weight.detach(), state["weight"])
    assert float(restored.bias.detach()) == 1.5
