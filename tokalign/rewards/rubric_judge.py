"""``rubric_judge``: nugget-as-rubric rewards from a generative verifier behind an OpenAI-compatible chat endpoint —
"An Efficient Rubric-based Generative Verifier for Search-Augmented LLMs" (Search-Gen-V), Ma, Xu, Long and Zheng,
2025, arXiv:2510.14660 (request and label format from the authors' code, linyue-ma/Search-Gen-V:
``evaluator/eval/nugget_eval/prompts.py`` and ``verl/utils/reward_score/search_gen_v.py``).

Each question carries a rubric Υ(q) = {(w_1, r_1), …, (w_k, r_k)}: k atomic information points ("nuggets") with
weights. The verifier V labels every nugget r_i of a completion ŷ ``support``, ``partial_support`` or
``not_support``; with v(label) the value of a label, the reward is the paper's weighted mean (its eq. for R_φ):

    R(q, ŷ) = Σ_i w_i · v(V(q, ŷ, r_i)) / Σ_j w_j  ∈ [0, 1]

    v: support -> 1, partial_support -> ``partial_value`` (0.5), not_support -> 0
    w_i: the nugget's own "weight" when it has one, else ``vital_weight`` (1) for importance "vital",
         ``okay_weight`` (1) for "okay", 1 when it gives no importance.

    e.g. nuggets [vital, vital, okay] labelled [support, partial_support, not_support], okay_weight 0.5:
         (1·1 + 1·0.5 + 0.5·0) / 2.5 = 0.6

As the authors' verifier does (batch, multi-rubric verification), one sample is ONE request holding all its
nuggets: a system message with the three label definitions and the output format, and the user message
``Search Query: <prompt>`` / ``Passage: <completion>`` / ``Nuggets (k):`` followed by the nuggets numbered 1..k. The
verifier reasons inside ``<reasoning>…</reasoning>`` (an optional ``<think>…</think>`` before it is ignored) and
ends with the k labels in order, asked for as a JSON array; the labels are read, in order, from the text after the
last ``</reasoning>`` in any of the authors' formats (JSON or Python list, comma/pipe/tab separated, markdown,
numbered, ``<label>`` XML; "partial support"/"not-support" spellings too). An answer with a number of labels other
than k, a request the server rejects (HTTP 4xx) or that keeps timing out, gives ``unparsed_value`` (default 0)
with ``parsed: false`` and the reason in ``info``; an unreachable server is a UserError. Client, retries, API key,
model discovery and threads are ``judge``'s (``tokalign.rewards.judge``); samples run ``concurrency`` at a time.

Where the rubric comes from: the row's ``reference`` — a list of nuggets (or its JSON text), or an object holding
that list under ``field`` (default "nuggets"; e.g. ``field=block_nuggets_assignment`` for the authors' RAG24 files).
A nugget is a string or an object with "text" (or "nugget") and optionally "importance" (vital|okay) or a numeric
"weight". A sample whose rubric is missing, empty, malformed or weighs 0 in all is a UserError naming the row and the
fix, raised before any request.

Options (``--reward-opt rubric_judge.KEY=VALUE``): base_url (required), model (default: the first the server lists),
field "nuggets", partial_value 0.5, vital_weight 1, okay_weight 1, system (replaces the instructions; ``{n}`` is
the number of nuggets), unparsed_value 0, max_tokens 1024 (the authors' evaluator default), temperature 0,
timeout 60 s, retries 2, concurrency 8, api_key_env OPENAI_API_KEY.

Limits: the verifier sees only the completion as the "passage", not the search results the policy read, so
"support" means "the answer states it", as in the paper's report-level use. A stray label word after
``</reasoning>`` (prose around the labels) changes the count and so makes the answer unparsed rather than misread.

⚠ Unchecked: the paper writes V(q, ŷ, r_i) ∈ ℝ without saying what ``partial_support`` is worth, nor what the
weights are; neither the authors' RL reward (which scores the verifier itself: label F1, exact match and format
against gold labels) nor their evaluator turns labels into a policy reward. partial 0.5 and vital/okay weights
(1, 1) are our defaults (TREC RAG 2024's AutoNuggetizer, arXiv:2411.09607, uses the same 0.5 for partial support
and 0.5 for an okay nugget in its weighted score: set okay_weight=0.5 for that). The system prompt paraphrases
the authors' short chain-of-thought instructions; it was not checked against their trained Search-Gen-V-4B.

Departures: temperature 0 (the authors' evaluator samples at 0.7) so a re-score gives the same reward; one fixed
output format (JSON array) where the authors rotate formats for robustness; a count mismatch is ``unparsed_value``
(the authors' training reward gives 0 there too) rather than a partial reading of the labels it did find.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards import judge

LABELS = ("support", "partial_support", "not_support")

SYSTEM = """You are NuggetMatchJudge. You are given a search query, a passage (an answer to the query) and {n} nuggets: atomic facts a good answer should contain.
Label every nugget "support", "partial_support" or "not_support", judging only from the passage and never from outside knowledge:
- support: every essential fact of the nugget is stated in the passage, explicitly or as a clear paraphrase, with matching qualifiers (time, scope, quantities, conditions) and nothing in the passage contradicting it.
- partial_support: at least one essential fact is stated, but another is missing, hedged or ambiguous, and nothing contradicts the nugget; only a minor, safe inference is needed.
- not_support: the nugget is absent, only topically related, contradicted, needs outside knowledge, or its qualifiers do not match.
First reason about each nugget k = 1..{n} inside one <reasoning> ... </reasoning> block (the nugget, the passage's words that bear on it, your decision).
Then end with the labels only, as a JSON array of exactly {n} strings in the order of the nuggets, for example ["support", "not_support", "partial_support"]."""

_LABEL = re.compile(r"(?<![a-z_])(partial[_ -]support|not[_ -]support|support)(?![a-z_])", re.IGNORECASE)


@dataclass
class RubricConfig:
    base_url: str = ""
    model: str = ""
    field: str = "nuggets"
    partial_value: float = 0.5
    vital_weight: float = 1.0
    okay_weight: float = 1.0
    system: str = ""
    unparsed_value: float = 0.0
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        if not 0.0 <= self.partial_value <= 1.0:
            raise ValueError(f"partial_value must be in [0, 1], got {self.partial_value}")
        if not (self.vital_weight >= 0 and self.okay_weight >= 0 and math.isfinite(self.vital_weight + self.okay_weight)):
            raise ValueError("vital_weight and okay_weight must be finite and >= 0")
        judge.check_requests(self)
        if not self.field.strip():
            raise ValueError("field must name the reference's key that holds the nuggets, e.g. nuggets")


@dataclass(frozen=True)
class Nugget:
    text: str
    weight: float


def _fix(config: RubricConfig) -> str:
    return (f"give each row a reference that is a JSON list of nuggets (strings, or objects with \"text\" and "
            f"\"importance\" vital|okay or \"weight\"), or an object holding that list under '{config.field}' "
            f"(--reward-opt rubric_judge.field=KEY)")


def rubric(config: RubricConfig, sample: Sample) -> list[Nugget]:
    """The sample's nuggets with their weights; a UserError naming the row and the fix when it has none."""
    ref = sample.reference
    if isinstance(ref, str):
        try:
            ref = json.loads(ref)
        except ValueError:
            ref = None
    if isinstance(ref, dict):
        ref = ref.get(config.field)
    if ref is None and isinstance(sample.metadata.get(config.field), list):
        ref = sample.metadata[config.field]
    where = f"rubric_judge: row {sample.id}"
    if not isinstance(ref, list) or not ref:
        raise UserError(f"{where} has no rubric; {_fix(config)}.")
    out = []
    for k, item in enumerate(ref, 1):
        if isinstance(item, str):
            text, weight = item, 1.0
        elif isinstance(item, dict) and isinstance(item.get("text", item.get("nugget")), str):
            text = item.get("text", item.get("nugget"))
            if "weight" in item:
                weight = item["weight"]
                if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
                    raise UserError(f"{where}: nugget {k} has weight {weight!r}; a weight must be a number >= 0.")
            else:
                importance = str(item.get("importance") or "").strip().lower()
                if importance not in ("", "vital", "okay"):
                    raise UserError(f"{where}: nugget {k} has importance {item['importance']!r}; use vital or okay, or a numeric \"weight\".")
                weight = config.okay_weight if importance == "okay" else config.vital_weight if importance == "vital" else 1.0
        else:
            raise UserError(f"{where}: nugget {k} is neither a string nor an object with \"text\"; {_fix(config)}.")
        if not text.strip():
            raise UserError(f"{where}: nugget {k} is empty; {_fix(config)}.")
        out.append(Nugget(text.strip(), float(weight)))
    if sum(n.weight for n in out) <= 0:
        raise UserError(f"{where}: its nuggets weigh 0 in all; give one a weight > 0 (or raise vital_weight/okay_weight).")
    return out


def request_messages(config: RubricConfig, sample: Sample, nuggets: list[Nugget]) -> list[dict]:
    n = len(nuggets)
    system = (config.system or SYSTEM).replace("{n}", str(n))
    listed = "\n".join(f"{k}. {g.text}" for k, g in enumerate(nuggets, 1))
    user = f"Search Query: {judge.render_prompt(sample.prompt)}\nPassage: {sample.completion}\nNuggets ({n}):\n{listed}\n\nBegin reasoning and final labels:"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_labels(text: str, n: int) -> list[str] | None:
    """The n labels the answer ends with, in order, or None when it holds another number of them."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "</reasoning>" in text:
        text = text.rsplit("</reasoning>", 1)[1]
    found = [re.sub(r"[ -]", "_", m.lower()) for m in _LABEL.findall(text)]
    return found if len(found) == n and n > 0 else None


def aggregate(config: RubricConfig, labels: list[str], weights: list[float]) -> float:
    """Σ w_i v(label_i) / Σ w_i, with v = 1, partial_value, 0 for support, partial_support, not_support."""
    value = {"support": 1.0, "partial_support": config.partial_value, "not_support": 0.0}
    return sum(w * value[lab] for lab, w in zip(labels, weights, strict=True)) / sum(weights)


class RubricJudge(judge.Judge):
    Config = RubricConfig
    name = "rubric_judge"
    batched = True

    def __init__(self, config: RubricConfig | None = None):
        config = config or RubricConfig()
        if not config.base_url.strip():
            raise UserError(f"{self.name} needs a server: --reward-opt {self.name}.base_url=http://HOST:PORT/v1")
        super().__init__(config)  # type: ignore[arg-type]  # the judge's client reads the fields both configs share

    def verify(self, sample: Sample, nuggets: list[Nugget]) -> Reward:
        c = self.config
        messages = request_messages(c, sample, nuggets)
        model = self.model()
        try:
            answer = self.call_api(lambda client: client.chat.completions.create(
                model=model, messages=messages, max_tokens=c.max_tokens, temperature=c.temperature))
        except judge.RequestFailed as e:
            return Reward(c.unparsed_value, None, {"parsed": False, "error": str(e)})
        try:
            text = answer.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return Reward(c.unparsed_value, None, {"parsed": False, "error": "malformed answer: no message content"})
        return self.read_answer(text, nuggets)

    def read_answer(self, text: str, nuggets: list[Nugget]) -> Reward:
        c = self.config
        labels = parse_labels(text, len(nuggets))
        if labels is None:
            found = len(_LABEL.findall(text.rsplit("</reasoning>", 1)[-1]))
            return Reward(c.unparsed_value, None, {"parsed": False, "response": text[:1000],
                                                   "detail": f"expected {len(nuggets)} labels after the reasoning, found {found}"})
        value = aggregate(c, labels, [g.weight for g in nuggets])
        return Reward(value, None, {"parsed": True, "labels": labels, "n": len(nuggets), "response": text[:1000]})

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        rubrics = [rubric(self.config, s) for s in samples]  # every row's rubric is checked before any request
        if self._down and time.monotonic() - self._down[0] < judge.DOWN_MEMORY_S:
            raise UserError(self._down[1])
        try:
            self.model()
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(samples))) as pool:
                return list(pool.map(self.verify, samples, rubrics))
        except judge.Unreachable as e:
            msg = f"{self.name}: cannot reach {self.base_url}: {e}; start the server or fix --reward-opt {self.name}.base_url."
            self._down = (time.monotonic(), msg)
            raise UserError(msg) from None

