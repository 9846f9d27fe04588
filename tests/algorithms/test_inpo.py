"""INPO (arXiv:2407.00617): the loss and its gradient by hand (per-token means and sums), its limiting cases — π_t = π_ref
is IPO bit for bit, ητ = 1 drops π_t, τ = 0 drops π_ref, h_t on its target η/2 is a minimum —, micro-batches adding up,
the previous-iterate component (its own model, or the reference's log-probs), the config checks, and two iterations
through the real CLI.

Notation: ℓ = policy, ℓ^t = previous iterate π_t, ℓ^ref = reference log-probs per token; u = agg(ℓ − ℓ^t),
v = agg(ℓ^ref − ℓ^t), h = (u_w − ητ v_w) − (u_l − ητ v_l), L = mean over pairs of (h − η/2)²."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.inpo import INPO, INPOConfig, PreviousIterate
from tokalign.batching import Seq, collate
from tokalign.protocols import PolicyOutput

# one pair: row 0 chosen (2 tokens + padding), row 1 rejected (3 tokens)
POL = [[-1.0, -2.0, 0.0], [-2.0, -2.0, -1.0]]
PREV = [[-1.5, -2.5, 0.0], [-1.0, -1.5, -0.5]]
REF = [[-2.0, -3.0, 0.0], [-0.5, -1.0, -1.0]]
MASK = [[1, 1, 0], [1, 1, 1]]


def _pair(pol=POL, prev=PREV, ref=REF, mask=MASK):
    fields = {"ref_logps": torch.tensor(ref), "previous_logps": torch.tensor(prev), "is_chosen": torch.tensor([1.0, 0.0]),
              "group_ids": torch.tensor([0, 0])}
    return token_batch(mask, fields, {"groups": 1.0}), PolicyOutput(leaf(pol))


def test_hand_loss_and_gradient_per_token_means():
    """η = 2, τ = 0.25 (ητ = ½), per-token means.
    chosen:   ℓ − ℓ^t = (0.5, 0.5) ⇒ u_w = 0.5;  ℓ^ref − ℓ^t = (−0.5, −0.5) ⇒ v_w = −0.5;  u_w − ½v_w = 0.75
    rejected: ℓ − ℓ^t = (−1, −0.5, −0.5) ⇒ u_l = −2/3;  ℓ^ref − ℓ^t = (0.5, 0.5, −0.5) ⇒ v_l = 1/6;  u_l − ½v_l = −3/4
    h = 0.75 + 0.75 = 1.5 — the paper's form agrees: log π ratio (−1.5) − (−5/3) = 1/6, log π_ref ratio −2.5 − (−5/6)
    = −5/3, log π_t ratio −2 − (−1) = −1; h = 1/6 − ½(−5/3) − ½(−1) = 1.5.
    L = (1.5 − η/2)² = 0.5² = 0.25;  ∂L/∂h = 2·0.5 = 1 ⇒ ∂L/∂ℓ = 1/2 per chosen token, −1/3 per rejected token, 0 on padding.
    metrics: margin 1.5, log π/π_t of y_w 0.5 and of y_l −2/3, accuracy 1."""
    batch, out = _pair()
    res = INPO(INPOConfig(eta=2.0, tau=0.25)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.25))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[0.5, 0.5, 0.0], [-1 / 3, -1 / 3, -1 / 3]]))
    assert res.metrics["inpo/margin"] == pytest.approx(1.5)
    assert res.metrics["inpo/logratio_chosen"] == pytest.approx(0.5)
    assert res.metrics["inpo/logratio_rejected"] == pytest.approx(-2 / 3)
    assert res.metrics["rewards/accuracy"] == 1.0


def test_hand_loss_and_gradient_sums():
    """The same pair with sequence log-probs (log_ratio = sum): u_w = 1, v_w = −1 ⇒ 1 + 0.5 = 1.5;
    u_l = −2, v_l = 0.5 ⇒ −2 − 0.25 = −2.25;  h = 3.75;  L = (3.75 − 1)² = 7.5625;  ∂L/∂h = 5.5 ⇒ ∂L/∂ℓ = +5.5 per
    chosen token, −5.5 per rejected token."""
    batch, out = _pair()
    res = INPO(INPOConfig(eta=2.0, tau=0.25, log_ratio="sum")).loss(batch, out)
    assert_close(res.loss, torch.tensor(7.5625))
    res.loss.backward()
    assert_close(out.logps.grad, torch.tensor([[5.5, 5.5, 0.0], [-5.5, -5.5, -5.5]]))


def _random_pairs(seed: int):
    """Three pairs of random lengths, collated (totals["groups"] = 3), with random policy ("pol"), reference and
    previous-iterate log-probs."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for p, (n_c, n_r) in enumerate([(2, 3), (1, 1), (4, 2)]):
        for n, chosen in ((n_c, 1.0), (n_r, 0.0)):
            seqs.append(Seq([1, 2], list(range(5, 5 + n)), p, row={"is_chosen": chosen},
                            token={name: (-torch.rand(n, generator=g) * 3).tolist() for name in ("pol", "ref_logps", "previous_logps")}))
    return collate(seqs, pad_id=0)


def _loss_and_grad(algo, batch):
    lp = leaf(batch.fields["pol"])
    loss = algo.loss(batch, PolicyOutput(lp)).loss
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("tau", [0.0, 0.01, 0.05, 0.1])
def test_previous_is_reference_is_ipo_bit_for_bit(tau):
    """π_t = π_ref: v = 0 exactly, h = IPO's per-token-mean margin for every τ, and with η = 1/β = 10 the loss and
    gradient are ``ipo``'s (β = 0.1) bit for bit — the run's defaults on both sides."""
    batch = _random_pairs(0)
    batch.fields["previous_logps"] = batch.fields["ref_logps"]
    got = _loss_and_grad(INPO(INPOConfig(eta=10.0, tau=tau)), batch)
    want = _loss_and_grad(DPO(DPOConfig(beta=0.1, loss_type="ipo")), batch)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert float(got[1].abs().max()) > 0
    assert INPOConfig().eta == 10.0 and DPOConfig().beta == 0.1  # the defaults agree


def test_eta_tau_one_drops_the_previous_iterate_and_tau_zero_the_reference():
    """ητ = 1: h = log π/π_ref(y_w) − log π/π_ref(y_l), IPO with β = 1/η whatever π_t; τ = 0: π_ref has no weight, so
    changing it changes nothing."""
    batch = _random_pairs(1)
    got = _loss_and_grad(INPO(INPOConfig(eta=4.0, tau=0.25)), batch)
    want = _loss_and_grad(DPO(DPOConfig(beta=0.25, loss_type="ipo")), batch)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    algo = INPO(INPOConfig(eta=4.0, tau=0.0))
    before = _loss_and_grad(algo, batch)
    batch.fields["ref_logps"] = batch.fields["ref_logps"] - 1.7
    after = _loss_and_grad(algo, batch)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_target_is_a_minimum():
    """h_t = η/2 (the mirror-descent step's log-ratio for a pair the oracle always decides): zero loss and gradient.
    The hand pair has h = 1.5 at η = 2, τ = 0.25; η = 3 with τ = 1/6 keeps ητ = ½ and so h, and puts it on η/2."""
    batch, out = _pair()
    res = INPO(INPOConfig(eta=3.0, tau=1 / 6)).loss(batch, out)
    assert_close(res.loss, torch.tensor(0.0), atol=1e-10, rtol=0)
    res.loss.backward()
    assert_close(out.logps.grad, torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_micro_batches_add_up():
    """Three pairs, totals["groups"] = 3: micro-batches of one pair give losses and gradients summing to the full
    batch's mean over pairs."""
    batch = _random_pairs(2)
    full, summed, full_grad, mb_grad, n = micro_batch_check(INPO(INPOConfig(eta=2.0, tau=0.2)), batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)


def test_previous_iterate_component():
    """Without --with previous the component reuses the reference's log-probs (no model loaded); with it, it loads
    that model frozen and fills its log-probs. Its role is optional; the algorithm asks for the reference too."""
    loaded = []
    ctx = SimpleNamespace(cfg=SimpleNamespace(models={}), load_model=lambda src, trainable=False: loaded.append(src) or "M",
                          frozen_logps=lambda model, batch: torch.full((len(batch), 3), 7.0))
    comp = PreviousIterate()
    comp.setup(ctx)
    batch, _ = _pair()
    del batch.fields["previous_logps"]
    comp.fill(batch, ctx)
    assert loaded == [] and comp.models() == [] and batch.fields["previous_logps"] is batch.fields["ref_logps"]
    ctx.cfg.models = {"previous": "runs/it1"}
    comp.setup(ctx)
    comp.fill(batch, ctx)
    assert loaded == ["runs/it1"] and comp.models() == ["M"] and float(batch.fields["previous_logps"][0, 0]) == 7.0
    algo = INPO(INPOConfig())
    assert algo.needs.data == ("pairs",) and algo.needs.reference
    assert [c.name for c in algo.needs.components] == ["previous"] and comp.roles() == {"previous": False}


def test_config_checks():
    with pytest.raises(ValueError, match="eta must be > 0"):
        INPOConfig(eta=0.0)
    with pytest.raises(ValueError, match="0 ≤ eta·tau ≤ 1"):
        INPOConfig(eta=10.0, tau=0.2)
    with pytest.raises(ValueError, match="0 ≤ eta·tau ≤ 1"):
        INPOConfig(tau=-0.1)
    with pytest.raises(ValueError, match="log_ratio"):
        INPOConfig(log_ratio="max")
    INPOConfig(eta=10.0, tau=0.1)  # ητ = 1 is allowed


# ---------------------------------------------------------------------------------------------------
# the real CLI

_PREFS = [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9"), ("3+1=", "4", "5")]
ALGO = "tokalign.algorithms.inpo:INPO"


@pytest.mark.slow
def test_cli_two_iterations(tmp_path):
    """Iteration 1 (π_t = π_ref = the bundled model) trains as `ipo` at its defaults: the same first-step loss. Iteration 2
    starts from iteration 1's model with it as --with previous (recorded in the manifest) and the bundled model as the
    reference; its first loss differs from iteration 1's, and its weights move. An unknown role is refused."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for q, c, r in _PREFS))
    common = ("--data", str(data), "--max-steps", "2", "--batch-size", "2", "--quiet")
    cli("train", ALGO, *common, "--out", "I1", cwd=tmp_path)
    first = check_run(tmp_path / "I1")
    cli("train", "ipo", *common, "--max-steps", "1", "--out", "IPO", cwd=tmp_path)
    ipo = json.loads((tmp_path / "IPO" / "metrics.jsonl").read_text().splitlines()[0])
    assert first[0]["loss"] == pytest.approx(ipo["loss"], rel=1e-6)
    assert first[0]["inpo/margin"] == pytest.approx(ipo["rewards/margin"] / 0.1, rel=1e-5, abs=1e-7)

    from tokalign.models import BUNDLED_MODEL

    cli("train", ALGO, *common, "--model", "I1", "--ref-model", str(BUNDLED_MODEL), "--with", "previous=I1", "--out", "I2",
        cwd=tmp_path)
    second = check_run(tmp_path / "I2")
    manifest = json.loads((tmp_path / "I2" / "manifest.json").read_text())
    assert manifest["config"]["models"] == {"previous": "I1"}
    assert math.isfinite(second[0]["loss"]) and second[0]["loss"] != pytest.approx(first[0]["loss"], rel=1e-6)

    bad = cli("train", ALGO, *common, "--with", "teacher=I1", "--out", "I3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "it takes: previous" in bad.stderr
