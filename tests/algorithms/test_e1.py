"""e1 / Adaptive Effort Control (arXiv:2510.27042): the running per-prompt average and the gated reward over two steps
by hand, the loss and gradient by hand, a large effort = GRPO bit for bit, the state round trip, a per-row effort
field, config errors, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import check_run, same_as_base
from conftest import cli, leaf, token_batch

from tokalign.algorithms.e1 import E1, E1Config
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import PolicyOutput

GROUPS = [0, 0, 0, 1, 1]
PROMPTS = [5, 5, 5, 7, 7]


def _batch(lengths, rewards, prompts=PROMPTS, old=None, extra=None):
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    f = {"rewards": torch.tensor(rewards), "group_ids": torch.tensor(GROUPS), "prompt_index": torch.tensor(prompts)}
    if old is not None:
        f["old_logps"] = old
    f.update(extra or {})
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": float(len(lengths))})


def test_two_steps_by_hand():
    """r = 0.5, m = 0.5. Step 1: prompt 5 lengths 2, 4, 6 → T = 4, within ℓ ≤ 2: rows 0; prompt 7 lengths 1, 3 → T = 2,
    within ℓ ≤ 1: row 3. R = 1 everywhere → R' = 1, 0, 0, 1, 0.
    Step 2: prompt 5 lengths 1, 2, 3 (mean 2) → T = ½·4 + ½·2 = 3, within ℓ ≤ 1.5: row 0; prompt 7 lengths 2, 2 (mean 2)
    → T = ½·2 + ½·2 = 2, within ℓ ≤ 1: none → R' = 1, 0, 0, 0, 0."""
    algo = E1(E1Config(effort=0.5, avg_momentum=0.5))
    f = algo.prepare(_batch([2, 4, 6, 1, 3], [1.0] * 5)).fields
    assert f["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert f["effort_average"].tolist() == [4.0, 4.0, 4.0, 2.0, 2.0]
    assert algo.averages == {5: 4.0, 7: 2.0}
    f = algo.prepare(_batch([1, 2, 3, 2, 2], [1.0] * 5)).fields
    assert f["rewards"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert algo.averages == {5: 3.0, 7: 2.0}


def test_loss_and_gradient_by_hand():
    """One step, r = 1, first visit: prompt 5 lengths 2, 4, 6 (T = 4): within ℓ ≤ 4 → R = 1, 0, 1 → R' = 1, 0, 0;
    prompt 7 lengths 1, 3 (T = 2), R = 0, 1 → R' = 0, 0 (ℓ = 3 > 2). scale none: A = R' − mean_g: ⅔, −⅓, −⅓, 0, 0.
    On policy, token-mean over N = 16: loss = −Σ A_i ℓ_i / N, ∂loss/∂logp_it = −A_i / N."""
    lengths = [2, 4, 6, 1, 3]
    old = -torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    algo = E1(E1Config(effort=1.0, scale_rewards="none"))
    batch = algo.prepare(_batch(lengths, [1.0, 0.0, 1.0, 0.0, 1.0], old=old))
    adv = [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]
    torch.testing.assert_close(batch.fields["advantages"], torch.tensor(adv))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    n = sum(lengths)
    assert float(out.loss.detach()) == pytest.approx(-sum(a * ln for a, ln in zip(adv, lengths)) / n, rel=1e-6)
    grad = torch.tensor([[-a / n] * ln + [0.0] * (6 - ln) for a, ln in zip(adv, lengths)])
    torch.testing.assert_close(lp.grad, grad, rtol=1e-6, atol=1e-9)
    assert out.metrics["e1/within_fraction"] == pytest.approx(0.6)


def test_large_effort_is_grpo_bit_for_bit():
    torch.manual_seed(0)
    values = -torch.rand(5, 6) * 3
    old = values + 0.3 * torch.randn(5, 6)
    same_as_base((E1(E1Config(effort=1e9, beta=0.04)), GRPO(GRPOConfig(beta=0.04))),
                 lambda: _batch([2, 4, 6, 1, 3], [1.0, 0.0, 1.0, 0.5, 1.0], old=old), values)


def test_state_round_trip():
    a = E1(E1Config(avg_momentum=0.7))
    a.prepare(_batch([2, 4, 6, 1, 3], [1.0] * 5))
    b = E1(E1Config(avg_momentum=0.7))
    b.load_state_dict(a.state_dict())
    fa = a.prepare(_batch([3, 3, 5, 2, 4], [1.0] * 5)).fields
    fb = b.prepare(_batch([3, 3, 5, 2, 4], [1.0] * 5)).fields
    assert a.averages == b.averages and torch.equal(fa["rewards"], fb["rewards"])
    fresh = E1(E1Config(avg_momentum=0.7)).prepare(_batch([3, 3, 5, 2, 4], [1.0] * 5)).fields
    assert not torch.equal(fresh["effort_average"], fa["effort_average"])  # the state matters


def test_rows_without_prompt_index_and_per_row_effort():
    """Prompt index −1: the group's mean of this step, nothing stored. A per-row effort (0 = not given) overrides r:
    group 0 lengths 2, 4, 6 (T = 4) with efforts 0 (→ r = 0.5: ℓ ≤ 2), 1 (ℓ ≤ 4), 1 (6 > 4) → 1, 1, 0."""
    algo = E1(E1Config(effort=0.5))
    f = algo.prepare(_batch([2, 4, 6, 1, 3], [1.0] * 5, prompts=[-1] * 5,
                            extra={"effort": torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])})).fields
    assert f["rewards"].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0] and algo.averages == {}


def test_config():
    with pytest.raises(ValueError, match="effort must be > 0"):
        E1Config(effort=0.0)
    with pytest.raises(ValueError, match="avg_momentum must be in"):
        E1Config(avg_momentum=1.0)


@pytest.mark.slow
def test_cli_e1(tmp_path):
    out = tmp_path / "e1"
    cli("train", "tokalign.algorithms.e1:E1", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--set", "algorithm.effort=1.0", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(0 < m["e1/within_fraction"] <= 1 for m in metrics)
    assert metrics[-1]["e1/prompts_tracked"] >= 2
