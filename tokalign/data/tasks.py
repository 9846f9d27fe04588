"""Built-in tasks over public datasets: ``gsm8k``, ``math`` and ``ultrafeedback``.

Where the data comes from (the same string works for ``tokalign prepare SOURCE``, ``train --data``
and ``eval --data``):

* ``gsm8k`` — the hub copy (``openai/gsm8k``, config ``main``), split ``train`` or ``test``;
* ``gsm8k:PATH`` — a local copy: a data file (.jsonl/.json/.parquet/.csv; it *is* the data, whatever
  ``--split`` says) or a folder holding ``<split>*.<ext>`` files, directly or in ``data/`` (a clone
  of the hub repository's folder, e.g. ``gsm8k:gsm8k/main``), or ``<split>/`` folders of one-record
  JSON files (the original MATH release: ``math:MATH``);
* ``gsm8k:ORG/NAME`` — another hub copy with the same columns (``math:DigitalLearningGmbH/MATH-lighteval``).

Records come out in TRL's conversational formats, so SFT, RL and eval read the same rows:

* ``gsm8k``: {question, answer "… #### 72"} -> prompt (the question and an instruction to end with
  "#### <answer>"), completion (the worked answer, calculator annotations ``<<48/2=24>>`` removed),
  reference "72" (thousands separators removed). Default reward: ``math``.
* ``math``: {problem, solution with \\boxed{…}} (+ ``answer`` in MATH-500) -> prompt (the problem and
  "put your final answer within \\boxed{}"), completion (the solution), reference (``answer`` when
  given, else the last \\boxed{} of the solution; a record with neither is skipped with a warning).
  Hub: ``hendrycks/competition_math`` (train), ``HuggingFaceH4/MATH-500`` (test). Default reward: ``math``.
* ``ultrafeedback``: UltraFeedback-binarized rows {prompt, chosen, rejected (message lists),
  prompt_id, score_chosen, score_rejected} -> preference rows (prompt messages, chosen and rejected
  assistant turns). Hub: ``HuggingFaceH4/ultrafeedback_binarized`` (train_prefs / test_prefs).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from tokalign.errors import UserError

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


class HubTask:
    """A task over a public dataset, or a local copy of it (see the module docstring)."""

    name = ""
    splits = ("train", "test")
    default_reward: str | None = None
    hub: ClassVar[dict[str, tuple[str, str | None, str]]] = {}  # our split -> (hub id, config name, hub split)

    def __init__(self, source: str = ""):
        self.source = source

    def records(self, split: str = "train") -> list[dict]:
        out, skipped = [], 0
        for i, rec in enumerate(self.raw(split)):
            row = self.convert(rec, i, split)
            if row is None:
                skipped += 1
            else:
                out.append(row)
        if skipped:
            print(f"{self.name}: skipped {skipped} record(s) without a usable answer", file=sys.stderr)
        if not out:
            raise UserError(f"{self.name}: no usable records in {self.source or self.hub[split][0]} (split '{split}').")
        return out

    def convert(self, rec: dict, i: int, split: str) -> dict | None:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.name}:{self.source} record {i + 1}" if self.source else f"{self.name} record {i + 1}"

    # ------------------------------------------------------------------------------------- loading

    def raw(self, split: str) -> list[dict]:
        from tokalign.data import loaders

        hub_id, config, hub_split = self.hub[split]
        if not self.source:
            return loaders.load_hub(hub_id, hub_split, config=config, hint=self.offline_hint())
        path = Path(self.source).expanduser()
        if path.is_file():
            return loaders.load_file(path)
        if path.is_dir():
            return self._from_dir(path, split, hub_split)
        if path.suffix.lower() in loaders.SUFFIXES or self.source.startswith((".", "/", "~")):
            raise UserError(f"{self.name}: data file '{self.source}' does not exist.")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", self.source):
            return loaders.load_hub(self.source, hub_split, hint=self.offline_hint())
        raise UserError(f"'{self.name}:{self.source}': after the colon give a data file, a folder or a hub id (org/name).")

    def offline_hint(self) -> str:
        return (f"Offline? Download it elsewhere and pass the local copy: {self.name}:PATH "
                "(a .jsonl/.json/.parquet/.csv file, or a folder of <split>*.parquet files).")

    def _from_dir(self, path: Path, split: str, hub_split: str) -> list[dict]:
        from tokalign.data import loaders

        names = dict.fromkeys((split, hub_split))
        for folder in (path, path / "data"):
            for name in names:
                files = sorted(f for f in folder.glob(f"{name}*") if f.is_file() and f.suffix.lower() in loaders.SUFFIXES
                               and re.fullmatch(rf"{re.escape(name)}([-_.].*)?", f.name))
                if files:
                    return [r for f in files for r in loaders.load_file(f)]
            for name in names:
                if (folder / name).is_dir():  # one JSON object per file (the original MATH release)
                    return [self._one_json(f) for f in sorted((folder / name).rglob("*.json"))]
        raise UserError(f"{self.name}: no '{split}' data in folder '{path}': expected {split}*.jsonl/.json/.parquet/.csv "
                        f"(or {hub_split}*), directly or in data/, or a {split}/ folder of JSON files.")

    @staticmethod
    def _one_json(f: Path) -> dict:
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: invalid JSON ({e}).") from e
        if not isinstance(rec, dict):
            raise UserError(f"{f}: expected one JSON object per file, got {type(rec).__name__}.")
        return rec


class GSM8K(HubTask):
    name = "gsm8k"
    default_reward = "math"
    hub = {"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")}

    def convert(self, rec: dict, i: int, split: str) -> dict:
        question, answer = rec.get("question"), rec.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
            raise UserError(f"{self.where(i)}: expected 'question' and an 'answer' ending in '#### N' (GSM8K), got columns {sorted(rec)}.")
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        worked = re.sub(r"<<[^<>]*>>", "", answer)
        return {
            "id": str(rec.get("id", f"gsm8k-{split}-{i}")),
            "prompt": [{"role": "user", "content": f"{question.strip()}\n{GSM8K_INSTRUCTION}"}],
            "completion": [{"role": "assistant", "content": worked}],
            "reference": final,
        }


class MATH(HubTask):
    name = "math"
    default_reward = "math"
    hub = {"train": ("hendrycks/competition_math", None, "train"), "test": ("HuggingFaceH4/MATH-500", None, "test")}

    def convert(self, rec: dict, i: int, split: str) -> dict | None:
        from tokalign.verifiers.math import last_boxed

        problem, solution = rec.get("problem"), rec.get("solution")
        if not isinstance(problem, str) or not isinstance(solution, str):
            raise UserError(f"{self.where(i)}: expected 'problem' and 'solution' (MATH), got columns {sorted(rec)}.")
        answer = rec.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            answer = last_boxed(solution)
            if not isinstance(answer, str) or not answer.strip():
                return None
        return {
            "id": str(rec.get("unique_id") or rec.get("id") or f"math-{split}-{i}"),
            "prompt": [{"role": "user", "content": f"{problem.strip()}\n{MATH_INSTRUCTION}"}],
            "completion": [{"role": "assistant", "content": solution}],
            "reference": answer.strip(),
        }


class UltraFeedback(HubTask):
    name = "ultrafeedback"
    hub = {"train": ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
           "test": ("HuggingFaceH4/ultrafeedback_binarized", None, "test_prefs")}

    def convert(self, rec: dict, i: int, split: str) -> dict:
        chosen, rejected, prompt = rec.get("chosen"), rec.get("rejected"), rec.get("prompt")
        where = self.where(i)
        if _is_messages(chosen) and _is_messages(rejected):
            n = 0  # the shared leading turns are the prompt
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            head, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
                raise UserError(f"{where}: 'chosen' and 'rejected' must end with assistant turns after the same prompt turns.")
        elif isinstance(chosen, str) and isinstance(rejected, str):
            head = []
        else:
            raise UserError(f"{where}: expected 'chosen' and 'rejected' as message lists (UltraFeedback-binarized) or texts, "
                            f"got columns {sorted(rec)}.")
        if not head:
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{where}: no prompt: neither a 'prompt' text nor shared user turns in chosen/rejected.")
            head = [{"role": "user", "content": prompt}]
        row = {"id": str(rec.get("prompt_id") or rec.get("id") or f"ultrafeedback-{split}-{i}"),
               "prompt": head, "chosen": chosen, "rejected": rejected}
        for key in ("score_chosen", "score_rejected"):
            if key in rec:
                row[key] = rec[key]
        return row
