"""Resolve reward specs ("name" or "name*weight") to batched callables, verifiers included.

A verifier becomes a reward whose value is its ``Verdict.score``. Every reward is checked against
the per-token contract: ``token_values`` must have one value per completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tokalign import registry
from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample, Verdict


@dataclass
class ResolvedReward:
    name: str
    weight: float
    fn: Callable[[list[Sample]], list[Reward]]
    plugin: registry.PluginInfo
    is_verifier: bool


def parse_spec(spec: str) -> tuple[str, float]:
    name, star, weight = spec.partition("*")
    if not star:
        return spec.strip(), 1.0
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise UserError(f"Bad reward weight in '{spec}': write name*weight, e.g. exact_match*0.5.") from None


def _lookup(name: str) -> tuple[Any, registry.PluginInfo, bool]:
    """A name is looked up among rewards, then verifiers; a module:attr path is loaded directly."""
    rewards, verifiers = registry.available("reward"), registry.available("verifier")
    if ":" in name or name in rewards:
        obj, kind = registry.load("reward", name), "reward"
    elif name in verifiers:
        obj, kind = registry.load("verifier", name), "verifier"
    else:
        from tokalign.errors import unknown

        raise unknown("reward", name, set(rewards) | set(verifiers))
    if isinstance(obj, type):
        obj = obj()
    return obj, registry.info(kind, name), kind == "verifier" or (not callable(obj) and hasattr(obj, "verify"))


def resolve(specs: list[str]) -> list[ResolvedReward]:
    out = []
    for spec in specs:
        name, weight = parse_spec(spec)
        obj, info, is_verifier = _lookup(name)
        problem = registry.check_obj("verifier" if is_verifier else "reward", obj)
        if problem:
            raise UserError(f"reward '{name}' ({info.distribution}) does not satisfy the protocol: {problem}.")
        fn = _verifier_as_reward(obj) if is_verifier else obj
        out.append(ResolvedReward(name, weight, fn, info, is_verifier))
    return out


def _verifier_as_reward(verifier) -> Callable[[list[Sample]], list[Reward]]:
    def call(samples: list[Sample]) -> list[Reward]:
        results = []
        for s in samples:
            v: Verdict = verifier.verify(s)
            results.append(Reward(float(v.score), None, {"passed": bool(v.passed), "detail": v.detail}))
        return results

    return call


def normalise(name: str, sample: Sample, value: Any) -> Reward:
    """Coerce a reward's return value and check the per-token contract."""
    if isinstance(value, Verdict):
        value = Reward(float(value.score), None, {"passed": value.passed, "detail": value.detail})
    elif isinstance(value, (int, float)) or value is None:
        value = Reward(float("nan") if value is None else float(value))
    if not isinstance(value, Reward):
        raise UserError(f"reward '{name}' returned {type(value).__name__}; it must return Reward or float per sample.")
    if value.token_values is not None:
        n = len(sample.completion_ids)
        if len(value.token_values) != n:
            raise UserError(
                f"reward '{name}' returned {len(value.token_values)} token values for sample '{sample.id}' "
                f"with {n} completion tokens; token_values needs one value per completion token."
            )
        value.token_values = [float(v) for v in value.token_values]
    return value


def score_samples(rewards: list[ResolvedReward], samples: list[Sample]) -> list[dict[str, Any]]:
    """Run every reward on the samples; returns per-sample dicts with reward, rewards, verdicts, token_rewards."""
    per_fn: dict[str, list[Reward]] = {}
    for r in rewards:
        try:
            values = list(r.fn(samples))
        except UserError:
            raise
        except Exception as e:  # the plug-in's failure, named as such, not a tokalign traceback
            raise UserError(f"reward '{r.name}' ({r.plugin.distribution} {r.plugin.version}) raised {type(e).__name__}: {e}") from e
        if len(values) != len(samples):
            raise UserError(f"reward '{r.name}' returned {len(values)} values for {len(samples)} samples.")
        per_fn[r.name] = [normalise(r.name, s, v) for s, v in zip(samples, values)]
    rows = []
    for i, s in enumerate(samples):
        total, token_total = 0.0, None
        for r in rewards:
            rw = per_fn[r.name][i]
            total += r.weight * rw.value
            if rw.token_values is not None:
                token_total = token_total or [0.0] * len(s.completion_ids)
                token_total = [a + r.weight * b for a, b in zip(token_total, rw.token_values)]
        rows.append(
            {
                "reward": total,
                "rewards": {r.name: per_fn[r.name][i].value for r in rewards},
                "verdicts": {r.name: per_fn[r.name][i].info for r in rewards if per_fn[r.name][i].info},
                "token_rewards": token_total,
            }
        )
    return rows
