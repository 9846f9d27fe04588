"""STEER: token weights from the entropy-change estimate |Ω| (the official code's exp and linear mappings, by hand),
and with weights pinned to 1 and no dual clip it is GRPO."""

import math

import pytest
import torch

from conftest import leaf, token_batch
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.steer import STEER, STEERConfig, token_weights
from tokalign.protocols import PolicyOutput

LOGPS = torch.log(torch.tensor([[0.5, 0.9], [0.2, 0.6]]))
OLD = torch.log(torch.tensor([[0.4, 0.9], [0.25, 0.5]]))
H = torch.tensor([[1.0, 0.3], [2.0, 0.5]])
ADV = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def _omega(p, old, h, a):
    return abs(a / old * p * (1 - p) * (math.log(p) + h))


def test_weights_by_hand():
    m = [_omega(0.5, 0.4, 1.0, 1.0), _omega(0.9, 0.9, 0.3, 1.0), _omega(0.2, 0.25, 2.0, -2.0)]
    k = -math.log(0.8) / max(max(m), 0.02)
    want = [min(max(math.exp(-k * x), 0.8), 1.0) for x in m]
    w = token_weights(LOGPS, OLD, ADV, H, MASK, 0.8, 1.0, "exp")
    assert w[0].tolist() == pytest.approx(want[:2], rel=1e-5) and w[1, 0].item() == pytest.approx(want[2], rel=1e-5)
    assert w[1, 1].item() == 0.0  # padding
    assert min(want) == pytest.approx(0.8)  # the largest |Ω| gets w_min
    lo, hi = min(m), max(m)
    lin = [1.2 - (x - lo) * 0.4 / (hi - lo) for x in m]
    w = token_weights(LOGPS, OLD, ADV, H, MASK, 0.8, 1.2, "linear")
    assert w[0].tolist() == pytest.approx(lin[:2], rel=1e-5) and w[1, 0].item() == pytest.approx(lin[2], rel=1e-5)
    flat = token_weights(LOGPS, OLD, torch.zeros(2, 2), H, MASK, 0.8, 1.2, "linear")  # all Ω = 0: the midpoint
    assert flat[0].tolist() == pytest.approx([1.0, 1.0])


def _batch(old):
    return token_batch(MASK, {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "old_logps": old},
                       {"tokens": float(MASK.sum()), "seqs": 2.0})


def test_loss_is_the_weighted_dual_clip_surrogate():
    algo = STEER(STEERConfig())
    b = algo.prepare(_batch(OLD))
    logps = leaf(LOGPS)
    out = algo.loss(b, PolicyOutput(logps, entropy=H))
    a = b.fields["advantages"].unsqueeze(-1).expand(2, 2)
    w = token_weights(LOGPS, OLD, a, H, MASK, 0.8, 1.0, "exp")
    ratio = torch.exp(LOGPS - OLD)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    pg = torch.where(a < 0, torch.minimum(pg, -10.0 * a), pg)
    assert out.loss.item() == pytest.approx(float((pg * w * MASK).sum() / 3), rel=1e-6)


def test_unit_weights_without_dual_clip_is_grpo():
    grads = []
    for algo in (STEER(STEERConfig(weight_min=1.0, weight_max=1.0, dual_clip=0.0)), GRPO(GRPOConfig(epsilon_high=0.28))):
        b = algo.prepare(_batch(OLD))
        logps = leaf(LOGPS)
        res = algo.loss(b, PolicyOutput(logps, entropy=H))
        res.loss.backward()
        grads.append((res.loss.item(), logps.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7) and torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def test_config():
    with pytest.raises(ValueError, match="mapping"):
        STEERConfig(mapping="cubic")
    with pytest.raises(ValueError, match="weight_min"):
        STEERConfig(weight_min=1.2, weight_max=1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        STEERConfig(dual_clip=0.5)
