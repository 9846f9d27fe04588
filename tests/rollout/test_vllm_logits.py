"""Decoding hooks in the vLLM engine (run in the vllm venv: .ci/vllm-venv.sh): a banned token is never sampled through
the CLI with --backend vllm, the sampler log-probs are those of the steered distribution (the same chain the HF engine
runs, tests/rollout/test_logits_processors.py), and a steered engine leaves unsteered requests alone.

One steered engine on the bundled model is shared by the module (the CLI test builds its own in its subprocess).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cli
from test_logits_processors import (
    BAN_ONE,
    arith_prompts,
    count_token,
    steered_logps,
    steering,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("vllm")
    from tokalign import models
    from tokalign.rollout.vllm_engine import VLLMEngine

    tok = models.load_tokenizer("")
    chain = steering(tok)
    engine = VLLMEngine(str(models.resolve_model("")[0]), tok, max_model_len=128, processors=chain)
    return engine, chain, models.load_model("").eval()


def test_vllm_sampler_logps_are_the_steered_distributions(setup):
    from tokalign.rollout import SamplingSpec

    engine, chain, model = setup
    prompts = arith_prompts(engine.tokenizer)
    out = engine.generate(prompts, SamplingSpec(n=3, temperature=0.7, max_new_tokens=8, seed=2))
    for prompt, group in zip(prompts, out):
        for c in group:
            torch.testing.assert_close(torch.tensor(c.logps), steered_logps(model, prompt, c.ids, chain, 0.7), atol=1e-3, rtol=0)


def test_a_steered_engine_leaves_unsteered_requests_alone(setup):
    """The same cached engine, through a VLLMEngine without processors: the model's own log-probs."""
    from tokalign import decoding
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine

    engine, _, model = setup
    plain = VLLMEngine(str(engine.llm.model_config.model), engine.tokenizer, max_model_len=128)
    assert plain.llm is engine.llm
    prompts = arith_prompts(engine.tokenizer, 2)
    for prompt, group in zip(prompts, plain.generate(prompts, SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=4))):
        for c in group:
            torch.testing.assert_close(torch.tensor(c.logps), steered_logps(model, prompt, c.ids, decoding.Chain(), 1.0),
                                       atol=1e-3, rtol=0)


def test_vllm_greedy_is_steered_too(setup):
    from tokalign import decoding
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine

    engine, _, model = setup
    prompt = arith_prompts(engine.tokenizer, 1)
    with torch.no_grad():
        top2 = model(torch.tensor(prompt)).logits[0, -1].topk(2).indices.tolist()
    ban = decoding.resolve(["ban_tokens"], {"ban_tokens": {"ids": [top2[0]]}}).bind(engine.tokenizer)
    steered = VLLMEngine(str(engine.llm.model_config.model), engine.tokenizer, max_model_len=128, processors=ban)
    c = steered.generate(prompt, SamplingSpec(n=1, temperature=0.0, max_new_tokens=6))[0][0]
    assert c.ids[0] == top2[1] and top2[0] not in c.ids


def test_rollout_cli_vllm_never_samples_a_banned_token(setup, tmp_path):
    """"1" is frequent in the bundled model's unsteered samples (the shared engine, unsteered), absent with ban_tokens
    through the CLI."""
    from tokalign import artifacts
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.vllm_engine import VLLMEngine

    engine, _, _ = setup
    one = engine.tokenizer.get_vocab()["1"]
    cli("prepare", "arith", "--limit", "16", "--out", str(tmp_path / "P"))
    rows = artifacts.read(tmp_path / "P", ["prompts"]).rows()
    plain = VLLMEngine(str(engine.llm.model_config.model), engine.tokenizer, max_model_len=128)
    unsteered = plain.generate([list(r["prompt_ids"]) for r in rows], SamplingSpec(n=4, max_new_tokens=8, seed=0))
    assert sum(c.ids.count(one) for group in unsteered for c in group) >= 10
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--backend", "vllm", "--out", str(tmp_path / "R"), *BAN_ONE)
    banned = artifacts.read(tmp_path / "R", ["rollouts"]).rows()
    assert len(banned) == 64 and count_token(banned, one) == 0
    assert all(len(r["sampler_logps"]) == len(r["completion_ids"]) > 0 for r in banned)


def test_online_train_with_vllm_samples_steered(setup, tmp_path):
    """Online GRPO on the vllm backend with a banned token: the engine takes the trainer's weights each step and keeps
    steering; the sampler's log-probs (steered) and the trainer's (the model's) then differ, which the mismatch
    metrics show."""
    import json

    cli("train", "grpo", "--data", "arith", "--backend", "vllm", "--max-steps", "1", "--batch-size", "4", "--n", "4",
        "--set", "algorithm.mismatch_correction=token", "--out", str(tmp_path / "C"), "--quiet", *BAN_ONE)
    manifest = json.loads((tmp_path / "C" / "manifest.json").read_text())
    assert any(p["kind"] == "logits_processor" and p["name"] == "ban_tokens" for p in manifest["plugins"])
    step = json.loads((tmp_path / "C" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["mismatch/logp_gap_abs"] > 0.01
