"""RLOO (arXiv:2402.14740) on hand cases (leave-one-out advantages, GRPO's surrogate on them; expected numbers worked out
in each docstring), its config check, and a slow run through the real CLI. CPU only, seeded. TRL parity (advantages):
tests/algorithms/test_trl_parity.py.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import train_changes_weights
from conftest import leaf as _leaf, token_batch as _batch
from torch.testing import assert_close

from tokalign import ops
from tokalign.algorithms.grpo import GRPO
from tokalign.algorithms.rloo import RLOO, RLOOConfig
from tokalign.protocols import PolicyOutput


def test_rloo_leave_one_out_advantages():
    """A_i = R_i − mean_{j≠i} R_j.  G=2, R=(1, 0): (1 − 0, 0 − 1) = (1, −1).  All-equal group (2, 2): 0.
    G=3, R=(1, 0, 0): (1 − 0, 0 − 0.5, 0 − 0.5) = (1, −0.5, −0.5) = 3/2·(R − 1/3).  A group of one: 0."""
    batch = _batch(torch.ones(8, 2), {"rewards": torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 5.0]),
                                      "group_ids": torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])})
    RLOO(RLOOConfig()).prepare(batch)
    assert_close(batch.fields["advantages"], torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -0.5, -0.5, 0.0]))
    assert_close(ops.leave_one_out_mean(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([7, 7, 7])), torch.tensor([0.0, 0.5, 0.5]))


def test_rloo_loss_is_grpo_loss_hand():
    """RLOO trains with GRPO's surrogate. R = (1, 0) ⇒ A = (1, −1); on-policy (ρ = 1), token-mean,
    mask [[1, 1], [1, 0]]: L = (−1 − 1 + 1)/3 = −1/3;  ∂L/∂ℓ_t = −A_i/3: row 0 (−1/3, −1/3), row 1 (1/3, 0).
    All-equal rewards ⇒ A = 0 ⇒ zero loss and gradient."""
    old = torch.tensor([[-1.0, -0.5], [-2.0, 0.0]])
    batch = _batch([[1.0, 1.0], [1.0, 0.0]], {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                              "old_logps": old})
    algo = RLOO(RLOOConfig())
    assert isinstance(algo, GRPO) and algo.needs.groups and not algo.needs.reference
    algo.prepare(batch)
    lp = _leaf(old)
    res = algo.loss(batch, PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(-1 / 3))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))

    batch.fields["rewards"] = torch.tensor([0.5, 0.5])
    algo.prepare(batch)
    lp = _leaf(old + 0.3)
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    assert float(res.loss.detach()) == 0.0 and float(lp.grad.abs().max()) == 0.0


def test_rloo_config_rejects_std_scaling():
    with pytest.raises(ValueError, match="scale_rewards must be none"):
        RLOOConfig(scale_rewards="group")


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train ALGO` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the run prints its
    checkpoint path, every logged loss is finite (and every gradient norm positive) and the saved weights differ from
    the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4")
