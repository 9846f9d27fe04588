"""CRM / CRF: the conciseness score coupled with the outcome reward — hand-computed values, the limits (λ = 0, every
answer wrong), option errors, the trained-RM scorer through ``reward_model``, and one run through ``tokalign score``."""

from __future__ import annotations

import pytest

from conftest import cli
from tokalign import artifacts, rewards
from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards.crm import CRM, CRMConfig, length_conciseness, minmax

NAME = "crm"


def sample(answer: str, n: int, ref: str = "42", group: int | None = None, limit: int | None = None) -> Sample:
    meta = {} if group is None else {"group_id": group}
    if limit is not None:
        meta["max_new_tokens"] = limit
    return Sample(id=f"{answer}/{n}", prompt="p", completion=answer, completion_ids=list(range(n)), reference=ref,
                  metadata=meta)


class TokenOutcome:
    """A token-level outcome: 1 when the completion is "42", spread evenly over its tokens."""

    def __call__(self, samples):
        out = []
        for s in samples:
            v = 1.0 if s.completion == "42" else 0.0
            n = len(s.completion_ids)
            out.append(Reward(v, [v / n] * n if n else None))
        return out


def stand_in(**kw) -> CRM:
    return CRM(CRMConfig(scorer="length", max_len=kw.pop("max_len", 10), **kw))


def test_additive_hand_computed():
    # c = 1 − n/10: 2 tokens → 0.8, 6 → 0.4; the wrong one (4 tokens) gets its outcome 0 and no bonus
    got = stand_in(lam=0.5)([sample("42", 2), sample("42", 6), sample("41", 4)])
    assert [r.value for r in got] == pytest.approx([1.0 + 0.5 * 0.8, 1.0 + 0.5 * 0.4, 0.0])
    assert [r.info["correct"] for r in got] == [True, True, False]
    assert got[0].info["concise"] == pytest.approx(0.8) and got[0].info["bonus"] == pytest.approx(0.4)
    assert "concise" not in got[2].info and got[2].info["bonus"] == 0.0
    assert all(r.token_values is None for r in got)  # exact_match is sequence-level, so is CRM on it


def test_product_hand_computed():
    # o · (1 − λ + λ·c): λ = 0.5, c = 0.75 → 0.875; λ = 1 → o · c
    (r,) = stand_in(lam=0.5, coupling="product", max_len=8)([sample("42", 2)])
    assert r.value == pytest.approx(1.0 * (0.5 + 0.5 * 0.75))
    (r,) = stand_in(lam=1.0, coupling="product", max_len=8)([sample("42", 2)])
    assert r.value == pytest.approx(0.75)
    (r,) = stand_in(lam=1.0, coupling="product", max_len=8)([sample("7", 2)])
    assert r.value == 0.0


def test_limits_lambda_zero_and_all_wrong_are_the_outcome():
    batch = [sample("42", 3), sample("41", 5), sample("42", 9)]
    outcome = [rewards.normalise("exact_match", s, v) for s, v in zip(batch, rewards.resolve_base("exact_match").fn(batch))]
    for coupling in ("additive", "product"):
        got = stand_in(lam=0.0, coupling=coupling)(batch)
        assert [(r.value, r.token_values, r.info) for r in got] == [(r.value, r.token_values, r.info) for r in outcome]
        wrong = [sample("1", 3), sample("2", 5), sample("3", 9)]
        got = stand_in(lam=2.0, coupling=coupling, group_norm="minmax")(wrong)
        assert [r.value for r in got] == [0.0, 0.0, 0.0] and not any(r.info["correct"] for r in got)


def test_scorer_runs_only_on_correct_samples():
    # a wrong sample without any length limit would make the stand-in raise: it is never scored
    crm = stand_in(max_len=0)
    (r,) = crm([sample("41", 4)])
    assert r.value == 0.0
    (r,) = crm([sample("42", 4, limit=16)])  # L from the rollout's recorded max_new_tokens
    assert r.value == pytest.approx(1.0 + 0.75)
    with pytest.raises(ValueError, match="needs a limit"):
        crm([sample("42", 4)])


def test_token_values_keep_their_sum():
    crm = CRM(CRMConfig(base="test_crm:TokenOutcome", scorer="length", max_len=4, lam=1.0))
    right, wrong = crm([sample("42", 2), sample("41", 2)])
    assert right.value == pytest.approx(1.5) and right.token_values == pytest.approx([0.5, 1.0])
    assert wrong.value == 0.0 and wrong.token_values == [0.0, 0.0]


def test_group_minmax_over_correct_samples():
    # group 0: correct c = 0.9, 0.5, 0.7 → 1, 0, 0.5; group 1: one correct sample → 1; the wrong ones add nothing
    batch = [sample("42", 1, group=0), sample("42", 5, group=0), sample("41", 2, group=0), sample("42", 3, group=0),
             sample("42", 8, group=1), sample("41", 1, group=1)]
    got = stand_in(lam=0.5, group_norm="minmax")(batch)
    assert [r.value for r in got] == pytest.approx([1.5, 1.0, 0.0, 1.25, 1.5, 0.0])
    assert got[1].info["concise"] == pytest.approx(0.5) and got[1].info["concise_normalised"] == 0.0
    assert minmax([2.0, 2.0]) == [1.0, 1.0]
    assert length_conciseness(sample("x", 0), 5) == 1.0 and length_conciseness(sample("x", 20), 5) == 0.0


def test_option_errors_are_one_line():
    with pytest.raises(UserError, match=r"needs the conciseness reward model: --reward-opt crm.model=PATH") as e:
        rewards.resolve([NAME])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="coupling must be one of additive, product"):
        rewards.resolve([NAME], {NAME: {"scorer": "length", "coupling": "sum"}})
    with pytest.raises(UserError, match="lam must be a finite number ≥ 0"):
        rewards.resolve([NAME], {NAME: {"scorer": "length", "lam": -1}})
    with pytest.raises(UserError, match="has no option 'lambda'"):
        rewards.resolve([NAME], {NAME: {"scorer": "length", "lambda": 1}})
    with pytest.raises(UserError, match="base must name another reward"):
        rewards.resolve([NAME], {NAME: {"scorer": "length", "base": "crm"}})
    (res,) = rewards.resolve([NAME], {NAME: {"scorer": "length", "lam": 0.5, "max_len": 64}})
    assert res.config["lam"] == 0.5 and res.config["base"] == "exact_match"


def test_the_reward_model_scorer_is_reward_model(tmp_path):
    from test_reward_model import make_classifier

    from tokalign.rewards.reward_model import RewardModel

    rm = str(make_classifier(tmp_path / "crm", 1, seed=5))
    batch = [sample("42", 2), sample("41", 2), sample("42", 3)]
    batch[2].completion = " 42 "  # still exact_match-correct, a different text for the RM
    want = [r.value for r in RewardModel(RewardModel.Config(model=rm, normalize="sigmoid"))([batch[0], batch[2]])]
    got = CRM(CRMConfig(model=rm, scorer_options={"normalize": "sigmoid"}, lam=0.25))(batch)
    assert [r.value for r in got] == pytest.approx([1 + 0.25 * want[0], 0.0, 1 + 0.25 * want[1]], rel=1e-5)
    assert got[0].info["concise"] == pytest.approx(want[0], rel=1e-5)


@pytest.mark.slow
def test_crm_through_score(tmp_path):
    """`tokalign score R --reward crm` with the length stand-in: every row is exact_match + λ·1[correct]·c, c read from
    the row's completion length and the rollout's recorded max_new_tokens; with τ = 0 every row counts as correct."""
    cli("prepare", "arith", "--limit", "3", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "2", "--seed", "0", "--max-new-tokens", "16", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", NAME, "--reward", "exact_match", "--reward-opt", f"{NAME}.scorer=length",
        "--reward-opt", f"{NAME}.lam=0.5", "--reward-opt", f"{NAME}.threshold=0", "--out", "S", cwd=tmp_path)
    rows = list(artifacts.read(tmp_path / "S", ["scored"]).rows())
    assert len(rows) == 6
    for row in rows:
        o, n = row["rewards"]["exact_match"], len(row["completion_ids"])
        assert row["rewards"][NAME] == pytest.approx(o + 0.5 * (1 - min(n, 16) / 16))
