"""BRPO / AnytimeReasoner (arXiv:2505.13438): the budget-relative advantages by hand (and their ablations), the budget
plan and priors, the online hook's summaries from a stand-in engine, the advantages the loss sees, one budget ⇒ GRPO
(scale_rewards none) bit for bit, the config's errors, and a short run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import groups_batch, same_as_base, train_changes_weights
from algo_helpers import stand_in_row as _row
from algo_helpers import stand_in_source as _source

from tokalign.algorithms.brpo import (BRPO, ROW_ADV, SUMMARY, TOKEN_ADV, BRPOConfig, BudgetSummaries, budget_advantages,
                                      budgets_for, prior_probs)
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.batching import Seq, collate
from tokalign.errors import UserError

BRPO_PATH = "tokalign.algorithms.brpo:BRPO"


def test_budget_advantages_hand():
    """S = 2, p = (½, ½), d = 2, a group of two rows with R = (0, 1) and (1, 1).
    G: row 0 (0.5, 0.5), row 1 (1, 0.5). V2 = group means (0.75, 0.5). V1: segment 1 has none (0); segment 2 is
    R_1 · Σ_{j≥2} p_j = (0, 0.5). brpo baseline ((s−1)V1 + (S−s+1)V2)/S: segment 1 (0 + 2·0.75)/2 = 0.75, segment 2
    (V1 + V2)/2 = (0.25, 0.5). A: row 0 (−0.25, 0.25), row 1 (0.25, 0)."""
    R = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert budget_advantages(R, p).tolist() == [[-0.25, 0.25], [0.25, 0.0]]
    assert budget_advantages(R, p, "v2only").tolist() == [[-0.25, 0.0], [0.25, 0.0]]
    assert budget_advantages(R, p, "v1only").tolist() == [[0.5, 0.5], [1.0, 0.0]]
    assert budget_advantages(R, p, "none").tolist() == [[0.5, 0.5], [1.0, 0.5]]
    # a group of one (V2 = 0), R = (0, 1, 1), p = ⅓ each, d = 2: G = (⅔, ⅔, ⅓); V1 = (0, R_1·⅔ = 0,
    # (1·0 + 2·1)/3 · ⅓ = 2/9); baselines (0, (1·0)/3 = 0, (2 · 2/9)/3 = 4/27); A = (⅔, ⅔, ⅓ − 4/27 = 5/27)
    one = budget_advantages(torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert one[0].tolist() == pytest.approx([2 / 3, 2 / 3, 5 / 27])


def test_one_budget_is_the_group_advantage():
    """S = 1: G = R, V2 = mean_g R, V1 = 0, baseline = V2 → R − mean (GRPO's advantage, scale_rewards none)."""
    R = torch.tensor([[1.0], [0.0], [0.0], [1.0]], dtype=torch.float64)
    assert budget_advantages(R, torch.ones(1, dtype=torch.float64)).flatten().tolist() == [0.5, -0.5, -0.5, 0.5]


def test_budget_plan_and_priors():
    assert budgets_for(BRPOConfig(), 16) == [4, 8, 12, 16]
    assert budgets_for(BRPOConfig(splits=3), 10) == [3, 6, 10]
    assert budgets_for(BRPOConfig(budgets=[2, 20]), 16) == [2, 20]
    with pytest.raises(UserError, match="must be ≥ rollout.max_new_tokens"):
        budgets_for(BRPOConfig(budgets=[2, 8]), 16)
    with pytest.raises(UserError, match="repeat or start at 0"):
        budgets_for(BRPOConfig(splits=4), 2)
    assert prior_probs([1, 3], "linear") == [0.25, 0.75]
    assert prior_probs([1, 3], "base") == [0.0, 1.0]
    assert prior_probs([1, 3, 5, 7], "uniform") == [0.25] * 4


@pytest.mark.parametrize("bad", [dict(budgets=[4, 2]), dict(budgets=[0, 2]), dict(splits=0), dict(summaries=0),
                                 dict(prior="beta"), dict(variance_reduction="v3"), dict(discount=0.0)])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        BRPOConfig(**bad)


def test_hook_summaries_and_advantages_hand():
    """Two rows of one group, completions of 4 tokens (reward 0) and 2 tokens (reward 0.9); budgets (2, 4), uniform,
    one summary each; τ = "T" (token 184); every summary is token 7 and the stand-in reward is len(completion_ids)/10.
    Row 0 is cut at 2: its summary scores len(20, 21, 184, 7)/10 = 0.4, so R_0 = (0.4, 0); row 1 (2 tokens) is cut
    nowhere: R_1 = (0.9, 0.9). G: row 0 (0.2, 0), row 1 (0.9, 0.45); V2 (0.55, 0.225); V1 segment 2: row 0 0.4·½ = 0.2,
    row 1 0.45. Baselines: segment 1 0.55; segment 2 (V1 + V2)/2 = 0.2125 (row 0). Row 0's tokens: (−0.35, −0.35,
    −0.2125, −0.2125); row 1's (0.35, 0.35). The summary row: prompt 5 + (20, 21, 184), completion (7), reward 0.4,
    advantage 0.4 − mean of the group's R at budget 1 (0.4 + 0.9)/2 = −0.25."""
    seen: dict = {}
    rows = [{**_row(), "group_id": 0, "prompt_index": 0},
            {**_row(), "id": "b#0", "completion_ids": [30, 31], "sampler_logps": [0.0, 0.0], "reward": 0.9, "group_id": 0,
             "prompt_index": 0}]
    hook = BudgetSummaries(BRPOConfig(budgets=[2, 8], terminate="T"))
    rows[0]["completion_ids"] = [20, 21, 22, 23]
    metrics = hook.after_batch(rows, _source(seen))
    assert seen["prompts"] == [[5, 20, 21, 184]] and seen["n"] == 1
    assert len(rows) == 3
    assert rows[0]["token_fields"][TOKEN_ADV] == pytest.approx([-0.35, -0.35, -0.2125, -0.2125])
    assert rows[1]["token_fields"][TOKEN_ADV] == pytest.approx([0.35, 0.35])
    s = rows[2]
    assert s["prompt_ids"] == [5, 20, 21, 184] and s["completion_ids"] == [7] and s["reward"] == pytest.approx(0.4)
    assert s["fields"][SUMMARY] == 1.0 and s["fields"][ROW_ADV] == pytest.approx(-0.25)
    assert s["group_id"] == 0 and s["prompt_index"] == 0 and s["sampler_logps"] == [0.0]
    assert rows[0]["fields"][SUMMARY] == 0.0
    assert metrics["brpo/summaries_per_completion"] == 0.5
    assert metrics["brpo/reward_at_budget_1"] == pytest.approx(0.65)


def test_summaries_left_out_of_the_batch():
    rows = [{**_row(), "group_id": 0, "prompt_index": 0}]
    BudgetSummaries(BRPOConfig(budgets=[2, 8], train_summaries=False)).after_batch(rows, _source({}))
    assert len(rows) == 1 and TOKEN_ADV in rows[0]["token_fields"]


def test_multi_turn_refused():
    with pytest.raises(UserError, match="multi-turn"):
        BudgetSummaries(BRPOConfig(budgets=[2, 8])).after_batch([{**_row(), "episode": "{}"}], _source({}))


def test_prepare_reads_the_hook_fields():
    """A thinking row gets its token advantages, a summary row its one advantage on every token."""
    seqs = [Seq([1, 2], [3, 4, 5], 0, row={"rewards": 1.0, SUMMARY: 0.0, ROW_ADV: 0.0}, token={TOKEN_ADV: [0.5, 0.5, -0.25]}),
            Seq([1, 2, 3], [6, 7], 0, row={"rewards": 0.0, SUMMARY: 1.0, ROW_ADV: -0.3}, token={TOKEN_ADV: [0.0, 0.0]})]
    batch = BRPO(BRPOConfig(budgets=[1, 8])).prepare(collate(seqs, pad_id=0))
    adv, mask = batch.fields["advantages"], batch.completion_mask.bool()
    assert adv[0][mask[0]].tolist() == [0.5, 0.5, -0.25]
    assert adv[1][mask[1]].tolist() == pytest.approx([-0.3, -0.3])
    assert float(adv[~mask].abs().sum()) == 0
    with pytest.raises(UserError, match="online hook"):
        BRPO(BRPOConfig(budgets=[1, 8])).prepare(groups_batch([[3, 4]], [1.0], [0]))


def test_one_budget_is_grpo_bit_for_bit():
    """splits = 1 installs no hook and is GRPO with scale_rewards none: rewards, advantages, loss and gradient equal."""
    algo = BRPO(BRPOConfig(splits=1))
    assert not any(h.name == "brpo_summaries" for h in algo.needs.hooks)
    torch.manual_seed(0)
    values = -torch.rand(4, 4)

    def make():
        batch = groups_batch([[3, 4, 5], [3, 6, 7], [4, 4, 4], [5, 6, 7]], [1.0, 0.0, 0.5, 0.0], [0, 0, 1, 1])
        batch.fields["old_logps"] = values - 0.05
        return batch

    same_as_base([algo, GRPO(GRPOConfig(scale_rewards="none"))], make, values)


@pytest.mark.slow
def test_cli_run_trains_summaries(tmp_path):
    """Arith completions are 3–4 tokens: budgets (2, 8) cut every one at 2 tokens, so every completion has a summary
    row in the batch (a third of the completion tokens or more)."""
    metrics = train_changes_weights(tmp_path, BRPO_PATH, "--data", "arith", "--n", "4", "--set", "rollout.max_new_tokens=8",
                                    "--set", "algorithm.budgets=[2,8]")
    assert all(m["brpo/summaries_per_completion"] == 1.0 for m in metrics)
    assert all(m["brpo/summary_token_fraction"] > 0.2 for m in metrics)
