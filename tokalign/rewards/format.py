"""Reward ``format``: 1.0 when the completion has the expected structure, else 0.0 — the format
rewards of DeepSeek-R1 ("DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via Reinforcement
Learning", arXiv:2501.12948: reasoning inside ``<think>…</think>``), ARES ("ARES: Multimodal Adaptive
Reasoning via Difficulty-Aware Token-Level Entropy Shaping": ``<think>…</think>`` then ``\\boxed{}``)
and GTPO ("GTPO: Trajectory-Based Policy Optimization in Large Language Models":
``<reasoning>…</reasoning><answer>…</answer>`` tags).

Options (``--reward-opt format.KEY=VALUE``):

* ``preset`` — ``think`` (default: one ``<think>…</think>`` block, then a non-empty answer),
  ``think_boxed`` (the answer holds a ``\\boxed{…}``), ``think_answer`` (``<think>…</think>`` then
  ``<answer>…</answer>``), ``reasoning_answer`` (GTPO's ``<reasoning>…</reasoning>`` then
  ``<answer>…</answer>``);
* ``pattern`` — your own regular expression (Python ``re``, DOTALL); it replaces the preset;
* ``search`` — false (default): the pattern must match the whole completion (surrounding
  whitespace ignored); true: matching anywhere is enough.

Combine it with a correctness reward: ``--reward math --reward format*0.1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokalign.protocols import Reward, Sample


def _free(tag: str) -> str:
    """Any text that holds no <tag> or </tag> (a tempered token: linear time, no backtracking blow-up)."""
    return rf"(?:(?!</?{tag}>).)*"


def _block(tag: str) -> str:
    """<tag>…</tag> with no nested <tag>, its content not blank."""
    return rf"<{tag}>\s*(?!</?{tag}>)\S{_free(tag)}</{tag}>"


# each preset must match the whole stripped completion (unless search=true)
PRESETS = {
    "think": rf"<think>{_free('think')}</think>\s*(?=\S){_free('think')}",
    "think_boxed": rf"<think>{_free('think')}</think>(?={_free('think')}?\\boxed\{{){_free('think')}",
    "think_answer": rf"<think>{_free('think')}</think>\s*{_block('answer')}",
    "reasoning_answer": rf"<reasoning>{_free('reasoning')}</reasoning>\s*{_block('answer')}",
}


@dataclass
class FormatConfig:
    preset: str = "think"
    pattern: str = ""  # a regular expression; overrides preset when given
    search: bool = False  # True: re.search anywhere; False: the whole (stripped) completion must match

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.pattern, str):
            raise ValueError(f"pattern must be a string (a regular expression), got {self.pattern!r}")
        if self.pattern:
            try:
                re.compile(self.pattern, re.S)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if not isinstance(self.search, bool):
            raise ValueError(f"search must be true or false, got {self.search!r}")


class Format:
    Config = FormatConfig

    def __init__(self, config: FormatConfig | None = None):
        self.config = config or FormatConfig()
        self.regex = re.compile(self.config.pattern or PRESETS[self.config.preset], re.S)

    def matches(self, completion: str) -> bool:
        text = completion.strip()
        m = self.regex.search(text) if self.config.search else self.regex.fullmatch(text)
        return m is not None

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        out = []
        for s in samples:
            ok = self.matches(s.completion or "")
            out.append(Reward(1.0 if ok else 0.0, info={"passed": ok}))
        return out
