"""PRM — train a process reward model on stepwise supervision: TRL's stepwise format (``prompt``, ``completions``
— the steps —, ``labels`` — one true/false per step) read as TRL's ``PRMTrainer`` reads it, trained as the
causal-LM PRM of Math-Shepherd ("Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human
Annotations", Wang et al. 2023, arXiv:2312.08935), which ``--reward prm`` then scores with.

Input: prompt + each step followed by ``step_tag`` and then ``separator`` (TRL joins the steps with its
``step_separator``, default "\\n"), rendered exactly as the ``prm`` reward renders it
(``rewards.prm.encode_steps``: the chat template with the steps as the assistant turn, when the tokenizer has
one). At the token holding step k's tag (its last character), with z_k = logit(good_token) − logit(bad_token)
of the next-token distribution there and y_k ∈ {0, 1} the step's label:

    L = mean over the steps of the batch of  −[y_k log σ(z_k) + (1 − y_k) log σ(−z_k)]

i.e. the cross-entropy of the next token renormalised over {good, bad} — what the reward reads back as
p(good) − p(bad) = tanh(z_k / 2). ``last_step_only`` trains on each example's last step (TRL's
``train_on_last_step_only``). TRL trains a token-classification head instead; the causal kind needs no new
head and keeps the checkpoint a plain causal LM. Score with it using the same layout:
``--reward prm --reward-opt prm.model=CKPT prm.separator='\\n'`` (the tag and the tokens default to these).

Shapes: logits [B, T, V]; batch.fields["step_labels"] [B, T] (the label at a step's read column, else 0); the
completion mask is 1 on the read columns only. Defaults: separator "\\n" (TRL), step_tag " ки", good "+", bad
"-" (Math-Shepherd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokalign.batching import Seq
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch
from tokalign.rewards.prm import check_layout, encode_steps, single_token, unescape
from tokalign.rows import loads


@dataclass
class PRMConfig:
    separator: str = "\n"
    step_tag: str = " ки"
    good_token: str = "+"
    bad_token: str = "-"
    chat_template: bool = True
    last_step_only: bool = False

    def __post_init__(self):
        self.separator, self.step_tag = unescape(self.separator), unescape(self.step_tag)
        check_layout(self.separator, self.good_token, self.bad_token)


class PRM:
    Config = PRMConfig

    def __init__(self, config: PRMConfig):
        self.config = config
        self.needs = Needs(data=("stepwise",), full_vocab=True)
        self._pair: tuple[int, int] | None = None  # (good, bad) token ids of the policy's tokenizer

    def encode(self, tokenizer, row: dict) -> Seq:
        """One stepwise row laid out for training: the ``prm`` reward's input, the loss on the steps' read columns."""
        c = self.config
        if self._pair is None:
            self._pair = tuple(single_token(tokenizer, t, key, "algorithm 'prm': ", "--set algorithm.")
                               for t, key in ((c.good_token, "good_token"), (c.bad_token, "bad_token")))
        completion, spans = "", []
        for step in row["steps"]:
            start = len(completion)
            completion += step
            spans.append((start, len(completion), len(completion) + len(c.separator)))
            completion += c.separator
        ids, reads, first = encode_steps(tokenizer, loads(row["prompt"]), completion, spans, c.step_tag, c.chat_template)
        first = max(first, 1)  # the first token has no prediction: it stays in the prompt
        labels = [float(x) for x in row["step_labels"]]
        if c.last_step_only:
            reads, labels = reads[-1:], labels[-1:]
        if reads and reads[-1] == len(ids) - 1:  # a read on the last token predicts one more: any token will do
            ids = ids + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else ids[-1]]
        mask, values = [0] * (len(ids) - first), [0.0] * (len(ids) - first)
        for r, y in zip(reads, labels):
            mask[r - first + 1], values[r - first + 1] = 1, y  # completion token j sits at column first - 1 + j
        return Seq(ids[:first], ids[first:], 0, token={"loss_mask": mask, "step_labels": values})

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        good, bad = self._pair
        z = (out.logits[..., good] - out.logits[..., bad]).float()
        y = batch.fields["step_labels"]
        loss = batch.aggregate(F.binary_cross_entropy_with_logits(z, y, reduction="none"), "token-mean")
        m = batch.completion_mask
        steps = m.sum().clamp(min=1)
        with torch.no_grad():
            accuracy = (((z > 0).float() == y).float() * m).sum() / steps
        return LossOutput(loss, {"prm/accuracy": float(accuracy), "prm/good_fraction": float((y * m).sum() / steps)})
