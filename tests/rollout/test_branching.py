"""Branching rollouts (tokalign/rollout/branching.py): a prompt's n episodes grown as a tree that forks where the
environment answered — ARPO's entropy-triggered forks and PORTool's tree. Without forks they sample exactly what
plain episodes do; with forks every group still ends with n episodes, forked ones share their history token for token,
and a fork's environment state is its own."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import AlwaysCalculates, Scripted, often_stopping_model

from tokalign import models
from tokalign.environments.base import Environment, Reply
from tokalign.errors import UserError
from tokalign.rollout import Completion, SamplingSpec, branching, top_entropy
from tokalign.rollout.episodes import EpisodeEngine, EpisodeSpec


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("")


def _prompts(tok, k=2):
    return [tok(tok.apply_chat_template([{"role": "user", "content": f"{i}*7="}], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"] for i in range(k)]


def _strategy(name, vocab, **options):
    return branching.make(name, options, vocab)


def _same(a, b):
    assert [[(c.ids, c.logps, c.loss_mask, c.finish_reason) for c in g] for g in a] == \
        [[(c.ids, c.logps, c.loss_mask, c.finish_reason) for c in g] for g in b]


def test_no_forks_is_plain_episodes_hf(tmp_path, tok):
    """entropy with initial = n and tree with forks = 1 sample exactly what independent episodes do (same engine calls,
    same seeds), on the real HF engine."""
    from tokalign.rollout.hf import HFEngine

    torch.manual_seed(0)
    model = models.load_model(often_stopping_model(tmp_path / "m", tok))
    spec = SamplingSpec(n=3, max_new_tokens=48, seed=5)
    prompts = _prompts(tok)

    def run(strategy):
        torch.manual_seed(1)
        return EpisodeEngine(HFEngine(model, tok), AlwaysCalculates(), max_turns=3, branching=strategy).generate(prompts, spec)

    plain = run(None)
    assert all(len(g) == 3 for g in plain) and any(c.episode["model_turns"] > 1 for g in plain for c in g)
    _same(plain, run(_strategy("entropy", len(tok), initial=3)))
    _same(plain, run(_strategy("tree", len(tok), forks=1)))


class Counter(Environment):
    """Counts the model turns of its episode in its state (a fork must not share its parent's counter)."""

    name = "counter"

    def start(self, row):
        return {"turns": 0}

    def step(self, state, text):
        state["turns"] += 1
        return Reply([{"role": "user", "content": f"turn {state['turns']} done"}], info={"seen": state["turns"]})


class Numbered:
    """A stand-in engine: each completion says a fresh number (so every sample differs), entropy ``entropy`` a token."""

    def __init__(self, tokenizer, entropy=0.0):
        self.tokenizer, self.count, self.entropy = tokenizer, 0, entropy

    def generate(self, prompts, spec):
        out = []
        for _ in prompts:
            group = []
            for _ in range(spec.n):
                self.count += 1
                ids = self.tokenizer(f"s{self.count}", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                ent = [self.entropy] * min(spec.entropy_tokens, len(ids)) if spec.entropy_tokens else None
                group.append(Completion(ids, [-0.5] * len(ids), "stop", f"s{self.count}", entropy=ent))
            out.append(group)
        return out


def assert_forks_share_history(groups):
    """Forked episodes share the ids of their history exactly: a forked one's prefix up to its fork is another's."""
    for g in groups:
        for c in g:
            k = c.episode.get("forked_at", 0)
            if k:
                cut = [t for t in c.episode["turns"] if t[2] == "model"][k - 1][1]
                assert any(o is not c and o.ids[:cut] == c.ids[:cut] for o in g)


def _segments(c, tok):
    """The episode's model turns as texts."""
    return [tok.decode(c.ids[a:b], skip_special_tokens=True) for a, b, who in c.episode["turns"] if who == "model"]


def test_tree_keeps_n_episodes_that_share_prefixes(tok):
    spec = SamplingSpec(n=4, max_new_tokens=20, seed=3)
    engine = EpisodeEngine(Numbered(tok), Counter(), max_turns=3, branching=_strategy("tree", len(tok), forks=2))
    groups = engine.generate(_prompts(tok), spec)
    for g in groups:
        assert len(g) == 4
        turns = [_segments(c, tok) for c in g]
        assert all(len(t) == 3 for t in turns)
        # 4 first turns, then each round 4 of the 8 candidates kept: some later turns follow the same history
        assert len({t[0] for t in turns}) < 4 or len({tuple(t[:2]) for t in turns}) < 4
        for c in g:  # the counter state of each episode is its own: turn k's reply says k
            texts = [m["content"] for m in c.episode["messages"] if m["role"] == "user"]
            assert texts == [f"turn {k} done" for k in range(1, len(texts) + 1)]
            a, b = c.episode["turns"][0][:2]
            assert c.loss_mask[a:b] == [1] * (b - a)
        assert any(c.episode.get("forked_at", 0) > 0 for c in g)
    assert_forks_share_history(groups)


def test_entropy_forks_fill_the_group(tok):
    """ARPO's rule: initial n/2, forks while the group has fewer than n; a group whose episodes all end gets fresh
    ones from the prompt. Every group ends with exactly n episodes."""
    spec = SamplingSpec(n=6, max_new_tokens=20, seed=1)
    for entropy in (0.0, 2.0):
        engine = EpisodeEngine(Numbered(tok, entropy), Counter(), max_turns=2, branching=_strategy("entropy", len(tok)))
        groups = engine.generate(_prompts(tok, 3), spec)
        assert [len(g) for g in groups] == [6, 6, 6]
        forked = sum(1 for g in groups for c in g if c.episode.get("forked_at"))
        assert 0 < forked <= 9  # 3 initial per group, at most 3 more each


def test_entropy_rule_by_hand(tok):
    """P(fork) = P(clip(U − β·ΔH, 0, 1) ≤ τ): with ΔH = 0 it is τ; a rise in entropy makes forks likelier."""
    strat = _strategy("entropy", len(tok), beam=2, threshold=0.5, entropy_weight=0.2)

    class Ep:
        def __init__(self, first, last):
            self.turn_entropies = [first, last]

    rng = random.Random(0)
    draws = [random.Random(0).random() for _ in range(1)]
    g = branching.Group(n=8, episodes=[Ep(0, 0)], open=[Ep(0, 0)])
    (ep, copies), = strat.expand(g, rng)
    assert copies == 1 + (draws[0] <= 0.5)
    # ΔH = 5 → U − 1 ≤ 0.5 always: every open episode forks (while the group has room)
    g = branching.Group(n=3, episodes=[Ep(0, 5), Ep(0, 5)], open=[Ep(0, 5), Ep(0, 5)])
    assert [c for _, c in strat.expand(g, random.Random(1))] == [2, 1]  # one slot left
    # the turn entropy: the sum of the first tokens' top-k entropies over log |V|
    assert strat.turn_entropy([1.0, 2.0]) == pytest.approx(3.0 / torch.log(torch.tensor(float(len(tok)))).item())
    assert top_entropy([0.0]) == 0.0 and top_entropy([float("-inf"), -1.0]) == pytest.approx(torch.exp(torch.tensor(-1.0)).item())


def test_hf_engine_records_entropy(tmp_path, tok):
    from tokalign.rollout.hf import HFEngine

    torch.manual_seed(0)
    model = models.load_model(often_stopping_model(tmp_path / "m", tok))
    prompt = _prompts(tok, 1)
    (c,), = HFEngine(model, tok).generate(prompt, SamplingSpec(n=1, max_new_tokens=5, seed=0, entropy_tokens=3))
    assert c.entropy is not None and len(c.entropy) == min(3, len(c.ids))
    # the first position's top-10 entropy, recomputed from the model's logits
    with torch.no_grad():
        logits = model(torch.tensor([prompt[0]])).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(10).values
    assert c.entropy[0] == pytest.approx(float(-(top.exp() * top).sum()), abs=1e-4)
    (plain,), = HFEngine(model, tok).generate(prompt, SamplingSpec(n=1, max_new_tokens=5, seed=0))
    assert plain.entropy is None


def test_bad_branching_is_one_line(tok):
    with pytest.raises(UserError, match="needs an environment"):
        EpisodeSpec("", branching="tree").check()
    with pytest.raises(UserError, match="Unknown rollout branching 'trees'"):
        EpisodeSpec("calculator", branching="trees").check()
    with pytest.raises(UserError, match="rollout.branch_options.width"):
        EpisodeSpec("calculator", branching="tree", branch_options=(("width", 3),)).check()
    with pytest.raises(UserError, match="forks must be"):
        EpisodeSpec("calculator", branching="tree", branch_options=(("forks", 0),)).check()


def test_scripted_tree_matches_tool_episode(tok):
    """With a real tool environment the fork copies the conversation: both branches hold the same call and result."""
    from tokalign.environments.builtin import Calculator
    from tokalign.environments.calls import hermes_text

    call = hermes_text("calculator", {"expression": "6*7"})
    engine = EpisodeEngine(Scripted(tok, [call, "42"]), Calculator(), max_turns=3, branching=_strategy("tree", len(tok), forks=2))
    (g,) = engine.generate(_prompts(tok, 1), SamplingSpec(n=2, max_new_tokens=60))
    assert len(g) == 2 and all(c.text == "42" for c in g)
    assert all(c.episode["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "6*7"}}] for c in g)


ALWAYS_ENV = '''
from tokalign.environments.base import Environment, Reply


class Always(Environment):
    name = "always"

    def step(self, state, text):
        return Reply([{"role": "user", "content": "go on"}])
'''


@pytest.mark.slow
def test_tree_rollouts_through_the_cli(tmp_path):
    """prepare | rollout --branching tree | score | train portool, as a user chains them (an environment of one's own,
    --env module:attr, that always answers: the bundled model makes no tool calls on arith prompts)."""
    import json

    import pyarrow.parquet as pq
    from conftest import sh

    (tmp_path / "always_env.py").write_text(ALWAYS_ENV)
    res = sh("export PYTHONPATH=$PWD; tokalign prepare arith --limit 4 -o p.prompts | tokalign rollout --env always_env:Always "
             "--branching tree --n 4 --max-turns 3 --max-new-tokens 8 -o r.rollouts | tokalign score -o s.scored "
             "&& tokalign train portool --data s.scored --max-steps 1 -o ck -q", tmp_path)
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(next((tmp_path / "r.rollouts").glob("*.parquet"))).to_pylist()
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert len(by_prompt) == 4 and all(len(g) == 4 for g in by_prompt.values())
    assert any(json.loads(r["episode"]).get("forked_at") for r in rows)
    config = json.loads((tmp_path / "r.rollouts" / "manifest.json").read_text())["config"]
    assert config["branching"] == "tree" and config["env"] == "always_env:Always"
    metrics = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert "portool/fork_advantage_abs_mean" in metrics[-1]


@pytest.mark.vllm
def test_vllm_entropy_and_branching(tmp_path, tok):
    """vLLM's top-10 log-probs give the same first-token entropy as the HF engine's logits, and a branching episode
    group runs on it (forks share their history, every group ends with n)."""
    pytest.importorskip("vllm")
    from tokalign.rollout.vllm_engine import VLLMEngine

    path = often_stopping_model(tmp_path / "m", tok)
    engine = VLLMEngine(path, tok, max_model_len=256, seed=0)
    prompt = _prompts(tok, 1)
    (c,), = engine.generate(prompt, SamplingSpec(n=1, max_new_tokens=5, seed=0, entropy_tokens=3))
    model = models.load_model(path)
    with torch.no_grad():
        logits = model(torch.tensor([prompt[0]])).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(10).values
    assert c.entropy is not None and c.entropy[0] == pytest.approx(float(-(top.exp() * top).sum()), abs=1e-3)
    spec = SamplingSpec(n=4, max_new_tokens=12, seed=2)
    groups = EpisodeEngine(engine, AlwaysCalculates(), max_turns=3, branching=_strategy("entropy", len(tok), initial=2)).generate(
        _prompts(tok), spec)
    assert [len(g) for g in groups] == [4, 4]
    assert_forks_share_history(groups)


def test_bad_branching_flags_are_one_line_and_write_nothing(tmp_path):
    from conftest import cli

    cli("prepare", "arith", "--limit", "2", "-o", str(tmp_path / "p.prompts"))
    for flags, says in ((["--env", "calculator", "--branching", "tree", "--branch-opt", "forks"], "--branch-opt expects key=value (e.g. --branch-opt forks=3)"),
                        (["--env", "calculator", "--branching", "tree", "--branch-opt", "width=2"], "rollout.branch_options.width"),
                        (["--branching", "tree"], "needs an environment"),
                        (["--env", "calculator", "--branching", "beam"], "Unknown rollout branching 'beam'")):
        res = cli("rollout", str(tmp_path / "p.prompts"), *flags, "-o", str(tmp_path / "r.rollouts"), check=False)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.rollouts").exists()
