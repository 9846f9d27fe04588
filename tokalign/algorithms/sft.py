"""SFT — supervised fine-tuning: negative log-likelihood of the completion tokens.

Shapes: ``logps``, mask: [B, T].   L = aggregate(−ℓ_t, mask, aggregation)  (token-mean by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class SFTConfig:
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")


class SFT:
    Config = SFTConfig

    def __init__(self, config: SFTConfig):
        self.config = config
        self.needs = Needs(data=("completions",))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        nll = batch.aggregate(-out.logps, self.config.aggregation)
        return LossOutput(nll, {})
