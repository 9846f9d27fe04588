"""``implicit``: the token-level implicit reward of a DPO-trained model — "From r to Q*: Your Language Model
is Secretly a Q-Function", Rafailov et al. 2024, arXiv:2404.12358 (used as a dense reward by RTO,
arXiv:2404.18922, and TGDPO, arXiv:2506.14574).

For completion tokens y_1..y_T of a sample (its ``completion_ids``, scored as they are) after the prompt x:

    token_values[t] = β · (log π_dpo(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))        one per completion token
    value          = Σ_t token_values[t]        (= β · log π_dpo(y|x)/π_ref(y|x), DPO's sequence implicit reward)

The scalar of a token-level reward is the sum of its token values (algorithms such as PURE read
``reward − Σ_t token_values`` as the part the tokens do not explain).

The prompt is rendered with the DPO model's tokenizer and chat template, as the policy renders it:
the DPO model and its reference must share the policy's tokenizer (they do when DPO started from the
policy), since ``completion_ids`` are fed to them unchanged.

Options (``--reward-opt implicit.KEY=VALUE``): model (the DPO model, required), ref (its reference,
required), beta 0.1 (the DPO β), batch_size 8, dtype float32, device.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample
from tokalign.rewards import common


@dataclass
class ImplicitConfig:
    model: str = ""
    ref: str = ""
    beta: float = 0.1
    batch_size: int = 8
    dtype: str = "float32"
    device: str = ""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        common.check_choice("dtype", self.dtype, common.DTYPES)


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int, pad_id: int) -> list[list[float]]:
    """log π(y_t | x, y_<t) for every completion token of each (prompt ids, completion ids) row."""
    import torch

    seqs = [p + c for p, c in zip(prompts, completions)]

    def take(logits, i, k):
        lo, n = len(prompts[k]), len(seqs[k])
        # logits at position t predict token t+1: completion token j (at lo + j) is read at lo + j - 1
        lp = torch.log_softmax(logits[i, lo - 1: n - 1].float(), dim=-1)
        target = torch.tensor(completions[k], dtype=torch.long, device=lp.device)
        return lp.gather(-1, target[:, None]).squeeze(-1).tolist()

    return common.batched(model, seqs, batch_size, pad_id, take)


class Implicit:
    Config = ImplicitConfig
    name = "implicit"
    batched = True

    def __init__(self, config: ImplicitConfig | None = None):
        self.config = config or ImplicitConfig()
        common.need_model(self.name, self.config.model)
        common.need_model(self.name, self.config.ref, key="ref")

    def _models(self):
        c = self.config
        path, ref = c.model, c.ref

        def load(p):
            return common.load_auto(self.name, p, "AutoModelForCausalLM", c.dtype, c.device,
                                    suffix="ForCausalLM", what="causal language model")

        return load(path), load(ref), common.load_tokenizer(self.name, path)

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        from tokalign.data.render import render_prompts

        dpo, ref, tok = self._models()
        vocab = min(dpo.config.vocab_size, ref.config.vocab_size)
        prompts = [ids for _, ids in render_prompts(tok, [s.prompt for s in samples])]
        completions = [list(s.completion_ids) for s in samples]
        for s, p in zip(samples, prompts):
            if not p:
                raise UserError(f"{self.name}: sample '{s.id}' renders to an empty prompt; the DPO model needs at least one prompt token.")
            if any(not 0 <= t < vocab for t in s.completion_ids):
                raise UserError(f"{self.name}: sample '{s.id}' has completion token ids outside the DPO model's vocabulary "
                                f"({vocab}); the DPO and reference models must share the policy's tokenizer.")
        pad = tok.pad_token_id
        lp_dpo = completion_logps(dpo, prompts, completions, self.config.batch_size, pad)
        lp_ref = completion_logps(ref, prompts, completions, self.config.batch_size, pad)
        beta = self.config.beta
        out = []
        for a, b in zip(lp_dpo, lp_ref):
            values = [beta * (x - y) for x, y in zip(a, b)]
            out.append(Reward(sum(values), values, {"dpo_logp": sum(a), "ref_logp": sum(b)}))
        return out
