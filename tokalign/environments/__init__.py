"""Environments: what answers the model between its turns in a multi-turn episode (plug-in group
``tokalign.environments``; ``--env NAME`` on ``rollout``, ``train`` and ``eval``).

An episode starts from a prompt row; the model speaks, the environment replies (tool results, feedback, a next
observation) until it says done or the turn / token budget ends (``rollout.max_turns``,
``rollout.max_episode_tokens``). ``base`` holds the protocol, ``calls`` the tool-call parsers, ``tools`` the
environment built from plain Python functions, ``builtin`` the ``calculator`` and ``python`` tools, and ``turns``
how an environment's reply becomes token ids (once per turn, with the chat template's own turn wrappers).
"""

from __future__ import annotations


def load(name: str):
    """The environment behind a plug-in name (or ``module:attr``): a class is instantiated with no arguments."""
    from tokalign import plugin_errors, registry

    obj = registry.load("environment", name)
    if isinstance(obj, type):
        with plugin_errors.guard("environment", name, "__init__"):
            obj = obj()
    problem = registry.check_obj("environment", obj)
    if problem:
        from tokalign.errors import PluginError

        raise PluginError(f"environment '{name}': {problem}")
    return obj
