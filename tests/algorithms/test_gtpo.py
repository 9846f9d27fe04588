"""GTPO (arXiv:2508.03772) on hand cases (expected numbers worked out in each docstring): the conflict mask of shared
prefix/suffix runs, the entropy-shifted loss, its limits, micro-batches adding up to the full batch, and a slow run
through the real CLI (module:attr name). CPU only.

Notation: ℓ = policy log-prob, ρ = exp(ℓ − ℓ_old), A = advantage, m = mask, G = group size."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import groups_batch, micro_batches_add_up, train_changes_weights
from conftest import leaf as _leaf
from torch.testing import assert_close

from tokalign.algorithms.gtpo import GTPO, GTPOConfig, conflict_delta
from tokalign.protocols import PolicyOutput


def test_gtpo_no_shared_first_or_last_token_delta_is_one():
    """Positive (5, 6, 7) and negative (8, 6, 9): position 0 holds 5 vs 8 and the last position 7 vs 9, so neither run
    starts ⇒ δ ≡ 1 and no conflict tokens (the shared 6 in the middle is not a run)."""
    deltas, counts = conflict_delta([[5, 6, 7], [8, 6, 9]], [0.5, -0.5], 2.0)
    assert deltas == [[1.0] * 3, [1.0] * 3] and counts == [0, 0]


def test_gtpo_conflict_mask_hand():
    """R = (1, 0, 0) ⇒ A = (2/3, −1/3, −1/3). pos (5, 6, 7, 1, 9), neg₁ (5, 6, 8, 9), neg₂ (5, 4, 7, 2, 9).
    Forward (position, token) pairs in both a positive and a negative: (0,5), (1,6), (2,7), (4,9).
      pos run 3 (5, 6, 7; (3,1) is not shared); neg₁ run 2 ((2,8) not shared); neg₂ run 1 ((1,4) not shared).
    Backward (position from the end): pos 9,1,7,6,5; neg₁ 9,8,6,5; neg₂ 9,2,7,4,5 ⇒ shared (0,9), (2,7), (4,5):
      every run is 1 (the final 9), since position 1 from the end differs.
    δ = δ_fwd·δ_bwd, W = 2 on a positive's runs, 0 on a negative's:
      pos  (2, 2, 2, 1, 1)·(1, 1, 1, 1, 2) = (2, 2, 2, 1, 2), n = 3 + 1 = 4
      neg₁ (0, 0, 1, 1)·(1, 1, 1, 0)       = (0, 0, 1, 0),    n = 3
      neg₂ (0, 1, 1, 1, 1)·(1, 1, 1, 1, 0) = (0, 1, 1, 1, 0), n = 2
    Loss with mean entropies (0.5, 0.8, 0.2): A' = 2/3 − 0.05 = 0.6166667; 0.8 > 0.7 ⇒ 0; −1/3 − 0.02 = −0.3533333.
    Per completion −A'Σδ/(|y|·n): pos −0.6166667·9/(5·4) = −0.2775; neg₁ 0; neg₂ 0.3533333·3/(5·2) = 0.106;
    loss = (−0.2775 + 0.106)/3 = −0.0571667. ∂L/∂ℓ_t = −A'δ_t/(|y| n B): pos −0.6166667·δ/60 ⇒ −0.0205556 (δ 2),
    −0.0102778 (δ 1); neg₂ 0.3533333·δ/30 ⇒ 0.0117778 on δ = 1, 0 on δ = 0."""
    comps = [[5, 6, 7, 1, 9], [5, 6, 8, 9], [5, 4, 7, 2, 9]]
    ent = [0.5, 0.8, 0.2]
    batch = groups_batch(comps, [1.0, 0.0, 0.0], [0, 0, 0], token=[{"ent": [e] * len(c)} for c, e in zip(comps, ent)])
    algo = GTPO(GTPOConfig())
    assert not algo.needs.old_logps and not algo.needs.reference
    algo.prepare(batch)
    m = batch.completion_mask.bool()
    delta = [batch.fields["gtpo_delta"][i][m[i]].tolist() for i in range(3)]
    assert delta == [[2, 2, 2, 1, 2], [0, 0, 1, 0], [0, 1, 1, 1, 0]]
    assert batch.fields["gtpo_conflicts"].tolist() == [4, 3, 2]
    assert float(batch.fields["gtpo_delta"][~m].abs().max()) == 0.0
    lp = _leaf(torch.full_like(batch.completion_mask, -1.0))
    res = algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"]))
    assert_close(res.loss, torch.tensor(-0.0571667))
    res.loss.backward()
    expected = [[-0.0205556] * 3 + [-0.0102778, -0.0205556], [0.0] * 4, [0.0, 0.0117778, 0.0117778, 0.0117778, 0.0]]
    assert [lp.grad[i][m[i]].tolist() for i in range(3)] == [pytest.approx(e, abs=1e-6) for e in expected]
    assert res.metrics["gtpo/entropy_kept_fraction"] == pytest.approx(2 / 3)


def test_gtpo_limits():
    """All-equal rewards ⇒ A = 0 ⇒ δ ≡ 1; the entropy shift still applies (as in the official code): H̄ = 0.1 ⇒
    A' = −0.01 ⇒ loss = (0.01 + 0.01)/2 = 0.01, ∂L/∂ℓ_t = 0.01/(|y|·2) = 0.0025 (|y| = 2), 0.0016667 (|y| = 3); with
    entropy_scale 0, zero loss and gradient. Low entropy, no shared tokens, entropy_scale 0 ⇒ per token −A/(|y| B):
    REINFORCE with the group-mean baseline, seq-mean-token-mean.
    A positive whose whole completion is a prefix run and a suffix run gets W² = 4 on tokens in both (official δ_fwd·δ_bwd)."""
    for scale, loss, grads in ((0.1, 0.01, (0.0025, 0.01 / 6)), (0.0, 0.0, (0.0, 0.0))):
        batch = groups_batch([[5, 6], [7, 8, 9]], [1.0, 1.0], [0, 0], token=[{"ent": [0.1] * 2}, {"ent": [0.1] * 3}])
        algo = GTPO(GTPOConfig(entropy_scale=scale))
        algo.prepare(batch)
        lp = _leaf(torch.zeros_like(batch.completion_mask))
        res = algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"]))
        res.loss.backward()
        assert float(res.loss.detach()) == pytest.approx(loss)
        m = batch.completion_mask.bool()
        assert lp.grad[0][m[0]].tolist() == pytest.approx([grads[0]] * 2) and lp.grad[1][m[1]].tolist() == pytest.approx([grads[1]] * 3)

    batch = groups_batch([[5, 6], [7, 8, 9]], [1.0, 0.0], [0, 0], token=[{"ent": [0.1] * 2}, {"ent": [0.1] * 3}])
    algo = GTPO(GTPOConfig(entropy_scale=0.0))
    algo.prepare(batch)
    lp = _leaf(torch.zeros_like(batch.completion_mask))
    algo.loss(batch, PolicyOutput(lp, entropy=batch.fields["ent"])).loss.backward()
    m = batch.completion_mask.bool()
    assert lp.grad[0][m[0]].tolist() == pytest.approx([-0.5 / 4] * 2) and lp.grad[1][m[1]].tolist() == pytest.approx([0.5 / 6] * 3)

    deltas, counts = conflict_delta([[5, 6], [5, 6]], [1.0, -1.0], 2.0)
    assert deltas == [[4.0, 4.0], [0.0, 0.0]] and counts == [2, 2]
    with pytest.raises(ValueError, match="entropy"):
        algo.loss(batch, PolicyOutput(lp))
    with pytest.raises(ValueError):
        GTPOConfig(conflict_weight=0.5)


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


@pytest.mark.parametrize("name", ["gtpo"])
def test_micro_batches_sum_to_full_batch(name):
    """GTPO: three groups of random completions over a 4-token vocabulary, run whole and as micro-batches of 2
    rows — the micro-batch losses and gradients add up to the full-batch ones (algo_helpers.micro_batches_add_up)."""
    micro_batches_add_up(GTPO(GTPOConfig()))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tokalign.algorithms.gtpo:GTPO"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train package.module:Class` for 2 steps on the bundled model (online arith, 2 prompts × 4 samples): the
    run prints its checkpoint path, every logged loss is finite and the saved weights differ from the bundled model's."""
    train_changes_weights(tmp_path, algo, "--data", "arith", "--n", "4", grad_norm=False)
