"""RRHF by hand: length-normalised scores ranked like the rewards (a hinge per misordered pair) plus the best
response's token-mean NLL, averaged over groups; rank_weight 0 is SFT on each group's best."""

import pytest
import torch

from conftest import leaf, token_batch
from tokalign.algorithms.rrhf import RRHF, RRHFConfig, best_of_groups
from tokalign.protocols import PolicyOutput

MASK = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
LOGPS = [[-1.0, -3.0, 0.0], [-0.5, -0.5, -0.5], [-4.0, 0.0, 0.0], [-1.0, -1.0, 0.0]]


def _batch(rewards, groups):
    m = torch.tensor(MASK, dtype=torch.float32)
    return token_batch(m, {"rewards": torch.tensor(rewards), "group_ids": torch.tensor(groups)},
                       {"tokens": float(m.sum()), "seqs": 4.0, "groups": float(len(set(groups)))})


def test_by_hand():
    # group 0: rows 0-2, rewards 0, 1, 0.5; scores p = -2, -0.5, -4; group 1: row 3 alone (p = -1)
    b = _batch([0.0, 1.0, 0.5, 0.3], [0, 0, 0, 1])
    logps = leaf(LOGPS)
    out = RRHF(RRHFConfig(rank_weight=2.0)).loss(b, PolicyOutput(logps))
    # misordered pairs (worse reward, higher score): row 0 (r 0, p -2) above row 2 (r 0.5, p -4): 2.0
    rank = 2.0
    ft = 0.5 + 1.0  # best of group 0 is row 1 (token-mean NLL 0.5); group 1's only row (1.0)
    assert out.loss.item() == pytest.approx((2.0 * rank + ft) / 2)
    assert out.metrics["rrhf/rank_loss"] == pytest.approx(1.0) and out.metrics["rrhf/misordered_fraction"] == pytest.approx(1 / 3)
    out.loss.backward()
    want = torch.zeros(4, 3)
    want[0, :2] = 2.0 * 0.5 / 2  # +p_0 (mean of 2 tokens) in the hinge
    want[2, 0] = -2.0 / 2  # −p_2
    want[1] = -1 / 3 / 2  # the best's NLL
    want[3, :2] = -0.5 / 2
    assert torch.allclose(logps.grad, want)


def test_limits():
    b = _batch([0.0, 1.0, 0.5, 0.3], [0, 0, 0, 1])
    out = RRHF(RRHFConfig(rank_weight=0.0)).loss(b, PolicyOutput(leaf(LOGPS)))
    assert out.loss.item() == pytest.approx((0.5 + 1.0) / 2)  # SFT on each group's best
    same = RRHF(RRHFConfig(rank_weight=5.0)).loss(_batch([1.0, 1.0, 1.0, 1.0], [0, 0, 0, 1]), PolicyOutput(leaf(LOGPS)))
    assert same.metrics["rrhf/rank_loss"] == 0.0  # equal rewards: no pair to rank
    assert same.loss.item() == pytest.approx((2.0 + 1.0) / 2)  # ties: the first row is the best (row 0, NLL 2)
    assert best_of_groups(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0, 0])).tolist() == [True, False, False]


def test_length_penalty_zero_ranks_summed_logps():
    b = _batch([0.0, 1.0, 0.5, 0.3], [0, 0, 0, 1])
    out = RRHF(RRHFConfig(rank_weight=1.0, length_penalty=0.0)).loss(b, PolicyOutput(leaf(LOGPS)))
    # sums: -4, -1.5, -4: row 0 (r 0) ties row 2 (r 0.5): no hinge; no other misordered pair
    assert out.metrics["rrhf/rank_loss"] == 0.0


def test_config():
    with pytest.raises(ValueError, match="≥ 0"):
        RRHFConfig(rank_weight=-1)
