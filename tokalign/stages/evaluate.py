"""Stage ``eval``: prompts + model + verifier -> an ``eval`` artifact (results.json + per-sample rows).

pass@k uses the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k)/C(n, k), averaged over
prompts, for k = 1, 2, 4, … ≤ n (and n itself).
"""

from __future__ import annotations

from math import comb
from pathlib import Path

from tokalign import artifacts, models, rewards
from tokalign.rollout import SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarise(rows: list[dict], n: int, verifier: str) -> dict:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    results: dict = {"num_prompts": len(groups), "n": n, "verifier": verifier}
    for k in ks_for(n):
        vals = [pass_at_k(len(g), sum(r["rewards"][verifier] >= 1.0 for r in g), k) for g in groups.values()]
        results[f"pass@{k}"] = sum(vals) / max(len(vals), 1)
    results["mean_reward"] = sum(r["reward"] for r in rows) / max(len(rows), 1)
    results["mean_completion_tokens"] = sum(len(r["completion_ids"]) for r in rows) / max(len(rows), 1)
    results["truncated_fraction"] = sum(r["finish_reason"] == "length" for r in rows) / max(len(rows), 1)
    return results


def evaluate(prompts: str, out: str, *, model: str = "", verifier: str = "exact_match", backend: str = "hf",
             spec: SamplingSpec = SamplingSpec(n=4), overwrite: bool = False, reward_options: dict | None = None,
             workers: int = 1, timeout: float | None = 30.0) -> tuple[Path, dict]:
    """A sample whose verifier raises or times out counts as failed (score 0); ``results["reward_failures"]`` counts them."""
    import sys

    from tokalign.scoring import resolve_workers
    from tokalign.stages.common import retokenize, score_rows
    from tokalign.stages.rollout import check_backend, sample
    from tokalign.stages.score import plugin_refs

    check_backend(backend)

    out_path = artifacts.check_output(out, overwrite)
    n_workers = resolve_workers(workers)
    src = artifacts.read(prompts, ["prompts"])
    resolved = rewards.resolve([verifier], reward_options)
    tokenizer = models.load_tokenizer(model)
    rows = retokenize(src.rows(), tokenizer)
    scored, report = score_rows(sample(rows, model, backend, spec, tokenizer), resolved, workers=n_workers, timeout=timeout or None)
    if report.failed_samples:
        sys.stderr.write(f"eval: {report.summary()}\n")
    results = summarise(scored, spec.n, resolved[0].name)
    results.update(model=model or "(bundled)", temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                   reward_failures=report.failed_samples)
    prov = artifacts.Provenance(
        config={"verifier": verifier, "backend": backend, "model": model or "(bundled)", **spec.__dict__,
                **({"reward_options": reward_options} if reward_options else {})},
        inputs=[src.ref()], plugins=plugin_refs(resolved), model=models.identity(model), seed=spec.seed,
        extra={"scoring": report.to_dict()},
    )
    with artifacts.writing(out_path, "eval", prov, overwrite) as w:
        w.write_rows(scored)
        w.write_json("results.json", results)
    return out_path, results
