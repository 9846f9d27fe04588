import json

import pytest

from tokalign import artifacts
from tokalign.errors import UserError

ROWS = [{"id": "a", "prompt": '"p"', "prompt_text": "p", "prompt_ids": [1, 2]}]


def write(out, rows=ROWS, overwrite=False):
    with artifacts.writing(out, "prompts", artifacts.Provenance(config={"x": 1}, seed=3), overwrite) as w:
        w.write_rows(rows)


def test_manifest_records_files_rows_and_hashes(tmp_path):
    write(tmp_path / "P")
    m = json.loads((tmp_path / "P" / "manifest.json").read_text())
    assert m["kind"] == "prompts" and m["schema_version"] == artifacts.SCHEMA_VERSION and m["seed"] == 3
    assert m["config_sha256"] == artifacts.sha256_json({"x": 1})
    (f,) = m["files"]
    assert f["name"] == "data.parquet" and f["rows"] == 1
    assert f["sha256"] == artifacts.sha256_file(tmp_path / "P" / "data.parquet")
    assert "python" in m["libraries"]
    assert artifacts.read(tmp_path / "P", ["prompts"]).rows() == ROWS


def test_failure_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with artifacts.writing(tmp_path / "P", "prompts", artifacts.Provenance()) as w:
            w.write_rows(ROWS)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path):
    write(tmp_path / "P")
    with pytest.raises(UserError, match="already exists"):
        write(tmp_path / "P")
    write(tmp_path / "P", rows=ROWS * 2, overwrite=True)
    assert len(artifacts.read(tmp_path / "P", ["prompts"]).rows()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]


def test_overwrite_that_fails_keeps_the_old_artifact(tmp_path):
    write(tmp_path / "P")
    with pytest.raises(RuntimeError):
        with artifacts.writing(tmp_path / "P", "prompts", artifacts.Provenance(), overwrite=True):
            raise RuntimeError("killed")
    assert len(artifacts.read(tmp_path / "P", ["prompts"]).rows()) == 1


def test_reads_validate_kind_schema_and_columns(tmp_path):
    write(tmp_path / "P")
    with pytest.raises(UserError, match="is a 'prompts' artifact, but this command needs 'rollouts'"):
        artifacts.read(tmp_path / "P", ["rollouts"])
    with pytest.raises(UserError, match="not a tokalign artifact"):
        artifacts.read(tmp_path, ["prompts"])
    m = json.loads((tmp_path / "P" / "manifest.json").read_text())
    m["schema_version"] = 99
    (tmp_path / "P" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema version 99"):
        artifacts.read(tmp_path / "P", ["prompts"])


def test_missing_columns_are_reported(tmp_path):
    with artifacts.writing(tmp_path / "P", "eval", artifacts.Provenance()) as w:  # eval has no required columns
        w.write_rows([{"id": "a"}])
        w.write_json("results.json", {})
    m = json.loads((tmp_path / "P" / "manifest.json").read_text())
    m["kind"] = "prompts"
    (tmp_path / "P" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="lacks column"):
        artifacts.read(tmp_path / "P", ["prompts"])


def _edit_parquet(path, rows):
    """Rewrite a data file in place (same schema, other values): what an edit after the artifact was written does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_reads_check_files_against_the_manifest(tmp_path, monkeypatch):
    write(tmp_path / "P")
    data = tmp_path / "P" / "data.parquet"
    _edit_parquet(data, [{**ROWS[0], "prompt_text": "q"}])  # one character changed
    with pytest.raises(UserError, match=r"data.parquet' changed after it was written .*--no-verify"):
        artifacts.read(tmp_path / "P", ["prompts"])
    monkeypatch.setenv("TOKALIGN_NO_VERIFY", "1")  # --no-verify: read as it is, and say so in what is written next
    assert artifacts.read(tmp_path / "P", ["prompts"]).rows()[0]["prompt_text"] == "q"
    write(tmp_path / "Q")
    assert json.loads((tmp_path / "Q" / "manifest.json").read_text())["inputs_verified"] is False
    monkeypatch.delenv("TOKALIGN_NO_VERIFY")
    assert "inputs_verified" not in json.loads((tmp_path / "P" / "manifest.json").read_text())


def test_a_truncated_data_file_is_one_line(tmp_path, monkeypatch):
    write(tmp_path / "P")
    data = tmp_path / "P" / "data.parquet"
    data.write_bytes(data.read_bytes()[:40])
    with pytest.raises(UserError, match="changed after it was written"):
        artifacts.read(tmp_path / "P", ["prompts"])
    monkeypatch.setenv("TOKALIGN_NO_VERIFY", "1")
    with pytest.raises(UserError, match="is not a readable Parquet file .*damaged, re-create it"):
        artifacts.read(tmp_path / "P", ["prompts"]).rows()
    (tmp_path / "P" / "data.parquet").unlink()
    monkeypatch.delenv("TOKALIGN_NO_VERIFY")
    with pytest.raises(UserError, match="missing data.parquet"):
        artifacts.read(tmp_path / "P", ["prompts"])


def test_cli_refuses_an_edited_artifact_and_no_verify_reads_it(tmp_path):
    from conftest import cli

    cli("prepare", "arith", "--split", "test", "--limit", "3", "--out", "P", cwd=tmp_path)
    data = tmp_path / "P" / "data.parquet"
    import pyarrow.parquet as pq

    rows = pq.read_table(data).to_pylist()
    _edit_parquet(data, rows[:2])
    bad = cli("eval", "--data", "P", "--n", "1", "--out", "E", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "changed after it was written" in bad.stderr
    assert not (tmp_path / "E").exists()
    ok = cli("eval", "--data", "P", "--n", "1", "--out", "E", "--no-verify", cwd=tmp_path)
    assert ok.returncode == 0
    assert json.loads((tmp_path / "E" / "manifest.json").read_text())["inputs_verified"] is False
