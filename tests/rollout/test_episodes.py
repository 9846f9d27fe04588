"""Multi-turn episodes, token in, token out: the stored ids are the ids the engine consumed, environment tokens
carry loss mask 0 and get exactly zero gradient, and the trainer's log-probs of the model's tokens equal the sampler's.

A scripted stand-in engine checks the episode bookkeeping (calls parsed, results appended, budgets); the real HF and
vLLM engines run a 3-turn episode on a seeded tiny model with an environment that answers every turn with a
calculator result (a random model writes no tool calls of its own)."""

from __future__ import annotations

import pytest
import torch
from conftest import AlwaysCalculates, Scripted, often_stopping_model

from tokalign import models
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.batching import collate
from tokalign.environments.builtin import Calculator
from tokalign.environments.calls import hermes_text
from tokalign.forward import forward
from tokalign.rollout import SamplingSpec
from tokalign.rollout.episodes import EpisodeEngine, EpisodeSpec
from tokalign.rows import loads, rollout_rows, to_sample
from tokalign.train.sources import scored_seqs


class Recording:
    """An engine that records what it was asked to continue."""

    def __init__(self, engine):
        self.engine, self.consumed = engine, []

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, spec):
        self.consumed.extend(list(p) for p in prompts)
        return self.engine.generate(prompts, spec)


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("")


def _prompt(tok):
    return tok(tok.apply_chat_template([{"role": "user", "content": "1234*5678="}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def test_scripted_episode_calls_the_tool_and_answers(tok):
    call = hermes_text("calculator", {"expression": "1234*5678"})
    engine = Recording(Scripted(tok, [call, "7006652"]))
    prompt = _prompt(tok)
    (ep,) = EpisodeEngine(engine, Calculator(), max_turns=4).generate([prompt], SamplingSpec(n=1, max_new_tokens=200))[0]
    assert ep.text == "7006652" and ep.finish_reason == "stop"
    assert ep.episode["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "1234*5678"}}]
    assert ep.episode["model_turns"] == 2
    assert [m["role"] for m in ep.episode["messages"]] == ["assistant", "tool", "assistant"]
    (m0, m1, who0), (e0, e1, who1), (n0, n1, who2) = ep.episode["turns"]
    assert (who0, who1, who2) == ("model", "env", "model") and m1 == e0 and e1 == n0 and n1 == len(ep.ids)
    assert tok.decode(ep.ids[e0:e1]) == "\n<|im_start|>tool\n7006652<|im_end|>\n<|im_start|>assistant\n"
    assert ep.loss_mask == [1] * m1 + [0] * (e1 - e0) + [1] * (n1 - n0)
    assert ep.logps == [-0.5] * m1 + [0.0] * (e1 - e0) + [-0.5] * (n1 - n0)
    # what the engine consumed: the prompt, then the prompt and the episode up to the second model turn
    assert engine.consumed == [prompt, prompt + ep.ids[:n0]]
    # the sample rewards see: the final answer, and the episode in its metadata
    row = rollout_rows([{"id": "p", "prompt": '[{"role": "user", "content": "1234*5678="}]', "prompt_text": "",
                         "prompt_ids": prompt}], [[ep]])[0]
    sample = to_sample(row)
    assert sample.completion == "7006652" and sample.metadata["turns"] == 2 and len(sample.metadata["tool_calls"]) == 1


def test_budgets_end_episodes(tok):
    call = hermes_text("calculator", {"expression": "2*2"})
    n_call = len(tok(call, add_special_tokens=False)["input_ids"]) + 1
    # max_turns: a model that calls forever stops after 2 model turns
    (ep,) = EpisodeEngine(Scripted(tok, [call]), Calculator(), max_turns=2).generate([_prompt(tok)], SamplingSpec(max_new_tokens=200))[0]
    assert ep.episode["model_turns"] == 2 and ep.finish_reason == "stop" and ep.loss_mask[-1] == 1
    # the token budget: the second turn is cut where the episode's tokens run out
    budget = n_call + 20
    (ep,) = EpisodeEngine(Scripted(tok, [call]), Calculator(), max_turns=5, max_tokens=budget).generate(
        [_prompt(tok)], SamplingSpec(max_new_tokens=200))[0]
    assert len(ep.ids) == budget and ep.finish_reason == "length"
    # a turn cut by max_new_tokens (finish "length" from the engine) ends the episode
    (ep,) = EpisodeEngine(Scripted(tok, ["1" * 5]), Calculator()).generate([_prompt(tok)], SamplingSpec(max_new_tokens=200))[0]
    assert ep.episode["model_turns"] == 1 and ep.finish_reason == "stop" and ep.loss_mask == [1] * len(ep.ids)


def test_episode_spec_defaults():
    spec = SamplingSpec(max_new_tokens=10)
    assert EpisodeSpec().budget(spec) == 10 and EpisodeSpec("calculator", 3).budget(spec) == 30
    assert EpisodeSpec("calculator", 3, 17).budget(spec) == 17
    engine = object()
    assert EpisodeSpec().wrap(engine) is engine and EpisodeSpec().tools() is None
    assert EpisodeSpec("calculator").tools()[0]["function"]["name"] == "calculator"


def _three_turns(engine, tok, model):
    """Run a 3-turn episode (n=2) through ``engine`` and check ids, mask, gradient and the log-prob gap."""
    recording = Recording(engine)
    prompt = _prompt(tok)
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    episodes = EpisodeEngine(recording, AlwaysCalculates(), max_turns=3, max_tokens=200).generate([prompt], spec)[0]
    rows = rollout_rows([{"id": "p", "prompt": '[{"role": "user", "content": "1234*5678="}]', "prompt_text": "",
                          "prompt_ids": prompt}], [episodes])
    for ep in episodes:
        model_turns = [t for t in ep.episode["turns"] if t[2] == "model"]
        assert ep.episode["turn_rewards"][:2] == [0.5, 0.5]
        env_turns = [t for t in ep.episode["turns"] if t[2] == "env"]
        assert len(env_turns) == len(model_turns) - 1
        if ep.finish_reason == "stop":  # every turn ended by a stop token: all three turns were taken
            assert len(model_turns) == 3
        for s, e, who in ep.episode["turns"]:
            assert ep.loss_mask[s:e] == [int(who == "model")] * (e - s)
    # what the engine consumed: the prompt once (n samples), then each episode's prompt and stored ids up to the start
    # of each later model turn, and nothing else
    expected = [prompt] + [prompt + ep.ids[:s] for ep in episodes for s, _, who in ep.episode["turns"][1:] if who == "model"]
    assert sorted(map(tuple, recording.consumed)) == sorted(map(tuple, expected))
    assert any(ep.episode["model_turns"] == 3 for ep in episodes), [ep.episode["turns"] for ep in episodes]

    for r, reward in zip(rows, (1.0, 0.0)):
        r["reward"] = reward
    batch = collate(scored_seqs(rows, [0, 0]), tok.pad_token_id)
    mask = batch.completion_mask
    env_positions = torch.zeros_like(mask, dtype=torch.bool)
    for i, ep in enumerate(episodes):
        start = len(prompt) - 1
        for s, e, who in ep.episode["turns"]:
            if who == "env":
                env_positions[i, start + s : start + e] = True
    assert env_positions.any() and (mask[env_positions] == 0).all() and (mask[~env_positions & (batch.fields["sampler_logps"] != 0)] == 1).all()

    model.train()
    out = forward(model, batch, keep_logits=True)
    out.logits.retain_grad()
    batch.fields["old_logps"] = out.logps.detach()
    algo = GRPO(GRPOConfig(beta=0.0))
    loss = algo.loss(algo.prepare(batch), out).loss
    loss.backward()
    grad = out.logits.grad.abs().sum(-1)
    assert (grad[env_positions] == 0).all(), "environment tokens must get exactly zero gradient"
    assert (grad[mask.bool()] > 0).any()
    gap = ((out.logps.detach() - batch.fields["sampler_logps"]).abs() * mask).max()
    assert gap < 1e-3, f"trainer vs sampler log-prob gap {gap:.2e} on model tokens"


def test_three_turn_episode_hf(tmp_path, tok):
    from tokalign.rollout.hf import HFEngine

    torch.manual_seed(0)
    path = often_stopping_model(tmp_path / "m", tok)
    model = models.load_model(path)
    _three_turns(HFEngine(model, tok), tok, model)


@pytest.mark.vllm
def test_three_turn_episode_vllm(tmp_path, tok):
    pytest.importorskip("vllm")
    from tokalign.rollout.vllm_engine import VLLMEngine

    path = often_stopping_model(tmp_path / "m", tok)
    model = models.load_model(path)
    engine = VLLMEngine(path, tok, max_model_len=256, seed=0)
    with torch.no_grad():  # a trained step's weights, pushed into the engine: the gap is checked after a sync
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.sync(model)
    _three_turns(engine, tok, model)


def test_rows_keep_the_episode(tok):
    call = hermes_text("calculator", {"expression": "2*3"})
    eps = EpisodeEngine(Scripted(tok, [call, "6"]), Calculator()).generate([_prompt(tok)], SamplingSpec(max_new_tokens=200))[0]
    row = rollout_rows([{"id": "p", "prompt": "[]", "prompt_text": "", "prompt_ids": _prompt(tok)}], [eps])[0]
    assert row["loss_mask"] == eps[0].loss_mask and loads(row["episode"])["model_turns"] == 2
