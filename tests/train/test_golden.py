"""Every built-in algorithm's fixed-seed 3-step run gives the numbers recorded before the components refactor
(relative 1e-6; tests/train/golden_runs.py records and re-runs them)."""

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
