"""Stage ``score``: rollouts + rewards/verifiers -> a ``scored`` artifact (the inputs are untouched)."""

from __future__ import annotations

from pathlib import Path

from tokalign import artifacts, rewards


def plugin_refs(resolved) -> list[dict]:
    return [{"kind": r.plugin.kind, "name": r.name, "distribution": r.plugin.distribution,
             "version": r.plugin.version, "weight": r.weight} for r in resolved]


def score(rollouts: str, out: str, *, reward: list[str], overwrite: bool = False) -> Path:
    from tokalign.stages.common import scored_rows

    out_path = artifacts.check_output(out, overwrite)
    src = artifacts.read(rollouts, ["rollouts", "scored"])
    resolved = rewards.resolve(reward)
    rows = src.rows()
    if src.kind == "scored":  # re-score: drop the old scores, keep the rollouts
        rows = [{k: v for k, v in r.items() if k not in ("reward", "rewards", "verdicts", "token_rewards")} for r in rows]
    out_rows = scored_rows(rows, resolved)
    prov = artifacts.Provenance(config={"reward": reward}, inputs=[src.ref()], plugins=plugin_refs(resolved))
    with artifacts.writing(out_path, "scored", prov, overwrite) as w:
        w.write_rows(out_rows)
    return out_path
