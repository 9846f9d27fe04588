"""CISPO: the detached, clipped importance weight times the advantage times the log-prob; on-policy it is GRPO's
gradient. (Parity with TRL's loss_type="cispo" is in test_trl_parity.py.)"""

import math

import pytest
import torch

from conftest import leaf, token_batch
from tokalign.algorithms.cispo import CISPO, CISPOConfig
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import PolicyOutput


def _batch(mask, rewards, groups, old):
    mask = torch.tensor(mask, dtype=torch.float32)
    return token_batch(mask, {"rewards": torch.tensor(rewards), "group_ids": torch.tensor(groups), "old_logps": old},
                       {"tokens": float(mask.sum()), "seqs": float(len(rewards))})


def test_by_hand():
    logps = leaf([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    # ratios exp(ℓ − ℓ_old): row 0: 0.5, 8 (capped at 5), 1; row 1: 1, 1/8 (its third token is padding)
    old = torch.tensor([[-1.0 - math.log(0.5), -2.0 - math.log(8.0), -0.5], [-1.0, -1.0 + math.log(8.0), 0.0]])
    algo = CISPO(CISPOConfig())
    b = algo.prepare(_batch([[1, 1, 1], [1, 1, 0]], [1.0, 0.0], [0, 0], old))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # (R − mean) / (std + eps): rewards 1, 0, unbiased std √½
    w = [[0.5, 5.0, 1.0], [1.0, 0.125]]
    want = (-a * (0.5 * -1.0 + 5.0 * -2.0 + 1.0 * -0.5) + a * (1.0 * -1.0 + 0.125 * -1.0)) / 5
    out = algo.loss(b, PolicyOutput(logps))
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    out.loss.backward()
    grad = [[-a * x / 5 for x in w[0]], [a * x / 5 for x in w[1]] + [0.0]]
    assert torch.allclose(logps.grad, torch.tensor(grad), atol=1e-7)
    assert out.metrics["clip_fraction"] == pytest.approx(1 / 5)


def test_on_policy_it_has_grpos_gradient():
    torch.manual_seed(0)
    values = -torch.rand(4, 4) * 3
    mask = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    grads = []
    for algo in (CISPO(CISPOConfig(beta=0.04)), GRPO(GRPOConfig(beta=0.04))):
        batch = algo.prepare(_batch(mask, [1.0, 0.0, 0.5, 0.25], [0, 0, 1, 1], values.clone()))
        batch.fields["ref_logps"] = values + 0.1
        logps = leaf(values)
        algo.loss(batch, PolicyOutput(logps)).loss.backward()
        grads.append(logps.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and grads[0].abs().sum() > 0


def test_config():
    with pytest.raises(ValueError, match="ratio_min < ratio_max"):
        CISPOConfig(ratio_min=2.0, ratio_max=1.0)
    with pytest.raises(ValueError, match="set ratio_max"):
        CISPOConfig(epsilon_high=0.28)
