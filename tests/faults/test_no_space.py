"""A full disk while writing an artifact: one line naming the path and the fix, exit 2, nothing left behind."""

from __future__ import annotations

import errno

import pytest
from conftest import cli
from fault_harness import tmpfs
from score_plugins import make_rollouts

from tokalign import artifacts
from tokalign.errors import NoSpace, no_space

ROWS = [{"id": "a", "prompt": '"p"', "prompt_text": "p", "prompt_ids": [1, 2]}]


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and "internal error" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize("stage", ["prepare", "score"])
def test_an_output_on_a_full_tmpfs_is_one_no_space_line_and_leaves_nothing(tmp_path, stage):
    make_rollouts(tmp_path / "R", 200)  # score's input, on the roomy disk
    with tmpfs(tmp_path / "small", "4k") as small:
        out = small / "out"
        args = ["prepare", "arith", "--limit", "64"] if stage == "prepare" else ["score", "R", "-r", "exact_match"]
        proc = cli(*args, "--out", str(out), cwd=tmp_path, check=False, env={"TOKALIGN_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 2, proc.stderr
        line = one_error_line(proc.stderr)
        assert line.startswith(f"error: No space left on the device holding '{out}'") and "another --out" in line, line
        assert "nothing was left behind" in line
        assert sorted(p.name for p in small.iterdir()) == []  # no temp dir, no half artifact
        assert proc.stdout == ""  # no path for a next stage to pick up


def test_enospc_anywhere_in_a_write_is_no_space_and_cleans_up(tmp_path, monkeypatch):
    """Without root: the disk 'fills up' at the manifest write; the existing artifact stays as it was."""
    with artifacts.writing(tmp_path / "P", "prompts", artifacts.Provenance()) as w:
        w.write_rows(ROWS)
    real = artifacts.build_manifest

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "build_manifest", full)
    with pytest.raises(NoSpace, match=r"No space left on the device holding '.*P'.*another --out"):
        with artifacts.writing(tmp_path / "P", "prompts", artifacts.Provenance(), overwrite=True) as w:
            w.write_rows(ROWS * 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]
    assert len(artifacts.read(tmp_path / "P", ["prompts"]).rows()) == 1


def test_no_space_is_recognised_through_wrappers():
    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert no_space(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert no_space(Exception("No space left on device (os error 28)"))  # tokenizers' save
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("file write failed") from e
    except RuntimeError as e:
        assert no_space(e)
    assert not no_space(OSError(errno.ENOENT, "No such file or directory")) and not no_space(ValueError("x"))
