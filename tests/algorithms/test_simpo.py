"""SimPO (arXiv:2405.14734) on hand cases (expected numbers worked out in each docstring), the limiting case γ = 0 with
one-token completions ⇒ reference-free DPO, micro-batches, and a slow run through the real CLI on a conversational TRL
preference JSONL. CPU only, seeded. TRL parity: tests/algorithms/test_trl_parity.py.

Notation: ℓ = policy log-prob, ℓ̄ = mean token log-prob, m = mask."""

from __future__ import annotations

import json

import pytest
import torch
from algo_helpers import train_changes_weights
from conftest import leaf as _leaf, token_batch as _batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.simpo import SimPO, SimPOConfig
from tokalign.batching import Seq, collate, micro_batches
from tokalign.protocols import PolicyOutput, TokenBatch


def _pair(chosen, rejected, mask_c, mask_r) -> tuple[TokenBatch, PolicyOutput]:
    """One pair: row 0 chosen, row 1 rejected; no reference log-probs."""
    fields = {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    return _batch([mask_c, mask_r], fields), PolicyOutput(_leaf([chosen, rejected]))


def test_simpo_equal_means_is_softplus_gamma():
    """ℓ̄_w = ℓ̄_l (−1.5 over 2 tokens, −1.5 over 3 tokens) ⇒ L = −log σ(−γ) = log(1 + e^γ); γ = 0.5: 0.9740770.
    dL/dΔ̄ = −β σ(γ) = −2·0.6224593 = −1.2449187 ⇒ −1.2449187/2 = −0.6224593 per chosen token,
    +1.2449187/3 = 0.4149729 per rejected token."""
    batch, out = _pair([-1.0, -2.0, 0.0], [-1.5, -1.0, -2.0], [1, 1, 0], [1, 1, 1])
    res = SimPO(SimPOConfig()).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.9740770))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.6224593, -0.6224593, 0.0], [0.4149729] * 3]))


def test_simpo_hand_margin():
    """β = 2, γ = 0.5. ℓ_w = (−1, −2) ⇒ ℓ̄_w = −1.5;  ℓ_l = (−3, −1, −2) ⇒ ℓ̄_l = −2;  z = 2·0.5 − 0.5 = 0.5.
    L = −log σ(0.5) = log(1 + e^{−0.5}) = 0.4740770;  dL/dz = −σ(−0.5) = −0.3775407 ⇒
    ∂L/∂ℓ_w,t = −0.3775407·β/2 = −0.3775407,  ∂L/∂ℓ_l,t = +0.3775407·β/3 = 0.2516938.
    metrics: rewards/chosen = βℓ̄_w = −3, rewards/rejected = −4, margin 1, accuracy 1."""
    batch, out = _pair([-1.0, -2.0, 0.0], [-3.0, -1.0, -2.0], [1, 1, 0], [1, 1, 1])
    res = SimPO(SimPOConfig(beta=2.0, gamma=0.5)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.4740770))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[-0.3775407, -0.3775407, 0.0], [0.2516938] * 3]))
    assert res.metrics == pytest.approx({"rewards/chosen": -3.0, "rewards/rejected": -4.0, "rewards/margin": 1.0,
                                         "rewards/accuracy": 1.0})


def test_simpo_gamma0_single_tokens_is_reference_free_dpo():
    """Limiting case: one-token completions make ℓ̄ = Σℓ, so with γ = 0 SimPO(β) is DPO(β) with ℓ_ref ≡ 0."""
    g = torch.Generator().manual_seed(3)
    seqs = [Seq([1, 2], [5], p, row={"is_chosen": float(ch)}, token={"pol": [-float(torch.rand(1, generator=g)) * 3]})
            for p in range(3) for ch in (1, 0)]
    batch = collate(seqs, pad_id=0)
    batch.fields["ref_logps"] = torch.zeros_like(batch.fields["pol"])
    a, b = _leaf(batch.fields["pol"]), _leaf(batch.fields["pol"])
    simpo = SimPO(SimPOConfig(beta=0.7, gamma=0.0)).loss(batch, PolicyOutput(a)).loss
    dpo = DPO(DPOConfig(beta=0.7)).loss(batch, PolicyOutput(b)).loss
    simpo.backward()
    dpo.backward()
    assert_close(simpo, dpo)
    assert_close(a.grad, b.grad)


def test_simpo_needs_and_micro_batches():
    """Reference-free pairs; with totals["groups"] the per-pair micro-batch losses sum to the batch mean."""
    algo = SimPO(SimPOConfig())
    assert algo.needs.data == ("pairs",) and algo.needs.reference is False
    g = torch.Generator().manual_seed(4)
    seqs = [Seq([1, 2], list(range(5, 5 + n)), p, row={"is_chosen": float(ch)},
                token={"pol": (-torch.rand(n, generator=g) * 3).tolist()})
            for p, ns in enumerate([(2, 3), (1, 1), (4, 2)]) for n, ch in zip(ns, (1, 0))]
    batch = collate(seqs, pad_id=0)
    full = algo.loss(batch, PolicyOutput(batch.fields["pol"])).loss
    parts = [algo.loss(mb, PolicyOutput(mb.fields["pol"])).loss for mb in micro_batches(batch, 2)]
    assert len(parts) == 3
    assert_close(sum(parts), full)
    with pytest.raises(ValueError, match="beta"):
        SimPOConfig(beta=0.0)


# ---------------------------------------------------------------------------------------------------
# the real CLI


_PREFS = [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["simpo"])
def test_cli_two_steps_train_changes_weights(tmp_path, algo):
    """`tokalign train simpo` for 2 steps on the bundled model, on a conversational TRL preference JSONL: the run
    prints its checkpoint path, every logged loss is finite, every gradient norm positive and the saved weights differ
    from the bundled model's."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for q, c, r in _PREFS))
    train_changes_weights(tmp_path, algo, "--data", str(data))
