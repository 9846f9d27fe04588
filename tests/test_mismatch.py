"""Sampler/trainer mismatch: truncated importance-sampling weights (token and sequence level) and their use in the
GRPO family's shared loss tail, with the logged log-prob gap."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import leaf, token_batch
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import PolicyOutput


def test_truncated_is_weights_hand():
    """trainer (−1, −2), sampler (−1.5, −1): token ratios (e^0.5, e^−1) = (1.6487, 0.3679), capped at 1.5 → (1.5, 0.3679);
    sequence level one weight e^(0.5 − 1) = 0.6065 on both tokens; masked positions get 0."""
    trainer, sampler = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "token", 2.0), torch.tensor([[math.exp(0.5), math.exp(-1), 0.0]]))
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "token", 1.5), torch.tensor([[1.5, math.exp(-1), 0.0]]))
    assert_close(ops.truncated_is_weights(trainer, sampler, mask, "sequence", 2.0), torch.tensor([[math.exp(-0.5)] * 2 + [0.0]]))


def test_grpo_mismatch_correction_weights_the_policy_term():
    """On-policy (ρ = 1), R = (1, 0) → A = ±0.7071; token-level TIS multiplies each token's −A·ρ by its weight, so
    ∂L/∂ℓ_t = −A_i w_t / N; with no correction the gap is still logged and nothing changes."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]])
    sampler = torch.tensor([[-1.5, -1.0], [-0.5, -0.7]])
    fields = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "old_logps": old, "sampler_logps": sampler}
    grads, metrics = {}, {}
    for level in ("none", "token"):
        algo = GRPO(GRPOConfig(mismatch_correction=level))
        batch = algo.prepare(token_batch(torch.ones(2, 2), dict(fields), {"tokens": 4.0}))
        lp = leaf(old)
        out = algo.loss(batch, PolicyOutput(lp))
        out.loss.backward()
        grads[level], metrics[level] = lp.grad, out.metrics
    a = 2 ** -0.5
    w = torch.tensor([[math.exp(0.5), math.exp(-1)], [1.0, 1.0]])
    assert_close(grads["none"], torch.tensor([[-a, -a], [a, a]]) / 4)
    assert_close(grads["token"], torch.tensor([[-a, -a], [a, a]]) * w / 4)
    assert metrics["none"]["mismatch/logp_gap_abs"] == pytest.approx((0.5 + 1.0) / 4)
    assert "mismatch/is_weight_mean" in metrics["token"] and "mismatch/is_weight_mean" not in metrics["none"]
    with pytest.raises(ValueError, match="mismatch_correction"):
        GRPOConfig(mismatch_correction="tokens")
