"""The row schema the stages and the online train loop share: JSON-encoded columns, rollout rows, samples."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tokalign.errors import UserError
from tokalign.protocols import Sample

SCORE_COLUMNS = ("reward", "rewards", "verdicts", "token_rewards", "reward_errors")
CHUNK_ROWS = 10_000  # rows prepare and score hold at a time (bounded memory on big inputs)


def chunk_rows() -> int:
    """Rows per chunk of the streaming stages: ``CHUNK_ROWS``, or ``$TOKALIGN_CHUNK_ROWS`` (tests force small chunks)."""
    try:
        return max(1, int(os.environ.get("TOKALIGN_CHUNK_ROWS", "") or CHUNK_ROWS))
    except ValueError:
        return CHUNK_ROWS


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


def best_and_worst(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(highest-reward, lowest-reward) row of each group whose rewards differ (first on ties), groups in order of
    their ids: the on-policy pair of a group of scored rollouts."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    out = []
    for key in sorted(groups):
        best = max(groups[key], key=lambda r: r["reward"])
        worst = min(groups[key], key=lambda r: r["reward"])
        if best["reward"] > worst["reward"]:
            out.append((best, worst))
    return out


def to_sample(row: dict) -> Sample:
    """A multi-turn episode's sample: ``completion`` is its final assistant turn, and ``metadata`` adds the episode's
    ``messages`` (after the prompt), ``tool_calls`` (each ``{"name", "arguments"}``, or ``{"name": None, "error"}``),
    ``turns`` (model turns), ``turn_rewards`` (the environment's, one per model turn, None where it gave none) and
    ``turn_spans`` (``[start, end, "model" | "env"]`` in completion-token positions) and ``turn_errors`` (per model
    turn, the tool calls of its reply that failed)."""
    # the prompt's ids: a reward that reads the policy (tokalign.rewards.policy) continues them, token in, token out
    metadata = {"max_new_tokens": row.get("max_new_tokens"), "prompt_ids": list(row.get("prompt_ids") or [])}
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
    environment's) — what step-level algorithms group tokens by. Nothing for a single-turn row. An episode that made
    tool calls adds ``turn_tool_calls`` and ``turn_tool_errors``: on the tokens of model turn k, the number of tool calls
    its reply held and how many of them failed (0 on the environment's tokens)."""
    episode = loads(row.get("episode"))
    if not episode:
        return {}
    index = [-1.0] * len(row["completion_ids"])
    spans = [(start, end) for start, end, who in episode["turns"] if who == "model"]
    for k, (start, end) in enumerate(spans):
        index[start:end] = [float(k)] * (end - start)
    out = {"turn_index": index}
    calls = _calls_per_turn(episode)
    if any(calls):
        errors = list(episode.get("turn_errors") or [])
        out["turn_tool_calls"], out["turn_tool_errors"] = [0.0] * len(index), [0.0] * len(index)
        for k, (start, end) in enumerate(spans):
            n = end - start
            out["turn_tool_calls"][start:end] = [float(calls[k] if k < len(calls) else 0)] * n
            out["turn_tool_errors"][start:end] = [float(errors[k] if k < len(errors) else 0)] * n
    return out


def _calls_per_turn(episode: dict) -> list[int]:
    """Tool calls per model turn: the tool messages after each assistant message; the episode's remaining calls belong
    to its last turn, whose calls ran but whose reply was not appended (the episode ended on a budget)."""
    calls: list[int] = []
    for m in episode.get("messages") or []:
        if m.get("role") == "assistant":
            calls.append(0)
        elif m.get("role") == "tool" and calls:
            calls[-1] += 1
    left = len(episode.get("tool_calls") or []) - sum(calls)
    if left > 0 and calls:
        calls[-1] += left
    return calls


def episode_stats(rows: list[dict], prefix: str = "") -> dict[str, float]:
    """Multi-turn episodes: mean model turns and tool calls per episode, and the share of calls that were malformed
    (nothing for single-turn rows). ``eval``'s results and the train loop's metrics (``episode/``) both report them."""
    episodes = [loads(r["episode"]) for r in rows if r.get("episode")]
    if not episodes:
        return {}
    calls = [c for e in episodes for c in e["tool_calls"]]
    return {f"{prefix}mean_turns": sum(e["model_turns"] for e in episodes) / len(episodes),
            f"{prefix}mean_tool_calls": len(calls) / len(episodes),
            f"{prefix}malformed_call_fraction": sum(c.get("error") is not None for c in calls) / len(calls) if calls else 0.0}


def failed_reward_rows(rows: list[dict]) -> int:
    """Rows of a scored artifact with at least one failed reward (artifacts from before the column count none)."""
    return sum(1 for r in rows if r.get("reward_errors") not in (None, "", "{}"))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _all_finite(values) -> bool:
    """No NaN, ±inf or null among ``values`` (one sum: NaN and inf survive it; fast on long token columns)."""
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


def check_row(source: str, index: int, row: dict, scored: bool) -> None:
    """One rollouts (or, with ``scored``, scored) row is usable: its per-token columns hold one value per completion
    token and (scored) its rewards are finite numbers. Raises one line naming the row (``index`` from 1) and the fix."""
    where = f"'{source}' row {index} (id '{row.get('id')}')"
    fix = f"re-score it (tokalign score {source} --out NEW)"
    redo = "re-create it (tokalign rollout, then tokalign score)" if scored else "re-create it (tokalign rollout)"
    if scored:
        values = {"reward": row.get("reward"), **{f"rewards.{k}": v for k, v in (row.get("rewards") or {}).items()}}
        for key, value in values.items():
            if not _finite(value):
                raise UserError(f"{where} has {key} = {value!r}: rewards must be finite numbers; {fix}.")
    n = len(row.get("completion_ids") or ())
    for column in ("sampler_logps", "token_rewards", "loss_mask") if scored else ("sampler_logps", "loss_mask"):
        got = row.get(column)
        if got is None:
            continue
        if len(got) != n:
            raise UserError(f"{where} has {len(got)} {column} for {n} completion tokens (one per token needed); "
                            f"{fix if column == 'token_rewards' else redo}.")
        if column == "token_rewards" and not _all_finite(got):
            raise UserError(f"{where} has a token reward that is not a finite number; {fix}.")
