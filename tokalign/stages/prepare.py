"""Stage ``prepare``: a task, file or hub dataset -> a ``prompts`` or ``pairs`` artifact.

Records are read, normalised, rendered and written a chunk at a time (``iter_rows``; ``rows.chunk_rows()`` records
each), so a big JSONL, Parquet or CSV file is prepared in bounded memory."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from tokalign import artifacts, models
from tokalign.data import formats, loaders, render
from tokalign.errors import UserError
from tokalign.rows import chunk_rows, dumps


def load_rows(source: str, tokenizer, split: str = "train", limit: int | None = None,
              tools: list[dict] | None = None) -> tuple[str, list[dict], dict]:
    """(kind, rows, info): normalised, tokenised rows ready for an artifact or the train loop (prompts rendered with
    an environment's ``tools``, if any)."""
    kind, chunks, info = iter_rows(source, tokenizer, split, limit, tools)
    return kind, [row for chunk in chunks for row in chunk], info


def iter_rows(source: str, tokenizer, split: str = "train", limit: int | None = None, tools: list[dict] | None = None,
              chunk: int | None = None, context: int | None = None) -> tuple[str, Iterator[list[dict]], dict]:
    """(kind, chunks of rows, info): ``load_rows`` a chunk of ``chunk`` records at a time (default
    ``rows.chunk_rows()``), read as the chunks are consumed; no more than ``limit`` records are read. The first chunk
    is read here: the data's format (told from its first record) decides the artifact's kind. With ``context`` (the
    model's, in tokens), a prompt that leaves no room to answer is refused, naming its record."""
    records, info = loaders.iter_records(source, split, chunk or chunk_rows(), limit or None)
    first = next(records, [])
    if not first:
        raise UserError(f"{source}: no records.")
    fmt = formats.detect(first[0], source)

    def rows() -> Iterator[list[dict]]:
        start = 0
        for part in itertools.chain([first], records):
            normalised = [formats.normalise_record(rec, start + i, fmt, source) for i, rec in enumerate(part)]
            if context:  # before tokenising: a prompt of 100 characters a token or more is over any context
                _check_context(source, start, normalised, lambda r: len(str(r["prompt"])) // 100, context)
            rendered = _rendered(normalised, fmt, tokenizer, tools)
            if context:
                _check_context(source, start, rendered, lambda r: len(r["prompt_ids"]), context)
            start += len(part)
            yield rendered

    return formats.ARTIFACT_KIND[fmt], rows(), info


def _rendered(rows: list[dict], fmt: str, tokenizer, tools: list[dict] | None) -> list[dict]:
    out = []
    for r, (text, ids) in zip(rows, render.render_prompts(tokenizer, [r["prompt"] for r in rows], tools)):
        row = {"id": r["id"], "prompt": dumps(r["prompt"]), "prompt_text": text, "prompt_ids": ids,
               "reference": dumps(r.get("reference"))}
        if fmt == "preference":
            row.update(chosen=r["chosen"], rejected=r["rejected"])
        elif fmt == "stepwise":
            row.update(steps=r["steps"], step_labels=r["step_labels"])
        else:
            row["completion"] = r.get("completion")
            if r.get("completion_messages"):  # a multi-turn completion (assistant turns and what answered them)
                row["completion_messages"] = dumps(r["completion_messages"])
            if fmt == "unpaired":
                row["label"] = r["label"]
        out.append(row)
    return out


def _check_context(source: str, start: int, rows: list[dict], tokens, context: int) -> None:
    """Refuse the first of ``rows`` (records ``start`` + 1, …) whose prompt has ``tokens(row)`` ≥ ``context`` tokens."""
    for i, row in enumerate(rows):
        n = tokens(row)
        if n >= context:
            raise UserError(f"{source} record {start + i + 1} (id '{row['id']}'): its prompt is {'over ' if 'prompt_ids' not in row else ''}"
                            f"{n} tokens, but the model's context is {context} (max_position_embeddings); shorten it or drop "
                            "the record.")


def prepare(source: str, out: str, *, model: str = "", split: str = "train", limit: int | None = None,
            overwrite: bool = False) -> Path:
    out_path = artifacts.check_output(out, overwrite)
    tokenizer = models.load_tokenizer(model)
    kind, chunks, info = iter_rows(source, tokenizer, split, limit, context=models.context_length(model))
    prov = artifacts.Provenance(
        config={"source": source, "split": split, "limit": limit, "model": model or "(bundled)"},
        inputs=[{"path": info.get("path", source), "kind": info["source"], "split": split, "sha256": info["sha256"]}],
        plugins=loaders.plugin_refs(info), model=models.identity(model),
        extra={"default_reward": info.get("default_reward")},
    )
    with artifacts.writing(out_path, kind, prov, overwrite) as w:  # a bad record in a later chunk: nothing is left
        w.stream_rows(chunks)
    return out_path
