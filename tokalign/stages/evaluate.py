"""Stage ``eval``: prompts + model + verifier -> an ``eval`` artifact (results.json + per-sample rows).

Metrics in ``results.json`` (per-sample columns in the rows where noted):

* ``pass@k`` — the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k)/C(n, k), averaged over
  prompts, for k = 1, 2, 4, … ≤ n (and n itself).
* ``maj@k`` — majority voting over the samples' *answers* (column ``answer``), same k's. Each prompt's
  n samples, in ``sample_idx`` order, are cut into ⌊n/k⌋ disjoint blocks of k consecutive samples; a
  block votes for the answer given most often in it (samples without an answer do not vote; a tie goes
  to the tied answer that appears first in the block) and the vote is correct when the first sample
  giving that answer passed (a block where no sample has an answer is wrong). maj@k is the mean over
  blocks, then over prompts; so maj@1 = pass@1. Answers are compared as strings: the verifier's
  ``answer(sample)`` hook (see ``answer_fn``), else the stripped completion.
* ``mean_reward``, ``mean_completion_tokens``, ``truncated_fraction``.
* ``mean_entropy`` — the policy's next-token entropy H = −Σ_v p log p (nats, the untempered model
  distribution) at each completion token, averaged over all completion tokens; column ``entropy``:
  the per-sample mean over its tokens.
* with a reference model (``ref``): ``kl`` — the mean over samples of Σ_t (log π(y_t) − log π_ref(y_t))
  over the sample's completion tokens (ops.kl_penalty's k1, summed: the sequence-level log-ratio, an
  unbiased estimate of KL(π ‖ π_ref) between the models' sequence distributions when sampling at
  temperature 1 and top_p 1; at other settings, the mean log-ratio under the sampling distribution);
  ``kl_k3_per_token`` — ops.kl_penalty's k3 estimate averaged over all completion tokens (each token's
  k3 clamped to [−10, 10] as in training, so for far-apart models trust ``kl``). Columns
  ``kl`` and ``kl_k3`` (per-sample sum of k1 and mean of k3).

Entropy and KL come from one transformers forward pass of each model over the sampled tokens
(``tokalign.forward.forward``, the train loop's own), with the models' untempered log-probs.
"""

from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Callable

from tokalign import artifacts, models, rewards
from tokalign.errors import UserError
from tokalign.rollout import SamplingSpec

LOGITS_BUDGET = 1 << 28  # logits per forward pass of the entropy/KL pass (≈1 GiB in float32); at least one row


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


def majority_vote(answers: list[str | None], passed: list[bool]) -> bool:
    """One block's vote: the most frequent answer (None does not vote; ties: the one appearing first);
    correct iff the first sample giving it passed."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return False
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(passed[first[best]])


def maj_at_k(answers: list[str | None], passed: list[bool], k: int) -> float | None:
    """Mean vote over the ⌊n/k⌋ disjoint blocks of k consecutive samples; None when n < k."""
    blocks = len(answers) // k
    if blocks == 0:
        return None
    return sum(majority_vote(answers[b * k:(b + 1) * k], passed[b * k:(b + 1) * k]) for b in range(blocks)) / blocks


def summarise(rows: list[dict], n: int, verifier: str) -> dict:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample_idx", 0))
    results: dict = {"num_prompts": len(groups), "n": n, "verifier": verifier}
    passed = lambda r: r["rewards"][verifier] >= 1.0  # noqa: E731
    for k in ks_for(n):
        vals = [pass_at_k(len(g), sum(passed(r) for r in g), k) for g in groups.values()]
        results[f"pass@{k}"] = sum(vals) / max(len(vals), 1)
    if rows and all("answer" in r for r in rows):
        for k in ks_for(n):
            votes = [maj_at_k([r["answer"] for r in g], [passed(r) for r in g], k) for g in groups.values()]
            votes = [v for v in votes if v is not None]
            if votes:
                results[f"maj@{k}"] = sum(votes) / len(votes)
    results["mean_reward"] = sum(r["reward"] for r in rows) / max(len(rows), 1)
    results["mean_completion_tokens"] = sum(len(r["completion_ids"]) for r in rows) / max(len(rows), 1)
    results["truncated_fraction"] = sum(r["finish_reason"] == "length" for r in rows) / max(len(rows), 1)
    counted = [r for r in rows if r.get("entropy") is not None]
    if counted:
        results["mean_entropy"] = _token_mean(counted, "entropy")
    with_kl = [r for r in rows if r.get("kl") is not None]
    if with_kl:
        results["kl"] = sum(r["kl"] for r in with_kl) / len(with_kl)
        results["kl_k3_per_token"] = _token_mean(with_kl, "kl_k3")
    return results


def _token_mean(rows: list[dict], key: str) -> float:
    """The mean over all completion tokens of rows holding a per-sample mean under ``key``."""
    tokens = sum(len(r["completion_ids"]) for r in rows)
    return sum(r[key] * len(r["completion_ids"]) for r in rows) / max(tokens, 1)


def answer_fn(reward: rewards.ResolvedReward) -> Callable:
    """The verifier's (or reward object's) ``answer(sample) -> str | None`` hook: the answer that
    majority voting compares (e.g. ``math``: the extracted, normalised final answer). Without the
    hook: the completion, stripped (None when empty)."""
    obj = getattr(reward.fn, "verifier", reward.fn)
    hook = getattr(obj, "answer", None)
    if callable(hook):
        return hook
    return lambda s: (s.completion or "").strip() or None


def add_answers(rows: list[dict], reward: rewards.ResolvedReward) -> None:
    """Column ``answer``; a hook that raises on a sample gives it no answer (it does not vote)."""
    from tokalign.rows import to_sample

    fn = answer_fn(reward)
    for r in rows:
        try:
            a = fn(to_sample(r))
        except Exception:  # a broken hook costs that sample its vote, not the evaluation
            a = None
        r["answer"] = None if a is None else str(a)


def check_ref(ref: str, tokenizer) -> None:
    if models.load_tokenizer(ref).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--ref '{ref}' has a different tokenizer from the evaluated model; "
                        "KL over sampled tokens needs the same vocabulary: pass a reference of the same model family.")


def add_token_stats(rows: list[dict], model: str, tokenizer, ref: str = "", entropy: bool = True) -> None:
    """Columns ``entropy`` (policy, mean over the completion tokens) and, with ``ref``, ``kl`` (Σ k1) and
    ``kl_k3`` (mean k3), from transformers forward passes over prompt + completion; None for an empty completion."""
    import torch

    from tokalign import ops
    from tokalign.batching import Seq, collate
    from tokalign.forward import forward, to_device as _to

    if not rows or not (entropy or ref):
        return
    policy = models.load_model(model).eval()
    reference = None
    if ref:
        check_ref(ref, tokenizer)
        reference = models.load_model(ref).eval()
    device = next(policy.parameters()).device
    vocab = policy.get_output_embeddings().weight.shape[0] if policy.get_output_embeddings() is not None else len(tokenizer)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["completion_ids"]))
    start = 0
    while start < len(order):
        longest = len(rows[order[start]]["prompt_ids"]) + len(rows[order[start]]["completion_ids"])
        size = 1
        while start + size < len(order):  # rows are length-sorted: the next one is the longest so far
            i = order[start + size]
            longest = len(rows[i]["prompt_ids"]) + len(rows[i]["completion_ids"])
            if (size + 1) * longest * vocab > LOGITS_BUDGET:
                break
            size += 1
        chunk = order[start:start + size]
        start += size
        seqs = [Seq(list(rows[i]["prompt_ids"]), list(rows[i]["completion_ids"]), int(rows[i]["group_id"])) for i in chunk]
        batch = _to(collate(seqs, tokenizer.pad_token_id), device)
        mask = batch.completion_mask
        with torch.no_grad():
            out = forward(policy, batch, with_entropy=entropy)
            ent = ops.masked_mean(out.entropy, mask, dim=-1).tolist() if entropy else None
            if reference is not None:
                ref_logps = forward(reference, batch).logps
                k1 = ops.masked_sum(ops.kl_penalty(out.logps, ref_logps, "k1"), mask, dim=-1).tolist()
                k3 = ops.masked_mean(ops.kl_penalty(out.logps, ref_logps, "k3"), mask, dim=-1).tolist()
        for j, i in enumerate(chunk):
            empty = not rows[i]["completion_ids"]
            if entropy:
                rows[i]["entropy"] = None if empty else float(ent[j])
            if reference is not None:
                rows[i]["kl"] = None if empty else float(k1[j])
                rows[i]["kl_k3"] = None if empty else float(k3[j])


def load_prompts(source: str, tokenizer, split: str = "test", limit: int | None = None,
                 tools: list[dict] | None = None) -> tuple[list[dict], list[dict], str | None]:
    """(rows rendered for ``tokenizer``, manifest inputs, the data's default reward): a prompts artifact,
    or a built-in task / data file / hub dataset (``split``: a task's or hub dataset's split)."""
    from tokalign.data.render import retokenize

    if artifacts.is_artifact(source):
        src = artifacts.read(source, ["prompts"])
        rows = src.rows()[:limit] if limit else src.rows()
        return retokenize(rows, tokenizer, tools), [src.ref()], src.manifest.get("default_reward")
    from tokalign.stages.prepare import load_rows

    kind, rows, info = load_rows(source, tokenizer, split, limit, tools)
    if kind != "prompts":
        raise UserError(f"'{source}' holds preference pairs; eval needs prompts (with reference answers for the verifier).")
    inputs = [{"path": info.get("path", source), "kind": info["source"], "split": split, "sha256": info["sha256"]}]
    return rows, inputs, info.get("default_reward")


def evaluate(prompts: str, out: str, *, model: str = "", verifier: str | None = "exact_match", backend: str = "hf",
             spec: SamplingSpec = SamplingSpec(n=4), overwrite: bool = False, reward_options: dict | None = None,
             workers: int = 1, timeout: float | None = 30.0, ref: str = "", entropy: bool = True, split: str = "test",
             limit: int | None = None, episodes=None, processors=None) -> tuple[Path, dict]:
    """A sample whose verifier raises or times out counts as failed (score 0); ``results["reward_failures"]`` counts them.
    ``verifier`` None: the data's default reward (a task's), else ``exact_match``. ``processors``: decoding hooks that
    steer the sampling (``tokalign.decoding``); entropy and KL stay the model's own."""
    import sys

    from tokalign.scoring import resolve_workers
    from tokalign.scoring.calls import check_broken
    from tokalign.scoring.rows import score_rows
    from tokalign.rollout.episodes import EpisodeSpec
    from tokalign.rows import episode_stats
    from tokalign.stages.rollout import check_backend, episode_config, processor_config, sample
    from tokalign.rewards import plugin_refs

    check_backend(backend)

    out_path = artifacts.check_output(out, overwrite)
    n_workers = resolve_workers(workers)
    tokenizer = models.load_tokenizer(model)
    episodes = episodes or EpisodeSpec()
    rows, inputs, default_reward = load_prompts(prompts, tokenizer, split, limit, episodes.tools())
    if not rows:
        raise UserError(f"'{prompts}' holds no prompts to evaluate.")
    verifier = verifier or default_reward or "exact_match"
    resolved = rewards.resolve([verifier], reward_options, what="verifier")
    if ref:
        check_ref(ref, tokenizer)  # a bad --ref fails before any sampling
    scored, report = score_rows(sample(rows, model, backend, spec, tokenizer, episodes, processors), resolved, workers=n_workers, timeout=timeout or None)
    check_broken(report, resolved)  # a verifier failing on every sample is broken: no artifact of zeros
    if report.failed_samples:
        sys.stderr.write(f"eval: {report.summary()}\n")
    add_answers(scored, resolved[0])
    add_token_stats(scored, model, tokenizer, ref, entropy)
    results = summarise(scored, spec.n, resolved[0].name)
    results.update(model=model or "(bundled)", temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens,
                   seed=spec.seed, backend=backend, reward_failures=report.failed_samples, **({"ref": ref} if ref else {}),
                   **episode_config(episodes), **episode_stats(scored), **processor_config(processors))
    prov = artifacts.Provenance(
        config={"verifier": verifier, "backend": backend, "model": model or "(bundled)", **spec.__dict__, **episode_config(episodes),
                **processor_config(processors),
                **({"reward_options": reward_options} if reward_options else {}), **({"ref": ref} if ref else {}),
                "entropy": entropy, **({"split": split} if not artifacts.is_artifact(prompts) else {}),
                **({"limit": limit} if limit else {})},
        inputs=inputs, plugins=plugin_refs(resolved) + (processors.plugin_refs() if processors else []),
        model=models.identity(model), seed=spec.seed,
        extra={"scoring": report.to_dict(), **({"ref_model": models.identity(ref)} if ref else {})},
    )
    with artifacts.writing(out_path, "eval", prov, overwrite) as w:
        w.write_rows(scored)
        w.write_json("results.json", results)
    return out_path, results
