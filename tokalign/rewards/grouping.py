"""The samples of one scoring call by prompt, for rewards that compare a prompt's samples with each other
(``judge_listwise``, ``r3``): ``metadata["group_id"]`` when set, else the prompt and reference."""

from __future__ import annotations

import json

from tokalign.protocols import Sample


def group_key(sample: Sample) -> str:
    if sample.metadata.get("group_id") is not None:
        return f"group:{sample.metadata['group_id']}"
    return json.dumps([sample.prompt, sample.reference], ensure_ascii=False, default=str)


def groups(samples: list[Sample]) -> list[list[int]]:
    """Indices of ``samples`` by prompt, groups in order of first appearance, each in sample order."""
    by: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault(group_key(s), []).append(i)
    return list(by.values())
