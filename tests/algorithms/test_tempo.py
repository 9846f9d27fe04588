"""TEMPO (arXiv:2509.18314) on hand cases (expected numbers worked out in each docstring): the prefix-tree TD terms added
to GRPO's advantage at branching tokens, the loss (GRPO's with token advantages; no branches ⇒ GRPO exactly),
micro-batches adding up to the full batch, and a slow run through the real CLI (module:attr name). CPU only.

Notation: ℓ = policy log-prob, ℓ_old = behaviour log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask, G = group size."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import groups_batch, micro_batches_add_up, train_changes_weights
from conftest import leaf as _leaf
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.tempo import TEMPO, TEMPOConfig, prefix_td
from tokalign.protocols import PolicyOutput


def test_tempo_two_responses_differ_at_one_token():
    """Group of two, completions (3, 4, 5, 6) R = 1 and (3, 4, 7, 6) R = 0, differing only at token k = 2. GRPO:
    A = ±(0.5/0.7071068) = ±0.7071061 (eps 1e-6). At k = 2 the shared node (V = 0.5) splits into two leaves of one
    completion each (V = R): TD = R_i − 0.5 = ±0.5 = ±(R_1 − R_2)/2; every other token gets exactly the GRPO advantage."""
    batch = groups_batch([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    TEMPO(TEMPOConfig()).prepare(batch)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = batch.fields["advantages"][batch.completion_mask.bool()].view(2, 4)
    assert_close(adv, torch.tensor([[a, a, a + 0.5, a], [-a, -a, -a - 0.5, -a]]))
    grpo = groups_batch([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    GRPO(GRPOConfig()).prepare(grpo)
    non_branch = adv[:, [0, 1, 3]]
    assert torch.equal(non_branch, grpo.fields["advantages"][:, None].expand(2, 3))  # exactly, not approximately
    assert float(batch.fields["advantages"][~batch.completion_mask.bool()].abs().max()) == 0.0


def test_tempo_tree_hand():
    """Completions (1, 2, 3) R = 1, (1, 2, 4) R = 0, (1, 5, 6) R = 1. Tree: root V = 2/3 (3 completions) → [1] (3, V 2/3,
    no branch) → [1, 2] (2, V 0.5) and [1, 5] (1, V 1) → leaves. TD per token:
    c1: (0, 0.5 − 2/3 = −1/6, 1 − 0.5 = +0.5);  c2: (0, −1/6, 0 − 0.5 = −0.5);  c3: (0, 1 − 2/3 = +1/3, 0: [1, 5] → [1, 5, 6]
    keeps its one completion, no branch). Along each path the TD terms telescope to R_i − mean_g R (1/3, −2/3, 1/3).
    A completion that is a prefix of another: (1, 2) R = 1 and (1, 2, 3) R = 0: only token 3 branches (the shorter one
    ends there): TD = 0 − 0.5 = −0.5; the shorter one gets no TD."""
    td = prefix_td([[1, 2, 3], [1, 2, 4], [1, 5, 6]], [1.0, 0.0, 1.0])
    assert_close(torch.tensor(td), torch.tensor([[0.0, -1 / 6, 0.5], [0.0, -1 / 6, -0.5], [0.0, 1 / 3, 0.0]]))
    assert [sum(t) for t in td] == pytest.approx([1 / 3, -2 / 3, 1 / 3])
    assert prefix_td([[1, 2], [1, 2, 3]], [1.0, 0.0]) == [[0.0, 0.0], [0.0, 0.0, -0.5]]
    batch = groups_batch([[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3]], [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 1])
    TEMPO(TEMPOConfig()).prepare(batch)
    # groups are separate trees: the last row is a group of one (GRPO A = 0, no branching)
    grpo = torch.tensor([1 / 3, -2 / 3, 1 / 3]) / (math.sqrt(1 / 3) + 1e-6)
    adv = batch.fields["advantages"][batch.completion_mask.bool()].view(4, 3)
    assert_close(adv[:3], grpo[:, None] + torch.tensor(td))
    assert float(adv[3].abs().max()) == 0.0


def test_tempo_loss_is_grpo_loss_with_token_advantages():
    """On-policy (ρ = 1), token-mean over the 8 tokens of the two-response group: ∂L/∂ℓ_t = −A_{i,t}/8, i.e. GRPO's
    −A_i/8 plus ∓0.5/8 = ∓0.0625 at the branching token; without branches (identical completions) TEMPO = GRPO exactly."""
    batch = groups_batch([[3, 4, 5, 6], [3, 4, 7, 6]], [1.0, 0.0], [0, 0])
    algo = TEMPO(TEMPOConfig())
    algo.prepare(batch)
    batch.fields["old_logps"] = torch.zeros_like(batch.completion_mask) - 1.0
    lp = _leaf(batch.fields["old_logps"])
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    assert_close(lp.grad, -batch.fields["advantages"] * batch.completion_mask / 8)
    assert res.metrics["tempo/td_token_fraction"] == pytest.approx(2 / 8)

    same = [groups_batch([[3, 4, 5], [3, 4, 5]], [1.0, 0.0], [0, 0]) for _ in range(2)]
    grads = []
    for algo, b in zip((TEMPO(TEMPOConfig()), GRPO(GRPOConfig())), same):
        algo.prepare(b)
        b.fields["old_logps"] = torch.full_like(b.completion_mask, -1.0)
        lp = _leaf(b.fields["old_logps"] + 0.1)
        algo.loss(b, PolicyOutput(lp)).loss.backward()
        grads.append(lp.grad)
    assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


@pytest.mark.parametrize("name", ["tempo"])
def test_micro_batches_sum_to_full_batch(name):
    """TEMPO: three groups of random completions over a 4-token vocabulary, run whole and as micro-batches of 2
    rows — the micro-batch losses and gradients add up to the full-batch ones (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(TEMPO(TEMPOConfig(aggregation="seq-mean-token-mean")))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.tempo:TEMPO"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train package.module:Class` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the
    run prints its checkpoint path, every logged loss is finite and the saved weights differ from the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", grad_norm=False)
