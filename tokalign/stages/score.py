"""Stage ``score``: rollouts + rewards/verifiers -> a ``scored`` artifact (the inputs are untouched).

Rewards run one sample per call, in-process (``workers=1``) or in worker processes, with a per-sample
timeout; results are cached on disk by (reward fingerprint, sample content). A reward failing on a
sample scores 0 there and says why in ``reward_errors``; the run goes on (see ``tokalign.scoring``).
A reward failing on every sample, or breaking its contract, is broken: the plug-in's one-line error, no artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokalign import artifacts, rewards
from tokalign.rewards import plugin_refs  # defined there (train imports it too); still importable from here


def default_reward(src) -> str:
    """The data's own reward (a task's, e.g. ``reasoning_gym``), recorded by ``prepare`` and carried by ``rollout``;
    a scored artifact's own rewards when re-scoring."""
    from tokalign.errors import UserError

    found = src.manifest.get("default_reward") or (src.manifest.get("config", {}).get("reward") if src.kind == "scored" else None)
    if not found:
        raise UserError(f"'{src.path}' records no reward of its data: pass --reward NAME (see `tokalign plugins`).")
    return found


def score(rollouts: str, out: str, *, reward: list[str] | None = None, overwrite: bool = False, reward_options: dict | None = None,
          workers: int = 1, timeout: float | None = 30.0, cache: bool = True, policy: str | None = None) -> Path:
    """``workers``: 1 in-process, N > 1 processes, 0 one per CPU. ``timeout``: seconds per sample and
    reward (None or 0: none). ``cache``: read and write the score cache (``scoring.cache``). ``policy``: the model (a
    checkpoint) that rewards which read the policy (``tokalign.rewards.policy``) see; they need one.

    Rows are read, scored and written a chunk at a time (``rows.chunk_rows()`` rows, cut between groups), with one
    worker pool, cache and report over all chunks; a broken reward is told at the end, and then no artifact is left."""
    from tokalign.errors import UserError
    from tokalign.rows import SCORE_COLUMNS, check_row, chunk_rows
    from tokalign.scoring import Scorer, resolve_workers
    from tokalign.scoring.calls import check_broken
    from tokalign.scoring.rows import group_chunks, score_chunk

    out_path = artifacts.check_output(out, overwrite)
    if timeout is not None and timeout < 0:
        raise UserError(f"--timeout must be ≥ 0 seconds (0 = no limit), got {timeout:g}.")
    n_workers = resolve_workers(workers)
    src = artifacts.read(rollouts, ["rollouts", "scored"])
    if not reward:
        found = default_reward(src)
        reward = list(found) if isinstance(found, list) else [found]
    resolved = _with_policy(rewards.resolve(reward, reward_options), policy, n_workers)
    size = chunk_rows()
    rows = (check_row(str(src.path), i, r, scored=False) or r for i, r in enumerate(src.iter_rows(size), 1))
    if src.kind == "scored":  # re-score: drop the old scores, keep the rollouts
        rows = ({k: v for k, v in r.items() if k not in SCORE_COLUMNS} for r in rows)
    store = None
    if cache:
        from tokalign.scoring.cache import ScoreCache

        store = ScoreCache()
    progress = _progress if sys.stderr.isatty() else None
    config = {"reward": reward, "reward_options": dict(reward_options or {}), "timeout_s": timeout or None}
    prov = artifacts.Provenance(config=config, inputs=[src.ref()], plugins=plugin_refs(resolved))
    with artifacts.writing(out_path, "scored", prov, overwrite) as w:  # raising in here leaves nothing behind
        try:
            with Scorer(resolved, workers=n_workers, timeout=timeout or None, cache=store, progress=progress,
                        total=src.num_rows() * len(resolved)) as scorer:
                w.stream_rows(score_chunk(scorer, chunk) for chunk in group_chunks(rows, size))
        finally:
            if store is not None:
                store.close()
            if progress:
                sys.stderr.write("\r\033[K")
        report = scorer.report
        check_broken(report, resolved)  # known only once every chunk is scored
        sys.stderr.write(f"score: {report.summary()}\n")
        prov.extra["scoring"] = report.to_dict()  # the manifest is built when the block ends
    return out_path


def _with_policy(resolved: list, policy: str | None, workers: int) -> list:
    """The rewards, those that read the policy bound to ``policy`` (loaded here) and keyed in the cache by its
    identity; one line and exit 2 when such a reward has no policy, or ``policy`` is given for none."""
    import dataclasses
    import hashlib
    import json

    from tokalign import models
    from tokalign.errors import UserError
    from tokalign.rewards import policy as policy_mod

    seeing = policy_mod.policy_rewards(resolved)
    if not seeing:
        if policy:
            raise UserError(f"--policy {policy}: none of the rewards ({', '.join(r.name for r in resolved)}) reads the policy; drop --policy.")
        return resolved
    names = ", ".join(f"'{r.name}'" for r in seeing)
    if not policy:
        raise UserError(f"reward {names} scores with the policy's own likelihoods: pass --policy MODEL (the checkpoint "
                        "whose samples these are, e.g. the run's train output).")
    policy_mod.check(seeing, workers=workers)
    ident = json.dumps(models.identity(policy), sort_keys=True, default=str)  # validates the path before any load
    model = models.load_model(policy, device=models.default_device())
    policy_mod.bind(seeing, policy_mod.PolicyView(model, models.load_tokenizer(policy)))
    keyed = {id(r) for r in seeing}
    return [dataclasses.replace(r, fingerprint=hashlib.sha256(f"{r.fingerprint}\0{ident}".encode()).hexdigest())
            if id(r) in keyed else r for r in resolved]


def _progress(done: int, total: int) -> None:
    sys.stderr.write(f"\rscore: {done}/{total} reward calls")
    sys.stderr.flush()
