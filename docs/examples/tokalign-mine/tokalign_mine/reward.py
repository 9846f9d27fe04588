"""``target_length``: a per-token reward with options. Every completion token past ``target`` costs ``penalty``;
``token_values`` has one value per completion token and ``value`` is their sum."""

from dataclasses import dataclass

from tokalign.protocols import Reward, Sample


@dataclass
class Config:  # --reward-opt target_length.target=8 --reward-opt target_length.penalty=0.1
    target: int = 4
    penalty: float = 0.25

    def __post_init__(self):
        if self.target < 0 or self.penalty < 0:
            raise ValueError("target and penalty must be >= 0")


class TargetLength:
    Config = Config

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        c, out = self.config, []
        for s in samples:
            values = [0.0 if t < c.target else -c.penalty for t in range(len(s.completion_ids))]
            out.append(Reward(value=sum(values), token_values=values, info={"over": max(0, len(values) - c.target)}))
        return out
