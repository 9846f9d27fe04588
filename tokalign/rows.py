"""The row schema the stages and the online train loop share: JSON-encoded columns, rollout rows, samples."""

from __future__ import annotations

import json
from typing import Any

from tokalign.protocols import Sample

SCORE_COLUMNS = ("reward", "rewards", "verdicts", "token_rewards", "reward_errors")


def dumps(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False)


def loads(x: str | None) -> Any:
    return None if x is None else json.loads(x)


def rollout_rows(prompt_rows: list[dict], completions, max_new_tokens: int | None = None, group_offset: int = 0) -> list[dict]:
    """Join prompt rows (prompts artifact rows) with their engine completions into rollout rows.
    ``max_new_tokens`` (the sampler's length limit) is kept per row for length-aware rewards."""
    rows = []
    for g, (p, comps) in enumerate(zip(prompt_rows, completions)):
        for k, c in enumerate(comps):
            rows.append(
                {
                    "id": f"{p['id']}#{k}",
                    "prompt_id": p["id"],
                    "group_id": group_offset + g,
                    "sample_idx": k,
                    "prompt": p["prompt"],
                    "prompt_text": p["prompt_text"],
                    "prompt_ids": p["prompt_ids"],
                    "reference": p.get("reference"),
                    "completion": c.text,
                    "completion_ids": c.ids,
                    "sampler_logps": c.logps,
                    "finish_reason": c.finish_reason,
                    "max_new_tokens": max_new_tokens,
                    # a multi-turn episode: which completion tokens are the model's, and its turns
                    **({"loss_mask": c.loss_mask, "episode": dumps(c.episode)} if c.loss_mask is not None else {}),
                }
            )
    return rows


def to_sample(row: dict) -> Sample:
    """A multi-turn episode's sample: ``completion`` is its final assistant turn, and ``metadata`` adds the episode's
    ``messages`` (after the prompt), ``tool_calls`` (each ``{"name", "arguments"}``, or ``{"name": None, "error"}``),
    ``turns`` (model turns), ``turn_rewards`` (the environment's, one per model turn, None where it gave none) and
    ``turn_spans`` (``[start, end, "model" | "env"]`` in completion-token positions) and ``turn_errors`` (per model
    turn, the tool calls of its reply that failed)."""
    metadata = {"max_new_tokens": row.get("max_new_tokens")}
    episode = loads(row.get("episode"))
    if episode:
        metadata.update(messages=episode["messages"], tool_calls=episode["tool_calls"], turns=episode["model_turns"],
                        turn_rewards=episode["turn_rewards"], turn_spans=episode["turns"],
                        turn_errors=episode.get("turn_errors", []))
    return Sample(
        id=row["id"],
        prompt=loads(row["prompt"]),
        completion=row["completion"],
        completion_ids=list(row["completion_ids"]),
        reference=loads(row.get("reference")),
        finish_reason=row.get("finish_reason", "stop"),
        metadata=metadata,
    )


def episode_token_fields(row: dict) -> dict[str, list[float]]:
    """Per completion token of a multi-turn episode's row: ``turn_index`` (k on the tokens of model turn k, −1 on the
    environment's) — what step-level algorithms group tokens by. Nothing for a single-turn row."""
    episode = loads(row.get("episode"))
    if not episode:
        return {}
    index = [-1.0] * len(row["completion_ids"])
    k = 0
    for start, end, who in episode["turns"]:
        if who == "model":
            index[start:end] = [float(k)] * (end - start)
            k += 1
    return {"turn_index": index}


def failed_reward_rows(rows: list[dict]) -> int:
    """Rows of a scored artifact with at least one failed reward (artifacts from before the column count none)."""
    return sum(1 for r in rows if r.get("reward_errors") not in (None, "", "{}"))
