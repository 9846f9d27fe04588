"""Where each step's training batch comes from. Offline sources index their rows by
(seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from tokalign.batching import Seq
from tokalign import plugin_errors
from tokalign.errors import UserError
from tokalign.rollout.episodes import generate_rows
from tokalign.rows import episode_stats, episode_token_fields, loads, rollout_rows
from tokalign.scoring.rows import scored_rows


def _hook(method, *args):
    """A sampling hook's bound ``method``, called so that its exception is the hook's one line."""
    return plugin_errors.call("sampling hook", method.__self__.name, method.__name__, method, *args)


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
    out.update(episode_stats(rows, "episode/"))  # multi-turn: turns and tool calls per episode
    return out


STANDARD_TOKEN_COLUMNS = ("sampler_logps", "token_rewards", "loss_mask")  # per-token columns of the row schema the algorithms see


def scored_seqs(rows: list[dict], prompt_index: list[int]) -> list[Seq]:
    """``prompt_index[k]``: the stable index of row k's prompt in the data source. A row's ``fields`` / ``token_fields``
    (what sampling hooks added) become per-row / per-token batch fields beside ``rewards`` and the standard columns."""
    return [
        Seq(
            list(r["prompt_ids"]), list(r["completion_ids"]), int(r["group_id"]),
            row={"rewards": float(r["reward"]), **{k: float(v) for k, v in (r.get("fields") or {}).items()}},
            token={**{k: r.get(k) for k in STANDARD_TOKEN_COLUMNS}, **episode_token_fields(r), **(r.get("token_fields") or {})},
            prompt_index=k,
        )
        for r, k in zip(rows, prompt_index)
    ]


@dataclass
class ScoredSource:
    """Offline RL from a ``scored`` artifact: ``batch_size`` whole groups per step; groups the algorithm's sampling
    hooks do not ``accept`` (e.g. equal rewards under dynamic sampling) are dropped up front."""

    rows: list[dict]
    batch_size: int
    seed: int
    hooks: tuple = ()

    def __post_init__(self):
        self.groups: dict[Any, list[dict]] = {}
        for r in self.rows:
            self.groups.setdefault(r["group_id"], []).append(r)
        self.groups = {k: g for k, g in self.groups.items() if all(_hook(h.accept, g) for h in self.hooks)}
        if not self.groups:
            names = ", ".join(h.name for h in self.hooks)
            raise UserError(f"No group of the scored data passes the algorithm's group filter ({names}): nothing to learn from "
                            "(dynamic sampling drops groups whose rewards are all equal).")
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
    from tokalign.rows import best_and_worst

    return [{"id": f"{best['id']}>{worst['id']}", "prompt": best["prompt"], "prompt_text": best["prompt_text"],
             "prompt_ids": best["prompt_ids"], "reference": best.get("reference"),
             "chosen": best["completion"], "rejected": worst["completion"],
             "chosen_ids": list(best["completion_ids"]), "rejected_ids": list(worst["completion_ids"])}
            for best, worst in best_and_worst(rows)]


def unpaired_from_pairs(rows: list[dict]) -> list[dict]:
    """Preference pairs as labelled single completions, as TRL's KTO reads a paired dataset: the chosen completion
    desirable, the rejected one undesirable, in that order."""
    out = []
    for r in rows:
        common = {k: v for k, v in r.items() if k not in ("chosen", "rejected", "chosen_ids", "rejected_ids")}
        for side, label in (("chosen", True), ("rejected", False)):
            out.append({**common, "id": f"{r['id']}/{side}", "completion": r[side], "label": label})
    return out


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
        idx = indices_for_step(len(self.rows), self.batch_size, step, self.seed)
        return [self._seq(self.rows[i], g, i) for g, i in enumerate(idx)], {}

    def _seq(self, row: dict, group: int, index: int) -> Seq:
        from tokalign.data.render import completion_ids

        turns = row.get("completion_messages")
        if not turns:
            prompt, completion = list(row["prompt_ids"]), completion_ids(self.tokenizer, row["completion"])
            if not prompt:  # language modelling (TRL's ``text``): the first token has no prediction, so it is the prompt
                prompt, completion = completion[:1], completion[1:]
            return Seq(prompt, completion, group, prompt_index=index)
        from tokalign.environments.turns import conversation_tokens

        ids, mask = conversation_tokens(self.tokenizer, loads(turns) if isinstance(turns, str) else turns)
        return Seq(list(row["prompt_ids"]), ids, group, token={"loss_mask": mask}, prompt_index=index)


@dataclass
class StepwiseSource:
    """Stepwise supervision (a prompt, its completion's steps, a label per step), one group each; the algorithm lays
    a row out as it trains on it (``encode(tokenizer, row) -> Seq``: which tokens, which carry the loss)."""

    rows: list[dict]
    encode: Callable[[dict], Seq]
    batch_size: int
    seed: int

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        idx = indices_for_step(len(self.rows), self.batch_size, step, self.seed)
        seqs = [replace(self.encode(self.rows[i]), group_id=g, prompt_index=i) for g, i in enumerate(idx)]
        labels = [bool(x) for i in idx for x in self.rows[i]["step_labels"]]
        return seqs, {"steps/per_example": len(labels) / len(idx), "steps/good_fraction": _mean([float(x) for x in labels])}


@dataclass
class Sharing:
    """How the online sampling is shared between processes: prompts are sampled in chunks of ``chunk`` (0: one chunk
    per process), each under its own seed, chunk k by process k mod N, and the scored rows gathered — so every process
    holds the whole batch, and N processes draw exactly what one process with the same ``chunk`` draws."""

    dist: Any = None  # train.distributed.Dist, or None for one process
    chunk: int = 0
    lockstep: bool = False  # every process must run as many generate calls (FSDP-sharded model: they are collectives)

    @property
    def world(self) -> int:
        return self.dist.world if self.dist is not None else 1


@dataclass
class OnlineSource:
    """Online RL: each step samples ``spec.n`` completions for ``batch_size`` prompts from the live policy and scores
    them with the same code as the ``rollout`` and ``score`` stages. The algorithm's sampling hooks steer it (they see
    this object as their ``SamplingContext``): prompt weights, accepted groups and resampling rounds, a whole
    collection of their own, extra samples or values on the chosen rows."""

    rows: list[dict]
    engine: Any
    rewards: list
    spec: Any
    batch_size: int
    seed: int
    hooks: tuple = ()
    rollout_config: Any = None  # the run's rollout section (hooks read e.g. max_sampling_rounds)
    policy: Any = None  # pushed into the engine before every step (engines that sample from their own copy)
    reference: Callable[[], Any] | None = None  # the run's reference model, for hooks that sample from it
    sharing: Sharing = field(default_factory=lambda: Sharing())
    step: int = field(default=0, init=False)

    def __post_init__(self):
        self._calls, self._reference_engine = 0, None
        self.rounds_used = self.accepted_groups = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def reference_engine(self):
        if self._reference_engine is None:
            from tokalign.rollout.hf import HFEngine
            from tokalign.train.distributed import is_sharded

            # every process samples the same reference rows (hooks see the gathered batch): in step for a sharded one
            model = self.reference()
            self._reference_engine = HFEngine(model, self.tokenizer, synced_gpus=is_sharded(model))
        return self._reference_engine

    def pick(self, step: int, round_: int) -> list[int]:
        """Prompts of round ``round_`` of step ``step``: a function of (seed, step, round) and the hooks' state only,
        so a resumed run draws the same ones."""
        weights = next((w for w in (_hook(h.prompt_weights, len(self.rows)) for h in self.hooks) if w is not None), None)
        if weights is None:
            return indices_for_step(len(self.rows), self.batch_size, step, self.seed + 7919 * round_)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step * 7919 + round_)
        w = torch.tensor(weights, dtype=torch.float64)
        return torch.multinomial(w, self.batch_size, replacement=self.batch_size > len(self.rows), generator=gen).tolist()

    def generate(self, prompt_ids: list[list[int]], **spec):
        """The engine's completions (``spec`` overrides the sampling spec, e.g. n). Engines that take a seed per call
        (vLLM) get one per (step, call): fresh samples every step, the same ones on resume."""
        return self.engine.generate(prompt_ids, self._call_spec(spec))

    def _call_spec(self, spec: dict):
        self._calls += 1
        return replace(self.spec, **{"seed": self.seed * 1_000_003 + self.step * 7919 + self._calls, **spec})

    def score(self, rows: list[dict]) -> list[dict]:
        from tokalign.rewards import policy

        if self.policy is not None and policy.policy_rewards(self.rewards):  # rewards that read the policy: as it is now
            policy.bind(self.rewards, policy.PolicyView(self.policy, self.tokenizer, self.step))
        return scored_rows(rows, self.rewards)

    def sample(self, prompts: list[dict], **spec) -> list[dict]:
        """Sample and score; group_id k = prompts[k]. Shared between processes when chunked (see ``chunk``)."""
        world = self.sharing.world
        if world == 1 and self.sharing.chunk <= 0:  # one process, one call, the global RNG stream
            completions = generate_rows(self.engine, prompts, self._call_spec(spec))
            return self.score(rollout_rows(prompts, completions, self.spec.max_new_tokens))
        return self._sample_chunks(prompts, world, spec)

    def _sample_chunks(self, prompts: list[dict], world: int, spec: dict) -> list[dict]:
        from tokalign.train import distributed

        size = self.sharing.chunk if self.sharing.chunk > 0 else -(-len(prompts) // world)
        starts = list(range(0, len(prompts), size))
        self._calls += 1
        base = self.seed * 1_000_003 + self.step * 7919 + self._calls * 104_729
        rank = self.sharing.dist.rank if self.sharing.dist is not None else 0
        mine = [k for k in range(len(starts)) if k % world == rank]
        rows: dict[int, list[dict]] = {}
        for k in mine:
            part = prompts[starts[k] : starts[k] + size]
            rows[k] = self.score(rollout_rows(part, self._seeded(part, base + k, spec), self.spec.max_new_tokens, group_offset=starts[k]))
        calls = -(-len(starts) // world)
        for _ in range(calls - len(mine) if self.sharing.lockstep else 0):  # keep a sharded model's collectives in step
            self._seeded(prompts[:1], base, spec)
        merged: dict[int, list[dict]] = {}
        for part in distributed.gather_objects(rows, self.sharing.dist):
            merged.update(part)
        return [r for k in sorted(merged) for r in merged[k]]

    def _seeded(self, prompts: list[dict], seed: int, spec: dict):
        """One chunk's completions under an RNG seeded for it (and the same seed for engines that take one)."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return generate_rows(self.engine, prompts, replace(self.spec, **{"seed": seed, **spec}))

    def _rounds(self) -> tuple[list[list[dict]], list[dict], dict]:
        """Sample rounds of fresh prompts until ``batch_size`` groups are accepted by every hook, for at most the
        largest number of rounds a hook allows; nothing accepted: the last round (zero advantages)."""
        kept: list[list[dict]] = []
        sampled: list[dict] = []
        limit = max([_hook(h.rounds, self.rollout_config) for h in self.hooks] + [1])
        rounds = 0
        while rounds < limit and len(kept) < self.batch_size:
            # round r of step s draws its own prompts, a function of (seed, step, round) only: resumable
            picked = self.pick(self.step, rounds)
            rows = self.sample([self.rows[i] for i in picked])
            sampled += rows
            groups = [[{**r, "prompt_index": picked[g]} for r in rows if r["group_id"] == g] for g in range(len(picked))]
            kept += [group for group in groups if all(_hook(h.accept, group) for h in self.hooks)]
            rounds += 1
        self.rounds_used, self.accepted_groups = rounds, len(kept)
        return (kept or groups), sampled, {}

    def batch(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        self.step, self._calls = step, 0
        sync_s = self.engine.sync(self.policy)
        collected = next((c for c in (_hook(h.collect, self) for h in self.hooks) if c is not None), None)
        groups, sampled, extra = collected if collected is not None else self._rounds()
        idle = getattr(self.engine, "idle", None)  # the step's sampling is done: a sleeping vLLM engine frees its GPU memory
        if idle is not None:
            idle()
        out = [{**r, "group_id": gid} for gid, group in enumerate(groups[: self.batch_size]) for r in group]
        metrics = {**reward_metrics(sampled), **extra}
        for h in self.hooks:
            metrics.update(_hook(h.after_batch, out, self))
        if sync_s is not None:
            metrics["time/weight_sync_s"] = round(sync_s, 4)
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
