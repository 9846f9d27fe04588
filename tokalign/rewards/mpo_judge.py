"""``mpo_judge``: an LLM judge whose rubric a meta-judge rewrites as training goes — MPO, "Meta Policy Optimization:
Evolving the Reward Model's Rubric", Kim et al. 2025, arXiv:2504.20157. Official code: minnesotanlp/mpo
(``trl/trainer/mpo_trainer.py``, ``trl/extras/mpo/__init__.py``, ``trl/extras/mpo/prompts/*/mrm_*.txt``).

Procedure. The reward model (RM, "junior instructor") scores each sample as the ``judge`` reward does (same client,
options, parsing and normalisation: value = clip((s − min_score)/(max_score − min_score), 0, 1)), with the current
rubric R_v filled into its template at ``{rubric}`` (beside ``{prompt}``, ``{completion}``, ``{reference}``). The
(prompt, completion, raw score) triples of the calls since the last refinement are kept (the last ``meta_samples``
of them). After every ``refine_every``-th call the meta reward model (MRM, "senior instructor") gets one request with
R_v and those triples, analyses where the scores are inflated (reward hacking) and answers a new rubric in a
``<rubric> … </rubric>`` block (the official output format: ``<rubric>\\n<item>…</item>…\\n</rubric>``); the last such
block of the answer, tags included, becomes R_{v+1} and scores every later call. An answer without a non-empty block,
or a meta request that fails (HTTP error, timeouts, server unreachable), keeps R_v and is counted
(``garbled`` / ``meta_failed``); training never stops for the meta-judge.

Options (``--reward-opt mpo_judge.KEY=VALUE``): every ``judge`` option (base_url required, model, template or
template_file — now holding ``{rubric}`` —, system, score_pattern, min_score, max_score, unparsed_value, max_tokens,
temperature, timeout, retries, concurrency, api_key_env), plus: rubric or rubric_file (the initial rubric R_0),
refine_every 10 (official ``num_mpo_interval`` = 10 update steps), meta_samples 20 (official ``num_mpo_samples``),
meta_base_url / meta_model (default: base_url / model — the official runs serve RM and MRM at separate addresses,
sizes 1.5B–72B), meta_template or meta_template_file (fields ``{rubric}``, ``{samples}``, ``{min_score}``,
``{max_score}``; default: the official essay-writing ``mrm_analyze.txt`` + ``mrm_refine.txt``, merged into one
request), meta_system ("You are a helpful English teacher." in the official essay task; default empty), meta_max_tokens
4096, meta_temperature 0.02 (official), history_file (a JSONL file: one line per rubric version, see below), resume
(false; true: start from the last rubric in history_file instead of rubric).

State. ``state_dict()`` / ``load_state_dict()`` hold the whole rubric history, the call counter, the kept triples and
the counters, as plain JSON-able values (a round trip is exact). Online training checkpoints them with the run
(``train/checkpoint.py`` saves every stateful reward of the source by name), so ``--resume`` continues with the rubric,
counter and triples it had; score workers (``--workers``) hold their own copies and are not checkpointed. For
``tokalign score`` runs, or to keep the versions, set ``history_file`` (e.g. inside the run's output dir): each version
R_0, R_1, … is appended as a JSON line {version, call, rubric, samples, reply} when it
is adopted, and ``resume=true`` restarts from its last line (version, rubric, call count; the kept triples of the
interval in progress are lost).

Limits and ⚠ unchecked points:
- ⚠ ``refine_every`` counts calls of the reward, not training steps: scoring hands a batched reward chunks of up to
  ``scoring.calls.BATCH`` = 64 samples and re-calls a failing chunk one sample at a time, so a step with more than 64
  samples, or a chunk that raised, advances the counter by more than one. The step counter tokalign passes to rewards
  (``PolicyView.step`` through ``bind_policy``) is not used: it marks a reward as policy-reading, which is refused with
  score workers, async rollouts and FSDP and ties score caches to a policy.
- ⚠ Per process: under DDP each rank refines its own rubric from its own samples, so ranks drift apart; score workers
  (``--workers`` > 1) each hold their own rubric. Use one process / ``--workers 1``.
- ⚠ In ``tokalign score`` the score cache keys on options, not the evolving rubric: use ``--no-cache``.
- The rubric is substituted into the template before ``{prompt}``/``{completion}``/``{reference}`` are filled, so a
  rubric that itself contains one of those fields gets it filled too.
- The meta request blocks the call that triggers it (one request, up to ``timeout`` × (retries+1)).

Departures from the official code, on purpose: (1) one MRM request per refinement that sees all kept triples, where
the official runs, for each of ``num_mpo_samples`` randomly drawn rollouts, a multi-turn analyse-then-refine
conversation (item count, then each item), and then one merge conversation over all refined rubrics (de-duplicating
items) — k+1 generations of several turns each; here the merge is the MRM's own job within one answer. (2) The kept
triples are the last ``meta_samples`` of the interval (deterministic), where the official samples them at random from
the interval's rollouts (no RNG state to resume). (3) No pre-screening (the official default ``do_prescreening=False``
agrees). (4) The RM here is the single-request judge (rubric in one prompt, one "Score: N"), where the official RM
scores each rubric item in its own turn and sums the item scores. (5) Task-specific rubrics/prompts of the four
official tasks are not bundled; the default meta prompt is the essay-writing one made task-neutral.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards.judge import (
    Judge,
    JudgeConfig,
    RequestFailed,
    Unreachable,
    render_prompt,
)

DEFAULT_RUBRIC = """<rubric>
<item>
Judge whether the response fulfils the prompt's request correctly, completely and clearly. Output your score as an integer from 0 (worst quality) to 10 (best quality).
</item>
</rubric>"""

DEFAULT_TEMPLATE = """Please act as an impartial judge and rate the response to the user's prompt below using the scoring rubric.

[Scoring rubric]
{rubric}

[Prompt]
{prompt}

[Reference answer]
{reference}

[Response]
{completion}

Explain briefly, then end with one line of the form "Score: N", where N is an integer from 0 (worst) to 10 (best)."""

# after the official essay-writing mrm_analyze.txt + mrm_refine.txt (minnesotanlp/mpo), merged into one request
DEFAULT_META_TEMPLATE = """You are a senior instructor tasked with evaluating a junior instructor's scoring of student generations.

Your objective is to conduct a meta-level analysis of the junior instructor's evaluation approach, guiding them in refining their scoring criteria to ensure accurate, nuanced differentiation between high-quality and subpar generations.
Emphasize strategies for assigning lower scores to undesirable responses and higher scores to responses that adhere closely to the overall objectives of the task.

Junior Instructor's Scoring Criteria:
{rubric}

Scored student generations (scores range from {min_score} to {max_score}):
{samples}

Your task:
1. Accuracy of Scoring: determine whether responses receive inflated scores despite not fully meeting the task objectives in quality and content; identify deviations such as misinterpretation, lack of depth, or overemphasis on irrelevant aspects (exploits of the criteria).
2. Evaluation of Scoring Criteria: assess whether the criteria align with the task's purpose, whether critical aspects are overlooked, and whether the distribution of points distinguishes generations of varying quality.
3. Refinement: design an explicit rubric-based framework with separate items for awarding and deducting points, assigning specific point values for meeting given criteria, with clear deductions for any shortcomings and strict penalization of severe errors. Fill in any gaps in the existing criteria.

Use the following structure for each evaluation criterion:
### (name of the evaluation category)
- (score): (description of the criterion for achieving this score, followed by an example.)
...

Write your analysis first, then end with the complete refined rubric in exactly this format:
<rubric>
<item>
(criterion)
</item>
...
</rubric>"""

SAMPLE_BLOCK = "[Sample #{i}]\nStudent's Prompt Instructions:\n{prompt}\n\nStudent's Generation:\n{completion}\n\nJunior Instructor's Assigned Score:\n{score}\n"
_RUBRIC = re.compile(r"<rubric>.*?</rubric>", re.DOTALL | re.IGNORECASE)
_META_FIELDS = re.compile(r"\{(rubric|samples|min_score|max_score)\}")


def _read(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"mpo_judge: cannot read {what} '{path}': {e.strerror}.") from e


@dataclass
class MPOJudgeConfig(JudgeConfig):
    template: str = DEFAULT_TEMPLATE
    rubric: str = DEFAULT_RUBRIC
    rubric_file: str = ""
    refine_every: int = 10
    meta_samples: int = 20
    meta_base_url: str = ""
    meta_model: str = ""
    meta_template: str = DEFAULT_META_TEMPLATE
    meta_template_file: str = ""
    meta_system: str = ""
    meta_max_tokens: int = 4096
    meta_temperature: float = 0.02
    history_file: str = ""
    resume: bool = False

    def __post_init__(self):
        super().__post_init__()
        for key in ("refine_every", "meta_samples", "meta_max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.meta_template_file and "{samples}" not in self.meta_template:
            raise ValueError("meta_template must contain {samples}")
        if self.resume and not self.history_file:
            raise ValueError("resume=true needs a history_file to resume from")


def parse_rubric(text: str) -> str | None:
    """The last ``<rubric> … </rubric>`` block of a meta-judge answer, tags included; None without a non-empty one."""
    found = [m[0].strip() for m in _RUBRIC.finditer(text)]
    found = [f for f in found if re.sub(r"(?i)</?rubric>|</?item>", "", f).strip()]
    return found[-1] if found else None


class MPOJudge(Judge):
    Config = MPOJudgeConfig
    name = "mpo_judge"

    def __init__(self, config: MPOJudgeConfig | None = None):
        super().__init__(config or MPOJudgeConfig())
        c = self.config
        # the meta-judge: the same client code, at its own address/model, answering at length
        shared = {f.name: getattr(c, f.name) for f in fields(JudgeConfig)}
        shared.update(base_url=c.meta_base_url or c.base_url, model=c.meta_model or c.model, system=c.meta_system,
                      max_tokens=c.meta_max_tokens, temperature=c.meta_temperature, template="{completion}", template_file="")
        self.meta = Judge(JudgeConfig(**shared))
        self._meta_template = _read(c.meta_template_file, "meta_template_file") if c.meta_template_file else c.meta_template
        if "{samples}" not in self._meta_template:
            raise UserError(f"mpo_judge: meta_template_file '{c.meta_template_file}' must contain {{samples}}.")
        rubric = _read(c.rubric_file, "rubric_file").strip() if c.rubric_file else c.rubric
        self.history: list[dict] = [{"version": 0, "call": 0, "rubric": rubric}]
        self.calls = 0  # calls with at least one sample
        self.kept: list[dict] = []  # (prompt, completion, score) of the calls since the last refinement
        self.counts = {"refinements": 0, "garbled": 0, "meta_failed": 0}
        self._state_lock = threading.Lock()
        if c.resume and Path(c.history_file).expanduser().exists():
            lines = [json.loads(x) for x in _read(c.history_file, "history_file").splitlines() if x.strip()]
            if lines:
                self.history = [{k: h[k] for k in ("version", "call", "rubric")} for h in lines]
                self.calls = lines[-1]["call"]
        elif c.history_file:
            self._append_history(self.history[0])

    # --------------------------------------------------------------------------------------- rubric

    @property
    def rubric(self) -> str:
        return self.history[-1]["rubric"]

    @property
    def version(self) -> int:
        return self.history[-1]["version"]

    def template(self) -> str:
        return super().template().replace("{rubric}", self.rubric)

    def _append_history(self, entry: dict) -> None:
        path = Path(self.config.history_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    # --------------------------------------------------------------------------------------- scoring

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        version = self.version
        got = super().__call__(samples)
        out = [Reward(r.value, r.token_values, {**r.info, "rubric_version": version}) for r in got]
        with self._state_lock:
            for s, r in zip(samples, got):
                self.kept.append({"prompt": render_prompt(s.prompt), "completion": s.completion,
                                  "score": r.info.get("score") if r.info.get("parsed") else None})
            del self.kept[: max(0, len(self.kept) - self.config.meta_samples)]
            self.calls += 1
            if self.calls % self.config.refine_every == 0:
                self.refine()
        return out

    def meta_request(self) -> str:
        """The meta-judge's user message for the current rubric and kept triples."""
        c = self.config
        blocks = "\n".join(SAMPLE_BLOCK.format(i=i + 1, prompt=k["prompt"], completion=k["completion"],
                                               score="(no score parsed)" if k["score"] is None else f"{k['score']:g}")
                           for i, k in enumerate(self.kept))
        values = {"rubric": self.rubric, "samples": blocks, "min_score": f"{c.min_score:g}", "max_score": f"{c.max_score:g}"}
        return _META_FIELDS.sub(lambda m: values[m[1]], self._meta_template)

    def refine(self) -> bool:
        """One meta-judge round: adopt the rubric it answers, or keep the current one (and count why). True if adopted."""
        c = self.meta.config
        messages = ([{"role": "system", "content": c.system}] if c.system else []) + \
            [{"role": "user", "content": self.meta_request()}]
        samples, self.kept = self.kept, []
        try:
            model = self.meta.model()
            answer = self.meta.call_api(lambda client: client.chat.completions.create(
                model=model, messages=messages, max_tokens=c.max_tokens, temperature=c.temperature))
            text = answer.choices[0].message.content or ""
        except (RequestFailed, Unreachable, UserError, AttributeError, IndexError, TypeError):
            self.counts["meta_failed"] += 1
            return False
        new = parse_rubric(text)
        if new is None:
            self.counts["garbled"] += 1
            return False
        entry = {"version": self.version + 1, "call": self.calls, "rubric": new}
        self.history.append(entry)
        self.counts["refinements"] += 1
        if self.config.history_file:
            self._append_history({**entry, "samples": samples, "reply": text})
        return True

    # --------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        with self._state_lock:
            return json.loads(json.dumps({"history": self.history, "calls": self.calls, "kept": self.kept,
                                          "counts": self.counts}))

    def load_state_dict(self, state: dict) -> None:
        with self._state_lock:
            state = json.loads(json.dumps(state))
            self.history, self.calls, self.kept, self.counts = state["history"], state["calls"], state["kept"], state["counts"]
