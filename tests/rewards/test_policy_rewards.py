"""Rewards that see the policy (tokalign.rewards.policy): the view's log-probs are the model's, online the reward reads
the policy as it trains, ``score --policy`` binds a checkpoint (and keys the cache by it), and the set-ups where a
reward cannot read the policy are one line and exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import cli
from tokalign import artifacts

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": str(HERE)}


def test_view_logps_and_hidden_are_the_models(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign.rewards.policy import PolicyView

    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    view = PolicyView(model, AutoTokenizer.from_pretrained(tiny_model), step=3, micro_batch_size=2)
    prefixes, conts = [[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15], [16]]
    got, hidden = view.logps(prefixes, conts), view.hidden(prefixes, conts)
    model.eval()
    for p, c, lp, h in zip(prefixes, conts, got, hidden):
        with torch.no_grad():
            out = model(torch.tensor([p + c]), output_hidden_states=True)
        want = torch.log_softmax(out.logits[0].float(), -1)[len(p) - 1 : len(p) + len(c) - 1].gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(lp, want, atol=1e-5), (lp, want)
        assert torch.allclose(h, out.hidden_states[-1][0, len(p) - 1 : len(p) + len(c) - 1], atol=1e-5)
    assert model.training is False and view.step == 3  # restored to the mode it was in (eval here)
    with pytest.raises(ValueError, match="at least one token"):
        view.logps([[]], [[1]])


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    work = tmp_path_factory.mktemp("policy-rewards")
    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=work)
    cli("rollout", "P", "--n", "2", "--seed", "0", "--out", "R", cwd=work)
    return work


def _rows(path: Path) -> list[dict]:
    return list(artifacts.read(path, ["scored"]).rows())


def test_score_with_the_sampling_policy_gives_its_own_sampler_logps(rollouts):
    """Token in, token out: bound to the model that sampled the rollouts, the policy's mean log-prob of each sample
    equals the sampler's (stored with the rollouts)."""
    from tokalign.models import BUNDLED_MODEL

    cli("score", "R", "--reward", "policy_plugins:OwnLikelihood", "--policy", str(BUNDLED_MODEL), "--out", "S", "--overwrite",
        "--no-cache", cwd=rollouts, env=ENV)
    rows = _rows(rollouts / "S")
    assert len(rows) == 8
    for r in rows:
        want = sum(r["sampler_logps"]) / len(r["sampler_logps"])
        assert math.isclose(r["reward"], want, abs_tol=1e-4), (r["reward"], want)


def test_score_needs_a_policy_and_keys_the_cache_by_it(rollouts, tmp_path):
    from tokalign.models import BUNDLED_MODEL
    from tokalign.tiny import make_random

    out = cli("score", "R", "--reward", "policy_plugins:OwnLikelihood", "--out", "X", cwd=rollouts, env=ENV, check=False)
    assert out.returncode == 2 and "pass --policy MODEL" in out.stderr and "Traceback" not in out.stderr
    assert not (rollouts / "X").exists()
    out = cli("score", "R", "--reward", "exact_match", "--policy", str(BUNDLED_MODEL), "--out", "X", cwd=rollouts, env=ENV, check=False)
    assert out.returncode == 2 and "drop --policy" in out.stderr
    out = cli("score", "R", "--reward", "policy_plugins:OwnLikelihood", "--policy", str(BUNDLED_MODEL), "--workers", "2",
              "--out", "X", cwd=rollouts, env=ENV, check=False)
    assert out.returncode == 2 and "without --workers" in out.stderr
    # the cache on: the same samples under another policy are scored again, not served from the first one's scores
    other = make_random(tmp_path / "other", seed=1)  # another (random) model: it scores the rollouts' token ids as they are
    env = {**ENV, "TOKALIGN_CACHE": str(tmp_path / "cache")}
    cli("score", "R", "--reward", "policy_plugins:OwnLikelihood", "--policy", str(BUNDLED_MODEL), "--out", str(tmp_path / "A"), cwd=rollouts, env=env)
    cli("score", "R", "--reward", "policy_plugins:OwnLikelihood", "--policy", str(other), "--out", str(tmp_path / "B"), cwd=rollouts, env=env)
    a, b = [r["reward"] for r in _rows(tmp_path / "A")], [r["reward"] for r in _rows(tmp_path / "B")]
    assert all(abs(x - y) > 1e-3 for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
def test_online_the_reward_reads_the_policy_as_it_trains(tmp_path):
    """3 GRPO steps with the policy-aware reward beside exact_match: it is bound at every step to the live policy, so
    its probe (a fixed continuation's log-prob) changes from step to step, as the weights do."""
    log = tmp_path / "calls.jsonl"
    cli("train", "grpo", "--data", "arith", "--reward", "exact_match", "--reward", "policy_plugins:OwnLikelihood*0.1",
        "--reward-opt", f"policy_plugins:OwnLikelihood.log={log}", "--max-steps", "3", "--batch-size", "4", "--n", "4",
        "--set", "train.lr=1e-3", "--out", str(tmp_path / "T"), "--quiet", cwd=tmp_path, env=ENV)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["step"] for c in calls] == [0, 1, 2]
    probes = [c["probe"] for c in calls]
    assert all(abs(a - b) > 1e-4 for a, b in zip(probes, probes[1:])), probes


@pytest.mark.parametrize("sets,message", [
    (["--set", "train.async_rollouts=1"], "train.async_rollouts=0"),
])
def test_set_ups_where_it_cannot_read_the_policy_are_one_line(tmp_path, sets, message):
    out = cli("train", "grpo", "--data", "arith", "--reward", "policy_plugins:OwnLikelihood", *sets, "--dry-run",
              "--out", str(tmp_path / "T"), cwd=tmp_path, env=ENV, check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_fsdp_is_refused_before_any_model_loads():
    from tokalign.errors import UserError
    from tokalign.rewards import policy
    from tokalign.rewards import ResolvedReward

    class Seeing:
        def bind_policy(self, view):
            pass

    r = ResolvedReward("seeing", 1.0, Seeing(), None, False)
    with pytest.raises(UserError, match="train.distributed=ddp"):
        policy.check([r], distributed="fsdp", world=2)
    policy.check([r], distributed="ddp", world=2)  # ddp: each process reads its own full copy
