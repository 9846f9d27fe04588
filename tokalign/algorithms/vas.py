"""VAS's value model — "Value Augmented Sampling for Language Model Alignment and Personalization", Han, Shenfeld,
Srivastava, Kim, Agrawal 2024, arXiv:2405.06639; official code idanshen/Value-Augmented-Sampling (``vas_trainer.py``:
``VASTrainer.step``, ``compute_advantages``, ``loss``; ``vas_config.py``). The training half of VAS: ``tokalign train
vas --model M --data SCORED`` fits a value model V_φ (M's trunk + a zero-initialised scalar head) on the frozen LM's
scored rollouts; the decoding half is the logits processor ``vas`` (``tokalign.decoding.vas``:
``tokalign rollout --model LM --logits-processor vas --processor-opt vas.model=V``). The LM is never trained.

Shapes: ``rewards`` R [B]; ``old_values`` V^old, ``values`` V, ``token_rewards``, mask: [B, T] over completion
tokens, where V_t = V_φ(x, y_{<t}) (the head on the hidden state that predicts token t: the state before it).

    r_t = token_rewards_t + 1[t = last]·(R − Σ token_rewards)     (the outcome on the last token, as the official)
    δ_t = r_t + γ V^old_{t+1} − V^old_t,   A_t = Σ_k (γλ)^k δ_{t+k},   G_t = A_t + V^old_t    (TD(λ) returns)
    L   = ½ · aggregate((V_t − G_t)², mask)                                           (token-mean: the official)

V^old is the value model before the step (one frozen pass, ``components.ValueHead``), so at the zero-initialised start
G_t = Σ_{k ≥ t} γ^{k−t} r_k: the Monte-Carlo return; λ = 1 gives Monte-Carlo returns at every step. The trunk is
trained with the head (the official trains its LoRA adapters and the head); the checkpoint is the trunk's
``save_pretrained`` weights plus ``value_head.safetensors``, what the ``vas`` processor loads.

Defaults: γ = 1, λ = 0.95 (``VASConfig.gamma``, ``lam``). The official's other defaults are the train loop's to set:
Adam at lr 1.41e-5 (``--set train.lr=1.41e-5``; tokalign's default is 1e-6), 32 sequences per optimiser step, two
optimiser steps on each batch with the returns fixed (``vas_epochs`` = 2: ``--set train.updates_per_batch=2``; the
loop's default is 1), no value clipping, no score scaling or clipping (``use_score_scaling``, ``score_clip``: off by
default there, not offered here).

Alignment with decoding: the processor's Q(s, a) = V_φ(s ⊕ a) is the head on the hidden state after a, i.e. V_{t+1}
for a = y_t. As in the official, V is trained on the states before each completion token (t = 0 … T−1) and the
outcome lands on the last of them; the state after the final token (V_T) is never a training target (⚠ so Q of a
final token such as EOS is an extrapolation, in the official as here).

Departures / ⚠: the official's value model has its dropout set to 0; tokalign trains in the model's train mode (the
bundled and tiny models have no dropout; set a real model's dropout to 0 in its config for a faithful run). The
official decodes with a different (larger) LM than the value model's trunk (TinyLlama-1.1B values for Llama-2-7B);
that works here when both share a tokenizer (``--model`` of ``train vas`` is the value model's initialisation, the
scored rollouts may come from any LM with that tokenizer). ⚠ unchecked: the paper's own equations were not read
offline; the maths above is the official code's.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign import ops
from tokalign.components import ValueHead
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class VASConfig:
    gamma: float = 1.0  # γ of the TD(λ) returns (official 1)
    lam: float = 0.95  # λ of the TD(λ) returns (official 0.95); 1 = Monte-Carlo returns
    aggregation: str = "token-mean"  # the official's masked mean over the batch's tokens

    def __post_init__(self):
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")


class VAS:
    Config = VASConfig

    def __init__(self, config: VASConfig):
        self.config = config
        self.needs = Needs(data=("scored",), components=(ValueHead(),), split_groups=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        token_reward = ops.placed_rewards(f["rewards"], mask, f.get("token_rewards"))
        _, f["returns"] = ops.gae(token_reward, f["old_values"], mask, c.gamma, c.lam)
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask, t = self.config, batch.fields, batch.completion_mask, batch.totals
        err = (out.values - f["returns"]).square()
        vf_loss = 0.5 * ops.aggregate(err, mask, c.aggregation, total_tokens=t.get("tokens"), total_seqs=t.get("seqs"),
                                      max_len=t.get("max_completion_len"))
        share = len(batch) / t["seqs"] if t.get("seqs") else 1.0  # this micro-batch's share, scaled to the batch's
        metrics = {"vf_loss": float(vf_loss.detach()) / share,
                   "values/mean": float(ops.masked_mean(out.values.detach(), mask)),
                   "returns/mean": float(ops.masked_mean(f["returns"], mask))}
        return LossOutput(vf_loss, metrics)
