"""Resolve reward specs ("name" or "name*weight") to per-sample callables, verifiers included.

A verifier becomes a reward whose value is its ``Verdict.score``. Every reward is checked against
the per-token contract: ``token_values`` must have one value per completion token.

Options: a reward or verifier class may define a nested ``Config`` dataclass; it is then built as
``Cls(Cls.Config(**options))`` from ``--reward-opt NAME.key=value`` / ``reward_options: {NAME:
{key: value}}`` (values typed like ``--set``). A class without ``Config`` is built as ``Cls()`` and
takes no options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from tokalign import registry
from tokalign.errors import UserError, did_you_mean
from tokalign.protocols import Reward, Sample, Verdict


@dataclass
class ResolvedReward:
    name: str
    weight: float
    fn: Callable[[list[Sample]], list[Reward]]
    plugin: registry.PluginInfo
    is_verifier: bool
    options: dict[str, Any] = field(default_factory=dict)  # as the user gave them (a worker rebuilds from these)
    config: dict[str, Any] | None = None  # the resolved Config (defaults included), None without a Config
    fingerprint: str = ""  # plug-in identity + version + source hash + resolved options: the score cache's key part


def parse_spec(spec: str) -> tuple[str, float]:
    name, star, weight = spec.partition("*")
    if not star:
        return spec.strip(), 1.0
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise UserError(f"Bad reward weight in '{spec}': write name*weight, e.g. exact_match*0.5.") from None


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """['math.tolerance=1e-6', 'length.target=64'] -> {'math': {'tolerance': 1e-06}, 'length': {'target': 64}}.
    The key is what follows the last dot, so ``pkg.mod:Cls.key=v`` names the reward ``pkg.mod:Cls``."""
    from tokalign.config import parse_plugin_options

    return parse_plugin_options(items, "--reward-opt", "math.tolerance=1e-6")


def _lookup(name: str, what: str = "reward") -> tuple[Any, registry.PluginInfo, str]:
    """A name is looked up among rewards, then verifiers; a module:attr path is loaded directly.
    ``what`` names the option in the unknown-name message (eval's --verifier takes a reward too)."""
    rewards, verifiers = registry.available("reward"), registry.available("verifier")
    if ":" in name or name in rewards:
        obj, kind = registry.load("reward", name), "reward"
    elif name in verifiers:
        obj, kind = registry.load("verifier", name), "verifier"
    else:
        from tokalign.errors import unknown

        raise unknown(what, name, set(rewards) | set(verifiers))
    return obj, registry.info(kind, name), kind


def _construct(name: str, obj: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """``Cls(Cls.Config(**options))``, ``Cls()``, or the object itself (a function or an instance)."""
    if not isinstance(options, dict):
        raise UserError(f"reward_options.{name} must be a mapping of option: value, got {options!r}.")
    cfg_cls = getattr(obj, "Config", None) if isinstance(obj, type) else None
    if cfg_cls is None:
        if options:
            raise UserError(f"reward '{name}' takes no options (it defines no Config dataclass); got {', '.join(sorted(options))}.")
        if not isinstance(obj, type):
            return obj, None
        try:
            return obj(), None
        except UserError:  # the plug-in's own one-line message (e.g. a missing required option)
            raise
        except Exception as e:
            raise UserError(f"reward '{name}' failed to construct: {type(e).__name__}: {e}") from e
    if not dataclasses.is_dataclass(cfg_cls):
        raise UserError(f"reward '{name}' has a Config that is not a dataclass; its author must decorate it with @dataclass.")
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    for key in options:
        if key not in valid:
            raise UserError(f"reward '{name}' has no option '{key}'.{did_you_mean(key, valid)} Valid options: {', '.join(valid) or '(none)'}.")
    from tokalign import config

    try:
        cfg = config.build(cfg_cls, options, prefix=f"{name}.")
    except UserError as e:
        raise UserError(f"reward '{name}': bad option value: {e} Valid options: {', '.join(valid)}.") from e
    try:
        return obj(cfg), dataclasses.asdict(cfg)
    except UserError:  # the plug-in's own one-line message (e.g. a missing required option)
        raise
    except (ValueError, TypeError) as e:  # the plug-in rejecting a value names it
        raise UserError(f"reward '{name}': {e} (options: {options}).") from e
    except Exception as e:
        raise UserError(f"reward '{name}' failed to construct: {type(e).__name__}: {e}") from e


def _source_hash(obj: Any) -> str:
    """Hash of the source file that defines ``obj``: editing a local or editable plug-in invalidates cached scores."""
    module = sys.modules.get(getattr(obj, "__module__", None) or type(obj).__module__)
    path = getattr(module, "__file__", None)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""


def build(name: str, options: dict[str, Any] | None = None, what: str = "reward") -> tuple[Callable, registry.PluginInfo, bool, dict | None, str]:
    """(per-sample callable, plug-in info, is_verifier, resolved Config as a dict, fingerprint) for one reward name."""
    import json

    options = options if options is not None else {}
    raw, info, kind = _lookup(name, what)
    fn, is_verifier, cfg = _make(name, raw, kind, options, info.distribution)
    ident = [info.value, info.distribution, info.version, _source_hash(raw), cfg if cfg is not None else options]
    fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return fn, info, is_verifier, cfg, fingerprint


def rebuild(name: str, value: str, kind: str, options: dict[str, Any]) -> Callable:
    """The callable of a reward already resolved in another process, from its entry point's ``module:attr``
    value: a worker process skips the registry's metadata scans (a few hundred ms for a ``module:attr`` name)."""
    return _make(name, registry.load_value(value), kind, options, "")[0]


def _make(name: str, raw: Any, kind: str, options: dict[str, Any], distribution: str) -> tuple[Callable, bool, dict | None]:
    obj, cfg = _construct(name, raw, options)
    is_verifier = kind == "verifier" or (not callable(obj) and hasattr(obj, "verify"))
    problem = registry.check_obj("verifier" if is_verifier else "reward", obj)
    if problem:
        raise UserError(f"reward '{name}' ({distribution}) does not satisfy the protocol: {problem}.")
    return (_verifier_as_reward(obj, name) if is_verifier else obj), is_verifier, cfg


def resolve(specs: list[str], options: dict[str, dict] | None = None, what: str = "reward") -> list[ResolvedReward]:
    """``options`` maps a reward name (as written in its spec, without the weight) to its options.
    ``what``: how an unknown name is called in the error ("verifier" for eval's --verifier)."""
    options = dict(options or {})
    out = []
    for spec in specs:
        name, weight = parse_spec(spec)
        opts = options.get(name) or {}
        fn, info, is_verifier, cfg, fingerprint = build(name, opts, what)
        out.append(ResolvedReward(name, weight, fn, info, is_verifier, dict(opts), cfg, fingerprint))
    names = [r.name for r in out]
    for name in options:
        if name not in names:
            raise UserError(f"Options given for reward '{name}', which this run does not use.{did_you_mean(name, names)} "
                            f"Rewards in this run: {', '.join(names) or '(none)'}.")
    return out


def resolve_base(name: str, options: dict[str, Any] | None = None) -> ResolvedReward:
    """The one reward another reward builds on (``length``, ``otc``, ``gated``: their ``base`` and ``base_options``)."""
    return resolve([name], {name: dict(options)} if options else None)[0]


def plugin_refs(resolved: list[ResolvedReward]) -> list[dict[str, Any]]:
    """The rewards of a run as an artifact's provenance ``plugins`` entries (name, distribution, version, weight,
    resolved options)."""
    return [{"kind": r.plugin.kind, "name": r.name, "distribution": r.plugin.distribution,
             "version": r.plugin.version, "weight": r.weight, **({"options": r.config} if r.config is not None else {})}
            for r in resolved]


def _verifier_as_reward(verifier, name: str = "") -> Callable[[list[Sample]], list[Reward]]:
    """A verifier raising on a sample fails that sample (scoring records it); one returning anything but a
    Verdict with a numeric score breaks its contract, which stops the run (``plugin_errors.ContractViolation``)."""
    from tokalign.plugin_errors import contract

    name = name or type(verifier).__name__

    def call(samples: list[Sample]) -> list[Reward]:
        results = []
        for s in samples:
            v = verifier.verify(s)
            if not isinstance(v, Verdict):
                contract("verifier", name, "verify", f"it must return tokalign.protocols.Verdict, got {type(v).__name__}")
            try:
                score = float(v.score)
            except (TypeError, ValueError):
                contract("verifier", name, "verify", f"Verdict.score must be a number, got {type(v.score).__name__}")
            results.append(Reward(score, None, {"passed": bool(v.passed), "detail": v.detail}))
        return results

    call.verifier = verifier  # its optional hooks (answer) stay reachable, e.g. for eval's maj@k
    call.plugin_kind, call.plugin_method = "verifier", "verify"  # how scoring names its failures
    return call


def normalise(name: str, sample: Sample, value: Any) -> Reward:
    """Coerce a reward's return value and check the per-token contract; a breach is the reward's bug on any
    input, so it raises ``plugin_errors.ContractViolation`` (scoring stops the run on it)."""
    import math
    import numbers

    from tokalign.plugin_errors import contract

    def broke(problem: str):
        contract("reward", name, "__call__", problem)

    if isinstance(value, Verdict):
        value = Reward(value.score, None, {"passed": value.passed, "detail": value.detail})
    elif isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too (and bools)
        value = Reward(float(value))
    if value is None:
        broke(f"it returned None for sample '{sample.id}'; a reward must be a finite number (0.0 for no credit)")
    if not isinstance(value, Reward):
        broke(f"it must return a Reward or a float per sample, got {type(value).__name__}")
    try:
        value.value = float(value.value)  # a numpy or 0-d torch scalar is a number too
    except (TypeError, ValueError):
        broke(f"Reward.value must be a number, got {type(value.value).__name__}")
    if not math.isfinite(value.value):  # NaN or ±inf would poison group means, advantages and the loss
        broke(f"it returned {value.value} for sample '{sample.id}'; a reward must be a finite number")
    if value.token_values is not None:
        n = len(sample.completion_ids)
        if len(value.token_values) != n:
            broke(f"it returned {len(value.token_values)} token values for sample '{sample.id}' with {n} completion tokens; "
                  "token_values needs one value per completion token")
        try:
            value.token_values = [float(v) for v in value.token_values]
        except (TypeError, ValueError):
            broke("token_values must be numbers")
        bad = next((v for v in value.token_values if not math.isfinite(v)), None)
        if bad is not None:
            broke(f"it returned a token value of {bad} for sample '{sample.id}'; token_values must be finite numbers")
    return value
