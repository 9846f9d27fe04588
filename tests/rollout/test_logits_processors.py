"""Decoding hooks in the HF engine and through the CLI: a banned token is never sampled (`rollout`, `eval`, online
`train`), the sampler log-probs are those of the steered distribution (processors, per-token temperature), and the
manifests record the processors. The vLLM side is tests/rollout/test_vllm_logits.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from tokalign import artifacts, decoding

BAN_ONE = ["--logits-processor", "ban_tokens", "--processor-opt", 'ban_tokens.tokens=["1"]']


class Hot:
    """A per-token temperature: 0.5 at odd positions, the run's at even ones."""

    def __call__(self, logits, prompt_ids, output_ids):
        return logits

    def temperature(self, prompt_ids, output_ids):
        return [0.5 if len(out) % 2 else None for out in output_ids]


def steering(tok):
    """CyclicReflex on the digits 1 and 2 with a short period (so the bias changes every token), then Hot."""
    chain = decoding.resolve(["cyclic_reflex"], {"cyclic_reflex": {"tokens": ["1", "2"], "amplitude": 4.0, "period": 6.0,
                                                                   "windows": [], "end_token": ""}})
    chain.resolved.append(decoding.Resolved("hot", Hot(), None, None))
    return chain.bind(tok)


def steered_logps(model, prompt: list[int], ids: list[int], chain, temperature: float) -> torch.Tensor:
    """The log-probs of ``ids`` under the steered distribution, one position at a time: the model's logits, the chain
    with that position's history, then the run's temperature (what an engine must record as sampler_logps)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    out = []
    for t, tid in enumerate(ids):
        row = chain(logits[t : t + 1].clone(), [prompt], [ids[:t]], temperature)[0] / temperature
        out.append(torch.log_softmax(row, -1)[tid])
    return torch.stack(out)


def arith_prompts(tok, k: int = 4) -> list[list[int]]:
    from tokalign.data.render import render_prompts

    return [ids for _, ids in render_prompts(tok, [[{"role": "user", "content": f"{9 * a}+{a + 1}="}] for a in range(k)])]


def test_hf_sampler_logps_are_the_steered_distributions():
    from tokalign import models
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    tok, model = models.load_tokenizer(""), models.load_model("")
    chain = steering(tok)
    prompts = arith_prompts(tok)
    torch.manual_seed(0)
    out = HFEngine(model, tok, processors=chain).generate(prompts, SamplingSpec(n=3, temperature=0.7, max_new_tokens=8))
    for prompt, group in zip(prompts, out):
        for c in group:
            torch.testing.assert_close(torch.tensor(c.logps), steered_logps(model.eval(), prompt, c.ids, chain, 0.7),
                                       atol=1e-5, rtol=0)


def test_hf_greedy_takes_the_argmax_of_the_processed_logits():
    """Greedy with the top token banned at every step: the model's second choice, token by token."""
    from tokalign import models
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    tok, model = models.load_tokenizer(""), models.load_model("")
    prompt = arith_prompts(tok, 1)
    plain = HFEngine(model, tok).generate(prompt, SamplingSpec(n=1, temperature=0.0, max_new_tokens=6))[0][0]
    ban = decoding.resolve(["ban_tokens"], {"ban_tokens": {"ids": [plain.ids[0]]}}).bind(tok)
    steered = HFEngine(model, tok, processors=ban).generate(prompt, SamplingSpec(n=1, temperature=0.0, max_new_tokens=6))[0][0]
    with torch.no_grad():
        first = model(torch.tensor(prompt)).logits[0, -1]
    assert steered.ids[0] == int(first.topk(2).indices[1]) != plain.ids[0]
    assert plain.ids[0] not in steered.ids


def count_token(rows, token: int) -> int:
    return sum(list(r["completion_ids"]).count(token) for r in rows)


@pytest.mark.slow
def test_rollout_cli_never_samples_a_banned_token(tmp_path):
    """The bundled model answers arith prompts with digits: "1" is frequent unsteered, and absent with ban_tokens."""
    from tokalign import models

    one = models.load_tokenizer("").get_vocab()["1"]
    cli("prepare", "arith", "--limit", "16", "--out", str(tmp_path / "P"))
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--out", str(tmp_path / "R0"))
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--out", str(tmp_path / "R1"), *BAN_ONE)
    plain, banned = (artifacts.read(tmp_path / r, ["rollouts"]).rows() for r in ("R0", "R1"))
    assert count_token(plain, one) >= 10, count_token(plain, one)
    assert count_token(banned, one) == 0 and len(banned) == 64
    assert all(len(r["sampler_logps"]) == len(r["completion_ids"]) and all(lp > float("-inf") for lp in r["sampler_logps"])
               for r in banned)
    manifest = json.loads((tmp_path / "R1" / "manifest.json").read_text())
    assert manifest["config"]["logits_processors"] == [{"name": "ban_tokens", "options": {"ids": [], "tokens": ["1"]}}]
    assert {"kind": "logits_processor", "name": "ban_tokens"}.items() <= manifest["plugins"][0].items()


@pytest.mark.slow
def test_eval_and_online_train_take_logits_processors(tmp_path):
    from tokalign import models

    one = models.load_tokenizer("").get_vocab()["1"]
    cli("prepare", "arith", "--limit", "8", "--out", str(tmp_path / "P"))
    cli("eval", "--data", str(tmp_path / "P"), "--n", "4", "--out", str(tmp_path / "E"), "--quiet", *BAN_ONE)
    rows = artifacts.read(tmp_path / "E", ["eval"]).rows()
    assert len(rows) == 32 and count_token(rows, one) == 0
    assert json.loads((tmp_path / "E" / "results.json").read_text())["logits_processors"][0]["name"] == "ban_tokens"

    dry = cli("train", "grpo", "--data", "arith", "--dry-run", "--logits-processor", "cyclic_reflex",
              "--processor-opt", 'cyclic_reflex.tokens=["1"]').stdout
    assert "logits processors: cyclic_reflex (tokalign 0.1.0)" in dry
    assert "period: 1200.0" in dry  # the resolved options, defaults included

    cli("train", "grpo", "--data", "arith", "--max-steps", "1", "--batch-size", "2", "--n", "2",
        "--out", str(tmp_path / "C"), "--quiet", *BAN_ONE)
    manifest = json.loads((tmp_path / "C" / "manifest.json").read_text())
    assert manifest["config"]["rollout"]["logits_processors"] == ["ban_tokens"]
    assert any(p["kind"] == "logits_processor" and p["name"] == "ban_tokens" for p in manifest["plugins"])


@pytest.mark.slow
def test_the_docs_example_processor_through_the_cli(tmp_path):
    """docs/plugins/logits-processor.md's no_repeat, as a module:attr path: no token twice in a row."""
    import os

    from conftest import ROOT

    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "docs" / "examples" / "tokalign-mine"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cli("prepare", "arith", "--limit", "8", "--out", str(tmp_path / "P"))
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--max-new-tokens", "12", "--out", str(tmp_path / "R"),
        "--logits-processor", "tokalign_mine.processor:NoRepeat", "--processor-opt", "tokalign_mine.processor:NoRepeat.cool_after=4",
        env=env)
    rows = artifacts.read(tmp_path / "R", ["rollouts"]).rows()
    assert all(a != b for r in rows for a, b in zip(r["completion_ids"], r["completion_ids"][1:]))
    manifest = json.loads((tmp_path / "R" / "manifest.json").read_text())
    assert manifest["config"]["logits_processors"][0]["options"] == {"cool_after": 4, "cool_temperature": 0.5}
