"""LoRA through PEFT: the reference is the base with the adapter switched off (no second copy of the weights), the
merged weights equal PEFT's own merge, and the saved adapter loads in plain PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from torch.testing import assert_close

peft = pytest.importorskip("peft")


def _lora_model(path, seed=0):
    from transformers import AutoModelForCausalLM

    from tokalign.config import TrainSection
    from tokalign.train import lora

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)  # LoRA's A matrices are drawn at wrap time
    model = lora.wrap(base, TrainSection(lora_r=4))
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_adapter_off_is_the_base_model_and_shares_its_weights(tiny_model):
    from transformers import AutoModelForCausalLM

    from tokalign.train import lora

    model = _lora_model(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    x = torch.randint(0, 200, (2, 7))
    ref = lora.AdapterOff(model)
    assert_close(ref(input_ids=x).logits, base(input_ids=x).logits)
    assert (model(input_ids=x).logits - base(input_ids=x).logits).abs().max() > 1e-4  # the adapter does something
    assert {p.data_ptr() for p in ref.parameters()} == {p.data_ptr() for p in model.parameters()}
    assert lora.reference_or_none(model, True, "") is not None and lora.reference_or_none(model, True, "other/ref") is None


@pytest.mark.parametrize("where", ["tokalign.train.lora", "tokalign.rollout.weights"])
def test_merged_state_dict_equals_peft_merge(tiny_model, where):
    """What the trainer saves (train.lora) and what a vLLM engine is synced with (rollout.weights)."""
    import importlib

    mod = importlib.import_module(where)
    model = _lora_model(tiny_model)
    assert mod.is_lora(model)
    merged = mod.merged_state_dict(model)
    reference = _lora_model(tiny_model).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for k in reference:
        assert_close(merged[k], reference[k])


@pytest.mark.slow
def test_cli_lora_grpo_one_copy_and_adapter_loads_in_peft(tmp_path):
    """GRPO with β > 0 needs a reference: with LoRA the run holds one copy of the weights (+ the adapter), the full
    run two. The artifact's merged model and its adapter (loaded with plain PEFT on the base) give the same logits."""
    from transformers import AutoModelForCausalLM

    from tokalign.models import BUNDLED_MODEL

    common = ["train", "grpo", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--set", "algorithm.beta=0.04", "--quiet"]
    cli(*common, "--set", "train.lora_r=8", "--set", "train.lr=1e-2", "--out", str(tmp_path / "lora"))
    cli(*common, "--out", str(tmp_path / "full"))
    lora_m = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    full_m = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["kl"] >= 0 for m in lora_m)
    assert lora_m[0]["memory/model_bytes"] < 0.6 * full_m[0]["memory/model_bytes"]
    base = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "lora" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora", dtype=torch.float32)
    x = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        assert_close(adapted(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-4, rtol=1e-4)
        assert (merged(input_ids=x).logits - AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL)(input_ids=x).logits).abs().max() > 1e-4


def test_target_modules_list(tiny_model):
    """`train.lora_target_modules: q_proj,v_proj` adapts exactly those projections (a comma-separated list, as the
    config documents), "all-linear" every linear layer but the head."""
    from transformers import AutoModelForCausalLM

    from tokalign.config import TrainSection
    from tokalign.train import lora

    def adapted(names):
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                          TrainSection(lora_r=4, lora_target_modules=names))
        return {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}

    assert adapted("q_proj, v_proj") == {"q_proj", "v_proj"}
    assert {"q_proj", "v_proj", "down_proj"} <= adapted("all-linear") and "lm_head" not in adapted("all-linear")
