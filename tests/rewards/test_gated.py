"""G-RA's gated reward accumulation: hand-computed totals and token values, and its limiting cases."""

from __future__ import annotations

import math

import pytest

from tokalign import rewards
from tokalign.protocols import Sample
from tokalign.rewards.gated import Gated, GatedConfig


def episode(answer: str, turn_rewards, spans, n: int) -> Sample:
    return Sample(id="s", prompt="p", completion=answer, completion_ids=list(range(n)), reference="42",
                  metadata={"turn_rewards": turn_rewards, "turn_spans": spans, "turns": len(turn_rewards)})


SPANS = [[0, 3, "model"], [3, 6, "env"], [6, 8, "model"]]


def test_gate_open_adds_step_rewards_at_turn_ends():
    (r,) = Gated(GatedConfig(step_weight=0.5))([episode("42", [0.2, None], SPANS, 8)])
    assert r.value == pytest.approx(1.0 + 0.5 * 0.2)
    assert r.token_values == pytest.approx([0, 0, 0.1, 0, 0, 0, 0, 1.0])  # step 1 ends at 2; the outcome on the last token
    assert math.isclose(sum(r.token_values), r.value) and r.info["gate_open"] is True


def test_gate_closed_keeps_only_the_outcome():
    (r,) = Gated()([episode("41", [0.7, 0.3], SPANS, 8)])
    assert r.value == 0.0 and r.token_values == [0.0] * 8 and r.info["gate_open"] is False


def test_limiting_cases():
    # τ = −inf: plain accumulation, even for a failed outcome
    (r,) = Gated(GatedConfig(threshold=-math.inf))([episode("41", [0.7, 0.3], SPANS, 8)])
    assert r.value == pytest.approx(1.0) and r.token_values == pytest.approx([0, 0, 0.7, 0, 0, 0, 0, 0.3])
    # no step rewards (single turn): the base reward
    single = Sample(id="s", prompt="p", completion="42", completion_ids=[1, 2], reference="42")
    (r,) = Gated()([single])
    assert r.value == 1.0 and r.token_values == [0.0, 1.0]
    # w = 0: the base reward
    (r,) = Gated(GatedConfig(step_weight=0.0))([episode("42", [0.7, 0.3], SPANS, 8)])
    assert r.value == 1.0


def test_resolves_by_name_and_refuses_bad_options():
    (res,) = rewards.resolve(["gated"], {"gated": {"threshold": 0.5}})
    assert res.name == "gated"
    from tokalign.errors import UserError

    with pytest.raises(UserError, match="threshold"):
        rewards.resolve(["gated"], {"gated": {"threshold": "high"}})
