"""The policy's final hidden states in the training forward, ``PolicyOutput.hidden`` [B, T, H] (THR's token
influence is an inner product of them)."""

from __future__ import annotations

from tokalign.components.base import Component


class HiddenStates(Component):
    name = "hidden_states"
    forward_outputs = ("hidden",)
