"""Where each step's training batch comes from. Offline sources index their rows by
(seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokalign.train.batching import Seq


def indices_for_step(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Items of batch ``step``: walk epoch permutations (seeded by seed+epoch) in order."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = min(batch_size - len(out), n_items - offset)
        out.extend(perm[offset : offset + take])
        pos += take
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def reward_metrics(rows: list[dict]) -> dict[str, float]:
    rewards = [float(r["reward"]) for r in rows]
    out = {"reward/mean": _mean(rewards)}
    if len(rewards) > 1:
        out["reward/std"] = float(torch.tensor(rewards).std())
    for name in rows[0].get("rewards") or {}:
        values = [float(r["rewards"][name]) for r in rows]
        out[f"reward/{name}"] = _mean(values)
        if len(values) > 1:  # unbiased, like reward/std
            out[f"reward/{name}_std"] = float(torch.tensor(values).std())
    lengths = [len(r["completion_ids"]) for r in rows]
    out["completion/len_mean"] = _mean(lengths)
    out["completion/len_min"], out["completion/len_max"] = (min(lengths), max(lengths)) if lengths else (0, 0)
    out["completion/truncated"] = _mean([r["finish_reason"] == "length" for r in rows])
    return out


def informative(group: list[dict]) -> bool:
    """A group teaches something relative only if its rewards differ."""
    return len({float(r["reward"]) for r in group}) > 1


ROW_SCALARS = ("baseline", "pool_mean", "pool_std", "pool_size")  # per-row numbers a source may add for the algorithm


def _row_scalars(r: dict) -> dict[str, float]:
    return {k: float(v) for k, v in r.items() if k in ROW_SCALARS or k.startswith("ref_reward_")}


def scored_seqs(rows: list[dict], prompt_index: list[int]) -> list[Seq]:
    """``prompt_index[k]``: the stable index of row k's prompt in the data source."""
    return [
        Seq(
            list(r["prompt_ids"]), list(r["completion_ids"]), int(r["group_id"]),
            row={"rewards": float(r["reward"]), **_row_scalars(r)},
            token={k: r.get(k) for k in ("sampler_logps", "token_rewards", "segment_value_start", "segment_value_end")},
            prompt_index=k,
        )
        for r, k in zip(rows, prompt_index)
    ]


@dataclass
class ScoredSource:
    """Offline RL from a ``scored`` artifact: ``batch_size`` whole groups per step."""

    rows: list[dict]
    batch_size: int
    seed: int
    max_completion_len: int | None = None
    informative_only: bool = False  # drop groups whose rewards are all equal (DAPO's dynamic sampling)

    def __post_init__(self):
        self.groups: dict[Any, list[dict]] = {}
        for r in self.rows:
            self.groups.setdefault(r["group_id"], []).append(r)
        if self.informative_only:
            self.groups = {k: g for k, g in self.groups.items() if informative(g)}
            if not self.groups:
                from tokalign.errors import UserError

                raise UserError("Every group in the scored data has equal rewards: nothing to learn from with dynamic sampling.")
        self.keys = sorted(self.groups)

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        rows, index = [], []
        picked = indices_for_step(len(self.keys), self.batch_size, step, self.seed)
        for new_gid, i in enumerate(picked):  # the same group may appear twice across an epoch edge
            group = self.groups[self.keys[i]]
            rows.extend({**r, "group_id": new_gid} for r in group)
            index.extend([i] * len(group))
        return scored_seqs(rows, index), reward_metrics(rows)


def pairs_from_scored(rows: list[dict]) -> list[dict]:
    """On-policy preference pairs from scored rollouts: in each group whose rewards differ, the
    highest-reward completion (first on ties) is chosen and the lowest rejected, with the sampler's
    own token ids. Groups of equal rewards give no pair."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    pairs = []
    for key in sorted(groups):
        best = max(groups[key], key=lambda r: r["reward"])
        worst = min(groups[key], key=lambda r: r["reward"])
        if best["reward"] > worst["reward"]:
            pairs.append({"id": f"{best['id']}>{worst['id']}", "prompt": best["prompt"], "prompt_text": best["prompt_text"],
                          "prompt_ids": best["prompt_ids"], "reference": best.get("reference"),
                          "chosen": best["completion"], "rejected": worst["completion"],
                          "chosen_ids": list(best["completion_ids"]), "rejected_ids": list(worst["completion_ids"])})
    return pairs


@dataclass
class PairSource:
    """Preference pairs: each pair is a group of two rows, chosen (is_chosen=1) then rejected."""

    rows: list[dict]
    tokenizer: Any
    batch_size: int
    seed: int
    with_gold: bool = False  # triples (TPO): a third row per group, the gold ``reference`` completion

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        from tokalign.data.render import completion_ids
        from tokalign.stages.common import loads

        seqs = []
        for gid, i in enumerate(indices_for_step(len(self.rows), self.batch_size, step, self.seed)):
            r = self.rows[i]
            for side, flag in (("chosen", 1.0), ("rejected", 0.0)):
                ids = r.get(f"{side}_ids") or completion_ids(self.tokenizer, r[side])  # sampled pairs keep their ids
                margins = {f"margin_{k}": m for k, m in enumerate(r.get(f"{side}_margins") or [])}
                seqs.append(Seq(list(r["prompt_ids"]), ids, gid, row={"is_chosen": flag, **margins}, prompt_index=i,
                                prompt=loads(r["prompt"]) if "prompt" in r else None))
            if self.with_gold:
                gold = completion_ids(self.tokenizer, loads(r["reference"]))
                seqs.append(Seq(list(r["prompt_ids"]), gold, gid, row={"is_chosen": 0.0, "is_gold": 1.0}, prompt_index=i))
        return seqs, {}


@dataclass
class CompletionSource:
    """Supervised rows (prompt + completion), one group each."""

    rows: list[dict]
    tokenizer: Any
    batch_size: int
    seed: int

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        from tokalign.data.render import completion_ids

        idx = indices_for_step(len(self.rows), self.batch_size, step, self.seed)
        return [Seq(list(self.rows[i]["prompt_ids"]), completion_ids(self.tokenizer, self.rows[i]["completion"]), g, prompt_index=i)
                for g, i in enumerate(idx)], {}


@dataclass
class OnlineSource:
    """Online RL: each step samples ``spec.n`` completions for ``batch_size`` prompts from the
    live policy and scores them with the same code as the ``rollout`` and ``score`` stages."""

    rows: list[dict]
    engine: Any
    rewards: list
    spec: Any
    batch_size: int
    seed: int
    informative_only: bool = False  # DAPO's dynamic sampling: keep sampling until the batch has
    max_rounds: int = 1  # `batch_size` groups whose rewards differ, for at most this many rounds
    greedy_baseline: bool = False  # ReMax: also decode each prompt greedily and score it (row "baseline")
    prompt_weights: Any = None  # the algorithm's prompt_weights(n_prompts) hook: prioritised prompt sampling
    adaptive: Any = None  # the algorithm's AdaptiveSampling: per-prompt multi-round sampling (Reinforce-Ada)
    reference_engine: Any = None  # samples of the reference model (PAR), ``reference_samples`` per prompt
    reference_samples: int = 0
    segments: Any = None  # the algorithm's segment hook (SPO): cut_points(sampler_logps) and rollouts per cut

    def __post_init__(self):
        self._ref_rewards: dict[int, list[float]] = {}
        self._step, self._calls = 0, 0

    def _segment_values(self, rows: list[dict]) -> float:
        """Monte-Carlo values at each row's cut points: V(c) = mean reward of ``segments.rollouts`` continuations of
        prompt + completion[:c] (c = 0 is the prompt alone); V(end) = the row's own reward. Each completion token gets
        the values at the start and at the end of its segment (token fields ``segment_value_start``/``_end``)."""
        from tokalign.stages.common import scored_rows

        h, tok = self.segments, self.engine.tokenizer
        cuts = [sorted({0, *h.cut_points(r["sampler_logps"])} - {len(r["completion_ids"])}) for r in rows]
        jobs = [(i, c) for i, cs in enumerate(cuts) for c in cs]
        conts = self._generate([rows[i]["prompt_ids"] + rows[i]["completion_ids"][:c] for i, c in jobs], n=h.rollouts)
        mc_rows = []
        for (i, c), samples in zip(jobs, conts):
            prefix, room = rows[i]["completion_ids"][:c], self.spec.max_new_tokens - c
            for k in samples:
                ids = prefix + k.ids[:room]
                mc_rows.append({**rows[i], "completion": tok.decode(ids, skip_special_tokens=True), "completion_ids": ids,
                                "finish_reason": "length" if len(k.ids) > room else k.finish_reason})
        scores = [float(r["reward"]) for r in scored_rows(mc_rows, self.rewards)] if mc_rows else []
        values: dict[tuple[int, int], float] = {}
        for j, job in enumerate(jobs):
            part = scores[j * h.rollouts : (j + 1) * h.rollouts]
            values[job] = sum(part) / len(part)
        for i, r in enumerate(rows):
            n, bounds = len(r["completion_ids"]), cuts[i] + [len(r["completion_ids"])]
            start, end = [0.0] * n, [0.0] * n
            for a, b in zip(bounds[:-1], bounds[1:]):
                v_end = values[(i, b)] if b < n else float(r["reward"])
                for t in range(a, b):
                    start[t], end[t] = values[(i, a)], v_end
            r["segment_value_start"], r["segment_value_end"] = start, end
        return len(jobs) / len(rows)  # cut points (segments) per completion

    def _reference_rewards(self, prompt_index: int) -> list[float]:
        """Rewards of ``reference_samples`` completions of the reference model for one prompt. Sampled under an RNG
        seeded by (seed, prompt) and cached, so they do not disturb the policy's sampling and a resumed run (which
        starts with an empty cache) sees the same values."""
        if prompt_index not in self._ref_rewards:
            from dataclasses import replace

            from tokalign.stages.common import rollout_rows, scored_rows

            prompt = self.rows[prompt_index]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + prompt_index)
                completions = self.reference_engine.generate([prompt["prompt_ids"]], replace(self.spec, n=self.reference_samples))
            scored = scored_rows(rollout_rows([prompt], completions, self.spec.max_new_tokens), self.rewards)
            self._ref_rewards[prompt_index] = [float(r["reward"]) for r in scored]
        return self._ref_rewards[prompt_index]

    def _pick(self, step: int, round_: int) -> list[int]:
        """Prompts of round ``round_`` of step ``step``: a function of (seed, step, round) and the algorithm's
        state only, so a resumed run draws the same ones."""
        weights = self.prompt_weights(len(self.rows)) if self.prompt_weights is not None else None
        if weights is None:
            return indices_for_step(len(self.rows), self.batch_size, step, self.seed + 7919 * round_)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step * 7919 + round_)
        w = torch.tensor(weights, dtype=torch.float64)
        return torch.multinomial(w, self.batch_size, replacement=self.batch_size > len(self.rows), generator=gen).tolist()

    def _generate(self, prompt_ids: list[list[int]], **spec):
        """The engine's completions (``spec`` overrides the sampling spec, e.g. n). Engines that take a seed per call
        (vLLM) get one per (step, call): fresh samples every step, the same ones on resume."""
        from dataclasses import replace

        self._calls += 1
        spec = {"seed": self.seed * 1_000_003 + self._step * 7919 + self._calls, **spec}
        return self.engine.generate(prompt_ids, replace(self.spec, **spec))

    def _sample(self, prompts: list[dict], **spec) -> list[dict]:
        """Sample and score; group_id k = prompts[k]."""
        from tokalign.stages.common import rollout_rows, scored_rows

        completions = self._generate([p["prompt_ids"] for p in prompts], **spec)
        return scored_rows(rollout_rows(prompts, completions, self.spec.max_new_tokens), self.rewards)

    def _adaptive_batch(self, step: int) -> tuple[list[dict], dict[str, float]]:
        """Reinforce-Ada: sample ``round_n`` more completions for every unfinished prompt, round after round,
        until the algorithm's ``select`` accepts a prompt's pool; then each group is the selection, and its rows
        carry the whole pool's reward mean/std/size."""
        a = self.adaptive
        picked = self._pick(step, 0)
        pools: list[list[dict]] = [[] for _ in picked]
        done: dict[int, list[dict]] = {}
        rounds = 0
        for rounds in range(1, a.max_rounds + 1):
            active = [g for g in range(len(picked)) if g not in done]
            if not active:
                break
            rows = self._sample([self.rows[picked[g]] for g in active], n=a.round_n)
            for k, g in enumerate(active):
                pools[g] += [r for r in rows if r["group_id"] == k]
                chosen = a.select(pools[g], self.spec.n, final=False)
                if chosen is not None:
                    done[g] = chosen
        out = []
        for g, pool in enumerate(pools):
            group = done.get(g) or a.select(pool, self.spec.n, final=True)
            rewards = torch.tensor([float(r["reward"]) for r in pool], dtype=torch.float64)
            stats = {"pool_mean": float(rewards.mean()), "pool_std": float(rewards.std()) if len(pool) > 1 else 0.0,
                     "pool_size": float(len(pool)), "prompt_index": picked[g]}
            out += [{**r, **stats, "group_id": g} for r in group]
        metrics = reward_metrics([r for p in pools for r in p])
        metrics.update({"sampling/rounds": rounds, "sampling/finished_prompts": len(done),
                        "sampling/pool_size_mean": sum(map(len, pools)) / len(pools)})
        return out, metrics

    def _greedy_baseline(self, rows: list[dict]) -> float:
        """Score one greedy completion per prompt into each row's ``baseline`` (greedy decoding draws no
        random numbers, so a resumed run is unaffected)."""
        firsts = {}
        for r in rows:
            firsts.setdefault(r["group_id"], r)
        scores = self._sample([firsts[g] for g in sorted(firsts)], n=1, temperature=0.0)
        by_group = {g: s["reward"] for g, s in zip(sorted(firsts), scores)}
        for r in rows:
            r["baseline"] = by_group[r["group_id"]]
        return sum(by_group.values()) / len(by_group)

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        self._step, self._calls = step, 0
        if self.adaptive is not None:
            out, metrics = self._adaptive_batch(step)
            return scored_seqs(out, [r["prompt_index"] for r in out]), metrics
        kept: list[list[dict]] = []
        sampled: list[dict] = []
        rounds = 0
        while rounds < max(1, self.max_rounds) and len(kept) < self.batch_size:
            # round r of step s draws its own prompts, a function of (seed, step, round) only: resumable
            picked = self._pick(step, rounds)
            rows = self._sample([self.rows[i] for i in picked])
            sampled += rows
            for g in range(len(picked)):
                group = [{**r, "prompt_index": picked[g]} for r in rows if r["group_id"] == g]
                if not self.informative_only or informative(group):
                    kept.append(group)
            rounds += 1
        if not kept:  # nothing informative after every round: train on the last round (zero advantages)
            kept = [[{**r, "prompt_index": picked[g]} for r in rows if r["group_id"] == g] for g in range(len(picked))]
        out = [{**r, "group_id": gid} for gid, group in enumerate(kept[: self.batch_size]) for r in group]
        metrics = reward_metrics(sampled)
        if self.segments is not None:
            metrics["segments/per_completion"] = self._segment_values(out)
        if self.reference_samples:
            for r in out:
                r.update({f"ref_reward_{k}": v for k, v in enumerate(self._reference_rewards(r["prompt_index"]))})
            metrics["reward/reference_mean"] = sum(v for r in out for k, v in r.items() if k.startswith("ref_reward_")) / (
                len(out) * self.reference_samples)
        if self.greedy_baseline:
            metrics["reward/greedy_baseline"] = self._greedy_baseline(out)
        if self.informative_only:
            metrics.update({"sampling/rounds": rounds, "sampling/informative_groups": len(kept)})
        return scored_seqs(out, [r["prompt_index"] for r in out]), metrics


@dataclass
class UnpairedSource:
    """Labelled single completions (KTO). Each example is a group of two rows: the example
    (``label`` 1 desirable / 0 undesirable) and a mismatched KL row (``is_kl`` 1) pairing its prompt
    with the previous example's completion, cycled within the batch as TRL does."""

    rows: list[dict]
    tokenizer: Any
    batch_size: int
    seed: int

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        from tokalign.data.render import completion_ids

        idx = indices_for_step(len(self.rows), self.batch_size, step, self.seed)
        completions = [completion_ids(self.tokenizer, self.rows[i]["completion"]) for i in idx]
        seqs = []
        for g, i in enumerate(idx):
            label = 1.0 if self.rows[i]["label"] else 0.0
            prompt = list(self.rows[i]["prompt_ids"])
            seqs.append(Seq(prompt, completions[g], g, row={"label": label, "is_kl": 0.0}, prompt_index=i))
            seqs.append(Seq(prompt, completions[g - 1], g, row={"label": label, "is_kl": 1.0}, prompt_index=i))
        return seqs, {"label/desirable_fraction": sum(bool(self.rows[i]["label"]) for i in idx) / len(idx)}
