"""DAPO's overlong shaping (arXiv:2503.14476): |y| ≤ L_max − L_buf ⇒ 0; |y| = L_max ⇒ −f."""

import pytest

from tokalign.rewards.overlong import Overlong


@pytest.mark.parametrize("length,expected", [(0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (20, -1.0), (25, -1.0)])
def test_overlong_by_hand(length, expected):
    """L_max = 20, buffer ⌈0.2·20⌉ = 4: free up to 16 tokens, then −(|y| − 16)/4, −1 past 20."""
    assert Overlong().score(length, 20).value == pytest.approx(expected)


def test_unknown_limit_scores_zero():
    assert Overlong().score(500, None).value == 0.0
