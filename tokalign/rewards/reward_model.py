"""``reward_model``: a learned scalar reward model — a transformers ``AutoModelForSequenceClassification``
(Bradley–Terry RMs as in "Training language models to follow instructions with human feedback",
Ouyang et al. 2022, arXiv:2203.02155; used by RTO, ReMax, MODPO, ...) scoring prompt + completion.

The text is rendered with the RM's *own* tokenizer: through its chat template when it has one (the
prompt's messages, or the text prompt as a user turn, then the completion as the assistant turn), else
plain prompt text followed by the completion. Rows go through the model ``batch_size`` at a time,
right-padded (so positions, and scores, do not depend on the batch); the model pools the last
non-padding token as transformers does.

    value = logits[label]                  normalize = none (num_labels == 1: label 0, the usual RM head)
    value = sigmoid(logits[label])         normalize = sigmoid
    value = softmax(logits)[label]         normalize = softmax (classifiers with num_labels >= 2)

Options (``--reward-opt reward_model.KEY=VALUE``): model (required), batch_size 8, label 0, normalize
none, max_length 0 (no limit; else keep the last max_length tokens), chat_template true, dtype float32,
device (default: cuda when available). The model is loaded once per process and path.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards import common

NORMALIZE = ("none", "sigmoid", "softmax")


@dataclass
class RewardModelConfig:
    model: str = ""
    batch_size: int = 8
    label: int = 0
    normalize: str = "none"
    max_length: int = 0
    chat_template: bool = True
    dtype: str = "float32"
    device: str = ""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.label < 0:
            raise ValueError(f"label must be >= 0, got {self.label}")
        if self.max_length < 0:
            raise ValueError(f"max_length must be >= 0 (0 = no limit), got {self.max_length}")
        common.check_choice("normalize", self.normalize, NORMALIZE)
        common.check_choice("dtype", self.dtype, common.DTYPES)


class RewardModel:
    Config = RewardModelConfig
    name = "reward_model"
    batched = True  # scoring hands it lists of samples; it runs them batch_size at a time

    def __init__(self, config: RewardModelConfig | None = None):
        self.config = config or RewardModelConfig()
        common.need_model(self.name, self.config.model)

    def _load(self):
        c = self.config
        path = c.model
        model = common.load_auto(self.name, path, "AutoModelForSequenceClassification", c.dtype, c.device,
                                 suffix="ForSequenceClassification", what="sequence-classification reward model")
        tok = common.load_tokenizer(self.name, path)
        n = model.config.num_labels
        if c.label >= n:
            raise UserError(f"{self.name}: label {c.label} is out of range for a model with {n} label(s); "
                            f"pass --reward-opt {self.name}.label=0..{n - 1}.")
        if c.normalize == "softmax" and n < 2:
            raise UserError(f"{self.name}: normalize=softmax needs num_labels >= 2, '{path}' has 1; use none or sigmoid.")
        if model.config.pad_token_id is None:  # transformers pools the last non-pad token and needs the pad id
            model.config.pad_token_id = tok.pad_token_id
        return model, tok

    def encode(self, tok, samples: list[Sample]) -> tuple[list[list[int]], list[bool]]:
        seqs, truncated = [], []
        for s in samples:
            text, special, _ = common.conversation(tok, s.prompt, s.completion, self.config.chat_template)
            ids = tok(text, add_special_tokens=special)["input_ids"]
            cut = self.config.max_length and len(ids) > self.config.max_length
            seqs.append(ids[-self.config.max_length:] if cut else ids)
            truncated.append(bool(cut))
        return seqs, truncated

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        import torch

        model, tok = self._load()
        c = self.config
        seqs, truncated = self.encode(tok, samples)
        logits = common.batched(model, seqs, c.batch_size, model.config.pad_token_id, lambda out, i, k: out[i].float())
        rewards = []
        for row, cut in zip(logits, truncated):
            if c.normalize == "sigmoid":
                value = torch.sigmoid(row[c.label])
            elif c.normalize == "softmax":
                value = torch.softmax(row, dim=-1)[c.label]
            else:
                value = row[c.label]
            info = {"logit": float(row[c.label])}
            if cut:
                info["truncated"] = True
            rewards.append(Reward(float(value), None, info))
        return rewards
