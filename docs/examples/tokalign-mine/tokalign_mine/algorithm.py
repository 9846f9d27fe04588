"""``reinforce_running``: REINFORCE with a running-average baseline, from a batch component of its own.

Shapes: rewards, baseline: [B]; logps, mask: [B, T].
    A_i = R_i − b,  b = the moving average of earlier steps' mean reward;   L = aggregate(−A_i · ℓ_t)
"""

from dataclasses import dataclass

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch
from tokalign_mine.components import RunningBaseline, SkipAllTruncated


@dataclass
class Config:  # --set algorithm.decay=0.8
    decay: float = 0.9
    aggregation: str = "token-mean"
    skip_truncated: bool = True

    def __post_init__(self):  # a ValueError here is a one-line error naming the algorithm
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")


class ReinforceRunning:
    Config = Config

    def __init__(self, config: Config):
        self.config = config
        self.needs = Needs(
            data=("online", "scored"),
            components=(RunningBaseline(config.decay),),  # fills batch.fields["baseline"] before prepare()
            hooks=(SkipAllTruncated(),) if config.skip_truncated else (),
        )

    def prepare(self, batch: TokenBatch) -> TokenBatch:  # no grad, once per step
        batch.fields["advantages"] = batch.fields["rewards"] - batch.fields["baseline"]
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:  # per micro-batch, with grad
        per_token = -batch.fields["advantages"].unsqueeze(-1) * out.logps  # [B, T]
        loss = batch.aggregate(per_token, self.config.aggregation)  # normalised by the whole batch
        return LossOutput(loss, {"advantage/abs_mean": float(batch.fields["advantages"].abs().mean())})
