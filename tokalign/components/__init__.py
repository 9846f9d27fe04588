"""Batch components: what fills a step's batch before the algorithm's ``prepare`` (the ``BatchComponent`` protocol of
``tokalign.protocols``). An algorithm lists the ones it uses in ``Needs.components``; ``Needs.reference``,
``Needs.models`` and ``Needs.old_logps`` are shorthands for ``Reference``, ``FrozenModel`` and ``BehaviourLogps``.
Third-party packages use these classes, or subclass ``Component`` for their own."""

from __future__ import annotations

from tokalign.components.base import Component
from tokalign.components.behaviour import BehaviourLogps
from tokalign.components.frozen import FrozenModel
from tokalign.components.hidden_states import HiddenStates
from tokalign.components.prompt_variants import PromptVariants
from tokalign.components.reference import Reference
from tokalign.components.trained_model import TrainedModel
from tokalign.components.value_head import ValueHead

__all__ = ["BehaviourLogps", "Component", "FrozenModel", "HiddenStates", "PromptVariants", "Reference", "TrainedModel",
           "ValueHead", "resolve"]


def resolve(needs) -> list:
    """The run's components in the order they fill a batch: the reference, the frozen models, the algorithm's own
    (as listed), then the behaviour log-probs if the algorithm wants them and no component provides them."""
    out = [Reference(needs.full_vocab)] if needs.reference else []
    out += [FrozenModel(role, needs.full_vocab) for role in needs.models]
    out += list(needs.components)
    if needs.old_logps and not any("old_logps" in c.provides for c in out):
        out.append(BehaviourLogps())
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two batch components share the name {dup[0]!r}; give each a unique name")
    return out
