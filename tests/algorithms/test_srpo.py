"""SRPO (arXiv:2406.01660): a hand case (loss and gradient), the limit α = 0 with flat revision rows ⇒ β²·IPO, the
revision layout built from scored rows, the config and data checks, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import IPO, IPOConfig
from tokalign.algorithms.srpo import SRPO, SRPOConfig, revision_groups
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


def _srpo_batch(n_pairs, ref=None, t=1, roles=None):
    b = 6 * n_pairs
    roles = roles if roles is not None else list(range(6)) * n_pairs
    return token_batch(torch.ones(b, t), {"group_ids": torch.arange(n_pairs).repeat_interleave(6),
                                          "srpo_role": torch.tensor(roles, dtype=torch.float32),
                                          "ref_logps": torch.zeros(b, t) if ref is None else ref},
                       {"groups": float(n_pairs)})


def test_srpo_hand_loss_and_gradient():
    """β = 0.1, α = 0.8, ref = 0, one token per row, Δ = (Δ_0..Δ_5) = (1, −1, 2, 0.5, 0, −2):
    L_self = (½ − 0.1·1.5)² + (½ − 0.1·2)² = 0.35² + 0.3² = 0.2125
    L_gen  = (0.1·(2 + 1 + 2 + 1) − 1)² = (−0.4)² = 0.16
    L = 0.2·0.16 + 0.8·0.2125 = 0.202.
    Gradients: g = 2·0.2·(−0.4)·0.1 = −0.016 on Δ_2, Δ_0 and +0.016 on Δ_5, Δ_1;
    self: 2·0.8·0.35·(−0.1) = −0.056 on Δ_2, +0.056 on Δ_3; 2·0.8·0.3·(−0.1) = −0.048 on Δ_4, +0.048 on Δ_5."""
    batch = _srpo_batch(1)
    algo = SRPO(SRPOConfig())
    algo.prepare(batch)
    pol = leaf([[1.0], [-1.0], [2.0], [0.5], [0.0], [-2.0]])
    out = algo.loss(batch, PolicyOutput(pol))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.2 * 0.16 + 0.8 * 0.2125, rel=1e-6)
    expect = [-0.016, 0.016, -0.016 - 0.056, 0.056, -0.048, 0.016 + 0.048]
    assert_close(pol.grad, torch.tensor(expect).unsqueeze(-1), rtol=1e-6, atol=1e-8)


def test_row_order_does_not_matter_and_micro_batches_add_up():
    """Roles are read from the rows, not their order; two pairs as two micro-batches sum to the full loss."""
    torch.manual_seed(0)
    perm = [3, 0, 5, 1, 4, 2]
    batch = _srpo_batch(2, ref=torch.randn(12, 2), t=2, roles=perm + list(range(6)))
    pol = torch.randn(12, 2)
    algo = SRPO(SRPOConfig())
    full = algo.loss(algo.prepare(batch), PolicyOutput(pol)).loss
    parts = sum(algo.loss(batch.select(torch.arange(6 * i, 6 * i + 6)), PolicyOutput(pol[6 * i:6 * i + 6])).loss for i in (0, 1))
    assert_close(parts, full)
    reordered = _srpo_batch(1, ref=batch.fields["ref_logps"][:6][torch.tensor(perm).argsort()], t=2)
    single = algo.loss(reordered, PolicyOutput(pol[:6][torch.tensor(perm).argsort()])).loss
    assert_close(single * 1, algo.loss(batch.select(torch.arange(6)), PolicyOutput(pol[:6])).loss * 2)


def test_alpha_zero_flat_revisions_is_scaled_ipo():
    """α = 0 and revision rows whose policy equals the reference: L = (β h − 1)² = β² (h − 1/β)², IPO's loss with
    β_IPO = β/2 on one-token completions (IPO's per-token mean = sum); gradients likewise ×β² (y_w's and y_l's rows)."""
    torch.manual_seed(1)
    ref = torch.randn(6, 1)
    pol = ref.clone()
    pol[:2] = torch.randn(2, 1)  # only the generative rows move away from the reference
    batch = _srpo_batch(1, ref=ref)
    a, b = leaf(pol), leaf(pol[:2])
    ls = SRPO(SRPOConfig(alpha=0.0, beta=0.2)).loss(batch, PolicyOutput(a)).loss
    pair = token_batch(torch.ones(2, 1), {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                          "ref_logps": ref[:2]}, {"groups": 1.0})
    li = IPO(IPOConfig(beta=0.1)).loss(pair, PolicyOutput(b)).loss
    ls.backward()
    li.backward()
    assert_close(ls, 0.2 ** 2 * li)
    assert_close(a.grad[:2], 0.2 ** 2 * b.grad)
    # the revision rows 2 (y_w | y_l) and 5 (y_l | y_w) enter L_gen as y_w and y_l do; rows 3 and 4 only L_self
    assert torch.equal(a.grad[2], a.grad[0]) and torch.equal(a.grad[5], a.grad[1])
    assert float(a.grad[3:5].abs().max()) == 0.0


def test_revision_groups_layout():
    """Scored group [r = 0, 1, 0]: best = row 1, worst = row 0 (first on ties); a group of equal rewards is dropped."""
    def row(i, g, r, ids):
        return {"id": f"s{i}", "group_id": g, "sample_idx": i, "prompt": "q", "prompt_text": "Q:", "prompt_ids": [1, 2],
                "completion": f"c{i}", "completion_ids": ids, "reward": r}
    rows = [row(0, 7, 0.0, [5]), row(1, 7, 1.0, [6, 6]), row(2, 7, 0.0, [8]), row(3, 9, 1.0, [4]), row(4, 9, 1.0, [4])]
    out = revision_groups(rows, revise_ids=[3])
    assert len(out) == 6 and {r["group_id"] for r in out} == {0}
    assert [r["fields"]["srpo_role"] for r in out] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [r["completion_ids"] for r in out] == [[6, 6], [5], [6, 6], [5], [6, 6], [5]]
    assert [r["prompt_ids"] for r in out] == [[1, 2], [1, 2], [1, 2, 5, 3], [1, 2, 5, 3], [1, 2, 6, 6, 3], [1, 2, 6, 6, 3]]
    assert out[2]["prompt_text"] == "Q:c0\nRevise the answer above to improve it.\n"


def test_config_and_data_checks():
    with pytest.raises(ValueError, match="alpha"):
        SRPOConfig(alpha=1.5)
    with pytest.raises(ValueError, match="own squared loss"):
        SRPOConfig(loss_type="ipo")
    with pytest.raises(ValueError, match="beta"):
        SRPOConfig(beta=0.0)
    batch = _srpo_batch(1)
    del batch.fields["srpo_role"]
    with pytest.raises(UserError, match="srpo_role"):
        SRPO(SRPOConfig()).prepare(batch)
    with pytest.raises(UserError, match="exactly one row"):
        SRPO(SRPOConfig()).prepare(_srpo_batch(1, roles=[0, 1, 2, 3, 4, 4]))
    assert SRPO(SRPOConfig()).needs.data == ("scored",) and SRPO(SRPOConfig()).needs.reference


@pytest.mark.slow
def test_cli_srpo_two_steps(tmp_path):
    """Scored rollouts → revision_groups → a scored artifact → 2 steps of `tokalign train tokalign.algorithms.srpo:SRPO`."""
    from tokalign import artifacts
    from tokalign.models import BUNDLED_MODEL, load_tokenizer

    cli("prepare", "arith", "--limit", "16", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "4", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=tmp_path)
    tok = load_tokenizer(BUNDLED_MODEL)
    rows = revision_groups(artifacts.read(tmp_path / "S", ["scored"]).rows(), tok("\nRevise:\n", add_special_tokens=False)["input_ids"])
    assert rows, "the tiny model's scored rollouts hold no group of differing rewards"
    with artifacts.writing(tmp_path / "V", "scored", artifacts.Provenance()) as w:
        w.write_rows(rows)
    out = tmp_path / "T"
    cli("train", "tokalign.algorithms.srpo:SRPO", "--data", "V", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet", cwd=tmp_path)
    metrics = check_run(out)
    assert all(m["srpo/self_loss"] >= 0 for m in metrics)
