"""Task ``reasoning_gym:NAME``: a procedural task of reasoning-gym (``pip install reasoning-gym``).

reasoning-gym generates verifiable reasoning problems offline (``leg_counting``, ``basic_arithmetic``,
``letter_counting``, ``sudoku``, …; ``tokalign prepare reasoning_gym:nope`` lists them all) and scores
answers with a scorer per task. ``reasoning_gym:NAME`` works wherever data is named:
``tokalign prepare``, ``train --data``, ``eval --data``.

Splits, from ``reasoning_gym.create_dataset(NAME, seed=..., size=...)``:

* ``train``: seed ``TRAIN_SEED`` (1), ``TRAIN_SIZE`` (1,000) records, less any whose question is also
  in the (default-size) test split;
* ``test``: seed ``TEST_SEED`` (1,000,000), ``TEST_SIZE`` (200) records.

reasoning-gym seeds record ``i`` from ``seed + i``, so the seeds are far enough apart that the splits
never share a generator seed. Options go after a ``?``, ``&``-separated:
``reasoning_gym:leg_counting?size=5000&max_animals=4``: ``size`` (records in the split read) and
the task's own config fields (values typed like ``--set``). A few tasks (``isomorphic_strings``,
``ransom_note``, ``polynomial_multiplication`` in 0.1.25) generate differently from one Python
process to the next (string hashing); their records are fixed only once written to an artifact.

Records (TRL's conversational prompt-completion format): prompt = the question plus
``INSTRUCTION`` (answer between ``<answer>`` tags, reasoning-gym's convention); completion = the
gold answer in those tags (for SFT; absent for tasks without a single gold answer); reference =
``{"task", "config", "index", "question", "answer", "metadata"}`` (JSON), what the default reward,
the verifier ``reasoning_gym`` (``tokalign.verifiers.reasoning_gym``), needs to call the task's scorer.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from tokalign.errors import UserError, did_you_mean
from tokalign.verifiers import reasoning_gym as rgv

TRAIN_SEED, TRAIN_SIZE = 1, 1000
TEST_SEED, TEST_SIZE = 1_000_000, 200
INSTRUCTION = "Give your final answer between <answer> and </answer> tags."


class ReasoningGym:
    """``reasoning_gym:NAME[?size=N&option=value…]`` (see the module docstring)."""

    splits = ("train", "test")
    default_reward = "reasoning_gym"

    def __init__(self, source: str = ""):
        name, _, query = source.partition("?")
        known = rgv.names()
        if not name:
            raise UserError(f"reasoning_gym needs a task name: reasoning_gym:NAME, e.g. reasoning_gym:leg_counting. "
                            f"Tasks: {', '.join(known)}.")
        if name not in known:
            raise UserError(f"Unknown reasoning-gym task '{name}'.{did_you_mean(name, known)} Tasks: {', '.join(known)}.")
        self.name = name
        self.size: int | None = None  # set by a size= option
        self.options = self._options(query)

    def _options(self, query: str) -> dict:
        from reasoning_gym.factory import DATASETS

        from tokalign.config import parse_scalar

        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
        except ValueError:
            raise UserError(f"reasoning_gym:{self.name}: options after '?' are key=value pairs joined by '&', got '{query}'.") from None
        valid = sorted(set(DATASETS[self.name][1].__dataclass_fields__) - {"seed", "size"})
        options = {}
        for key, raw in pairs:
            value = parse_scalar(raw)
            if key == "size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise UserError(f"reasoning_gym:{self.name}: size must be a whole number ≥ 1, got '{raw}'.")
                self.size = value
            elif key in valid:
                options[key] = value
            else:
                raise UserError(f"reasoning_gym:{self.name} has no option '{key}'.{did_you_mean(key, ['size', *valid])} "
                                f"Options: size, {', '.join(valid)} (seeds are fixed per split).")
        return options

    def config(self, split: str, size: int | None = None) -> dict:
        """The ``create_dataset`` keyword arguments of a split."""
        seed, default = (TEST_SEED, TEST_SIZE) if split == "test" else (TRAIN_SEED, TRAIN_SIZE)
        return {**self.options, "seed": seed, "size": size or self.size or default}

    def entries(self, split: str, size: int | None = None) -> tuple[dict, list[dict]]:
        """(config, reasoning-gym entries made JSON-safe) of a split."""
        cfg = self.config(split, size)
        ds = rgv.dataset(self.name, cfg)
        return cfg, [json.loads(json.dumps(ds[i], default=str)) for i in range(cfg["size"])]

    def records(self, split: str = "train") -> list[dict]:
        cfg, entries = self.entries(split)
        held_out = {e["question"] for e in self.entries("test", TEST_SIZE)[1]} if split == "train" else set()
        out = []
        for i, e in enumerate(entries):
            if e["question"] in held_out:
                continue
            ref = {"task": self.name, "config": cfg, "index": i, "question": e["question"], "answer": e.get("answer"),
                   "metadata": e.get("metadata", {})}
            row = {"id": f"rg-{self.name}-{split}-{i}",
                   "prompt": [{"role": "user", "content": f"{e['question'].rstrip()}\n\n{INSTRUCTION}"}],
                   "reference": ref}
            if isinstance(e.get("answer"), str):
                row["completion"] = [{"role": "assistant", "content": f"<answer>{e['answer']}</answer>"}]
            out.append(row)
        return out
