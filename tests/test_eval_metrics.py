from math import comb

import pytest

from tokalign.stages.evaluate import ks_for, pass_at_k, summarise


def test_pass_at_k_unbiased_estimator_by_hand():
    """n=4 samples, c=1 correct: pass@1 = 1 − C(3,1)/C(4,1) = 1/4; pass@2 = 1 − C(3,2)/C(4,2) = 1 − 3/6 = 1/2."""
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))


def test_ks():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6]


def test_summary_averages_over_prompts():
    rows = [{"group_id": g, "rewards": {"v": r}, "reward": r, "completion_ids": [1] * (g + 1), "finish_reason": "stop"}
            for g, rs in enumerate([[1, 0], [0, 0]]) for r in rs]
    res = summarise(rows, 2, "v")
    assert res["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert res["pass@2"] == pytest.approx((1 + 0) / 2)
    assert res["mean_completion_tokens"] == pytest.approx(1.5)
