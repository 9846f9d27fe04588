"""SFT: the negative log-likelihood of the completion tokens on a hand case, and micro-batches adding up to the batch NLL.
CPU only."""

from __future__ import annotations

import torch
from conftest import leaf as _leaf, token_batch as _batch
from torch.testing import assert_close

from tokalign.algorithms.sft import SFT, SFTConfig
from tokalign.batching import Seq, collate, micro_batches
from tokalign.protocols import PolicyOutput


def test_sft_nll_hand():
    """ℓ = [[−1, −2, −3], [−0.5, −4, −9]], mask = [[1, 1, 0], [1, 0, 0]]
    token-mean NLL = (1 + 2 + 0.5)/3 = 1.1666667, ∂L/∂ℓ = −1/3 on each completion token, 0 elsewhere;
    seq-mean-token-mean NLL = ((1 + 2)/2 + 0.5/1)/2 = (1.5 + 0.5)/2 = 1.0."""
    mask = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    lp = _leaf([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    res = SFT(SFTConfig()).loss(_batch(mask), PolicyOutput(lp))
    assert_close(res.loss, torch.tensor(3.5 / 3))
    res.loss.backward()
    assert_close(lp.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))
    res = SFT(SFTConfig(aggregation="seq-mean-token-mean")).loss(_batch(mask), PolicyOutput(_leaf(lp.detach())))
    assert_close(res.loss, torch.tensor(1.0))


def test_sft_micro_batches_with_totals():
    """token-mean over micro-batches with totals["tokens"] sums to the batch NLL."""
    seqs = [Seq([1], [2, 3, 4], 0, token={"pol": [-1.0, -2.0, -3.0]}), Seq([1, 1], [5], 1, token={"pol": [-4.0]}),
            Seq([1], [6, 7], 2, token={"pol": [-0.5, -0.25]})]
    batch = collate(seqs, pad_id=0)
    algo = SFT(SFTConfig())
    full = algo.loss(batch, PolicyOutput(batch.fields["pol"])).loss
    assert_close(full, torch.tensor((1 + 2 + 3 + 4 + 0.5 + 0.25) / 6))
    parts = [algo.loss(mb, PolicyOutput(mb.fields["pol"])).loss for mb in micro_batches(batch, 1)]
    assert_close(sum(parts), full)
