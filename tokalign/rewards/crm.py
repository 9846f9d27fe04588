"""Reward ``crm``: CRM / CRF — a Conciseness Reward Model scores how concise a reasoning trace is, and the
Conciseness Reward Function couples that score with the outcome reward — "Efficient Reasoning via Reward Model",
Wang, Li, Gong, Liu, Zhang, Liu & Zhao 2025 (City University of Hong Kong, Huawei Research), arXiv:2511.09158
(seed listing 001).

Length penalties added to a correctness reward are reported to cause *length collapse* (length falls while the reward
still rises) and *training collapse*; CRF instead makes the conciseness term depend explicitly on the outcome, so a
short wrong answer earns nothing for being short. Per sample, with o the outcome reward (``base``; ``exact_match`` by
default), g = 1[o ≥ τ] (correct) and c the conciseness score (``scorer``):

    coupling = additive (default):   R = o + λ · g · c
    coupling = product:              R = o · (1 − λ + λ · g · c)  when g, else o    (λ = 1: R = o · c for a correct one)

Limits (tested): λ = 0 gives exactly the outcome reward (its value, token values and info; the scorer is not even
called); a sample that is not correct (g = 0) gets exactly the outcome reward, so a group where every answer is wrong
is scored by the outcome alone. The scorer only runs on the correct samples (a reward model sees no wrong ones).

The conciseness score c — ``scorer``:

* ``reward_model`` (default): the trained CRM, a sequence-classification model scored through tokalign's
  ``reward_model`` reward (prompt + completion in the RM's own chat template), from ``model`` (required then) and
  ``scorer_options`` (``reward_model``'s own: ``normalize``, ``label``, ``batch_size``, ``max_length``, ``dtype``,
  ``device``, ...). The paper's CRM is trained on conciseness scores in [0.1, 1], so its raw head value (``normalize:
  none``, the default) is c.
* ``length``: a stand-in that needs no trained model (for tests and smoke runs), c = 1 − min(|y|, L) / L with |y| the
  completion tokens and L = ``max_len``, or when that is 0 the sampler's ``max_new_tokens`` recorded with the rollout
  (``tokalign.rewards.length``'s helpers); c ∈ [0, 1], 1 for an empty completion. It is not the ``length`` reward.
* any other reward or verifier name: its value is c (with ``scorer_options`` as its options).

``group_norm: minmax`` rescales c over the correct samples of one prompt (``tokalign.rewards.grouping``: the samples
that arrive in one scoring call — up to 64 — by ``group_id``, else by prompt and reference) to (c − min)/(max − min);
all equal (or one correct sample): 1. ``none`` (default) uses c as scored.

Per-token values: when the outcome reward has token values, the added term goes on the last completion token (their
sum stays R); otherwise the reward is sequence-level (``token_values`` None), as ``exact_match`` is. ``info`` has
``outcome``, ``correct``, ``concise`` (c as scored, correct samples only) and ``bonus`` (R − o).

Options (``--reward-opt crm.KEY=VALUE``): base exact_match, base_options {}, scorer reward_model, model "",
scorer_options {}, lam 1.0 (λ), coupling additive, threshold 1.0 (τ), max_len 0, group_norm none.

⚠ unchecked: only the abstract and third-party summaries could be read offline (the official code,
anonymous.4open.science/r/CRM, is not reachable here, and no copy was found). What was read: the CRM is a model
fine-tuned on DeepMath-103K solutions (a concise and a redundant one per problem, written by Qwen2.5-Math-72B-Instruct)
whose conciseness Qwen2.5-72B-Instruct scored from 0.1 to 1 (repetition avoidance, step relevance, token efficiency),
keeping only the discriminative pairs; CRF has "explicit dependency between the outcome reward and conciseness
score", argued to reduce variance. tokalign's choices: the exact CRF formula (the two couplings above), λ = 1, the
correctness gate τ = 1.0 on the outcome's value, the CRM as a sequence-classification head read raw, no per-group
normalisation by default (``group_norm`` is an opt-in), and no schedule on λ over training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tokalign.protocols import Reward, Sample
from tokalign.rewards.grouping import groups
from tokalign.rewards.length import completion_length, sampler_limit

COUPLINGS = ("additive", "product")
GROUP_NORMS = ("none", "minmax")
STAND_IN = "length"  # the built-in length-based conciseness score (not the `length` reward)
SELF = ("crm", "tokalign.rewards.crm:CRM")


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


@dataclass
class CRMConfig:
    base: str = "exact_match"  # the outcome reward o (any reward or verifier name)
    base_options: dict[str, Any] = field(default_factory=dict)
    scorer: str = "reward_model"  # the conciseness score c: reward_model (the CRM), length (stand-in), or a reward name
    model: str = ""  # scorer=reward_model: the conciseness RM (a sequence-classification model directory or hub id)
    scorer_options: dict[str, Any] = field(default_factory=dict)  # options of the scorer reward (reward_model's, ...)
    lam: float = 1.0  # λ: the weight of the conciseness term
    coupling: str = "additive"  # additive: o + λ·g·c | product: o·(1 − λ + λ·g·c)
    threshold: float = 1.0  # τ: a sample is correct when o ≥ τ
    max_len: int = 0  # scorer=length: L; 0 = the sampler's max_new_tokens recorded with the rollout
    group_norm: str = "none"  # none | minmax (c over a prompt's correct samples)

    def __post_init__(self) -> None:
        for name in ("base", "scorer"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or v in SELF:
                raise ValueError(f"{name} must name another reward (e.g. {'exact_match' if name == 'base' else 'reward_model'}), got {v!r}")
        for name in ("base_options", "scorer_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping of option: value, got {getattr(self, name)!r}")
        if not isinstance(self.model, str):
            raise ValueError(f"model must be a path or hub id, got {self.model!r}")
        if self.scorer == "reward_model" and not (self.model or self.scorer_options.get("model")):
            raise ValueError("scorer=reward_model needs the conciseness reward model: --reward-opt crm.model=PATH "
                             "(or crm.scorer=length, the length-based stand-in)")
        if self.scorer != "reward_model" and self.model:
            raise ValueError(f"model is the conciseness RM of scorer=reward_model; scorer is {self.scorer!r} (drop model)")
        if self.scorer == STAND_IN and self.scorer_options:
            raise ValueError("scorer=length (the stand-in) takes no scorer_options; its one option is max_len")
        lam = _number("lam", self.lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number ≥ 0 (0: the outcome reward alone), got {self.lam!r}")
        _number("threshold", self.threshold)
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {self.coupling!r}")
        if self.group_norm not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {', '.join(GROUP_NORMS)}, got {self.group_norm!r}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 0:
            raise ValueError(f"max_len must be a whole number ≥ 0 (0: the sampler's limit), got {self.max_len!r}")


def length_conciseness(sample: Sample, max_len: int = 0) -> float:
    """The stand-in score c = 1 − min(|y|, L) / L, L = ``max_len`` or the sampler's recorded ``max_new_tokens``."""
    limit = max_len or sampler_limit(sample)
    if not limit:
        raise ValueError("the length stand-in needs a limit: set crm.max_len, or score rollouts that record max_new_tokens")
    return 1.0 - min(completion_length(sample), limit) / limit


def minmax(values: list[float]) -> list[float]:
    """(c − min) / (max − min); all equal (or one value): 1 each."""
    lo, hi = min(values), max(values)
    return [1.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]


class CRM:
    Config = CRMConfig
    batched = True  # a reward model scorer keeps its batches; group_norm needs a prompt's samples together

    def __init__(self, config: CRMConfig | None = None):
        from tokalign import rewards

        self.config = cfg = config or CRMConfig()
        self.base = rewards.resolve_base(cfg.base, cfg.base_options)
        self.scorer = None
        if cfg.scorer != STAND_IN:
            opts = dict(cfg.scorer_options)
            if cfg.model:
                opts["model"] = cfg.model
            self.scorer = rewards.resolve_base(cfg.scorer, opts)

    def conciseness(self, samples: list[Sample]) -> list[float]:
        """c for each sample (only the correct ones are passed)."""
        if not samples:
            return []
        if self.scorer is None:
            return [length_conciseness(s, self.config.max_len) for s in samples]
        from tokalign.rewards import normalise

        return [normalise(self.scorer.name, s, v).value for s, v in zip(samples, self.scorer.fn(samples))]

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        from tokalign.rewards import normalise

        cfg = self.config
        outcomes = [normalise(self.base.name, s, v) for s, v in zip(samples, self.base.fn(samples))]
        if cfg.lam == 0:
            return outcomes
        correct = [r.value >= cfg.threshold for r in outcomes]
        todo = [i for i, ok in enumerate(correct) if ok]
        raw = dict(zip(todo, self.conciseness([samples[i] for i in todo])))
        used = dict(raw)
        if cfg.group_norm == "minmax":
            for part in groups(samples):
                idx = [i for i in part if correct[i]]
                if idx:
                    used.update(zip(idx, minmax([raw[i] for i in idx])))
        out = []
        for i, (s, r) in enumerate(zip(samples, outcomes)):
            if not correct[i]:
                out.append(Reward(r.value, r.token_values, {**r.info, "outcome": r.value, "correct": False, "bonus": 0.0}))
                continue
            c = used[i]
            value = r.value + cfg.lam * c if cfg.coupling == "additive" else r.value * (1.0 - cfg.lam + cfg.lam * c)
            bonus = value - r.value
            tokens = None
            if r.token_values is not None:
                tokens = list(r.token_values)
                if tokens:
                    tokens[-1] += bonus
            info = {**r.info, "outcome": r.value, "correct": True, "concise": raw[i], "bonus": bonus}
            if cfg.group_norm != "none":
                info["concise_normalised"] = c
            out.append(Reward(value, tokens, info))
        return out
