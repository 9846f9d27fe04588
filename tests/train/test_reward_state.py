"""A reward that keeps state (MPO's rubric, anything with state_dict / load_state_dict) is checkpointed with the run
under its name in the source's rewards and restored on resume; rewards without state add nothing."""

from __future__ import annotations

from types import SimpleNamespace

from tokalign.train import checkpoint


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, samples):
        self.calls += 1
        return []

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


def _state(fns):
    rewards = [SimpleNamespace(name=n, fn=f) for n, f in fns.items()]
    return SimpleNamespace(source=SimpleNamespace(rewards=rewards), algorithm=object(), components=[],
                           needs=SimpleNamespace(hooks=()))


def test_stateful_rewards_are_saved_and_restored_by_name():
    counting = Counting()
    counting.calls = 3
    saved = checkpoint.states(_state({"mpo": counting, "exact_match": lambda samples: []}))
    assert saved["rewards"] == {"mpo": {"calls": 3}}
    fresh = Counting()
    checkpoint.restore_rewards(_state({"mpo": fresh}), saved)
    assert fresh.calls == 3
    checkpoint.restore_rewards(_state({"mpo": Counting()}), {})  # an older checkpoint without rewards: nothing to do


def test_a_source_without_rewards_saves_none():
    state = SimpleNamespace(source=object(), algorithm=object(), components=[], needs=SimpleNamespace(hooks=()))
    assert checkpoint.states(state)["rewards"] == {}
