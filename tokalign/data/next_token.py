"""Task ``next_token:PATH``: next-word prediction prompts from a raw text file, for reinforcement mid-training (RMT,
"Reinforcement Mid-Training", Tian et al. 2025, arXiv:2509.24375; RPT, arXiv:2506.08007): the policy reads a context
from the corpus, reasons, and predicts what comes next; the reward ``next_token`` checks the prediction.

The file (UTF-8 text) is split into words (whitespace); record k takes the ``context`` words starting at word
k·``stride`` as the context and the ``target`` words after them as the reference:

    prompt    = INSTRUCTION + "\\n\\n" + context words (joined by single spaces)
    reference = the next ``target`` word(s);   completion = "<answer>reference</answer>" (for SFT)

Options go after a ``?``, ``&``-separated: ``next_token:corpus.txt?context=64&stride=32&target=1&test=0.05`` —
``context`` (default 64 words), ``stride`` (default: = context, non-overlapping windows), ``target`` (default 1 word),
``test`` (the share of records, from the end of the file, that form the ``test`` split; default 0.05, at least one
record when there are two or more). Words, not tokens: a task has no tokenizer; the RL target "the next token(s)" of
the paper is read as the next word(s), which is tokenizer-independent and verifiable by string equality.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from tokalign.errors import UserError

INSTRUCTION = ("Here is the beginning of a text. Think briefly about how it continues, then give the next word "
               "between <answer> and </answer> tags.")
OPTIONS = {"context": 64, "stride": 0, "target": 1, "test": 0.05}


class NextToken:
    default_reward = "next_token"
    splits = ("train", "test")

    def __init__(self, source: str = ""):
        path, _, query = source.partition("?")
        if not path:
            raise UserError("next_token needs a text file: next_token:PATH (e.g. next_token:corpus.txt?context=64).")
        self.path = Path(path).expanduser()
        self.options = dict(OPTIONS)
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in OPTIONS:
                raise UserError(f"next_token: unknown option {key!r}. Available: {', '.join(OPTIONS)}.")
            try:
                self.options[key] = type(OPTIONS[key])(value)
            except ValueError as e:
                raise UserError(f"next_token: option {key}={value!r} is not a {type(OPTIONS[key]).__name__}.") from e
        o = self.options
        if o["context"] < 1 or o["target"] < 1 or o["stride"] < 0 or not 0 <= o["test"] < 1:
            raise UserError("next_token: context and target must be ≥ 1, stride ≥ 0 (0 = context), 0 ≤ test < 1.")

    def records(self, split: str = "train") -> list[dict]:
        if not self.path.is_file():
            raise UserError(f"next_token: text file '{self.path}' does not exist.")
        words = self.path.read_text(encoding="utf-8").split()
        o = self.options
        n, t, stride = o["context"], o["target"], o["stride"] or o["context"]
        rows = []
        for k, start in enumerate(range(0, len(words) - n - t + 1, stride)):
            context, gold = " ".join(words[start:start + n]), " ".join(words[start + n:start + n + t])
            rows.append({"id": f"next_token-{k}", "prompt": [{"role": "user", "content": f"{INSTRUCTION}\n\n{context}"}],
                         "completion": [{"role": "assistant", "content": f"<answer>{gold}</answer>"}], "reference": gold})
        if not rows:
            raise UserError(f"next_token: '{self.path}' has {len(words)} words, fewer than context + target = {n + t}.")
        n_test = min(len(rows) - 1, max(1, round(o["test"] * len(rows)))) if o["test"] > 0 and len(rows) > 1 else 0
        return rows[len(rows) - n_test:] if split == "test" else rows[:len(rows) - n_test]
