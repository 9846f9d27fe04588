"""Each reward component's value as a batch field, for algorithms that weigh the components themselves."""

from __future__ import annotations

from typing import Any

from tokalign.errors import UserError
from tokalign.sampling.base import Hook, set_field


def component_field(name: str) -> str:
    """The batch field holding reward component ``name``'s value per row, [B]."""
    return f"rewards.{name}"


class ComponentRewards(Hook):
    """Copies ``row["rewards"][name]`` (the unweighted value of each named reward of ``--reward``) into
    ``batch.fields["rewards.<name>"]`` [B], beside the weighted total in ``batch.fields["rewards"]``."""

    name = "component_rewards"

    def __init__(self, names: list[str]):
        self.names = list(names)

    def after_batch(self, rows: list[dict], ctx: Any) -> dict[str, float]:
        for r in rows:
            values = r.get("rewards") or {}
            missing = [n for n in self.names if n not in values]
            if missing:
                raise UserError(f"Reward component {missing[0]!r} is not one of this run's rewards "
                                f"({', '.join(values) or 'none'}). Add it with --reward {missing[0]}.")
            for n in self.names:
                set_field(r, component_field(n), values[n])
        return {}
