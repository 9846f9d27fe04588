"""--log tensorboard / wandb (tokalign/train/tracking.py), and the per-step metrics an online GRPO run logs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import cli
from tokalign.errors import UserError
from tokalign.train import tracking


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in a TensorBoard log dir (read without TensorFlow)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_unknown_tracker_is_a_user_error():
    with pytest.raises(UserError, match=r"Unknown --log 'tensorbord'. Did you mean 'tensorboard'"):
        tracking.check(["tensorbord"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_wandb_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="needs the wandb package.*pip install wandb") as e:
        tracking.start(["wandb"], tmp_path, {})
    assert "\n" not in str(e.value)


def test_no_trackers_is_a_no_op(tmp_path):
    t = tracking.start([], tmp_path, {})
    t.log({"loss": 1.0}, 1)
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    """Numbers are logged at their step (non-numbers and 'step' skipped); a run resumed at step 1 purges the old
    step-2 value it redoes."""
    t = tracking.start(["tensorboard", "tensorboard"], tmp_path, {"seed": 0})
    assert len(t.trackers) == 1
    for step, loss in ((1, 0.5), (2, 0.25)):
        t.log({"step": step, "loss": loss, "reward/mean": step / 4, "note": "x", "flag": True}, step)
    t.close()
    got = scalars(tmp_path / "tb")
    assert got == {"loss": {1: 0.5, 2: 0.25}, "reward/mean": {1: 0.25, 2: 0.5}}
    again = tracking.start(["tensorboard"], tmp_path, {"seed": 0}, start_step=1)
    again.log({"loss": 0.125}, 2)
    again.close()
    assert scalars(tmp_path / "tb")["loss"] == {1: 0.5, 2: 0.125}


def test_log_in_yaml_config_is_checked_in_a_dry_run(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  log: [tensorbord]\n")
    proc = cli("train", "grpo", "--data", "arith", "--config", "bad.yaml", "--dry-run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Unknown --log 'tensorbord'" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "ok.yaml").write_text("train:\n  log: [tensorboard]\n")
    cli("train", "grpo", "--data", "arith", "--config", "ok.yaml", "--dry-run", cwd=tmp_path)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model) -> Path:
    """A 2-step online GRPO run on arith with β > 0 (so KL is logged) and --log tensorboard."""
    work = tmp_path_factory.mktemp("track")
    cli("train", "grpo", "--data", "arith", "--model", str(tiny_model), "--out", "C", "--max-steps", "2",
        "--batch-size", "2", "--n", "4", "--set", "rollout.max_new_tokens=8", "--set", "algorithm.beta=0.04",
        "--log", "tensorboard", "--quiet", cwd=work)
    return work / "C"


@pytest.mark.slow
def test_train_log_tensorboard_event_file_holds_the_steps(grpo_run):
    """The final artifact carries tb/ (the work dir is gone); its scalars equal metrics.jsonl's for steps 1 and 2."""
    assert not grpo_run.with_name("C.partial").exists()
    assert list((grpo_run / "tb").glob("events.out.tfevents.*"))
    got = scalars(grpo_run / "tb")
    rows = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "reward/mean", "entropy", "kl"):
        assert set(got[key]) == {1, 2}
        for r in rows:
            assert got[key][r["step"]] == pytest.approx(r[key], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_online_grpo_logs_the_usual_metrics(grpo_run):
    """What TRL/verl users look for: reward mean/std overall and per reward, KL (β > 0), entropy, clip fraction,
    completion length mean/min/max, tokens/s, and the sampler-vs-trainer log-prob gap."""
    rows = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    expected = {"loss", "reward/mean", "reward/std", "reward/exact_match", "reward/exact_match_std", "kl", "entropy",
                "clip_fraction", "completion/len_mean", "completion/len_min", "completion/len_max", "completion/truncated",
                "tokens_per_s", "mismatch/logp_gap_abs", "grad_norm", "lr"}
    for r in rows:
        assert expected <= set(r), expected - set(r)
        assert r["completion/len_min"] <= r["completion/len_mean"] <= r["completion/len_max"] <= 8


def test_wandb_gets_config_and_steps(tmp_path, monkeypatch):
    """A stand-in wandb module records what tokalign hands it: init(project, name, config), log(scalars, step), finish."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    t = tracking.start(["wandb"], tmp_path / "run.partial", {"seed": 3})
    t.log({"step": 1, "loss": 0.5, "tag": "x"}, 1)
    t.close()
    assert calls == [("init", {"project": "proj", "name": "run", "config": {"seed": 3}}), ("log", {"loss": 0.5}, 1), ("finish",)]

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    fake.init = refuse
    with pytest.raises(UserError, match=r"wandb.init failed \(api_key not configured.*WANDB_MODE=offline"):
        tracking.start(["wandb"], tmp_path, {})
