"""Built-in tasks gsm8k, math, ultrafeedback: local copies named after a colon (``gsm8k:FILE``), the
hub id otherwise (unreachable here: one clear line), through the library and the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, cli

from tokalign.data import formats, loaders
from tokalign.data.tasks import (
    GSM8K,
    GSM8K_INSTRUCTION,
    MATH,
    MATH_INSTRUCTION,
    UltraFeedback,
)
from tokalign.errors import UserError

FIX = ROOT / "tests" / "fixtures"


def test_gsm8k_rows():
    rows = GSM8K(str(FIX / "gsm8k.jsonl")).records("train")
    assert [r["reference"] for r in rows] == ["26", "10000", "6", "15"]
    assert rows[0] == {
        "id": "gsm8k-train-0",
        "prompt": [{"role": "user", "content": "Tom has 3 boxes with 12 pencils in each box. He gives away 10 pencils. "
                                               f"How many pencils does he have left?\n{GSM8K_INSTRUCTION}"}],
        "completion": [{"role": "assistant", "content": "Tom had 3 * 12 = 36 pencils.\nAfter giving some away he has "
                                                        "36 - 10 = 26 pencils.\n#### 26"}],
        "reference": "26",
    }
    fmt, norm = formats.normalise(rows, "gsm8k")
    assert fmt == "prompts" and norm[1]["completion"].endswith("#### 10,000") and norm[1]["reference"] == "10000"


def test_math_rows_file_and_release_folder(capsys):
    rows = MATH(str(FIX / "math.jsonl")).records("train")
    # nested braces kept; the *last* \boxed counts; MATH-500's 'answer' column wins; no answer -> skipped
    assert [(r["id"], r["reference"]) for r in rows] == [
        ("math-train-0", "\\frac{5}{6}"), ("math-train-1", "4"), ("math-train-2", "\\{-3, 3\\}"), ("test/prealgebra/1.json", "4")]
    assert "math: skipped 1 record(s) without a usable answer" in capsys.readouterr().err
    assert rows[0]["prompt"][0]["content"] == f"What is $\\frac{{1}}{{2}} + \\frac{{1}}{{3}}$?\n{MATH_INSTRUCTION}"
    assert rows[1]["completion"][0]["content"] == "Subtract 3: $2x = 8$, so $x = \\boxed{4}$."
    release = MATH(str(FIX / "MATH"))  # the original release: <split>/<subject>/<n>.json
    assert [r["reference"] for r in release.records("train")] == ["56", "7"]
    assert [r["reference"] for r in release.records("test")] == ["9"]


def test_ultrafeedback_rows():
    rows = UltraFeedback(str(FIX / "ultrafeedback.jsonl")).records("train")
    assert rows[1] == {
        "id": "uf-0002", "prompt": [{"role": "user", "content": "Give one word that rhymes with cat."}],
        "chosen": [{"role": "assistant", "content": "Hat."}], "rejected": [{"role": "assistant", "content": "Dog."}],
        "score_chosen": 9.0, "score_rejected": 2.0,
    }
    fmt, norm = formats.normalise(rows, "ultrafeedback")
    assert fmt == "preference"
    assert [(r["chosen"], r["rejected"]) for r in norm] == [
        ("Red is a primary colour.", "Green, probably."), ("Hat.", "Dog."), ("Hello, and good morning to you.", "hi")]


def test_folder_of_split_files(tmp_path):
    """A clone of a hub repo: data/<split>-00000-of-00001.parquet per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [json.loads(line) for line in (FIX / "gsm8k.jsonl").read_text().splitlines()]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(recs[:3]), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(recs[3:]), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert [r["reference"] for r in GSM8K(str(tmp_path)).records("train")] == ["26", "10000", "6"]
    assert [r["reference"] for r in GSM8K(str(tmp_path)).records("test")] == ["15"]
    uf = tmp_path / "uf"
    uf.mkdir()
    (uf / "test_prefs.jsonl").write_text((FIX / "ultrafeedback.jsonl").read_text())  # the hub's split name
    assert len(UltraFeedback(str(uf)).records("test")) == 3
    with pytest.raises(UserError, match=r"no 'train' data in folder .*expected train\*\.jsonl"):
        UltraFeedback(str(uf)).records("train")


def test_loader_task_colon_source():
    records, info = loaders.load_records(f"gsm8k:{FIX / 'gsm8k.jsonl'}", "train")
    assert len(records) == 4 and info["task"] == "gsm8k" and info["default_reward"] == "math"
    assert info["path"] == str((FIX / "gsm8k.jsonl").resolve()) and len(info["sha256"]) == 64
    with pytest.raises(UserError, match=r"^Task 'arith' takes nothing after a colon \('arith:x.jsonl'\); write 'arith'\.$"):
        loaders.load_records("arith:x.jsonl")
    with pytest.raises(UserError, match=r"^gsm8k: data file 'no/such.jsonl' does not exist\.$"):
        loaders.load_records("gsm8k:no/such.jsonl")
    with pytest.raises(UserError, match="names no data after the colon"):
        loaders.load_records("gsm8k:")
    with pytest.raises(UserError, match=r"gsm8k:.*math.jsonl record 1: expected 'question' and an 'answer' ending in '#### N'"):
        loaders.load_records(f"gsm8k:{FIX / 'math.jsonl'}")
    with pytest.raises(UserError, match=r"expected 'problem' and 'solution' \(MATH\)"):
        loaders.load_records(f"math:{FIX / 'gsm8k.jsonl'}")


def test_hub_is_tried_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        loaders.load_records("math", "test")
    msg = str(e.value)
    assert msg.startswith("Cannot load dataset 'HuggingFaceH4/MATH-500' (split 'test') from the hub: ")
    assert msg.endswith("Offline? Download it elsewhere and pass the local copy: math:PATH "
                        "(a .jsonl/.json/.parquet/.csv file, or a folder of <split>*.parquet files).")
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_prepare_through_the_cli(tmp_path):
    from tokalign import artifacts

    cli("prepare", f"gsm8k:{FIX / 'gsm8k.jsonl'}", "--out", "G", cwd=tmp_path)
    art = artifacts.read(tmp_path / "G", ["prompts"])
    rows = art.rows()
    assert [json.loads(r["reference"]) for r in rows] == ["26", "10000", "6", "15"]
    assert rows[0]["prompt_text"].startswith("<|im_start|>user\nTom has 3 boxes") and rows[0]["prompt_text"].endswith("<|im_start|>assistant\n")
    assert rows[0]["completion"].endswith("#### 26")
    assert art.manifest["default_reward"] == "math"

    cli("prepare", f"math:{FIX / 'MATH'}", "--split", "test", "--out", "M", cwd=tmp_path)
    assert [json.loads(r["reference"]) for r in artifacts.read(tmp_path / "M", ["prompts"]).rows()] == ["9"]

    cli("prepare", f"ultrafeedback:{FIX / 'ultrafeedback.jsonl'}", "--limit", "2", "--out", "U", cwd=tmp_path)
    pairs = artifacts.read(tmp_path / "U", ["pairs"]).rows()
    assert [(r["id"], r["chosen"], r["rejected"]) for r in pairs] == [
        ("uf-0001", "Red is a primary colour.", "Green, probably."), ("uf-0002", "Hat.", "Dog.")]

    proc = cli("prepare", "gsm8k", "--out", "H", cwd=tmp_path, check=False)  # CLI_ENV is offline
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Cannot load dataset 'openai/gsm8k' (split 'train') from the hub" in err
    assert "gsm8k:PATH" in err and "Traceback" not in proc.stderr


def test_hub_ids_configs_and_splits(monkeypatch):
    """Where the hub is reachable: each task asks `datasets` for its id, config and split (faked here)."""
    import datasets

    calls = []

    def fake(repo_id, config=None, split=None):
        calls.append((repo_id, config, split))
        return [json.loads(line) for line in (FIX / ("gsm8k.jsonl" if "gsm8k" in repo_id else "math.jsonl"
                                                     if "math" in repo_id.lower() else "ultrafeedback.jsonl")).read_text().splitlines()]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(GSM8K().records("test")) == 4
    assert len(MATH().records("train")) == 4 and len(MATH().records("test")) == 4
    assert len(UltraFeedback().records("train")) == 3
    assert len(MATH("DigitalLearningGmbH/MATH-lighteval").records("train")) == 4
    assert calls == [("openai/gsm8k", "main", "test"), ("hendrycks/competition_math", None, "train"),
                     ("HuggingFaceH4/MATH-500", None, "test"), ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
                     ("DigitalLearningGmbH/MATH-lighteval", None, "train")]
