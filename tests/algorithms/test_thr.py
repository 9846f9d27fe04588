"""THR (Token Hidden Reward; see tokalign/algorithms/thr.py for the source): the token hidden rewards and reweighting by
hand, the limit p = 0 ⇒ GRPO, and a slow run through the real CLI."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.thr import THR, THRConfig, reweight, token_hidden_rewards
from tokalign.protocols import PolicyOutput


def _thr_case():
    """A group of two one-token responses over a vocabulary of 2, π = (0.5, 0.5) at both positions (logits 0).
    Row 0 (correct, R = 1) emits token 0 with hidden state 1; row 1 (R = 0) emits token 1 with hidden state 2.
    GRPO: A = (+0.7071, −0.7071)."""
    logits = torch.zeros(2, 1, 2)
    hidden = torch.tensor([[[1.0]], [[2.0]]])
    targets = torch.tensor([[0], [1]])
    return logits, hidden, targets, torch.ones(2, 1), torch.tensor([1.0, 0.0]), torch.tensor([0, 0])


def test_thr_hand():
    """Row 0: K = 1 − 0.5 − 0.5 + 0.5 = 0.5, ⟨h, h'⟩ = 1 → THR = 0.7071·0.5 = 0.35355.
    Row 1: K = 0 − 0.5 − 0.5 + 0.5 = −0.5, ⟨h, h'⟩ = 2 → THR = −0.7071·(−1) = +0.7071 (pushing the wrong token down
    raises the correct one). top_fraction 1, p = 0.5 → weights 1.5 on both."""
    logits, hidden, targets, mask, rewards, gids = _thr_case()
    adv = torch.tensor([2 ** -0.5, -(2 ** -0.5)])
    thr = token_hidden_rewards(logits, hidden, targets, mask, adv, rewards > 0.5, gids)
    assert_close(thr, torch.tensor([[0.353553], [0.707107]]))
    assert_close(reweight(thr, mask, gids, 0.5, 1.0), torch.full((2, 1), 1.5))
    assert_close(reweight(thr, mask, gids, 0.5, 0.5), torch.tensor([[1.0], [1.5]]))  # only the larger |THR|
    assert_close(reweight(-thr, mask, gids, 0.5, 0.5), torch.tensor([[1.0], [0.5]]))


def test_thr_p0_is_grpo_and_weights_scale_the_gradient():
    """p = 0 ⇒ GRPO's loss and gradient exactly; p = 0.5 with every token reweighted by 1.5 ⇒ 1.5 × GRPO's gradient."""
    from tokalign.algorithms.grpo import GRPO, GRPOConfig

    logits, hidden, targets, mask, rewards, gids = _thr_case()
    fields = {"rewards": rewards, "group_ids": gids, "old_logps": torch.full((2, 1), -math.log(2))}
    batch = token_batch(mask, dict(fields))
    batch.input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), targets], 1)
    grads = {}
    for name, algo in {"grpo": GRPO(GRPOConfig()), "p0": THR(THRConfig(p=0.0)), "p05": THR(THRConfig(p=0.5, top_fraction=1.0))}.items():
        b = algo.prepare(token_batch(mask, dict(fields)))
        b.input_ids = batch.input_ids
        lp = leaf(torch.full((2, 1), -math.log(2)))
        algo.loss(b, PolicyOutput(lp, logits=logits, hidden=hidden)).loss.backward()
        grads[name] = lp.grad
    assert THR(THRConfig()).needs.full_vocab and [c.forward_outputs for c in THR(THRConfig()).needs.components] == [("hidden",)]
    assert_close(grads["p0"], grads["grpo"])
    assert_close(grads["p05"], 1.5 * grads["grpo"])


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_thr(tmp_path):
    out = tmp_path / "thr"
    cli("train", "thr", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(0 <= m["thr/reweighted_fraction"] <= 1 for m in metrics)
