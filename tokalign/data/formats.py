"""Normalise TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats), standard or conversational,
into tokalign rows, one record at a time (so a large file can be read in chunks):

  =====================  ===========================================  ==================================
  TRL type               columns                                      tokalign row
  =====================  ===========================================  ==================================
  language modelling     ``text`` / ``messages``                      prompt "" + completion / the turns
  prompt-only            ``prompt``                                   prompt
  prompt-completion      ``prompt``, ``completion``                   prompt + completion
  preference             (``prompt``), ``chosen``, ``rejected``       prompt + chosen + rejected
  unpaired preference    ``prompt``, ``completion``, ``label``        prompt + completion + label
  stepwise supervision   ``prompt``, ``completions``, ``labels``      prompt + steps + step_labels
  =====================  ===========================================  ==================================

A normalised row: ``id``, ``prompt`` (str or list of messages), ``reference`` (any JSON), and, when present,
``completion`` / ``chosen`` / ``rejected`` as completion *text* (the assistant content; the model's EOS is appended
at tokenisation), ``completion_messages`` (a multi-turn completion, trained on its assistant turns), ``label``,
``steps`` / ``step_labels``. The format is told from the first record's columns (``detect``); every record is then
read as that format (``normalise_record``), as TRL reads a dataset of one type.
"""

from __future__ import annotations

from typing import Any

from tokalign.errors import UserError

REFERENCE_KEYS = ("reference", "answer", "solution", "ground_truth", "label")
# normalised formats -> what prepare writes (an artifact kind)
ARTIFACT_KIND = {"preference": "pairs", "unpaired": "prompts", "prompts": "prompts", "stepwise": "prompts"}


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def completion_text(x: Any, where: str) -> str:
    """Assistant text of a completion given as a string or as assistant message(s)."""
    if isinstance(x, str):
        return x
    if _is_messages(x):
        return "".join(str(m["content"]) for m in x if m["role"] == "assistant") or "".join(str(m["content"]) for m in x)
    raise UserError(f"{where}: expected text or a list of {{role, content}} messages, got {type(x).__name__}.")


def _margins(value: Any, key: str, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where}: '{key}' must be a number or a list of numbers (one per other objective), got {value!r}.")
    return [float(v) for v in values]


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's implicit-prompt preference format (``trl.extract_prompt``): the longest common prefix of chosen and
    rejected is the prompt — whole messages for conversations, characters for text, where a space just before the
    first difference stays with the completions ("The sky is" + " blue." / " green.")."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == min(len(chosen), len(rejected)):  # one is a prefix of the other: the shorter one keeps its last piece
        n = max(n - 1, 0)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def detect(record: dict, source: str) -> str:
    """The normalised format of a dataset whose first record is ``record``: 'preference', 'unpaired' (prompt,
    completion, boolean label), 'stepwise' (prompt, completions, labels) or 'prompts' (language modelling,
    prompt-only or prompt-completion)."""
    if not isinstance(record, dict):
        raise UserError(f"{source} record 1: expected an object with named columns, got {type(record).__name__}.")
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completions", "labels"} <= keys:
        return "stepwise"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if "prompt" in keys or "messages" in keys or "text" in keys:
        return "prompts"
    raise UserError(
        f"{source} record 1: cannot tell the format from columns {sorted(keys)}; expected one of TRL's: 'text' or "
        "'messages' (language modelling), 'prompt' (+ 'completion'), 'chosen'/'rejected' (+ 'prompt'), "
        "'prompt'/'completion'/'label' (unpaired) or 'prompt'/'completions'/'labels' (stepwise)."
    )


def normalise(records: list[dict], source: str, start: int = 0) -> tuple[str, list[dict]]:
    """(format, rows) of a whole dataset (``detect`` on its first record). ``start``: the index of ``records[0]`` in
    the dataset (ids of records without one, and error messages, count from it)."""
    if not records:
        raise UserError(f"{source}: no records.")
    fmt = detect(records[0], source)
    return fmt, [normalise_record(rec, start + i, fmt, source) for i, rec in enumerate(records)]


def normalise_record(rec: dict, index: int, fmt: str, source: str) -> dict:
    """One record (the dataset's ``index``-th, from 0) read as format ``fmt``."""
    where = f"{source} record {index + 1}"
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with named columns, got {type(rec).__name__}.")
    row: dict[str, Any] = {"id": str(rec.get("id", rec.get("idx", index)))}
    row["reference"] = next((rec[k] for k in REFERENCE_KEYS if k in rec and not (fmt == "unpaired" and k == "label")), None)
    if fmt == "preference":
        _preference(rec, row, where)
    elif fmt == "stepwise":
        _stepwise(rec, row, where)
    elif "prompt" in rec:
        row["prompt"] = _prompt(rec["prompt"], where)
        if "completion" in rec and rec["completion"] is not None:
            _completion(rec["completion"], row, where)
        if fmt == "unpaired":
            if not isinstance(rec.get("label"), bool):
                raise UserError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {rec.get('label')!r}.")
            row["label"] = rec["label"]
    elif "messages" in rec:
        _messages(rec["messages"], row, where)
    elif "text" in rec:  # standard language modelling: the whole text is trained on, after no prompt
        if not isinstance(rec["text"], str):
            raise UserError(f"{where}: 'text' must be a string, got {type(rec['text']).__name__}.")
        row.update(prompt="", completion=rec["text"])
    else:
        raise UserError(f"{where}: has none of the columns of the dataset's format ({fmt}): 'prompt', 'messages' or 'text'.")
    return row


def _preference(rec: dict, row: dict, where: str) -> None:
    if "chosen" not in rec or "rejected" not in rec:
        raise UserError(f"{where}: preference data needs both 'chosen' and 'rejected'.")
    prompt, chosen, rejected = rec.get("prompt"), rec["chosen"], rec["rejected"]
    if prompt is None:
        pair = (chosen, rejected)
        if not (all(isinstance(x, str) for x in pair) or all(_is_messages(x) for x in pair)):
            raise UserError(f"{where}: no 'prompt' column, and chosen/rejected are not both text or both conversations "
                            "(the implicit prompt is their shared beginning).")
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    else:
        prompt = _prompt(prompt, where)
    row.update(prompt=prompt, chosen=completion_text(chosen, where), rejected=completion_text(rejected, where))
    for side in ("chosen", "rejected"):  # other objectives' scores of each side (MODPO's margins)
        if f"{side}_margins" in rec:
            row[f"{side}_margins"] = _margins(rec[f"{side}_margins"], f"{side}_margins", where)


def _stepwise(rec: dict, row: dict, where: str) -> None:
    """TRL's stepwise supervision: the completion's steps and whether each is correct."""
    steps, labels = rec.get("completions"), rec.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise UserError(f"{where}: 'completions' must be a non-empty list of step texts, got {steps!r:.80}.")
    if not isinstance(labels, list) or not all(isinstance(x, bool) for x in labels):
        raise UserError(f"{where}: 'labels' must be a list of true/false, one per step, got {labels!r:.80}.")
    if len(labels) != len(steps):
        raise UserError(f"{where}: {len(steps)} steps in 'completions' but {len(labels)} 'labels'; give one label per step.")
    row.update(prompt=_prompt(rec.get("prompt"), where), steps=list(steps), step_labels=list(labels))


def _completion(completion: Any, row: dict, where: str) -> None:
    row["completion"] = completion_text(completion, where)
    if _is_messages(completion) and any(m["role"] != "assistant" for m in completion):
        # a multi-turn completion (tool calls and results, feedback): trained on its assistant turns only
        row["completion_messages"] = completion


def _messages(msgs: Any, row: dict, where: str) -> None:
    """Conversational language modelling: the turns before the first assistant turn are the prompt, the rest the
    completion (trained on its assistant turns: TRL's ``assistant_only_loss``)."""
    if not _is_messages(msgs) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages.")
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: 'messages' must end with an assistant turn to train on it.")
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if first == 0:
        raise UserError(f"{where}: 'messages' starts with an assistant turn; put the turn it answers (user or system) before it.")
    row["prompt"] = msgs[:first]
    _completion(msgs[first:], row, where)


def _prompt(prompt: Any, where: str) -> Any:
    """A ``prompt`` column's value: non-empty text or a non-empty conversation."""
    if (isinstance(prompt, str) and not prompt.strip()) or prompt == []:
        raise UserError(f"{where}: 'prompt' is empty; give the text (or the messages) the model answers, or drop the record.")
    if isinstance(prompt, str) or _is_messages(prompt):
        return prompt
    raise UserError(f"{where}: 'prompt' must be text or a list of {{role, content}} messages, got {type(prompt).__name__}.")
