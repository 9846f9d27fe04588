"""Stage ``prepare``: a task, file or hub dataset -> a ``prompts`` or ``pairs`` artifact."""

from __future__ import annotations

from pathlib import Path

from tokalign import artifacts, models
from tokalign.data import formats, loaders, render
from tokalign.rows import dumps


def load_rows(source: str, tokenizer, split: str = "train", limit: int | None = None,
              tools: list[dict] | None = None) -> tuple[str, list[dict], dict]:
    """(kind, rows, info): normalised, tokenised rows ready for an artifact or the train loop (prompts rendered with
    an environment's ``tools``, if any)."""
    records, info = loaders.load_records(source, split)
    if limit:
        records = records[:limit]
    fmt, rows = formats.normalise(records, source)
    out = []
    for r, (text, ids) in zip(rows, render.render_prompts(tokenizer, [r["prompt"] for r in rows], tools)):
        row = {"id": r["id"], "prompt": dumps(r["prompt"]), "prompt_text": text, "prompt_ids": ids,
               "reference": dumps(r.get("reference"))}
        if fmt == "preference":
            row.update(chosen=r["chosen"], rejected=r["rejected"])
        else:
            row["completion"] = r.get("completion")
            if r.get("completion_messages"):  # a multi-turn completion (assistant turns and what answered them)
                row["completion_messages"] = dumps(r["completion_messages"])
            if fmt == "unpaired":
                row["label"] = r["label"]
        out.append(row)
    return ("pairs" if fmt == "preference" else "prompts"), out, info


def prepare(source: str, out: str, *, model: str = "", split: str = "train", limit: int | None = None,
            overwrite: bool = False) -> Path:
    out_path = artifacts.check_output(out, overwrite)
    tokenizer = models.load_tokenizer(model)
    kind, rows, info = load_rows(source, tokenizer, split, limit)
    prov = artifacts.Provenance(
        config={"source": source, "split": split, "limit": limit, "model": model or "(bundled)"},
        inputs=[{"path": info.get("path", source), "kind": info["source"], "split": split, "sha256": info["sha256"]}],
        plugins=loaders.plugin_refs(info), model=models.identity(model),
        extra={"default_reward": info.get("default_reward")},
    )
    with artifacts.writing(out_path, kind, prov, overwrite) as w:
        w.write_rows(rows)
    return out_path
