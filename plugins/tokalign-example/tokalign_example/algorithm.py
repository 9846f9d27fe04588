"""REINFORCE with a group-mean baseline (Williams 1992; the baseline as in RLOO/GRPO without std).

Shapes: rewards, group_ids: [B]; logps, mask: [B, T].
    A_i = R_i − mean_g R;   L = token-mean(−A_i · ℓ_t)
"""

from dataclasses import dataclass

from tokalign import ops
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class Config:
    aggregation: str = "token-mean"


class ReinforceMean:
    Config = Config

    def __init__(self, config: Config):
        self.config = config
        self.needs = Needs(data=("online", "scored"), groups=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        batch.fields["advantages"] = ops.group_advantages(batch.fields["rewards"], batch.fields["group_ids"], scale="none")
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        per_token = -batch.fields["advantages"].unsqueeze(-1) * out.logps
        loss = batch.aggregate(per_token, self.config.aggregation)
        return LossOutput(loss, {"advantage/abs_mean": float(batch.fields["advantages"].abs().mean())})
