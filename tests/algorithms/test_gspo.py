"""GSPO (arXiv:2507.18071) on hand cases (sequence-level ratio, its clip band; expected numbers worked out in each
docstring), the limiting case equal token ratios ⇒ GRPO, micro-batches, and a slow run through the real CLI. CPU only,
seeded. TRL parity: tests/algorithms/test_trl_parity.py.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import train_changes_weights
from conftest import leaf as _leaf, token_batch as _batch, micro_batch_check
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO
from tokalign.algorithms.gspo import GSPO, GSPOConfig
from tokalign.batching import Seq, collate
from tokalign.protocols import PolicyOutput


def _gspo_hand():
    """mask [[1,1,1],[1,1,0]], A = (1, −0.5); token ratios row 0 (1.2, 0.9, 1), row 1 (e^0.1, e^−0.3)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    log_ratio = torch.tensor([[math.log(1.2), math.log(0.9), 0.0], [0.1, -0.3, 0.0]])
    batch = _batch([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], {"advantages": torch.tensor([1.0, -0.5]), "old_logps": old})
    return batch, PolicyOutput(_leaf(old + log_ratio))


def test_gspo_hand_unclipped():
    """ε = 0.2. s_0 = (1.2·0.9·1)^{1/3} = 1.08^{1/3} = 1.0259856, s_1 = exp((0.1 − 0.3)/2) = e^{−0.1} = 0.9048374, both in
    [0.8, 1.2]. Per-token L = −A s: row 0 −1.0259856, row 1 0.4524187; seq-mean-token-mean = (−1.0259856 + 0.4524187)/2
    = −0.2867834.  ∂L/∂ℓ_t = −A s/(B|y|): row 0: −1.0259856/6 = −0.1709976 on each token; row 1: 0.4524187/4 = 0.1131047.
    (Token-level GRPO would weight each token by its own ratio instead.)"""
    batch, out = _gspo_hand()
    res = GSPO(GSPOConfig(epsilon_low=0.2, epsilon_high=0.2)).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.2867834))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.1709976] * 3, [0.1131047, 0.1131047, 0.0]]))
    assert res.metrics["clip_fraction"] == 0.0
    assert res.metrics["seq_ratio/mean"] == pytest.approx((1.0259856 + 0.9048374) / 2)


def test_gspo_hand_default_band_clips():
    """Defaults ε = (3e-4, 4e-4): s_0 = 1.026 > 1.0004 with A > 0 ⇒ L = −1.0004; s_1 = 0.905 < 0.9997 with A < 0 ⇒
    L = max(0.5·0.9048, 0.5·0.9997) = 0.49985. Loss (−1.0004 + 0.49985)/2 = −0.250275, zero gradient, every token
    clipped."""
    batch, out = _gspo_hand()
    res = GSPO(GSPOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(-0.250275))
    res.loss.backward()
    assert float(out.logps.grad.abs().max()) == 0.0
    assert res.metrics["clip_fraction"] == 1.0


def test_gspo_equal_token_ratios_is_sequence_ratio_and_grpo():
    """Every token ratio = r = 1.0002 (inside the band) ⇒ s = r, L_t = −A r, and ∂L/∂ℓ_t = −A r/(B|y|) =
    the token-level GRPO loss with the same band and aggregation, value and gradient. A = (1, −2), lengths (3, 1):
    loss = (−1.0002 + 2.0004)/2 = 0.5001;  grad row 0: −1.0002/6 = −0.1667, row 1: 2.0004/2 = 1.0002."""
    r = 1.0002
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]])
    batch = _batch([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], {"advantages": torch.tensor([1.0, -2.0]), "old_logps": old})
    grads, losses = [], []
    for algo in (GSPO(GSPOConfig()), GRPO(GSPOConfig())):
        lp = _leaf(old + math.log(r))
        res = algo.loss(batch, PolicyOutput(lp))
        res.loss.backward()
        losses.append(res.loss.detach())
        grads.append(lp.grad)
    assert_close(losses[0], torch.tensor(0.5001))
    assert_close(grads[0], torch.tensor([[-r / 6] * 3, [r, 0.0, 0.0]]))
    assert_close(losses[0], losses[1])
    assert_close(grads[0], grads[1])


def test_gspo_defaults_and_micro_batches():
    """Defaults: ε (3e-4, 4e-4), seq-mean-token-mean, no KL, GRPO advantages. Three groups of random rows run whole
    and as micro-batches of 2 rows: the micro-batch losses and gradients add up to the full-batch ones."""
    c = GSPOConfig()
    assert (c.epsilon_low, c.epsilon_high, c.aggregation, c.beta, c.scale_rewards) == (3e-4, 4e-4, "seq-mean-token-mean", 0.0, "group")
    g = torch.Generator().manual_seed(7)
    seqs = []
    for i, (n, gid, r) in enumerate(zip([2, 3, 1, 4, 1, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0.5, 0.2, 1, 0])):
        pol = -torch.rand(n, generator=g)
        seqs.append(Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 1e-3 * torch.randn(n, generator=g)).tolist()}))
    batch = collate(seqs, pad_id=0)
    algo = GSPO(c)
    algo.prepare(batch)
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gspo"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train ALGO` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the run prints its
    checkpoint path, every logged loss is finite (and every gradient norm positive) and the saved weights differ from
    the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4")
