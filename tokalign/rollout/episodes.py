"""Multi-turn episodes, token in, token out: an engine's turns and an environment's replies appended as ids.

``EpisodeEngine`` wraps an engine (HF or vLLM) and keeps its contract — ``generate(prompts, spec)`` returns ``spec.n``
Completions per prompt — but each Completion is a whole episode after the prompt: the model's sampled ids (loss mask
1, with the sampler's log-probs) and the environment's replies (loss mask 0, log-prob 0), tokenised once per turn by
``environments.turns``. The ids the engine consumed on each turn are exactly the prompt and the episode so far, so
the stored ids are the sampled ones and the trainer scores the very tokens that were sampled.

Turn 1 samples ``n`` per prompt; later turns continue each episode with one sample, all open episodes in one engine
call (vLLM's prefix cache serves their shared prefixes). An episode ends when the environment says done (for a tool
environment: a turn without a tool call), after ``max_turns`` model turns (``finish_reason`` "stop"), or when a turn
hits the per-turn or episode token budget (``finish_reason`` "length").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from tokalign.environments.base import fork_state
from tokalign.environments.turns import reply_ids
from tokalign.rollout import Completion, SamplingSpec, branching


@dataclass
class _Episode:
    prompt: list[int]
    state: Any
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    turns: list[list] = field(default_factory=list)  # [start, end, "model" | "env"] in completion positions
    messages: list[dict] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    turn_rewards: list[float | None] = field(default_factory=list)
    turn_errors: list[int] = field(default_factory=list)  # per model turn: the tool calls of its reply that failed
    finish: str | None = None
    model_turns: int = 0
    turn_entropies: list[float] = field(default_factory=list)  # branching rollouts: per model turn (rollout.branching)
    forked_at: int = 0  # the model turn after which this episode was forked off another (0: from the prompt)

    def add(self, ids: list[int], logps: list[float] | None, who: str) -> None:
        self.turns.append([len(self.ids), len(self.ids) + len(ids), who])
        self.ids += ids
        self.mask += [1 if who == "model" else 0] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)

    def fork(self, env) -> "_Episode":
        """A copy that goes on on its own from here (the environment's state copied too)."""
        return replace(self, state=fork_state(env, self.state), ids=list(self.ids), mask=list(self.mask),
                       logps=list(self.logps), turns=[list(t) for t in self.turns], messages=[dict(m) for m in self.messages],
                       tool_calls=list(self.tool_calls), turn_rewards=list(self.turn_rewards),
                       turn_errors=list(self.turn_errors), turn_entropies=list(self.turn_entropies),
                       forked_at=self.model_turns)

    def completion(self) -> Completion:
        last = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        episode = {"turns": self.turns, "messages": self.messages, "tool_calls": self.tool_calls,
                   "turn_rewards": self.turn_rewards, "turn_errors": self.turn_errors, "model_turns": self.model_turns}
        if self.forked_at:
            episode["forked_at"] = self.forked_at
        return Completion(self.ids, self.logps, self.finish or "stop", last, loss_mask=self.mask, episode=episode)


def generate_rows(engine, rows: list[dict], spec: SamplingSpec) -> list[list[Completion]]:
    """The engine's completions for these prompt rows; an episode engine also gets the rows, from which each
    episode's environment state starts."""
    ids = [r["prompt_ids"] for r in rows]
    if getattr(engine, "episodic", False):
        return engine.generate(ids, spec, rows=rows)
    return engine.generate(ids, spec)


@dataclass(frozen=True)
class EpisodeSpec:
    """The run's multi-turn settings (``rollout.env``, ``rollout.max_turns``, ``rollout.max_episode_tokens``,
    ``rollout.branching`` and its ``rollout.branch_options``)."""

    env: str = ""
    max_turns: int = 4
    max_tokens: int = 0
    branching: str = ""
    branch_options: tuple = ()  # (key, value) pairs (the spec is hashable)

    @classmethod
    def of(cls, env: str, max_turns: int, max_tokens: int, branching: str = "", options: dict | None = None) -> "EpisodeSpec":
        """The spec of these settings as the CLI and the config give them (branching "none" = none, options a mapping)."""
        return cls(env, max_turns, max_tokens, "" if branching == "none" else branching, tuple(sorted((options or {}).items())))

    def check(self) -> None:
        """Fail before any model loads: an unknown or broken environment, a branching without one, bad options."""
        if self.branching and not self.env:
            from tokalign.errors import UserError

            raise UserError(f"rollout.branching {self.branching!r} forks episodes where the environment answered: "
                            "it needs an environment (--env NAME, rollout.env).")
        if self.branching:
            branching.check_options(self.branching, dict(self.branch_options))
        if self.env:
            self.environment()

    def describe(self) -> str:
        """One line for the dry run: the environment, the budgets, the branching with its options."""
        out = f"env {self.env}, at most {self.max_turns} model turns"
        if self.max_tokens:
            out += f", {self.max_tokens} tokens"
        if self.branching:
            opts = branching.check_options(self.branching, dict(self.branch_options))
            out += f"; branching {self.branching} (" + ", ".join(f"{k} {v}" for k, v in vars(opts).items()) + ")"
        return out

    def budget(self, spec: SamplingSpec) -> int:
        """Tokens an episode may hold after its prompt (what the engine's context must fit beyond the prompt)."""
        if not self.env:
            return spec.max_new_tokens
        return self.max_tokens or self.max_turns * spec.max_new_tokens

    def tools(self) -> list[dict] | None:
        """The environment's tool schemas, for rendering prompts (None without an environment)."""
        return self.environment().tools() if self.env else None

    def environment(self):
        """The environment, loaded once per spec: checking it, rendering prompts with its tools and running its
        episodes use one instance (a ``verifiers`` environment, say, may load its dataset when built)."""
        return self._environment

    @cached_property
    def _environment(self):
        from tokalign import environments

        return environments.load(self.env)

    def wrap(self, engine):
        """``engine`` running this spec's episodes (the engine itself when single-turn)."""
        if not self.env:
            return engine
        strategy = branching.make(self.branching, dict(self.branch_options), len(engine.tokenizer))
        return EpisodeEngine(engine, self.environment(), self.max_turns, self.max_tokens, strategy)


class EpisodeEngine:
    """``engine`` running episodes of ``env``. ``max_turns``: model turns per episode; ``max_tokens``: the episode's
    tokens after the prompt (model and environment), 0 for ``max_turns`` × the per-turn ``max_new_tokens``;
    ``branching``: a ``tokalign.rollout.branching`` strategy (None: independent episodes)."""

    episodic = True

    def __init__(self, engine, env, max_turns: int = 4, max_tokens: int = 0, branching=None):
        self.engine, self.env = engine, env
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.branching = branching
        self.tools = env.tools()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def sync(self, model):
        return self.engine.sync(model)

    def idle(self) -> None:
        idle = getattr(self.engine, "idle", None)
        if idle is not None:
            idle()

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, rows: list[dict] | None = None) -> list[list[Completion]]:
        """``rows``: the prompt rows (the environment's ``start`` reads them), one per prompt."""
        rows = rows if rows is not None else [{} for _ in prompts]
        budget = self.max_tokens or self.max_turns * spec.max_new_tokens
        strategy = self.branching
        if strategy is not None and strategy.entropy_tokens:
            spec = replace(spec, entropy_tokens=strategy.entropy_tokens)
        rng = random.Random(spec.seed * 1_000_003 + 17)  # the strategy's draws, reproducible per call
        groups = [branching.Group(spec.n, [], []) for _ in prompts]
        first = self.engine.generate(prompts, replace(spec, n=strategy.initial(spec.n)) if strategy else spec)
        for k, comps in enumerate(first):
            for c in comps:
                self._continue(groups[k], self._start(groups[k], prompts[k], rows[k]), c, budget)
        turn = 1
        while True:
            requests = []  # (prompt index, the episode continued or None for a fresh one from the prompt)
            for k, g in enumerate(groups):
                plan = strategy.expand(g, rng) if strategy else [(ep, 1) for ep in g.open]
                requests += [(k, ep) for ep, copies in plan for _ in range(copies)]
            if not requests:
                break
            contexts = [prompts[k] + (ep.ids if ep is not None else []) for k, ep in requests]
            out = self.engine.generate(contexts, replace(spec, n=1, seed=spec.seed + 7919 * turn))
            candidates: list[list] = [[] for _ in groups]  # per prompt: (episode or None, its sampled turn)
            for (k, ep), comps in zip(requests, out):
                candidates[k].append((ep, comps[0]))
            for k, g in enumerate(groups):
                kept = [candidates[k][i] for i in (strategy.keep(g, candidates[k], rng) if strategy else range(len(candidates[k])))]
                copies: dict[int, int] = {}
                for ep, _ in kept:
                    if ep is not None:
                        copies[id(ep)] = copies.get(id(ep), 0) + 1
                dropped = {id(ep) for ep, _ in candidates[k] if ep is not None} - set(copies)
                g.episodes = [e for e in g.episodes if id(e) not in dropped]  # pruned: none of its continuations kept
                g.open = []
                for ep, c in kept:
                    if ep is None:
                        ep = self._start(g, prompts[k], rows[k])
                    elif copies[id(ep)] > 1:  # several continuations: each a copy of the history; the last one reuses it
                        copies[id(ep)] -= 1
                        ep = ep.fork(self.env)
                        g.episodes.append(ep)
                    self._continue(g, ep, c, budget)
            turn += 1
        return [[ep.completion() for ep in g.episodes] for g in groups]

    def _start(self, g: "branching.Group", prompt: list[int], row: dict) -> _Episode:
        """A new episode of the group, from its prompt."""
        ep = _Episode(list(prompt), self.env.start(row))
        g.episodes.append(ep)
        return ep

    def _continue(self, g: "branching.Group", ep: _Episode, c: Completion, budget: int) -> None:
        """Append the sampled turn ``c`` to ``ep``; it stays open in its group if the episode goes on."""
        if self.branching is not None:
            ep.turn_entropies.append(self.branching.turn_entropy(c.entropy))
        if self._model_turn(ep, c, budget):
            g.open.append(ep)

    def _model_turn(self, ep: _Episode, c: Completion, budget: int) -> bool:
        """Append the model's turn and the environment's reply; True if the episode goes on."""
        ids, logps, finish = c.ids, c.logps, c.finish_reason
        room = budget - len(ep.ids)
        if len(ids) > room:
            ids, logps, finish = ids[:room], logps[:room], "length"
        text = c.text if len(ids) == len(c.ids) else self.tokenizer.decode(ids, skip_special_tokens=True)
        ep.add(ids, logps, "model")
        ep.model_turns += 1
        ep.messages.append({"role": "assistant", "content": text})
        if finish == "length":
            ep.finish = "length"
            return False
        reply = self.env.step(ep.state, text)
        ep.turn_rewards.append(reply.reward)
        ep.turn_errors.append(int(reply.info.get("tool_errors", 0)))
        ep.tool_calls += reply.info.get("tool_calls", [])
        if reply.done or ep.model_turns >= self.max_turns:
            ep.finish = "stop"
            return False
        ended = self.tokenizer.decode(ids[-1:]) if ids else ""
        env_ids = reply_ids(self.tokenizer, reply.messages, self.tools, ended)
        ep.messages += reply.messages
        if len(ep.ids) + len(env_ids) >= budget:  # no room left for the model to answer the reply
            ep.finish = "length"
            return False
        ep.add(env_ids, None, "env")
        return True
