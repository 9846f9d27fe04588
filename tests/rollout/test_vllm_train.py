"""Online training with vLLM as the sampler (run in the vllm venv: see .ci/vllm-venv.sh): weight sync and learning.

The sync check compares vLLM's sampler log-probs with the trainer's log-probs of the *same* tokens: before a sync a
perturbed trainer disagrees with the engine, after it they agree to 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli

pytestmark = pytest.mark.vllm


def _prompts(tok, k: int = 4) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": f"{a}+{a + 1}="}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for a in range(k)]


def _trainer_logps(model, prompts, completions):
    from tokalign.batching import Seq, collate
    from tokalign.forward import frozen_logps

    seqs = [Seq(p, c.ids, g) for g, (p, group) in enumerate(zip(prompts, completions)) for c in group]
    batch = collate(seqs, 0)
    logps = frozen_logps(model, batch, 0)
    sampler = torch.zeros_like(logps)
    for i, s in enumerate(seqs):
        c = [c for group in completions for c in group][i]
        sampler[i, len(s.prompt_ids) - 1 : len(s.prompt_ids) - 1 + len(c.ids)] = torch.tensor(c.logps)
    return logps * batch.completion_mask, sampler * batch.completion_mask


def test_weight_sync_makes_the_sampler_match_the_trainer(tiny_model):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(tiny_model)
    engine = VLLMEngine(str(tiny_model), tok, max_model_len=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():  # the "trainer" moves away from the weights the engine was built with
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, spec = _prompts(tok), SamplingSpec(n=2, max_new_tokens=8, seed=3)
    trainer, sampler = _trainer_logps(model, prompts, engine.generate(prompts, spec))
    assert (trainer - sampler).abs().max() > 1e-2  # stale engine: a real disagreement
    seconds = engine.sync(model)
    trainer, sampler = _trainer_logps(model, prompts, engine.generate(prompts, spec))
    assert (trainer - sampler).abs().max() < 1e-3
    assert 0 < seconds < 30


def _pass1(stdout: str) -> float:
    return json.loads((Path(stdout.strip()) / "results.json").read_text())["pass@1"]


@pytest.mark.slow
def test_train_grpo_with_vllm_backend_learns(tmp_path):
    """`tokalign train grpo --data arith --backend vllm` on the bundled model with its recommended settings: every
    step syncs (time logged), the sampler and the trainer agree on the sampled tokens (the logged gap stays < 1e-3 —
    rollouts come from the updated weights), and pass@1 on 100 held-out prompts rises as with the HF backend."""
    out, test = tmp_path / "grpo-vllm", tmp_path / "test"
    cli("prepare", "arith", "--split", "test", "--limit", "100", "--out", str(test))
    before = _pass1(cli("eval", "--data", str(test), "--n", "4", "--out", str(tmp_path / "e0"), "--quiet").stdout)
    cli("train", "grpo", "--data", "arith", "--backend", "vllm", "--max-steps", "40", "--out", str(out), "--quiet")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 40 and all(m["time/weight_sync_s"] > 0 for m in metrics)
    assert max(m["mismatch/logp_gap_abs"] for m in metrics) < 1e-3
    after = _pass1(cli("eval", "--model", str(out), "--data", str(test), "--n", "4", "--out", str(tmp_path / "e1"), "--quiet").stdout)
    print(f"pass@1 {before:.3f} -> {after:.3f}")
    assert after > before + 0.1


def test_lora_policy_syncs_merged_weights(tiny_model):
    """A LoRA policy's merged weights (W + ΔW, computed without merging in place) go into vLLM: the sampler then agrees
    with the adapter-wrapped trainer on the sampled tokens."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign.config import TrainSection
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine
    from tokalign.train import lora

    tok = AutoTokenizer.from_pretrained(tiny_model)
    engine = VLLMEngine(str(tiny_model), tok, max_model_len=128)
    torch.manual_seed(0)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), TrainSection(lora_r=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    engine.sync(model)
    prompts = _prompts(tok)
    trainer, sampler = _trainer_logps(model, prompts, engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, seed=4)))
    assert (trainer - sampler).abs().max() < 1e-3
