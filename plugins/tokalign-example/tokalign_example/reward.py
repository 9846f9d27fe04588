"""``brevity``: a per-token reward. Every completion token past ``budget`` costs ``penalty``;
``token_values`` has one value per completion token, and ``value`` is their sum."""

from tokalign.protocols import Reward, Sample


class Brevity:
    budget = 4
    penalty = 0.25

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        out = []
        for s in samples:
            values = [0.0 if t < self.budget else -self.penalty for t in range(len(s.completion_ids))]
            out.append(Reward(value=sum(values), token_values=values, info={"tokens": len(values)}))
        return out
