"""Lazy plug-in registry over Python entry points.

Groups: ``tokalign.algorithms``, ``tokalign.rewards``, ``tokalign.verifiers``, ``tokalign.tasks``,
``tokalign.environments``, ``tokalign.logits_processors``. Listing reads
distribution metadata only; a plug-in module is imported on first use, so a broken plug-in never
breaks another command. ``package.module:attr`` is accepted wherever a name is.

We use the standard library's ``importlib.metadata`` rather than the ``entrypoints`` package: the
latter is in maintenance-only mode and its own README points new code to ``importlib.metadata``;
the stdlib also gives each entry point its distribution and version directly, and needs no
dependency (measured listing cost: see docs/plugins/index.md).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from dataclasses import dataclass
from functools import lru_cache

from tokalign.errors import PluginError, UserError, unknown

LOCAL = "(local)"  # the distribution of a ``module:attr`` that no installed distribution provides

GROUPS = {
    "algorithm": "tokalign.algorithms",
    "reward": "tokalign.rewards",
    "verifier": "tokalign.verifiers",
    "task": "tokalign.tasks",
    "environment": "tokalign.environments",
    "logits_processor": "tokalign.logits_processors",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str  # a key of GROUPS: algorithm | reward | verifier | task | environment | logits_processor
    value: str  # "module:attr"
    distribution: str
    version: str

    @property
    def group(self) -> str:
        return GROUPS[self.kind]

    @property
    def label(self) -> str:
        """Where it comes from, for messages: ``pkg 0.1.0``, or ``module my_mod, no distribution``."""
        if self.distribution in (LOCAL, "?"):
            return f"module {self.value.partition(':')[0]}, no distribution"
        return self.distribution if self.version == "?" else f"{self.distribution} {self.version}"


@lru_cache(maxsize=None)
def _scan(kind: str) -> tuple[dict[str, PluginInfo], tuple[str, ...]]:
    """name -> PluginInfo, plus collision messages (two distributions claiming one name)."""
    found: dict[str, PluginInfo] = {}
    collisions: list[str] = []
    for ep in md.entry_points(group=GROUPS[kind]):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            kind=kind,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        )
        prev = found.get(ep.name)
        if prev is not None and (prev.value, prev.distribution) != (info.value, info.distribution):
            collisions.append(
                f"{kind} '{ep.name}' is registered by both {prev.distribution} ({prev.value}) "
                f"and {info.distribution} ({info.value})"
            )
            continue
        found[ep.name] = info
    return found, tuple(collisions)


def available(kind: str) -> dict[str, PluginInfo]:
    return dict(_scan(kind)[0])


def collisions(kind: str) -> tuple[str, ...]:
    return _scan(kind)[1]


@lru_cache(maxsize=None)
def load_value(value: str):
    module_name, _, attr = value.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def info(kind: str, name: str) -> PluginInfo:
    """Resolve a public name or a ``package.module:attr`` path to its PluginInfo."""
    if ":" in name:
        module_name = name.partition(":")[0]
        dist_name, version = _distribution_of(module_name)
        return PluginInfo(name=name, kind=kind, value=name, distribution=dist_name, version=version)
    plugins, clashes = _scan(kind)
    for clash in clashes:
        if clash.startswith(f"{kind} '{name}' "):
            raise UserError(f"Plug-in name collision: {clash}. Uninstall one of them.")
    if name not in plugins:
        raise unknown(kind, name, plugins)
    return plugins[name]


def load(kind: str, name: str):
    """Import and return the object behind a plug-in name (class, function or instance)."""
    plugin = info(kind, name)
    try:
        return load_value(plugin.value)
    except ModuleNotFoundError as e:
        if ":" in name and e.name and plugin.value.startswith(e.name):  # the path itself is wrong: the user's to fix
            raise UserError(f"Cannot import '{name}': module '{e.name}' not found. Check the path or PYTHONPATH.") from e
        raise PluginError(f"{kind} '{name}' ({plugin.label}) failed to import: {type(e).__name__}: {e}") from e
    except AttributeError as e:
        raise UserError(f"{kind} '{name}' ({plugin.label}) failed to load: {e}") from e
    except Exception as e:  # a broken plug-in is the plug-in's fault, reported in one line
        raise PluginError(f"{kind} '{name}' ({plugin.label}) failed to import: {type(e).__name__}: {e}") from e


def _distribution_of(module_name: str) -> tuple[str, str]:
    top = module_name.split(".")[0]
    dists = md.packages_distributions().get(top, [])
    if not dists:
        return LOCAL, "?"
    try:
        return dists[0], md.version(dists[0])
    except md.PackageNotFoundError:
        return dists[0], "?"


def check(kind: str, name: str) -> str | None:
    """None if the plug-in imports and satisfies its protocol, else a one-line reason."""
    try:
        obj = load(kind, name)
    except UserError as e:
        return str(e)
    return check_obj(kind, obj)


def check_obj(kind: str, obj) -> str | None:
    from tokalign import protocols

    return protocols.check_plugin(kind, obj)
