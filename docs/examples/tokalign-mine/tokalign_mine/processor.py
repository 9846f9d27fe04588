"""``no_repeat``: a logits processor with options. A row never samples the token it sampled last (its logit is −inf),
and from position ``cool_after`` on (0: never) its tokens are sampled at ``cool_temperature``."""

from dataclasses import dataclass


@dataclass
class Config:  # --processor-opt no_repeat.cool_after=4 --processor-opt no_repeat.cool_temperature=0.5
    cool_after: int = 0
    cool_temperature: float = 0.5

    def __post_init__(self):
        if self.cool_after < 0 or not self.cool_temperature > 0:
            raise ValueError("cool_after must be >= 0 and cool_temperature > 0")


class NoRepeat:
    Config = Config

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, logits, prompt_ids, output_ids):
        # logits: [B, V] float32, before temperature and top-p; output_ids[b]: what row b generated so far
        for b, out in enumerate(output_ids):
            if out:
                logits[b, out[-1]] = float("-inf")
        return logits

    def temperature(self, prompt_ids, output_ids):
        c = self.config
        if not c.cool_after:
            return None  # the run's temperature for every row
        return [c.cool_temperature if len(out) >= c.cool_after else None for out in output_ids]
