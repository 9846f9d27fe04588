"""T-REG (arXiv:2412.02685): the self-generated token rewards and the regularised DPO loss by hand, the limit α = 0 ⇒ DPO,
the prompt rewrite and the realignment of the variants' per-token values, and a slow run through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.treg import TREG, TREGConfig, self_token_rewards, with_instruction
from tokalign.batching import Seq, move_completion_values
from tokalign.protocols import PolicyOutput


def _treg_batch():
    return token_batch(torch.ones(2, 1), {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                          "ref_logps": torch.zeros(2, 1), "better_logps": torch.tensor([[0.0], [-1.0]]),
                                          "worse_logps": torch.tensor([[-1.0], [0.0]])}, {"groups": 1.0, "tokens": 2.0})


def test_treg_hand():
    """ρ = 2σ(±1) − 1 = ±0.462117. Δ = (1, −1), β = 0.1: DPO = softplus(−0.2) = 0.598139; regulariser per token
    −log σ(0.462117·0.1) (both tokens agree in sign) = softplus(−0.0462117) = 0.670337; L = 0.598139 + 0.5·0.670337."""
    algo = TREG(TREGConfig())
    assert [c.names for c in algo.needs.components] == [("better", "worse")] and algo.needs.reference
    batch = algo.prepare(_treg_batch())
    rho = 2 / (1 + math.exp(-1)) - 1
    assert_close(batch.fields["self_token_rewards"], torch.tensor([[rho], [-rho]]))
    out = algo.loss(batch, PolicyOutput(leaf([[1.0], [-1.0]])))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert_close(out.loss, torch.tensor(softplus(-0.2) + 0.5 * softplus(-0.1 * rho)))


def test_treg_alpha0_is_dpo():
    pol = [[0.7], [-0.3]]
    a, b = leaf(pol), leaf(pol)
    algo = TREG(TREGConfig(alpha=0.0))
    la = algo.loss(algo.prepare(_treg_batch()), PolicyOutput(a)).loss
    lb = DPO(DPOConfig()).loss(_treg_batch(), PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert_close(la, lb)
    assert_close(a.grad, b.grad)
    assert_close(self_token_rewards(torch.zeros(1), torch.zeros(1)), torch.zeros(1))


def test_treg_prompt_rewrite_and_realignment():
    """The instruction goes after the text prompt, or after the last user turn; a completion's per-token values move
    from the variant's positions (longer prompt) to the row's own."""
    assert with_instruction("q", "do better") == "q\n\ndo better"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert with_instruction(msgs, "x")[1]["content"] == "u\n\nx" and msgs[1]["content"] == "u"
    src = [Seq([1, 2, 3, 4], [7, 8], 0)]  # completion values at columns 3, 4
    dst = [Seq([1, 2], [7, 8], 0)]  # ... belong at columns 1, 2
    values = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.25]])
    assert_close(move_completion_values(values, src, dst, 3), torch.tensor([[0.0, 0.5, 0.25]]))


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_treg(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for q, c, r in [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")]))
    out = tmp_path / "treg"
    cli("train", "treg", "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(m["reg"] > 0 for m in metrics)
