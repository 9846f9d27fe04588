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

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from tokalign.environments.turns import reply_ids
from tokalign.rollout import Completion, SamplingSpec


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

    def add(self, ids: list[int], logps: list[float] | None, who: str) -> None:
        self.turns.append([len(self.ids), len(self.ids) + len(ids), who])
        self.ids += ids
        self.mask += [1 if who == "model" else 0] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)

    def completion(self) -> Completion:
        last = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        return Completion(self.ids, self.logps, self.finish or "stop", last, loss_mask=self.mask,
                          episode={"turns": self.turns, "messages": self.messages, "tool_calls": self.tool_calls,
                                   "turn_rewards": self.turn_rewards, "turn_errors": self.turn_errors,
                                   "model_turns": self.model_turns})


def generate_rows(engine, rows: list[dict], spec: SamplingSpec) -> list[list[Completion]]:
    """The engine's completions for these prompt rows; an episode engine also gets the rows, from which each
    episode's environment state starts."""
    ids = [r["prompt_ids"] for r in rows]
    if getattr(engine, "episodic", False):
        return engine.generate(ids, spec, rows=rows)
    return engine.generate(ids, spec)


@dataclass(frozen=True)
class EpisodeSpec:
    """The run's multi-turn settings (``rollout.env``, ``rollout.max_turns``, ``rollout.max_episode_tokens``)."""

    env: str = ""
    max_turns: int = 4
    max_tokens: int = 0

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
        return EpisodeEngine(engine, self.environment(), self.max_turns, self.max_tokens) if self.env else engine


class EpisodeEngine:
    """``engine`` running episodes of ``env``. ``max_turns``: model turns per episode; ``max_tokens``: the episode's
    tokens after the prompt (model and environment), 0 for ``max_turns`` × the per-turn ``max_new_tokens``."""

    episodic = True

    def __init__(self, engine, env, max_turns: int = 4, max_tokens: int = 0):
        self.engine, self.env = engine, env
        self.max_turns, self.max_tokens = max_turns, max_tokens
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
        first = self.engine.generate(prompts, spec)
        episodes = [[_Episode(list(p), self.env.start(row)) for _ in comps] for p, row, comps in zip(prompts, rows, first)]
        active = []
        for eps, comps in zip(episodes, first):
            for ep, c in zip(eps, comps):
                if self._model_turn(ep, c, budget):
                    active.append(ep)
        turn = 1
        while active:
            contexts = [ep.prompt + ep.ids for ep in active]
            spec_t = replace(spec, n=1, seed=spec.seed + 7919 * turn)
            out = self.engine.generate(contexts, spec_t)
            active = [ep for ep, comps in zip(active, out) if self._model_turn(ep, comps[0], budget)]
            turn += 1
        return [[ep.completion() for ep in eps] for eps in episodes]

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
