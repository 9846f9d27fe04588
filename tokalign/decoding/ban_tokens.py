"""Logits processor ``ban_tokens``: tokens that are never sampled — their logits set to −inf at every step, in both
engines (transformers' ``SuppressTokensLogitsProcessor`` and vLLM's single-token ``bad_words`` do the same inside one
engine each; this one is engine-neutral, and the plainest test of the decoding hook).

Shapes: ``logits`` [B, V]; the banned ids K: ``logits[:, K] = −inf`` at every position of every row.

Options: ``ids`` (token ids) and ``tokens`` (token strings: a vocabulary entry such as ``Ġthe``, or text that encodes
to exactly one token; text of several tokens is refused with its ids, as banning a word means banning its first
token, which is the user's choice to make). At least one is needed; ids beyond the tokenizer, and banning every token,
are refused. The banned tokens' sampler log-probs are −inf; no sampled token has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokalign.errors import UserError


@dataclass
class BanTokensConfig:
    ids: list[int] = field(default_factory=list)  # token ids never sampled
    tokens: list[str] = field(default_factory=list)  # token strings never sampled (each must be one token)

    def __post_init__(self):
        if not self.ids and not self.tokens:
            raise ValueError("name the tokens to ban: ids=[...] and/or tokens=[...] (e.g. --processor-opt ban_tokens.ids=[5,7])")
        if any(i < 0 for i in self.ids):
            raise ValueError(f"token ids are ≥ 0, got {[i for i in self.ids if i < 0]}")


class BanTokens:
    Config = BanTokensConfig

    def __init__(self, config: BanTokensConfig | None = None):
        self.config = config if config is not None else BanTokensConfig()  # no tokens: its ValueError names the fix
        self.ids = sorted(set(self.config.ids))
        self._index = None  # the ids as a tensor, per device

    def bind(self, tokenizer) -> None:
        from tokalign.decoding import token_id

        ids = set(self.config.ids)
        for text in self.config.tokens:
            found = token_id(tokenizer, text)
            if found is None:
                parts = tokenizer.encode(text, add_special_tokens=False)
                raise UserError(f"ban_tokens: {text!r} is {len(parts)} tokens of this tokenizer ({parts}), not one; ban "
                                "single tokens (ids=[...] or tokens=[...], one token each).")
            ids.add(found)
        size = len(tokenizer)
        if too_big := sorted(i for i in ids if i >= size):
            raise UserError(f"ban_tokens: token id(s) {too_big} are beyond this tokenizer's {size} tokens.")
        if len(ids) >= size:
            raise UserError(f"ban_tokens would ban all {size} tokens of this tokenizer: nothing would be left to sample.")
        self.ids, self._index = sorted(ids), None

    def __call__(self, logits, prompt_ids, output_ids):
        import torch

        if self._index is None or self._index.device != logits.device:
            self._index = torch.tensor([i for i in self.ids if i < logits.shape[-1]], dtype=torch.long, device=logits.device)
        logits[:, self._index] = float("-inf")
        return logits
