"""A failed ``train`` leaves nothing to trip over, and a plug-in's exception is the plug-in's one line (exit 2)."""

from __future__ import annotations

import pytest
from conftest import cli

BROKEN = '''
import dataclasses
from tokalign.algorithms.sft import SFT


@dataclasses.dataclass
class Config:
    fail_at_step: int = 1
    mode: str = "raise"


class Broken(SFT):
    """SFT whose loss raises (or returns a non-scalar) from step ``fail_at_step`` on."""
    Config = Config

    def __init__(self, config):
        self.calls = 0
        self.mode = config.mode
        self.fail_at = config.fail_at_step
        super().__init__(SFT.Config())

    def loss(self, batch, out):
        self.calls += 1
        if self.calls >= self.fail_at:
            if self.mode == "raise":
                raise RuntimeError("boom")
            res = super().loss(batch, out)
            return type(res)(res.loss.expand(2, 3), res.metrics)
        return super().loss(batch, out)
'''


@pytest.fixture
def work(tmp_path):
    (tmp_path / "broken_algo.py").write_text(BROKEN)
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "{a}+1=", "completion": "{a + 1}"}}\n' for a in range(4)))
    return tmp_path


def _train(work, *extra, check=False):
    return cli("train", "broken_algo:Broken", "--data", "data.jsonl", "--max-steps", "3", "--batch-size", "2", "--out", "C",
               "--quiet", *extra, cwd=work, env={"PYTHONPATH": str(work)}, check=check)


@pytest.mark.slow
def test_failure_before_the_first_checkpoint_leaves_nothing_and_a_rerun_starts(work):
    proc = _train(work)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "algorithm 'broken_algo:Broken'" in line and "raised in loss(): RuntimeError: boom" in line
    assert "Traceback" not in proc.stderr
    assert not (work / "C.partial").exists() and not (work / "C").exists()
    _train(work, "--set", "algorithm.fail_at_step=100", check=True)  # a plain rerun starts and finishes
    assert (work / "C" / "model.safetensors").is_file()


@pytest.mark.slow
def test_non_scalar_loss_is_a_contract_violation(work):
    proc = _train(work, "--set", "algorithm.mode=shape")
    assert proc.returncode == 2 and "broke the contract in loss(): the loss must be a scalar tensor, got shape [2, 3]" in proc.stderr


@pytest.mark.slow
def test_debug_after_the_subcommand_shows_the_traceback(work):
    proc = _train(work, "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "boom" in proc.stderr


@pytest.mark.slow
def test_resume_of_a_partial_without_checkpoint_starts_from_the_beginning(work):
    (work / "C.partial").mkdir()
    (work / "C.partial" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run killed before its first checkpoint
    proc = _train(work, "--resume", "--set", "algorithm.fail_at_step=100", check=True)
    assert "starting from the beginning" in proc.stderr
    assert (work / "C" / "model.safetensors").is_file() and not (work / "C.partial").exists()


@pytest.mark.slow
def test_a_partial_without_checkpoint_does_not_block_a_plain_rerun(work):
    (work / "C.partial").mkdir()
    _train(work, "--set", "algorithm.fail_at_step=100", check=True)
    assert (work / "C" / "model.safetensors").is_file()
