"""TRL dataset formats are accepted as they are; bad files fail with one line naming the problem."""

import json

import pytest

from tokalign.data import formats, loaders
from tokalign.errors import UserError

MSG = lambda role, text: {"role": role, "content": text}  # noqa: E731


def test_prompt_only_and_prompt_completion_standard():
    fmt, rows = formats.normalise([{"prompt": "1+1=", "completion": "2", "answer": "2"}], "x")
    assert fmt == "prompts" and rows[0]["prompt"] == "1+1=" and rows[0]["completion"] == "2" and rows[0]["reference"] == "2"


def test_conversational_prompt_completion():
    fmt, rows = formats.normalise([{"prompt": [MSG("user", "hi")], "completion": [MSG("assistant", "yo")]}], "x")
    assert fmt == "prompts" and rows[0]["prompt"] == [MSG("user", "hi")] and rows[0]["completion"] == "yo"


def test_preference_explicit_and_implicit_prompt():
    fmt, rows = formats.normalise([{"prompt": "q", "chosen": "a", "rejected": "b"}], "x")
    assert fmt == "preference" and (rows[0]["chosen"], rows[0]["rejected"]) == ("a", "b")
    chosen = [MSG("user", "q"), MSG("assistant", "good")]
    rejected = [MSG("user", "q"), MSG("assistant", "bad")]
    fmt, rows = formats.normalise([{"chosen": chosen, "rejected": rejected}], "x")
    assert rows[0]["prompt"] == [MSG("user", "q")] and (rows[0]["chosen"], rows[0]["rejected"]) == ("good", "bad")


def test_messages_language_modelling_format():
    _, rows = formats.normalise([{"messages": [MSG("user", "q"), MSG("assistant", "a")]}], "x")
    assert rows[0]["prompt"] == [MSG("user", "q")] and rows[0]["completion"] == "a"


def test_unknown_format_is_one_clear_error():
    with pytest.raises(UserError, match="cannot tell the format"):
        formats.normalise([{"question": "q"}], "x")


def test_all_local_file_types(tmp_path):
    recs = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        records, info = loaders.load_records(str(tmp_path / f"d.{suffix}"))
        assert records == recs and info["source"] == "file"


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 3: invalid JSON"):
        loaders.load_records(str(p))


def test_arith_task_is_deterministic_with_disjoint_splits():
    train, info = loaders.load_records("arith", "train")
    test, _ = loaders.load_records("arith", "test")
    assert len(train) == 9500 and len(test) == 500 and info["default_reward"] == "exact_match"
    assert not {r["id"].split("-")[-1] for r in train} & {r["id"].split("-")[-1] for r in test}
    assert loaders.load_records("arith", "test")[0] == test


def test_unknown_task_suggests():
    with pytest.raises(UserError, match="Did you mean 'arith'"):
        loaders.load_records("arihm")
