"""Sampling hooks: what steers online sampling (the ``SamplingHook`` protocol of ``tokalign.protocols``). An algorithm
lists the ones it uses in ``Needs.hooks``; third-party packages use these classes, or subclass ``Hook``."""

from __future__ import annotations

from tokalign.sampling.adaptive import AdaptiveSampling
from tokalign.sampling.base import Hook, set_field, set_token_field
from tokalign.sampling.components import ComponentRewards, component_field
from tokalign.sampling.dynamic import DynamicSampling, informative
from tokalign.sampling.greedy_baseline import GreedyBaseline
from tokalign.sampling.prioritised import PrioritisedPrompts
from tokalign.sampling.reference_samples import ReferenceSamples
from tokalign.sampling.segments import SegmentRollouts

__all__ = ["AdaptiveSampling", "ComponentRewards", "DynamicSampling", "GreedyBaseline", "Hook", "PrioritisedPrompts", "ReferenceSamples",
           "SegmentRollouts", "component_field", "informative", "set_field", "set_token_field"]
