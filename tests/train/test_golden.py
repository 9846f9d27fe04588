"""Every built-in algorithm's fixed-seed 3-step run gives the numbers recorded before the components refactor
(to golden_runs.REL relative / ABS absolute, which says why; tests/train/golden_runs.py records and re-runs them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_runs  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(golden_runs.RUNS))
def test_golden_metrics(name, tmp_path):
    want = json.loads((golden_runs.GOLDEN / f"{name}.json").read_text())
    assert set(want[0]) >= {"loss", "grad_norm", "entropy"}
    problems = golden_runs.compare(golden_runs.run(name, tmp_path), want)
    assert not problems, "\n".join(problems)


def test_every_builtin_algorithm_has_a_golden_run():
    from tokalign import registry

    builtin = {n for n, i in registry.available("algorithm").items() if i.distribution == "tokalign"}
    assert builtin <= {n.split("@")[0] for n in golden_runs.RUNS}


# the same runs packed (train.packing): equal to the padded numbers up to float rounding. Not compared: the padding
# fraction (what packing changes) and the sampler/trainer log-prob gaps (differences of nearly equal numbers)
# h_hat/positive_fraction counts the sign of HAPO's ĥ, whose tokens near 0 flip under packed attention's rounding
# (1e-7): the loss, which is continuous in ĥ, still matches
PACKED_SKIP = ("padding_fraction", "mismatch/logp_gap_abs", "mismatch/logp_gap_max", "h_hat/positive_fraction")
FAST_PACKED = ("grpo", "ppo", "dpo", "tdpo", "ppo@tokens")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST_PACKED else [pytest.mark.slow])
                                  for n in sorted(golden_runs.RUNS)])
def test_packed_run_matches_golden(name, tmp_path):
    want = json.loads((golden_runs.GOLDEN / f"{name}.json").read_text())
    got = golden_runs.run(name, tmp_path, {"train": {"packing": True}})
    if name == "ppo@tokens":  # packed, its token budget counts real tokens: other micro-batches, so only the step's maths
        # compares (metrics that are means per micro-batch, entropy or returns/mean, move with the micro-batches)
        got, want = ([{k: r[k] for k in ("loss", "grad_norm", "reward/mean")} for r in rows] for rows in (got, want))
    problems = golden_runs.compare(got, want, rel=max(1e-5, golden_runs.REL), abs_tol=1e-6, skip=PACKED_SKIP)
    assert not problems, "\n".join(problems)


# one row per micro-batch: algorithms that declare Needs.split_groups have their groups split into single rows, the
# others get one group per micro-batch; the gradients (and losses, up to rounding) must not change. Left out: the
# four whose statistics are per micro-batch by design (DCPO's only-token-mean as in verl, HAPO's ĥ over the
# micro-batch's tokens, KTO's KL estimate from the micro-batch's mismatched rows, STEER's m_min and m_max as in the authors' code)
PER_MICRO_BATCH = ("dcpo", "hapo", "kto", "steer")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in ("grpo", "ppo", "dpo") else [pytest.mark.slow])
                                  for n in sorted(golden_runs.RUNS) if n not in PER_MICRO_BATCH])
def test_one_row_micro_batches_match_golden(name, tmp_path):
    want = json.loads((golden_runs.GOLDEN / f"{name}.json").read_text())
    got = golden_runs.run(name, tmp_path, {"train": {"micro_batch_size": 1, "micro_batch_tokens": 0}})
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert a["loss"] == pytest.approx(b["loss"], rel=max(1e-5, golden_runs.REL), abs=1e-6), f"step {step}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=max(1e-5, golden_runs.REL)), f"step {step}"
        if "reward/mean" in b:
            assert a["reward/mean"] == b["reward/mean"], f"step {step}"
