"""What a killed writer leaves is a locked-then-orphaned temp dir ``<out>.tmp-<hex>``: never an artifact at ``<out>``,
and the next write of ``<out>`` removes it, while a live writer's temp dir (its lock held) is left alone."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import CLI_ENV

from tokalign import artifacts

ROWS = [{"id": "a", "prompt": '"p"', "prompt_text": "p", "prompt_ids": [1, 2]}]
WRITER = """
import os, signal, sys
from tokalign import artifacts
rows = [{"id": "b", "prompt": '"q"', "prompt_text": "q", "prompt_ids": [3]}]
with artifacts.writing(sys.argv[1], "prompts", artifacts.Provenance(), overwrite=True) as w:
    w.write_rows(rows)
    print(w.path, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # hold the temp dir (and its lock) until told to finish
"""


def write(out, rows=ROWS, overwrite=False):
    with artifacts.writing(out, "prompts", artifacts.Provenance(), overwrite) as w:
        w.write_rows(rows)


def writer(out, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=CLI_ENV)


def test_a_killed_writers_temp_dir_is_cleared_by_the_next_write_a_live_ones_is_kept(tmp_path):
    out = tmp_path / "P"
    live = writer(out, "wait")
    live_tmp = live.stdout.readline().strip()
    dead = writer(out, "die")
    dead_tmp = dead.stdout.readline().strip()
    assert dead.wait() == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dead_tmp.rsplit("/", 1)[1], live_tmp.rsplit("/", 1)[1]])
    assert not out.exists()  # a kill mid-write leaves no artifact at --out

    write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["P", live_tmp.rsplit("/", 1)[1]])  # the dead one's is gone
    live.communicate("\n", timeout=60)
    assert live.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]
    assert [r["id"] for r in artifacts.read(out, ["prompts"]).rows()] == ["b"]  # the last writer's


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "move-aside"])
def test_an_overwrite_leaves_only_the_new_artifact(tmp_path, monkeypatch, swap):
    """One step (renameat2 RENAME_EXCHANGE) where the system has it; else the old one is moved aside to a temp dir."""
    if not swap:
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    write(tmp_path / "P")
    write(tmp_path / "P", rows=ROWS * 2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]
    assert len(artifacts.read(tmp_path / "P", ["prompts"]).rows()) == 2


def test_other_names_next_to_the_output_are_not_touched(tmp_path):
    for name in ("P.tmp-notahexid", "P.tmp-0123456789", "Q.tmp-deadbeef", "P.partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "P.tmp-deadbeef").write_text("a file, not a temp dir")
    write(tmp_path / "P")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P", "P.partial", "P.tmp-0123456789", "P.tmp-deadbeef",
                                                          "P.tmp-notahexid", "Q.tmp-deadbeef"]


def test_trains_resume_point_is_renamed_away_before_it_is_removed(tmp_path, monkeypatch):
    """A kill while `train` removes ``<out>.partial/`` (at the end, or on --overwrite) must not leave half of it: a
    checkpoint without its state, which --resume would trip over. It goes to a temp dir of ``<out>`` first."""
    import shutil

    from tokalign.train import checkpoint

    work = checkpoint.work_dir(tmp_path / "C")
    (work / "checkpoint-2" / "dcp").mkdir(parents=True)
    (work / "checkpoint-2" / "trainer_state.pt").write_text("state")
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # the removal is cut short: none of it happens
    checkpoint.discard(work)
    monkeypatch.undo()
    assert not work.exists()  # no resume point at all, rather than a broken one
    (left,) = tmp_path.iterdir()
    assert left.name.startswith("C.tmp-") and (left / "checkpoint-2" / "trainer_state.pt").is_file()
    write(tmp_path / "C")  # the next write of C clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C"]
