"""A batch component and a sampling hook of one's own.

``RunningBaseline`` keeps a moving average of the mean reward across steps (state that is checkpointed and resumed
with the run) and puts it in every row's ``batch.fields["baseline"]`` [B]. ``SkipAllTruncated`` drops groups whose
every completion hit ``max_new_tokens`` and samples fresh prompts, up to ``rollout.max_sampling_rounds`` rounds, to
refill the batch (on scored data it filters the groups once)."""

from tokalign.components import Component
from tokalign.sampling import Hook


class RunningBaseline(Component):
    name = "running_baseline"  # unique in a run: the key of its state in checkpoints
    provides = ("baseline",)  # the batch fields it fills (the dry run lists them)

    def __init__(self, decay: float):
        self.decay, self.mean = decay, None

    def fill(self, batch, ctx) -> dict[str, float]:  # once per step, before the algorithm's prepare()
        rewards = batch.fields["rewards"]  # [B]
        batch_mean = float(rewards.mean())
        baseline = batch_mean if self.mean is None else self.mean  # the average of the steps before this one
        batch.fields["baseline"] = rewards.new_full(rewards.shape, baseline)
        self.mean = batch_mean if self.mean is None else self.decay * self.mean + (1 - self.decay) * batch_mean
        return {"baseline/value": baseline}  # logged with the step's metrics

    def state_dict(self) -> dict:  # Stateful: saved in every checkpoint, restored by --resume
        return {"mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"]


class SkipAllTruncated(Hook):
    name = "skip_all_truncated"

    def accept(self, group: list[dict]) -> bool:  # a group: the scored rows of one prompt
        return any(r["finish_reason"] != "length" for r in group)

    def rounds(self, rollout_config) -> int:  # sampling rounds allowed to fill the batch with accepted groups
        return rollout_config.max_sampling_rounds

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:  # online only, on the chosen rows
        return {"sampling/rounds": ctx.rounds_used, "sampling/accepted_groups": ctx.accepted_groups}
