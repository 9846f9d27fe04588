"""Row conversions shared by the stages and the online train loop (one code path for both)."""

from __future__ import annotations

import json
from typing import Any

from tokalign.protocols import Sample


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
                }
            )
    return rows


def to_sample(row: dict) -> Sample:
    return Sample(
        id=row["id"],
        prompt=loads(row["prompt"]),
        completion=row["completion"],
        completion_ids=list(row["completion_ids"]),
        reference=loads(row.get("reference")),
        finish_reason=row.get("finish_reason", "stop"),
        metadata={"max_new_tokens": row.get("max_new_tokens")},
    )


SCORE_COLUMNS = ("reward", "rewards", "verdicts", "token_rewards", "reward_errors")


def score_rows(rows: list[dict], rewards, *, workers: int = 1, timeout: float | None = None, cache=None, progress=None):
    """(rows + score columns, ``scoring.ScoreReport``). ``reward_errors`` is a JSON object {reward: why
    it failed on this row} ("{}" when none failed); a failed reward counts 0 in ``reward`` (see ``tokalign.scoring``)."""
    from tokalign.scoring import score_samples

    results, report = score_samples(rewards, [to_sample(r) for r in rows], workers=workers, timeout=timeout, cache=cache, progress=progress)
    out = []
    for r, s in zip(rows, results):
        out.append({**r, "reward": s["reward"], "rewards": s["rewards"], "verdicts": dumps(s["verdicts"]),
                    "token_rewards": s["token_rewards"], "reward_errors": dumps(s["reward_errors"])})
    return out, report


def scored_rows(rows: list[dict], rewards) -> list[dict]:
    """In-process scoring for the online train loop. A sample whose reward fails scores 0 for it (see
    ``reward_errors``); a reward failing on every sample of a batch is broken, not unlucky: UserError."""
    from tokalign.errors import UserError

    out, report = score_rows(rows, rewards)
    for name, s in report.rewards.items():
        if report.samples >= 2 and s.failed == report.samples:
            raise UserError(f"reward '{name}' failed on all {report.samples} samples of the batch; first: {s.first_error}")
    return out


def failed_reward_rows(rows: list[dict]) -> int:
    """Rows of a scored artifact with at least one failed reward (artifacts from before the column count none)."""
    return sum(1 for r in rows if r.get("reward_errors") not in (None, "", "{}"))


def retokenize(rows: list[dict], tokenizer) -> list[dict]:
    """Render prompts with *this* model's tokenizer: an artifact may have been prepared for another."""
    from tokalign.data.render import render_prompts

    for r, (text, ids) in zip(rows, render_prompts(tokenizer, [loads(r["prompt"]) for r in rows])):
        r["prompt_text"], r["prompt_ids"] = text, ids
    return rows
