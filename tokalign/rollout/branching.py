"""Branching rollouts: a prompt's ``n`` episodes grown as a tree that forks where the environment answered, instead of
``n`` independent episodes (``rollout.branching``; multi-turn only, with ``rollout.env``).

Forked episodes share their history token for token (the fork copies the ids and the environment's state, then each
copy samples its next turn on its own), so the algorithms find the tree again from the stored ids alone (shared
prefixes, ``tokalign.algorithms.steps``) and rollouts artifacts keep their schema. Each episode records the model
turn at which it was forked off (``episode["forked_at"]``; 0 = sampled from the prompt).

A strategy answers two questions each round, per prompt group: which open episodes continue and in how many copies
(``expand``), and which of the sampled continuations are kept (``keep``). ``EpisodeEngine`` does the rest.

* ``entropy`` — ARPO's entropy-based adaptive rollout ("Agentic Reinforced Policy Optimization", Dong et al. 2025,
  arXiv:2507.19849; official code RUC-NLPIR/ARPO, ``vllm_rollout_with_tools.py``). ``initial`` episodes are sampled
  from the prompt; after each environment reply an open episode forks into up to ``beam`` − 1 extra copies, each with
  probability P(clip(U − β·ΔH, 0, 1) ≤ τ), U ~ Uniform(0, 1), while the group has fewer than ``n`` episodes; a group
  whose episodes all ended and that has fewer than ``n`` gets one fresh episode from the prompt per round. ΔH = H(last
  turn) − H(first turn) of the episode, where a turn's H is the sum over its first ``entropy_tokens`` tokens of the
  sampled distribution's top-10 entropy, divided by log |V| (the official code's measure). Defaults are the official
  scripts' (n 16, initial 8, beam 2, τ 0.5, β 0.2, 20 tokens) with ``initial`` = n / 2. Two readings of ours: the
  official code measures a forked copy's H(first turn) on its first turn after the fork; here a fork inherits its
  episode's; and the code compares the drawn number with τ after the clip, as here.
* ``tree`` — PORTool's tree rollout ("PORTool: Tool-Use LLM Training with Rewarded Tree", Wu et al. 2025,
  arXiv:2510.26020; no official code found): ``n`` episodes on the first turn; each round every open episode samples
  ``forks`` candidate next turns and ``n`` − (ended episodes) of all candidates are kept, uniformly at random, so the
  group ends with ``n`` episodes that share prefixes. The paper's selection rule could not be read here; uniform
  selection is ours.

No branching (``entropy`` with ``initial`` = n, or ``tree`` with ``forks`` = 1) samples exactly what plain episodes do.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class EntropyConfig:
    initial: int = 0  # episodes first sampled from the prompt; 0 = n / 2 (the official 8 of 16)
    beam: int = 2  # an open episode forks into at most beam − 1 extra copies per round
    threshold: float = 0.5  # τ ("branch_probability" in the official scripts)
    entropy_weight: float = 0.2  # β
    entropy_tokens: int = 20  # k: the tokens of a turn whose entropy is measured

    def __post_init__(self):
        if self.initial < 0 or self.beam < 1 or self.entropy_tokens < 1:
            raise ValueError("initial must be >= 0, beam and entropy_tokens >= 1")


@dataclass
class TreeConfig:
    forks: int = 2  # f: candidate next turns sampled per open episode each round

    def __post_init__(self):
        if self.forks < 1:
            raise ValueError("forks must be >= 1")


@dataclass
class Group:
    """One prompt's episodes during a branching rollout (``EpisodeEngine`` fills it)."""

    n: int
    episodes: list  # every episode kept, in creation order
    open: list  # those still running

    @property
    def ended(self) -> int:
        return len(self.episodes) - len(self.open)


class Entropy:
    name = "entropy"
    Config: ClassVar[type] = EntropyConfig

    def __init__(self, config: EntropyConfig, vocab_size: int):
        self.config, self.norm = config, math.log(max(vocab_size, 2))
        self.entropy_tokens = config.entropy_tokens

    def initial(self, n: int) -> int:
        return min(n, self.config.initial or max(1, n // 2))

    def turn_entropy(self, entropy: list[float] | None) -> float:
        return sum(entropy or []) / self.norm

    def expand(self, group: Group, rng: random.Random) -> list[tuple[Any, int]]:
        c = self.config
        out: list[tuple[Any, int]] = []
        room = group.n - len(group.episodes)
        for ep in group.open:
            copies = 1
            delta = ep.turn_entropies[-1] - ep.turn_entropies[0]
            for _ in range(c.beam - 1):
                if room <= 0:
                    break
                if min(1.0, max(0.0, rng.random() - c.entropy_weight * delta)) <= c.threshold:
                    copies += 1
                    room -= 1
            out.append((ep, copies))
        if not group.open and room > 0:
            out.append((None, 1))  # every episode ended: one more from the prompt
        return out

    def keep(self, group: Group, candidates: list, rng: random.Random) -> list[int]:
        return list(range(len(candidates)))


class Tree:
    name = "tree"
    Config: ClassVar[type] = TreeConfig
    entropy_tokens = 0

    def __init__(self, config: TreeConfig, vocab_size: int):
        self.config = config

    def initial(self, n: int) -> int:
        return n

    def turn_entropy(self, entropy: list[float] | None) -> float:
        return 0.0

    def expand(self, group: Group, rng: random.Random) -> list[tuple[Any, int]]:
        return [(ep, self.config.forks) for ep in group.open]

    def keep(self, group: Group, candidates: list, rng: random.Random) -> list[int]:
        want = group.n - group.ended
        if len(candidates) <= want:
            return list(range(len(candidates)))
        return sorted(rng.sample(range(len(candidates)), want))


STRATEGIES = {"entropy": Entropy, "tree": Tree}


def check_options(name: str, options: dict) -> Any:
    """The strategy's Config built from ``rollout.branch_options`` (unknown keys and bad values are UserErrors)."""
    from tokalign import config
    from tokalign.errors import unknown

    if name not in STRATEGIES:
        raise unknown("rollout branching", name, tuple(STRATEGIES))
    return config.build(STRATEGIES[name].Config, dict(options or {}), "rollout.branch_options.")


def make(name: str, options: dict, vocab_size: int):
    """The strategy ``name`` with its options; None for "" (independent episodes)."""
    if not name:
        return None
    return STRATEGIES[name](check_options(name, options), vocab_size)
