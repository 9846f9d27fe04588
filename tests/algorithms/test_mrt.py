"""MRT (arXiv:2503.07572): episode boundaries by hand (the official splitter's paragraph rule, every k tokens, SPO's cut
points), the online hook's J values from a stand-in engine, the three progress bonuses and the loss / gradient from
given Monte-Carlo success rates, α = 0 ⇒ GRPO bit for bit, the config's errors, and short runs through the real CLI."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import PIECES, Tok, check_run, off_policy_loss_and_grad, same_as_base, train_changes_weights
from algo_helpers import stand_in_row as _row
from algo_helpers import stand_in_source as _source
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.mrt import MRT, PAPER_MARKERS, EpisodeRollouts, MRTConfig, delimiter_cuts, episode_cuts
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput

MRT_PATH = "mrt"

# ---------------------------------------------------------------------------------------------------
# episode boundaries


def test_delimiter_cuts_hand():
    """Characters covered by the first j tokens: 1, 2, 3, 7, 9, 10, 12, 16, 17, 19, 32, 34. Paragraphs 1–4 begin at
    characters 3, 9, 12, 19, so they are cut after 3, 5, 7 and 10 tokens (the first count covering them).
    No markers, min 1: every paragraph → 3, 5, 7, 10. Markers Wait/Alternatively: paragraphs 1, 3, 4 → 3, 7, 10.
    The paper's markers, min 3 (the official rule): paragraph 1 is 1 < 3 after paragraph 0, paragraph 3 is 3 after it
    (cut 7), paragraph 4 only 1 after paragraph 3 → 7 alone."""
    assert delimiter_cuts(PIECES, "\n\n", [], 1) == [3, 5, 7, 10]
    assert delimiter_cuts(PIECES, "\n\n", ["Wait", "Alternatively"], 1) == [3, 7, 10]
    assert delimiter_cuts(PIECES, "\n\n", list(PAPER_MARKERS), 3) == [7]
    assert delimiter_cuts(PIECES, "\n\n", [], 2) == [5, 10]  # paragraphs 2 and 4
    assert delimiter_cuts(["a\n\nWait"], "\n\n", [], 1) == []  # the cut would be at the end: dropped
    assert delimiter_cuts(["a", "\n\nWait", "!"], "\n\n", [], 1) == [2]  # a token running on past the delimiter


def test_episode_cuts_modes_hand():
    """delimiter, no markers, min 1: 3, 5, 7, 10; max_cuts 3 → 3, 5, 7; group_size 2 keeps every 2nd start → 5.
    tokens, every 2 of 9: 2, 4, 6, 8 (max_cuts 3: 2, 4, 6). low_prob: SPO's cut points of p = (0.95, 0.5, 0.99, 0.3,
    0.2) at threshold 0.9, interval 1 → 1, 3, 4."""
    row = {"completion_ids": list(range(len(PIECES))), "sampler_logps": None}
    cfg = dict(boundary="delimiter", markers=[], min_paragraphs=1)
    assert episode_cuts(row, Tok(), MRTConfig(**cfg, group_size=1)) == [3, 5, 7, 10]
    assert episode_cuts(row, Tok(), MRTConfig(**cfg, group_size=1, max_cuts=3)) == [3, 5, 7]
    assert episode_cuts(row, Tok(), MRTConfig(**cfg, group_size=2, max_cuts=3)) == [5]
    assert episode_cuts(row, Tok(), MRTConfig(group_size=1)) == [7]  # the paper's markers and min 3 (as above)
    assert episode_cuts(row, Tok(), MRTConfig()) == []  # default group_size 5: one start, no 5th
    row9 = {"completion_ids": [1] * 9, "sampler_logps": None}
    assert episode_cuts(row9, Tok(), MRTConfig(boundary="tokens", episode_tokens=2)) == [2, 4, 6, 8]
    assert episode_cuts(row9, Tok(), MRTConfig(boundary="tokens", episode_tokens=2, max_cuts=3)) == [2, 4, 6]
    row5 = {"completion_ids": [1] * 5, "sampler_logps": [math.log(p) for p in (0.95, 0.5, 0.99, 0.3, 0.2)]}
    assert episode_cuts(row5, Tok(), MRTConfig(boundary="low_prob", interval=1)) == [1, 3, 4]


def test_defaults_group_five_starts():
    """The default group_size 5 keeps the 5th, 10th, … episode start: twelve paragraphs "Wait" (min 3 → starts at
    paragraphs 3, 6, 9; 3 < 5 of them) give no cut; sixteen give starts 3, 6, 9, 12, 15 → only the 5th (paragraph 15, cut at token 30)."""
    def pieces(k):
        return [p for j in range(k) for p in (["Wait"] if j == 0 else ["\n\n", "Wait"])]

    sixteen = pieces(16)  # "Wait" then 15 × ("\n\n", "Wait"): paragraph i begins after token 2i − 1, so it is cut at 2i
    assert delimiter_cuts(sixteen, "\n\n", list(PAPER_MARKERS), 3) == [6, 12, 18, 24, 30]

    class T:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(sixteen[i] for i in ids)

    assert episode_cuts({"completion_ids": list(range(31))}, T(), MRTConfig()) == [30]
    assert episode_cuts({"completion_ids": list(range(23))}, T(), MRTConfig()) == []  # paragraphs 0..11: starts 3, 6, 9


# ---------------------------------------------------------------------------------------------------
# the online hook


def test_hook_values_with_a_termination_text_hand():
    """Completion (20, 21, 22, 23), reward 0, cut every 2 tokens; τ = "T" is one token (100 + 84 % 100 = 184); every
    forced answer is token 7 and the test reward is len(completion_ids)/10. J_0 = len(184, 7)/10 = 0.2,
    J_1 = len(20, 21, 184, 7)/10 = 0.4, J_2 = R = 0: tokens 0–1 (0.2 → 0.4), 2–3 (0.4 → 0); progress 0.2, −0.4
    (mean −0.1); 2 episodes; root 0.2. The answers are generated from prompt + prefix + τ, 3 per boundary."""
    seen: dict = {}
    row = _row()
    hook = EpisodeRollouts(MRTConfig(boundary="tokens", episode_tokens=2, rollouts=3, terminate="T"))
    metrics = hook.after_batch([row], _source(seen))
    assert metrics == pytest.approx({"mrt/episodes_per_completion": 2, "mrt/value_root_mean": 0.2, "mrt/progress_mean": -0.1})
    assert seen["prompts"] == [[5, 184], [5, 20, 21, 184]] and seen["n"] == 3 and seen["max_new_tokens"] == 8
    assert seen["scored"] == [[184, 7]] * 3 + [[20, 21, 184, 7]] * 3
    assert row["token_fields"]["episode_value_start"] == pytest.approx([0.2, 0.2, 0.4, 0.4])
    assert row["token_fields"]["episode_value_end"] == pytest.approx([0.4, 0.4, 0.0, 0.0])
    assert row["fields"]["episode_value_root"] == pytest.approx(0.2)


def test_hook_plain_continuation_and_answer_budget_hand():
    """τ = "" (continuations, as SPO's values): J_0 = len(7)/10 = 0.1, J_1 = len(20, 21, 7)/10 = 0.3. A budget of 6
    answer tokens is passed to the engine as max_new_tokens; within the rollout's own budget (8) a prefix of 8 tokens
    would leave no room: its answers are cut to nothing and marked "length"."""
    seen: dict = {}
    row = _row()
    EpisodeRollouts(MRTConfig(boundary="tokens", episode_tokens=2, rollouts=2, answer_tokens=6)).after_batch([row], _source(seen))
    assert seen["prompts"] == [[5], [5, 20, 21]] and seen["max_new_tokens"] == 6
    assert row["token_fields"]["episode_value_start"] == pytest.approx([0.1, 0.1, 0.3, 0.3])
    long = {**_row(), "completion_ids": [20] * 9}
    seen = {}
    EpisodeRollouts(MRTConfig(boundary="tokens", episode_tokens=8, rollouts=1)).after_batch([long], _source(seen))
    assert seen["scored"] == [[7], [20] * 8]  # root: 7 fits; after 8 tokens: room 8 − 8 = 0


# ---------------------------------------------------------------------------------------------------
# the bonus, the advantages, the loss

# given Monte-Carlo success rates: row 0 (R = 1, 4 tokens) cut at 2 with J_0 = 0.25, J_1 = 0.75;
# row 1 (R = 0, 3 tokens) cut at 1 with J_0 = 0.25, J_1 = 0.5
MASK = [[1.0, 1, 1, 1], [1, 1, 1, 0]]
START = [[0.25, 0.25, 0.75, 0.75], [0.25, 0.5, 0.5, 0.0]]
END = [[0.75, 0.75, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]]


def _batch(old=None):
    f = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.zeros(2, dtype=torch.long),
         "episode_value_start": torch.tensor(START), "episode_value_end": torch.tensor(END),
         "episode_value_root": torch.tensor([0.25, 0.25])}
    if old is not None:
        f["old_logps"] = old
    return token_batch(MASK, f, {"tokens": 7.0, "seqs": 2.0})


@pytest.mark.parametrize("bonus,expected", [
    # to_go: b = R − J_k: row 0 (0.75, 0.75, 0.25, 0.25), row 1 (−0.25, −0.5, −0.5); A = ±0.5 + 0.5·b
    ("to_go", [[0.875, 0.875, 0.625, 0.625], [-0.625, -0.75, -0.75, 0.0]]),
    # episode: progress row 0 (0.5, 0.25), row 1 (0.25, −0.5); A = ±0.5 + 0.5·progress of the token's episode
    ("episode", [[0.75, 0.75, 0.625, 0.625], [-0.375, -0.75, -0.75, 0.0]]),
    # sum: Σ progress = R − J_0 = 0.75, −0.25; R' = 1.375, −0.125, group mean 0.625 → ±0.75 per row
    ("sum", [0.75, -0.75]),
])
def test_progress_bonus_hand(bonus, expected):
    """α = 0.5, Dr.GRPO's unscaled group advantage Â = R − mean = ±0.5 (so the arithmetic is exact)."""
    algo = MRT(MRTConfig(alpha=0.5, bonus=bonus, scale_rewards="none"))
    batch = algo.prepare(_batch())
    assert_close(batch.fields["advantages"], torch.tensor(expected))
    assert torch.equal(batch.fields["rewards"], torch.tensor([1.0, 0.0]))  # the outcome reward is kept


def test_loss_and_gradient_hand_and_against_grpo():
    """On policy (ρ = 1, no clipping), token-mean over N = 7 tokens: loss = −Σ A_t / 7 and ∂loss/∂ℓ_t = −A_t / 7 with
    to_go's A (above): Σ A = 3.0 − 2.125 = 0.875 → loss −0.125. Off policy, MRT's loss and gradient equal GRPO's on the
    same batch with these hand-made advantages."""
    adv = torch.tensor([[0.875, 0.875, 0.625, 0.625], [-0.625, -0.75, -0.75, 0.0]])
    old = -torch.rand(2, 4, generator=torch.Generator().manual_seed(3))
    algo = MRT(MRTConfig(alpha=0.5, scale_rewards="none"))
    batch = algo.prepare(_batch(old=old.clone()))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(-0.125)
    assert_close(lp.grad, -adv * torch.tensor(MASK) / 7)
    assert out.metrics["mrt/bonus_abs_mean"] == pytest.approx((0.75 * 2 + 0.25 * 2 + 0.25 + 0.5 * 2) / 7)

    mrt_loss, mrt_grad = off_policy_loss_and_grad(algo, algo.prepare(_batch()), seed=5)
    grpo_batch = _batch()
    grpo_batch.fields["advantages"] = adv
    grpo_loss, grpo_grad = off_policy_loss_and_grad(GRPO(GRPOConfig(scale_rewards="none")), grpo_batch, seed=5)
    assert_close(mrt_loss, grpo_loss)
    assert_close(mrt_grad, grpo_grad)
    assert mrt_grad.abs().sum() > 0


def test_missing_episode_values_are_refused():
    batch = _batch()
    del batch.fields["episode_value_end"]
    with pytest.raises(UserError, match="missing episode_value_end"):
        MRT(MRTConfig()).prepare(batch)


# ---------------------------------------------------------------------------------------------------
# limit: α = 0 is GRPO bit for bit


@pytest.mark.parametrize("bonus", ["to_go", "episode", "sum"])
def test_alpha_zero_is_grpo_bit_for_bit(bonus):
    """α = 0: GRPO's needs (no hook, scored data allowed) and GRPO's rewards, advantages, loss and gradient, with the
    episode fields present in the batch or not."""
    assert MRT(MRTConfig(alpha=0.0)).needs == GRPO(GRPOConfig()).needs
    assert any(isinstance(h, EpisodeRollouts) for h in MRT(MRTConfig()).needs.hooks)
    torch.manual_seed(0)
    values = -torch.rand(2, 4) * 3
    old = values + 0.3 * torch.randn(2, 4)
    same_as_base([MRT(MRTConfig(alpha=0.0, bonus=bonus, beta=0.04)), GRPO(GRPOConfig(beta=0.04))],
                 lambda: _batch(old=old.clone()), values)
    def plain():
        return token_batch(MASK, {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.zeros(2, dtype=torch.long),
                                  "old_logps": old.clone()}, {"tokens": 7.0, "seqs": 2.0})

    same_as_base([MRT(MRTConfig(alpha=0.0, bonus=bonus)), GRPO(GRPOConfig())], plain, values)


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": -0.1}, "alpha must be a finite number ≥ 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number ≥ 0"),
    ({"bonus": "dense"}, "bonus must be one of to_go, episode, sum"),
    ({"boundary": "steps"}, "boundary must be one of delimiter, tokens, low_prob"),
    ({"delimiter": ""}, "delimiter must be a non-empty string"),
    ({"min_paragraphs": 0}, "min_paragraphs must be ≥ 1"),
    ({"group_size": 0}, "group_size must be ≥ 1"),
    ({"episode_tokens": 0}, "episode_tokens must be ≥ 1"),
    ({"interval": 0}, "interval must be ≥ 1"),
    ({"rollouts": 0}, "rollouts must be ≥ 1"),
    ({"max_cuts": -1}, "max_cuts and answer_tokens must be ≥ 0"),
    ({"answer_tokens": -1}, "max_cuts and answer_tokens must be ≥ 0"),
    ({"p_threshold": 0.0}, r"p_threshold must be in \(0, 1\]"),
    ({"scale_rewards": "rank"}, "scale_rewards must be group, batch or none"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MRTConfig(**kwargs)


def test_config_accepts_an_empty_delimiter_off_delimiter_mode():
    assert MRTConfig(boundary="tokens", delimiter="").delimiter == ""


# ---------------------------------------------------------------------------------------------------
# the real CLI. The bundled model's completions are short sums (two or three digits and EOS) with no "\n\n", so the
# runs cut every 2 tokens (boundary=tokens): a 3-token completion has 2 episodes.


@pytest.mark.slow
def test_cli_mrt(tmp_path):
    out = tmp_path / "mrt"
    cli("train", MRT_PATH, "--data", "arith", "--n", "2", "--set", "algorithm.rollouts=2", "--set", "algorithm.boundary=tokens",
        "--set", "algorithm.episode_tokens=2", "--max-steps", "2", "--batch-size", "4", "--out", str(out), "--quiet")
    metrics = check_run(out)
    assert all(m["mrt/episodes_per_completion"] > 1 for m in metrics)
    assert all(math.isfinite(m["mrt/progress_mean"]) and "mrt/bonus_abs_mean" in m for m in metrics)


@pytest.mark.slow
def test_cli_mrt_episode_bonus_with_termination_text(tmp_path):
    """bonus=episode with a forced-answer text τ = " " and the paper's default boundaries, which find no paragraph here:
    every completion is one episode, whose progress R − J_0 moves the weights where GRPO's would not: at step 1 all
    rewards are equal (GRPO's advantages 0). (Step 2's rewards and forced answers are all 0: no gradient.)"""
    metrics = train_changes_weights(tmp_path, MRT_PATH, "--data", "arith", "--n", "2", "--set", "algorithm.rollouts=2",
                                    "--set", "algorithm.bonus=episode", "--set", 'algorithm.terminate=" "', grad_norm=False)
    assert all(m["mrt/episodes_per_completion"] == 1 for m in metrics)
    first = metrics[0]  # both completions right (R = 1), both forced answers after " " wrong (J_0 = 0): progress 1
    assert first["reward/std"] == 0 and first["mrt/value_root_mean"] == 0 and first["mrt/progress_mean"] == 1
    assert first["grad_norm"] > 0
