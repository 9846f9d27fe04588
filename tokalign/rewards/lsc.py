"""Reward ``lsc``: the log-sigmoid-centred transform and sum of rewards — "Transforming and Combining Rewards for
Aligning Large Language Models", Wang, Nagpal, Berant, Eisenstein, D'Amour, Koyejo, Veitch 2024 (ICML),
arXiv:2402.00742.

A Bradley-Terry reward r(x, y) is a log-odds that y is better than a reference response; its log-sigmoid, centred on
the reference's reward, is the log-probability that y is "good". That utility has diminishing returns (it gains little
from outputs already far above the reference: less reward hacking, more weight on the prompts still done badly), and
its sum over several reward models is the log-probability that y is good in all of them (sum = logical AND):

    u_k(x, y) = log σ(r_k(x, y) − r_k^ref(x))            for each component reward k (u_k ≤ 0)
    R(x, y)   = Σ_k w_k · u_k(x, y)                        (w_k = 1 unless written ``name*w``: the paper's plain sum)

Shapes: per sample, scalars; a component's per-token values are not kept (the transform is not additive over tokens),
so ``R`` is a sequence-level reward. It is ``batched`` when a component is (a reward model, a judge).

r_k^ref(x) — the paper's reference reward is that of the reference (SFT) policy's responses to x: the reward of one
such response, or a quantile of the rewards of several. A reward here scores samples, so the reference comes with the
prompt, in a dict ``reference`` (first match wins):

    reference["ref_rewards"][k]      the value itself, per prompt (e.g. the quantile computed when scoring SFT rollouts)
    reference["ref_completions"]     the reference policy's responses to x (text): each is scored by component k and
                                     r_k^ref is the ``quantile`` of those rewards (numpy's linear interpolation;
                                     one response: its reward)
    the ``reference`` option {k: value}, for every prompt, else 0

With a dict reference the components see its ``"answer"`` as their reference (else the dict without those keys).
Limiting case: one component with r^ref = 0 gives log σ(r).

Departures: the reference responses are read from the data, not sampled during training (PAR's online reference
sampling, ``sampling/reference_samples.py``, scores the run's total reward inside the ``par`` algorithm, out of a
reward's reach); they are text, so a component that reads ``completion_ids`` (``length`` in tokens) sees none for
them. ⚠ The quantile the paper's experiments use was not checked offline (no official code was found); 0.5 is ours.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from tokalign.protocols import Reward, Sample

REF_KEYS = ("ref_rewards", "ref_completions")


def log_sigmoid(z: float) -> float:
    """log σ(z), without overflow for large |z|."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` with linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _key(sample: Sample, texts: list[str] | None) -> str:
    """What the reference responses' rewards depend on: the prompt, the components' reference and the responses."""
    return json.dumps([sample.prompt, sample.reference, texts], sort_keys=True, default=str)


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


@dataclass
class LSCConfig:
    components: list[str] = field(default_factory=list)  # the rewards r_k (reward or verifier names, ``name*w``)
    component_options: dict[str, Any] = field(default_factory=dict)  # {name: {option: value}}
    reference: dict[str, Any] = field(default_factory=dict)  # r_k^ref for every prompt without its own: {name: value}
    quantile: float = 0.5  # r_k^ref from several reference responses: this quantile of their rewards

    def __post_init__(self) -> None:
        from tokalign.rewards import parse_spec

        if not self.components or not all(isinstance(c, str) and c for c in self.components):
            raise ValueError("components must name one or more rewards, e.g. --reward-opt lsc.components=reward_model,judge")
        names = [parse_spec(c)[0] for c in self.components]
        if "lsc" in names or len(set(names)) < len(names):
            raise ValueError(f"components must be other rewards, each once, got {self.components!r}")
        for name, opts in (("component_options", self.component_options), ("reference", self.reference)):
            if not isinstance(opts, dict) or any(k not in names for k in opts):
                raise ValueError(f"{name} must map some of the components ({', '.join(names)}) to values, got {opts!r}")
        for k, v in self.reference.items():
            _number(f"reference.{k}", v)
        if not 0 <= _number("quantile", self.quantile) <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")


class LSC:
    Config = LSCConfig

    def __init__(self, config: LSCConfig | None = None):
        from tokalign import rewards

        self.config = config or LSCConfig()
        self.parts = rewards.resolve(self.config.components, self.config.component_options)
        # scoring hands a batched reward many samples per call: a reward model among the components keeps its batches
        self.batched = any(getattr(p.fn, "batched", False) for p in self.parts)

    def _split(self, sample: Sample) -> tuple[Sample, dict, list[str] | None]:
        """(the sample as the components see it, per-prompt reference rewards, reference responses)."""
        ref = sample.reference
        if not isinstance(ref, dict) or not any(k in ref for k in REF_KEYS):
            return sample, {}, None
        rest = {k: v for k, v in ref.items() if k not in REF_KEYS}
        answer = rest.get("answer", rest or None)
        given = ref.get("ref_rewards") or {}
        if not isinstance(given, dict):
            raise TypeError(f"the reference's ref_rewards must map component names to numbers, got {given!r}")
        texts = ref.get("ref_completions")
        texts = [texts] if isinstance(texts, str) else texts
        if texts is not None and (not texts or not all(isinstance(t, str) for t in texts)):
            raise ValueError(f"the reference's ref_completions must be one or more texts, got {ref.get('ref_completions')!r}")
        return dataclasses.replace(sample, reference=answer), given, texts

    def _reference_values(self, part, views) -> dict[str, float]:
        """r^ref of ``part`` per reference key, from the reference responses (each distinct prompt scored once)."""
        from tokalign.rewards import normalise

        keys, samples = {}, []
        for s, given, texts in views:
            key = _key(s, texts)
            if texts is not None and part.name not in given and key not in keys:
                keys[key] = len(samples), len(texts)
                samples += [Sample(f"{s.id}#ref{j}", s.prompt, t, [], s.reference, "stop", {}) for j, t in enumerate(texts)]
        values = list(part.fn(samples)) if samples else []
        # reference responses carry no token ids: their rewards' per-token values are not checked, nor used
        values = [normalise(part.name, s, Reward(v.value, None, v.info) if isinstance(v, Reward) else v).value
                  for s, v in zip(samples, values)]
        return {key: quantile(values[start:start + n], self.config.quantile) for key, (start, n) in keys.items()}

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        from tokalign.rewards import normalise

        views = [self._split(s) for s in samples]
        seen = [s for s, _, _ in views]
        infos = [{"r": {}, "r_ref": {}, "u": {}} for _ in samples]
        totals = [0.0] * len(samples)
        for part in self.parts:
            from_texts = self._reference_values(part, views)
            values = list(part.fn(seen))
            for i, ((s, given, texts), v) in enumerate(zip(views, values)):
                r = normalise(part.name, s, v).value
                if part.name in given:
                    ref = _number(f"ref_rewards.{part.name}", given[part.name])
                elif texts is not None:
                    ref = from_texts[_key(s, texts)]
                else:
                    ref = float(self.config.reference.get(part.name, 0.0))
                u = log_sigmoid(r - ref)
                totals[i] += part.weight * u
                infos[i]["r"][part.name], infos[i]["r_ref"][part.name], infos[i]["u"][part.name] = r, ref, u
        return [Reward(t, None, info) for t, info in zip(totals, infos)]
