"""`prepare` and `score` stream big inputs a chunk at a time (bounded memory, issue #14 item 7): with chunks forced
small, the artifacts hold the rows, types, order and report of the whole-in-memory path; --limit stops reading; a bad
record in a later chunk is one line naming it and leaves nothing behind; chunks hold whole groups."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, cli
from score_plugins import make_rollouts

from tokalign import artifacts, models, rewards
from tokalign import rows as row_schema
from tokalign.data import formats, loaders
from tokalign.errors import UserError
from tokalign.plugin_errors import PluginError
from tokalign.stages import prepare as prepare_stage
from tokalign.stages import score as score_stage

N = 300
FLAKY = "score_plugins:Flaky"


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("TOKALIGN_CHUNK_ROWS", "16")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    return 16


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKALIGN_CACHE", str(tmp_path / "cache"))


def records(n: int = N) -> list[dict]:
    """Arith-like records; the first 40 have no completion (a column all null in the first chunks, then text)."""
    out = []
    for i in range(n):
        r = {"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)}
        if i >= 40:
            r["completion"] = str(i + i % 7)
        out.append(r)
    return out


def write_jsonl(path, recs) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def whole_prepare(source: str, tokenizer, tmp_path, limit=None):
    """The whole-in-memory path: every record loaded, normalised and rendered at once, one ``write_rows``."""
    recs, _ = loaders.load_records(source)
    fmt, rows = formats.normalise(recs[:limit] if limit else recs, source)
    out = tmp_path / "whole"
    with artifacts.writing(out, formats.ARTIFACT_KIND[fmt], artifacts.Provenance()) as w:
        w.write_rows(prepare_stage._rendered(rows, fmt, tokenizer, None))
    return out


def table(path):
    return pq.read_table(path / artifacts.DATA)


def no_leftovers(out) -> bool:
    return not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


# ---------------------------------------------------------------- prepare


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_streamed_prepare_matches_the_whole_in_memory_path(tmp_path, tokenizer, small_chunks, suffix):
    recs = records()
    src = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(src, recs)
    elif suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(recs), src)
    else:
        src.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in recs))
    out = prepare_stage.prepare(str(src), str(tmp_path / "P"))
    streamed, whole = table(out), table(whole_prepare(str(src), tokenizer, tmp_path))
    assert streamed.schema.equals(whole.schema) and streamed.to_pylist() == whole.to_pylist()
    assert pq.ParquetFile(out / artifacts.DATA).num_row_groups == -(-N // small_chunks)  # it was written in chunks
    manifest = artifacts.read(out, ["prompts"]).manifest
    assert manifest["files"][0]["rows"] == N and manifest["inputs"][0]["sha256"] == artifacts.sha256_file(src)


def test_one_chunk_is_byte_identical_to_write_rows(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", records())
    out = prepare_stage.prepare(src, str(tmp_path / "P"))
    whole = whole_prepare(src, tokenizer, tmp_path)
    assert artifacts.sha256_file(out / artifacts.DATA) == artifacts.sha256_file(whole / artifacts.DATA)


def test_limit_stops_reading_at_the_limit(tmp_path, tokenizer, small_chunks):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, records(40))
    with open(src, "a") as f:
        f.write("{not json\n")  # past the limit: never read
    out = prepare_stage.prepare(str(src), str(tmp_path / "P"), limit=25)
    streamed = table(out).to_pylist()
    assert [r["prompt_text"] for r in streamed] == [r["prompt"] for r in records(25)]
    assert streamed == table(whole_prepare(write_jsonl(tmp_path / "ok.jsonl", records(40)), tokenizer, tmp_path, 25)).to_pylist()
    _, chunks, _ = prepare_stage.iter_rows(str(src), tokenizer, limit=33, chunk=16)
    assert [len(c) for c in chunks] == [16, 16, 1]


def test_a_bad_record_in_a_later_chunk_is_one_line_and_leaves_nothing(tmp_path, small_chunks):
    recs = records()
    recs[200]["prompt"] = 7  # record 201: normalising fails in chunk 13
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    lines[250] = "{oops"  # and line 251 is not JSON: the first bad record in file order is told
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "P"
    with pytest.raises(UserError, match=r"d.jsonl record 201: 'prompt' must be text"):
        prepare_stage.prepare(src, str(out))
    assert no_leftovers(out)
    recs[200]["prompt"] = "ok"
    write_jsonl(tmp_path / "d.jsonl", recs)
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write("[1, 2]\n")
    proc = cli("prepare", src, "--out", str(out), check=False, env={"TOKALIGN_CHUNK_ROWS": "16"})
    assert proc.returncode == 2 and "d.jsonl line 301: expected a JSON object, got list" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and no_leftovers(out)


def test_load_rows_keeps_working_for_train_and_eval(tmp_path, tokenizer, small_chunks):
    src = write_jsonl(tmp_path / "d.jsonl", records())
    kind, rows, info = prepare_stage.load_rows(src, tokenizer, limit=50)
    assert kind == "prompts" and len(rows) == 50 and info["source"] == "file"
    assert rows == table(whole_prepare(src, tokenizer, tmp_path, 50)).to_pylist()
    assert loaders.load_records(src)[0] == records()


# ---------------------------------------------------------------- score


def whole_score(src, names, **kw):
    """The whole-in-memory path: all rows scored at once, one ``write_rows``."""
    from tokalign.scoring.rows import score_rows

    resolved = rewards.resolve(names)
    return score_rows(artifacts.read(src, ["rollouts"]).rows(), resolved, **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_score_matches_the_whole_in_memory_path(tmp_path, small_chunks, cache_dir, workers):
    make_rollouts(tmp_path / "R", N)
    names = [FLAKY, "score_plugins:Batched"]  # batched: calls of up to 64 samples, of a chunk's
    out = score_stage.score(str(tmp_path / "R"), str(tmp_path / "S"), reward=names, workers=workers, cache=False)
    rows, report = whole_score(tmp_path / "R", names, workers=workers, timeout=30.0)
    whole = pa.Table.from_pylist(rows)
    streamed = table(out)
    assert streamed.schema.equals(whole.schema) and streamed.to_pylist() == whole.to_pylist()
    assert pq.ParquetFile(out / artifacts.DATA).num_row_groups > 1
    manifest = artifacts.read(out, ["scored"]).manifest
    assert manifest["scoring"] == report.to_dict()
    assert manifest["scoring"]["rewards"][FLAKY]["errors"] == N // 10 and manifest["files"][0]["rows"] == N


def test_rescoring_a_scored_artifact_streams_too(tmp_path, small_chunks, cache_dir):
    make_rollouts(tmp_path / "R", 100)
    first = score_stage.score(str(tmp_path / "R"), str(tmp_path / "S"), reward=["score_plugins:Counting"])
    again = score_stage.score(str(first), str(tmp_path / "S2"), reward=["score_plugins:Counting"])
    assert table(again).to_pylist() == table(first).to_pylist()
    assert artifacts.read(again, ["scored"]).manifest["scoring"]["rewards"]["score_plugins:Counting"]["cached"] == 100


def test_chunks_hold_whole_groups(tmp_path, small_chunks, monkeypatch):
    from tokalign.scoring import Scorer
    from tokalign.scoring.rows import group_chunks

    make_rollouts(tmp_path / "R", 100)  # groups of 4: 16 rows is a group boundary, 18 is not
    monkeypatch.setenv("TOKALIGN_CHUNK_ROWS", "18")
    seen: list[list[str]] = []
    score = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda self, samples: seen.append([s.id for s in samples]) or score(self, samples))
    score_stage.score(str(tmp_path / "R"), str(tmp_path / "S"), reward=["score_plugins:Counting"], cache=False)
    groups = [{int(i.lstrip("s")) // 4 for i in chunk} for chunk in seen]
    assert [len(c) for c in seen] == [20, 20, 20, 20, 20] and all(not a & b for a, b in itertools.pairwise(groups))
    chunks = list(group_chunks([{"group_id": g} for g in (0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4)], 2))
    assert [[r["group_id"] for r in c] for c in chunks] == [[0, 0, 0], [1, 1], [2, 3, 3, 3, 3], [4]]


class AlwaysFails:
    def __call__(self, samples):
        raise ValueError("never")


class FirstChunkFails:
    """Fails on s0..s15: the first chunk of 16 rows."""

    def __call__(self, samples):
        if any(int(s.id.lstrip("s")) < 16 for s in samples):
            raise ValueError(f"no {samples[0].id}")
        return [1.0 for _ in samples]


def test_a_reward_failing_on_every_sample_is_broken_at_the_end_and_leaves_nothing(tmp_path, small_chunks, cache_dir):
    make_rollouts(tmp_path / "R", 100)
    out = tmp_path / "S"
    with pytest.raises(PluginError, match=r"failed in __call__\(\) on all 100 samples: ValueError: never"):
        score_stage.score(str(tmp_path / "R"), str(out), reward=[f"{__name__}:AlwaysFails"], cache=False)
    assert no_leftovers(out)


def test_a_reward_failing_only_in_the_first_chunk_is_not_broken(tmp_path, small_chunks, cache_dir):
    make_rollouts(tmp_path / "R", 100)
    name = f"{__name__}:FirstChunkFails"
    out = score_stage.score(str(tmp_path / "R"), str(tmp_path / "S"), reward=[name], cache=False)
    stats = artifacts.read(out, ["scored"]).manifest["scoring"]["rewards"][name]
    assert (stats["errors"], stats["computed"], stats["first_error"]) == (16, 84, "ValueError: no s0")


# ---------------------------------------------------------------- artifacts


def test_stream_rows_widens_types_as_write_rows_infers_them(tmp_path):
    chunks = [[{"a": None, "b": 1, "c": {"x": 1.0}, "d": None}], [{"a": "t", "b": 2, "c": {"x": 2.0}, "e": 5}],
              [{"a": None, "b": 2.5, "c": {"x": 3.0, "y": 1.0}, "d": [1, 2]}], []]
    with artifacts.writing(tmp_path / "A", "eval", artifacts.Provenance()) as w:
        w.stream_rows(chunks)
        w.write_json("results.json", {})
    with artifacts.writing(tmp_path / "B", "eval", artifacts.Provenance()) as w:
        w.write_rows([r for c in chunks for r in c])
        w.write_json("results.json", {})
    a, b = table(tmp_path / "A"), table(tmp_path / "B")
    assert a.schema.equals(b.schema) and a.to_pylist() == b.to_pylist() and a.column_names == ["a", "b", "c", "d"]
    assert {f["name"]: f.get("rows") for f in artifacts.read(tmp_path / "A", ["eval"]).manifest["files"]}[artifacts.DATA] == 3
    assert not list((tmp_path / "A").glob("*.narrow"))


def test_iter_batches_gives_the_rows_in_order(tmp_path):
    make_rollouts(tmp_path / "R", 50)
    art = artifacts.read(tmp_path / "R", ["rollouts"])
    batches = list(art.iter_batches(7))
    assert [r for b in batches for r in b] == art.rows() == list(art.iter_rows(7)) and max(map(len, batches)) <= 7
    assert art.num_rows() == 50 and row_schema.chunk_rows() >= 1
