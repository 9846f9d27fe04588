"""``prm``: a process reward model's step scores as token-level rewards — PRMs as in "Let's Verify Step by
Step", Lightman et al. 2023, arXiv:2305.20050; the causal-LM kind is Math-Shepherd's ("Math-Shepherd:
Verify and Reinforce LLMs Step-by-step without Human Annotations", Wang et al. 2023, arXiv:2312.08935),
the token-classification kind PURE's ("Stop Summation: Min-Form Credit Assignment Is All Process Reward
Model Needs for Reasoning", Cheng et al. 2025, arXiv:2504.15275).

The completion is split into steps at ``separator`` (default a blank line, "\\n\\n"; "\\n" for one step
per line; blank pieces join the step before them; a step keeps its trailing separator). The PRM reads
prompt + the steps, each followed by ``step_tag`` before its separator, rendered with the PRM's own
tokenizer (its chat template when it has one), and scores each step at the PRM token holding the step's
last character (the tag's, when there is a tag):

    kind causal:  r_k = p(good) − p(bad), the two next-token probabilities renormalised over {good, bad}
                  (Math-Shepherd: good "+", bad "-", tag " ки")
    kind token:   r_k = p(label 1) − p(label 0) of a 2-label AutoModelForTokenClassification (no tag)

r_k ∈ [−1, 1] is placed on the *completion* token holding step k's last character (its separator's, if
it has one) and 0 elsewhere, so ``token_values`` has exactly ``len(completion_ids)`` values, and

    value = Σ_t token_values[t] = Σ_k r_k

The scalar of a token-level reward is the sum of its token values: PURE treats ``reward − Σ_t
token_values`` as the verifiable remainder and a non-zero token value as a step end (a step scored
exactly 0 cannot be told from "no step"; two steps ending in one token add up there).

Characters are mapped to completion tokens with ``tokenizer`` (the policy's; default the PRM's own, right
when they share a vocabulary): ``completion_ids`` must decode to the sample's completion with it.

Options (``--reward-opt prm.KEY=VALUE``): model (required), kind auto|causal|token (auto: from the
checkpoint's architecture), separator "\\n\\n", step_tag auto (" ки" for causal, "" for token), good_token
"+", bad_token "-", tokenizer, chat_template true, batch_size 8, dtype float32, device. Backslash escapes
\\n, \\t, \\r, \\\\ in separator and step_tag are decoded (so a shell can pass them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards import common

KINDS = ("auto", "causal", "token")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)


@dataclass
class PRMConfig:
    model: str = ""
    kind: str = "auto"
    separator: str = "\n\n"
    step_tag: str = "auto"
    good_token: str = "+"
    bad_token: str = "-"
    tokenizer: str = ""
    chat_template: bool = True
    batch_size: int = 8
    dtype: str = "float32"
    device: str = ""

    def __post_init__(self):
        common.check_choice("kind", self.kind, KINDS)
        common.check_choice("dtype", self.dtype, common.DTYPES)
        self.separator = unescape(self.separator)
        if self.step_tag != "auto":
            self.step_tag = unescape(self.step_tag)
        check_layout(self.separator, self.good_token, self.bad_token)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def check_layout(separator: str, good_token: str, bad_token: str) -> None:
    """The step layout a causal PRM is read (and trained) with: a separator, and two different label tokens."""
    if not separator:
        raise ValueError("separator must not be empty")
    if not good_token or not bad_token or good_token == bad_token:
        raise ValueError(f"good_token and bad_token must be two different tokens, got {good_token!r} and {bad_token!r}")


def split_steps(text: str, separator: str) -> list[tuple[int, int, int]]:
    """(start, body_end, end) per step: the body is text[start:body_end], its separator text[body_end:end].
    A blank piece (between two separators, or at the end) joins the step before it; leading blank
    pieces join the first step."""
    steps: list[list[int]] = []
    pos = 0
    while True:
        j = text.find(separator, pos)
        body_end, end = (len(text), len(text)) if j < 0 else (j, j + len(separator))
        if text[pos:body_end].strip():
            steps.append([pos if steps else 0, body_end, end])
        elif steps:
            steps[-1][2] = end
        if j < 0:
            break
        pos = end
    return [tuple(s) for s in steps]


def char_to_token(tokenizer, ids: list[int], positions: list[int]) -> list[int]:
    """The index of the token of ``ids`` whose decoded text holds each character position (binary search
    over prefix decodes: O(log n) decodes per position)."""
    out = []
    for pos in positions:
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=True)) > pos:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def token_at(offsets: list[tuple[int, int]], pos: int) -> int:
    """The last token whose character span holds ``pos`` (byte-fallback pieces of one character share a
    span); where offsets are trimmed (whitespace outside every span), the last token starting before it."""
    hit = [i for i, (a, b) in enumerate(offsets) if a <= pos < b]
    if not hit:
        hit = [i for i, (a, b) in enumerate(offsets) if b > a and a <= pos]
    if not hit:
        raise UserError(f"prm: no PRM token covers character {pos} of its input; the tokenizer's offsets do not cover the text.")
    return hit[-1]


def single_token(tok, text: str, key: str, owner: str = "prm: ", opt: str = "--reward-opt prm.") -> int:
    """The vocabulary id of ``text``, which must be one token of ``tok``."""
    vocab = tok.get_vocab()
    if text in vocab:
        return vocab[text]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"{owner}{key} {text!r} is {len(ids)} tokens for the PRM's tokenizer; pass one vocabulary token "
                        f"({opt}{key}=TOKEN).")
    return ids[0]


def encode_steps(tok, prompt, completion: str, steps: list[tuple[int, int, int]], tag: str,
                 chat_template: bool) -> tuple[list[int], list[int], int]:
    """(input ids, the token each step is scored at, the first token of the completion) of the PRM's input: prompt +
    the completion's ``steps`` (``split_steps``'s spans), each followed by ``tag`` before its separator, rendered as
    ``common.conversation`` renders it. A step is read at its tag's last character (with no tag: its separator's).
    The reward scores with it and ``tokalign train prm`` trains on it, so both see one layout."""
    tagged, read_chars = "", []
    for start, body_end, end in steps:
        tagged += completion[start:body_end] + tag
        sep = completion[body_end:end]
        read_chars.append(len(tagged) - 1 if tag else len(tagged) + len(sep) - 1)
        tagged += sep
    text, special, offset = common.conversation(tok, prompt, tagged, chat_template)
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    first = next((i for i, (a, b) in enumerate(offsets) if b > offset), len(offsets))
    return enc["input_ids"], [token_at(offsets, offset + p) for p in read_chars], first


class PRM:
    Config = PRMConfig
    name = "prm"
    batched = True

    def __init__(self, config: PRMConfig | None = None):
        self.config = config or PRMConfig()
        common.need_model(self.name, self.config.model)
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            self._loaded = self._load_once()
        return self._loaded

    def _load_once(self):
        import transformers

        from tokalign.models import resolve_model

        c = self.config
        path = c.model
        kind = c.kind
        if kind == "auto":
            archs = list(getattr(transformers.AutoConfig.from_pretrained(resolve_model(path)[0]), "architectures", None) or [])
            kind = "token" if any(a.endswith("ForTokenClassification") for a in archs) else \
                "causal" if any(a.endswith("ForCausalLM") for a in archs) else ""
            if not kind:
                raise UserError(f"prm: cannot tell the PRM kind of '{path}' (architectures: {', '.join(archs) or 'none'}); "
                                "pass --reward-opt prm.kind=causal or prm.kind=token.")
        if kind == "token":
            model = common.load_auto(self.name, path, "AutoModelForTokenClassification", c.dtype, c.device,
                                     suffix="ForTokenClassification", what="token-classification PRM")
            if model.config.num_labels != 2:
                raise UserError(f"prm: a token-classification PRM needs 2 labels (bad, good); '{path}' has {model.config.num_labels}.")
        else:
            model = common.load_auto(self.name, path, "AutoModelForCausalLM", c.dtype, c.device,
                                     suffix="ForCausalLM", what="causal-LM PRM")
        tok = common.load_tokenizer(self.name, path)
        if not getattr(tok, "is_fast", False):
            raise UserError(f"prm: the tokenizer of '{path}' is not a fast tokenizer; character offsets need one (tokenizer.json).")
        policy_tok = common.load_tokenizer(self.name, c.tokenizer) if c.tokenizer else tok
        candidates = [single_token(tok, t, key) for t, key in ((c.good_token, "good_token"), (c.bad_token, "bad_token"))]
        tag = c.step_tag if c.step_tag != "auto" else (" ки" if kind == "causal" else "")
        return kind, model, tok, policy_tok, candidates, tag

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        kind, model, tok, policy_tok, (good, bad), tag = self._load()
        c = self.config
        inputs, reads, places, step_counts = [], [], [], []
        for s in samples:
            if policy_tok.decode(list(s.completion_ids), skip_special_tokens=True) != s.completion:
                raise UserError(f"prm: the completion_ids of sample '{s.id}' do not decode to its completion with the "
                                f"{'policy' if c.tokenizer else 'PRM'}'s tokenizer; pass the policy's with --reward-opt prm.tokenizer=PATH.")
            steps = split_steps(s.completion, c.separator)
            ids, read, _ = encode_steps(tok, s.prompt, s.completion, steps, tag, c.chat_template)
            inputs.append(ids)
            reads.append(read)
            places.append(char_to_token(policy_tok, list(s.completion_ids), [end - 1 for _, _, end in steps]))
            step_counts.append(len(steps))

        def take(logits, i, k):
            import torch

            at = logits[i, reads[k]].float()  # [K, V] or [K, 2]
            pair = at[:, [good, bad]] if kind == "causal" else at[:, [1, 0]]
            p = torch.softmax(pair, dim=-1)
            return (p[:, 0] - p[:, 1]).tolist()

        todo = [k for k in range(len(samples)) if step_counts[k]]
        scores = dict(zip(todo, common.batched(model, [inputs[k] for k in todo], c.batch_size, tok.pad_token_id,
                                               lambda logits, i, j: take(logits, i, todo[j]))))
        out = []
        for k, s in enumerate(samples):
            values = [0.0] * len(s.completion_ids)
            step_scores = scores.get(k, [])
            for t, r in zip(places[k], step_scores):
                values[t] += r
            info = {"steps": len(step_scores), "step_scores": step_scores}
            if len(set(places[k])) < len(places[k]):
                info["merged_steps"] = len(places[k]) - len(set(places[k]))
            out.append(Reward(sum(values), values, info))
        return out
