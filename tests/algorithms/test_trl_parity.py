"""Parity of tokalign's DPO and GRPO-family losses, GSPO, SimPO and RLOO's advantages with TRL 1.16's trainers: equal
losses AND equal gradients (atol 1e-6), on random inputs and on a real tiny model. TRL is a test-only dependency. The
tests of all these algorithms stay in this one module (not in tests/algorithms/test_<name>.py) because they share the
TRL trainers' set-up, the stand-in models and the parity drivers below, and all skip together where TRL is missing
(the vLLM venv).

What is driven in TRL (line numbers in the installed trl 1.16.0):

* DPO — ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py:1285; ``loss_type="sigmoid"`` at :1387-1388,
  per-pair mean at :1528). TRL has no standalone DPO loss function in 1.16, so a real ``DPOTrainer`` is built on the
  seeded tiny model and its loss method is called (a) with a stand-in model that returns given random per-token
  log-probs (gradients w.r.t. those log-probs are compared), and (b) with the real policy and a distinct reference
  model (gradients w.r.t. the parameters are compared).
* Label smoothing — TRL 1.16's ``"sigmoid"`` loss ignores ``label_smoothing`` (it is ``-logsigmoid(β·Δ)``), so there
  is no TRL counterpart of the conservative (label-smoothed) sigmoid loss under that name. TRL's ``"aot"`` loss
  (dpo_trainer.py:1447-1456) is ``−(1−s)·logσ(βδ) − s·logσ(−βδ)`` with δ built from the batch's *sorted* log-ratios;
  for a single pair sorting is the identity and δ = h, so ``"aot"`` with one pair per batch is exactly the
  label-smoothed DPO loss. That is the (only) parity test of label smoothing here.
* GRPO / DAPO / Dr.GRPO / BNPO — ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py:3020, per-token logps by
  ``_get_per_token_logps_and_entropies`` at :1419, k3 KL at :3100, clipped surrogate at :3112-3120, aggregation at
  :3153-3184) on hand-built ``inputs`` dicts, and ``GRPOTrainer._generate_and_score_completions`` (:2324; group
  advantages at :2761-2787) for the advantages. TRL ``loss_type`` ↔ tokalign aggregation:
  "dapo" ↔ token-mean (TRL divides by ``num_items_in_batch``, the tokens of the whole generation batch),
  "bnpo" ↔ token-mean (TRL divides by the tokens of the *local* micro-batch, so it equals token-mean only when the
  optimiser batch is one micro-batch), "grpo" ↔ seq-mean-token-mean, "dr_grpo" ↔ seq-mean-token-sum-norm with
  max_len = ``max_completion_length``.
* GSPO — ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py:3020) with ``importance_sampling_level="sequence"``:
  the log-weight is the masked per-sequence mean of ℓ − ℓ_old, shape (B, 1), *with* gradient through every token
  (:3088-3090), clipped as in GRPO (:3112-3120) and broadcast over the tokens; aggregation ``loss_type="grpo"`` ↔
  seq-mean-token-mean (:3154), ``"dapo"`` ↔ token-mean (:3170). tokalign uses the token form
  ℓ_t − sg(ℓ_t) + sg(log s_i) (verl ``compute_policy_loss_gspo``), which has the same value and gradient.
  Pinned as for GRPO below: ``bf16=False``, ``use_bias_correction_kl=False``.
* SimPO — ``CPOTrainer.compute_loss`` (trl/experimental/cpo/cpo_trainer.py:919) with ``loss_type="simpo"`` and
  ``cpo_alpha=0`` (no NLL term, :842): ``concatenated_forward`` averages the completion log-probs
  (``get_batch_logps(average_log_prob=True)``, :752/:850), ``cpo_loss`` (:678, simpo branch :715-722) forms
  −(1−s)logσ(β(ℓ̄_w − ℓ̄_l − γ/β)) − s·logσ(−…), and ``get_batch_loss_metrics`` takes the mean over pairs (:890).
  TRL's ``simpo_gamma`` is tokalign's ``gamma`` (γ, not γ/β). Driven (a) with a stand-in model returning random
  logits (gradients w.r.t. the logits are compared) and (b) with the real tiny model (parameter gradients).
* RLOO advantages — ``RLOOTrainer._generate_and_score_completions`` (trl/trainer/rloo_trainer.py; leave-one-out
  baseline at :1682-1690) with ``beta=0`` and ``normalize_advantages=False``. TRL's RLOO *loss* is not compared:
  it clips the ratio of whole-sequence probabilities exp(Σ_t ℓ_t − Σ_t ℓ_old,t) (:1823-1833), whereas tokalign's
  RLOO (as verl's ``adv_estimator=rloo``) uses GRPO's per-token PPO-clip surrogate.

Settings that must be pinned for parity (TRL 1.16 defaults that differ from tokalign):

* ``bf16=False``: TRL configs default to ``bf16=True``, which on CPU runs the fused LM head under bf16 autocast
  (log-probs then differ by ~1e-3).
* ``use_bias_correction_kl=False``: TRL 1.16 defaults to multiplying the k3 KL term by the importance ratio ρ
  (DeepSeek-V3.2). The value is unchanged on-policy, but the KL gradient changes even at ρ = 1. tokalign implements
  the plain k3 penalty of GRPO/verl and has no such switch.
* Advantages: TRL normalises by ``std + 1e-4`` (tokalign default 1e-6), so ``adv_eps=1e-4`` when advantages are
  compared; TRL's k3 is not clamped (tokalign clamps to [−10, 10]), irrelevant at these magnitudes.
* ``current_gradient_accumulation_steps`` is set by ``transformers.Trainer``'s training loop (trainer.py:1877)
  before ``compute_loss``; the tests set it the same way since they call the loss outside ``train()``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig as TRLDPOConfig  # noqa: E402
from trl import DPOTrainer, GRPOTrainer  # noqa: E402
from trl import GRPOConfig as TRLGRPOConfig  # noqa: E402
from trl import RLOOConfig as TRLRLOOConfig, RLOOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from tokalign import ops  # noqa: E402
from tokalign.algorithms.cispo import CISPO, CISPOConfig  # noqa: E402
from tokalign.algorithms.dpo import DPO, DPOConfig  # noqa: E402
from tokalign.algorithms.grpo import GRPO, GRPOConfig  # noqa: E402
from tokalign.algorithms.gspo import GSPO, GSPOConfig  # noqa: E402
from tokalign.algorithms.rloo import RLOO, RLOOConfig  # noqa: E402
from tokalign.algorithms.simpo import SimPO, SimPOConfig  # noqa: E402
from tokalign.protocols import PolicyOutput, TokenBatch  # noqa: E402
from tokalign.batching import Seq, collate, micro_batches  # noqa: E402
from tokalign.forward import forward  # noqa: E402

ATOL = 1e-6
AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}
pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------------
# helpers


class LogpStub(torch.nn.Module):
    """Stands in for a causal LM patched by TRL's ``add_fused_lm_head``: called with ``labels`` and
    ``fused_lm_head=True`` it returns the given per-token log-probs ``[B, L-1]``, zero where the next-token label is
    -100 (as ``FusedCausalLMOutput`` documents for the real head). Only the log-probs carry gradient."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = logps

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head and labels is not None and labels.shape == input_ids.shape
        valid = labels[:, 1:] != -100
        log_probs = self.logps * valid
        zeros = torch.zeros_like(log_probs.detach())
        return FusedCausalLMOutput(loss=None, log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                   is_top1=torch.zeros_like(valid), label_mask=valid)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(g_trl: dict, g_tk: dict) -> float:
    assert g_trl.keys() == g_tk.keys() and len(g_trl) > 0
    worst = max(_max_abs(g_trl[k], g_tk[k]) for k in g_trl)
    for k in g_trl:
        assert_close(g_tk[k], g_trl[k], atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float(g.abs().max()) for g in g_trl.values()) > 1e-3  # the gradients are not trivially zero
    return worst


def _perturbed(model, seed: int, scale: float = 0.02):
    """The same architecture with seeded noise on every weight: a policy distinct from its reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# ---------------------------------------------------------------------------------------------------
# DPO


def _dpo_trainer(model_dir, out_dir, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, ref_model=None,
                 policy=None) -> DPOTrainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = policy if policy is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    ds = Dataset.from_dict({"prompt": ["hello world", "2+3="], "chosen": [" yes", "5"], "rejected": [" no", "6"]})
    args = TRLDPOConfig(output_dir=str(out_dir), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True,
                        per_device_train_batch_size=2, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                        precompute_ref_log_probs=ref_model is None)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.train()
    return trainer


def _dpo_case(n_pairs: int, vocab: int, seed: int):
    """Random pairs with equal-length prompts and different completion lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = torch.randint(10, vocab, (3,), generator=g).tolist()
        n_c, n_r = torch.randint(1, 6, (2,), generator=g).tolist()
        pairs.append((prompt, torch.randint(10, vocab, (n_c,), generator=g).tolist(),
                      torch.randint(10, vocab, (n_r,), generator=g).tolist()))
    return pairs


def _dpo_batches(pairs, pad_id):
    """TRL's layout [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}] (rows ``trl_rows``) and tokalign's rows
    alternating chosen/rejected per pair; ``order[k]`` is the TRL row of tokalign row k."""
    p = len(pairs)
    trl_rows = [Seq(pr, c, i) for i, (pr, c, _) in enumerate(pairs)] + [Seq(pr, r, i) for i, (pr, _, r) in enumerate(pairs)]
    trl_batch = collate(trl_rows, pad_id)
    order = [k for i in range(p) for k in (i, p + i)]
    tk_rows = []
    for i, (pr, c, r) in enumerate(pairs):
        tk_rows += [Seq(pr, c, i, row={"is_chosen": 1.0}), Seq(pr, r, i, row={"is_chosen": 0.0})]
    tk_batch = collate(tk_rows, pad_id)
    assert torch.equal(tk_batch.input_ids, trl_batch.input_ids[order])
    completion_mask = torch.zeros_like(trl_batch.input_ids)
    completion_mask[:, 1:] = trl_batch.completion_mask.long()  # TRL marks completion *tokens*, unshifted
    inputs = {"input_ids": trl_batch.input_ids, "attention_mask": trl_batch.attention_mask,
              "completion_mask": completion_mask}
    return inputs, tk_batch, order


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.1), ("hinge", 0.5),
                                                  ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_family_parity_random_logps(tiny_model, tmp_path, loss_type, beta):
    """Random per-token policy and reference log-probs with masks (4 pairs, completion lengths 1–5): tokalign's
    DPO(β, loss_type).loss equals DPOTrainer._compute_loss with the same loss_type (sigmoid = DPO, hinge = SLiC/RSO,
    ipo = length-normalised IPO), and so do the gradients w.r.t. every per-token policy log-prob."""
    trainer = _dpo_trainer(tiny_model, tmp_path, beta=beta, loss_type=loss_type)
    pairs = _dpo_case(4, len(trainer.processing_class), seed=10)
    inputs, tk_batch, order = _dpo_batches(pairs, trainer.processing_class.pad_token_id)
    g = torch.Generator().manual_seed(11)
    shape = tk_batch.completion_mask.shape
    logps = -torch.rand(shape, generator=g) * 4
    ref = -torch.rand(shape, generator=g) * 4
    mask = inputs["completion_mask"][:, 1:].float()
    ref_seq = (ref * mask).sum(-1)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_seq.chunk(2)

    trl_logps = logps.clone().requires_grad_(True)
    trl_loss = trainer._compute_loss(LogpStub(trl_logps), inputs, return_outputs=False)
    trl_loss.backward()

    tk_batch.fields["ref_logps"] = ref[order]
    tk_batch.totals["groups"] = float(len(pairs))
    tk_logps = logps[order].clone().requires_grad_(True)
    tk_loss = DPO(DPOConfig(beta=beta, loss_type=loss_type)).loss(tk_batch, PolicyOutput(tk_logps)).loss
    tk_loss.backward()

    print(f"\nDPO {loss_type} β={beta} random logps: |Δloss| = {_max_abs(tk_loss, trl_loss):.2e}, "
          f"max|Δgrad| = {_max_abs(tk_logps.grad, trl_logps.grad[order]):.2e}")
    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logps.grad, trl_logps.grad[order], atol=ATOL, rtol=0)
    assert float(trl_logps.grad.abs().max()) > 1e-3


def test_dpo_sigmoid_parity_tiny_model(tiny_model, tmp_path):
    """Real forward passes: policy = tiny model + seeded weight noise, reference = the tiny model. TRL computes the
    log-probs with its fused LM head, tokalign with ``tokalign.forward.forward``; losses and all parameter gradients match."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval().requires_grad_(False)
    policy = _perturbed(AutoModelForCausalLM.from_pretrained(tiny_model), seed=1)
    trainer = _dpo_trainer(tiny_model, tmp_path, beta=0.1, ref_model=ref, policy=policy)
    pairs = _dpo_case(3, len(trainer.processing_class), seed=12)
    inputs, tk_batch, order = _dpo_batches(pairs, trainer.processing_class.pad_token_id)
    model = trainer.model

    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    trl_loss.backward()
    g_trl = _param_grads(model)

    model.zero_grad()
    with torch.no_grad():
        tk_batch.fields["ref_logps"] = forward(ref, tk_batch).logps
    tk_loss = DPO(DPOConfig(beta=0.1)).loss(tk_batch, forward(model, tk_batch)).loss
    tk_loss.backward()
    g_tk = _param_grads(model)

    assert abs(float(trl_loss) - math.log(2)) > 1e-3  # π ≠ π_ref: not the trivial ln 2 point
    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    worst = _assert_same_grads(g_trl, g_tk)
    print(f"\nDPO tiny model: |Δloss| = {_max_abs(tk_loss, trl_loss):.2e}, max|Δgrad| = {worst:.2e}")


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_dpo_label_smoothing_parity_single_pair(tiny_model, tmp_path, seed):
    """Label smoothing s = 0.2, β = 0.3, one pair (see the module docstring: TRL's "aot" loss on one pair is the
    label-smoothed sigmoid loss −(1−s)·logσ(βh) − s·logσ(−βh))."""
    trainer = _dpo_trainer(tiny_model, tmp_path, beta=0.3, loss_type="aot", label_smoothing=0.2)
    pairs = _dpo_case(1, len(trainer.processing_class), seed=seed)
    inputs, tk_batch, order = _dpo_batches(pairs, trainer.processing_class.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    shape = tk_batch.completion_mask.shape
    logps, ref = -torch.rand(shape, generator=g) * 4, -torch.rand(shape, generator=g) * 4
    ref_seq = (ref * inputs["completion_mask"][:, 1:]).sum(-1)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_seq.chunk(2)

    trl_logps = logps.clone().requires_grad_(True)
    trl_loss = trainer._compute_loss(LogpStub(trl_logps), inputs, return_outputs=False)
    trl_loss.backward()

    tk_batch.fields["ref_logps"] = ref[order]
    tk_logps = logps[order].clone().requires_grad_(True)
    tk_loss = DPO(DPOConfig(beta=0.3, label_smoothing=0.2)).loss(tk_batch, PolicyOutput(tk_logps)).loss
    tk_loss.backward()
    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logps.grad, trl_logps.grad[order], atol=ATOL, rtol=0)
    # and it is not the unsmoothed loss
    plain = DPO(DPOConfig(beta=0.3)).loss(tk_batch, PolicyOutput(logps[order])).loss
    assert abs(float(plain) - float(trl_loss)) > 1e-3


# ---------------------------------------------------------------------------------------------------
# GRPO family

_TRAINERS: dict[tuple, GRPOTrainer] = {}


def _reward_constant(completions, **kwargs):
    return [0.0] * len(completions)


def _grpo_trainer(model_dir, out_dir, *, loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28,
                  max_completion_length=5, batch_size=4, grad_accum=1, scale_rewards="group",
                  reward=_reward_constant, cache=True) -> GRPOTrainer:
    key = (str(model_dir), loss_type, beta, epsilon, epsilon_high, max_completion_length, batch_size, grad_accum,
           scale_rewards, reward)
    if cache and key in _TRAINERS:
        trainer = _TRAINERS[key]
        trainer.model.zero_grad(set_to_none=True)
        return trainer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TRLGRPOConfig(
        output_dir=str(out_dir), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True, seed=0,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, num_generations=2,
        max_completion_length=max_completion_length, temperature=1.0, beta=beta, loss_type=loss_type,
        epsilon=epsilon, epsilon_high=epsilon_high, scale_rewards=scale_rewards, use_bias_correction_kl=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hello world"] * 8}), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum  # as Trainer's training loop sets it
    if cache:
        _TRAINERS[key] = trainer
    return trainer


def _grpo_case(vocab: int, pad_id: int, seed: int, lengths=(5, 2, 4, 1), prompt_len=3, max_len=5):
    """Equal-length prompts (TRL left-pads prompts; equal lengths keep position ids identical to tokalign's
    right-padded layout) and right-padded completions of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    prompt_ids = torch.randint(10, vocab, (b, prompt_len), generator=g)
    completion_ids = torch.randint(10, vocab, (b, max_len), generator=g)
    cmask = (torch.arange(max_len) < torch.tensor(lengths)[:, None]).long()
    completion_ids = torch.where(cmask.bool(), completion_ids, torch.full_like(completion_ids, pad_id))
    advantages = torch.randn(b, generator=g)
    return prompt_ids, completion_ids, cmask, advantages, g


def _trl_inputs(prompt_ids, completion_ids, cmask, advantages, old, ref, num_items=None):
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": cmask, "advantages": advantages, "old_per_token_logps": old * cmask,
              "num_items_in_batch": torch.tensor(float(cmask.sum()) if num_items is None else float(num_items))}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref * cmask
    return inputs


def _tk_batch(prompt_ids, completion_ids, cmask, advantages, old, ref, pad_id, max_completion_length):
    seqs = []
    for i in range(len(prompt_ids)):
        n = int(cmask[i].sum())
        token = {"old_logps": old[i, :n].tolist()}
        if ref is not None:
            token["ref_logps"] = ref[i, :n].tolist()
        seqs.append(Seq(prompt_ids[i].tolist(), completion_ids[i, :n].tolist(), i // 2,
                        row={"advantages": float(advantages[i])}, token=token))
    return collate(seqs, pad_id, max_completion_length)


GRPO_CASES = [(lt, beta) for lt in ("dapo", "grpo", "dr_grpo", "bnpo") for beta in (0.0, 0.04)]


def _random_logps_parity(trainer, algo, seed: int, lengths=(5, 2, 4, 1), noise: float = 0.4):
    """Random per-token policy log-probs (behaviour = policy + ``noise``·N(0,1), reference = policy + 0.3·N(0,1)
    when β > 0) and random advantages through TRL's ``_compute_loss`` and tokalign's ``algo.loss``.
    Returns (tokalign result, tokalign logps, TRL loss, TRL logps); both logps hold their gradients."""
    tok = trainer.processing_class
    prompt_ids, completion_ids, cmask, adv, g = _grpo_case(len(tok), tok.pad_token_id, seed=seed, lengths=lengths)
    p, c = prompt_ids.shape[1], completion_ids.shape[1]
    logps = -torch.rand(len(lengths), p + c - 1, generator=g) * 4  # [B, L-1]; completion token j at column p-1+j
    comp = logps[:, p - 1:]
    old = comp + noise * torch.randn(comp.shape, generator=g)
    ref = comp + 0.3 * torch.randn(comp.shape, generator=g) if algo.config.beta > 0 else None

    trl_logps = logps.clone().requires_grad_(True)
    trl_loss = trainer._compute_loss(LogpStub(trl_logps), _trl_inputs(prompt_ids, completion_ids, cmask, adv, old, ref))
    trl_loss.backward()

    batch = _tk_batch(prompt_ids, completion_ids, cmask, adv, old, ref, tok.pad_token_id, trainer.max_completion_length)
    tk_logps = logps.clone().requires_grad_(True)
    res = algo.loss(batch, PolicyOutput(tk_logps))
    res.loss.backward()
    return res, tk_logps, trl_loss, trl_logps


@pytest.mark.parametrize(("loss_type", "beta"), GRPO_CASES)
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.28), (0.1, 0.1)])
def test_grpo_parity_random_logps(tiny_model, tmp_path, loss_type, beta, eps_low, eps_high):
    """Random per-token log-probs (policy, behaviour ±0.4 noise so both clip sides are hit, reference ±0.3 noise),
    random advantages, 4 completions of lengths 5, 2, 4, 1: tokalign GRPO with the matching aggregation equals
    GRPOTrainer._compute_loss, loss and gradient w.r.t. every per-token policy log-prob."""
    trainer = _grpo_trainer(tiny_model, tmp_path, loss_type=loss_type, beta=beta, epsilon=eps_low, epsilon_high=eps_high)
    algo = GRPO(GRPOConfig(epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, aggregation=AGGREGATION[loss_type]))
    res, tk_logps, trl_loss, trl_logps = _random_logps_parity(trainer, algo, seed=30)

    assert 0.0 < res.metrics["clip_fraction"] < 1.0
    print(f"\nGRPO {loss_type} β={beta} ε=({eps_low},{eps_high}) random logps: |Δloss| = "
          f"{_max_abs(res.loss, trl_loss):.2e}, max|Δgrad| = {_max_abs(tk_logps.grad, trl_logps.grad):.2e}")
    assert_close(res.loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logps.grad, trl_logps.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("ratio_max", [5.0, 1.2])
def test_cispo_parity_random_logps(tiny_model, tmp_path, beta, ratio_max):
    """CISPO equals GRPOTrainer._compute_loss with loss_type="cispo" (trl/trainer/grpo_trainer.py: the detached
    ``clamp(ρ, max=epsilon_high)`` times A times ℓ, over the batch's tokens): loss and per-token gradients. Behaviour
    noise 1.0 so that some ratios pass the cap."""
    trainer = _grpo_trainer(tiny_model, tmp_path, loss_type="cispo", beta=beta, epsilon=0.2, epsilon_high=ratio_max)
    algo = CISPO(CISPOConfig(ratio_max=ratio_max, beta=beta))
    res, tk_logps, trl_loss, trl_logps = _random_logps_parity(trainer, algo, seed=31, noise=1.0)
    assert 0.0 < res.metrics["clip_fraction"] < 1.0
    print(f"\nCISPO β={beta} cap {ratio_max}: |Δloss| = {_max_abs(res.loss, trl_loss):.2e}, "
          f"max|Δgrad| = {_max_abs(tk_logps.grad, trl_logps.grad):.2e}")
    assert_close(res.loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logps.grad, trl_logps.grad, atol=ATOL, rtol=0)


def _tiny_model_parity(trainer, algo, seed: int, lengths=(5, 2, 4, 1), noise: float = 0.4):
    """Real forward passes of the trainer's tiny model: behaviour log-probs = the model's own + ``noise``·N(0,1),
    reference = + 0.3·N(0,1) when β > 0; TRL's ``_compute_loss`` (fused-head log-probs) vs ``algo.loss`` on
    ``tokalign.forward.forward``. Returns (tokalign result, TRL loss, tokalign parameter grads, TRL parameter grads)."""
    model, tok = trainer.model, trainer.processing_class
    prompt_ids, completion_ids, cmask, adv, g = _grpo_case(len(tok), tok.pad_token_id, seed=seed, lengths=lengths)
    p = prompt_ids.shape[1]
    plain = _tk_batch(prompt_ids, completion_ids, cmask, adv, torch.zeros(cmask.shape), None, tok.pad_token_id, 5)
    with torch.no_grad():
        comp = forward(model, plain).logps[:, p - 1:]
    old = comp + noise * torch.randn(comp.shape, generator=g)
    ref = comp + 0.3 * torch.randn(comp.shape, generator=g) if algo.config.beta > 0 else None

    model.zero_grad()
    trl_loss = trainer._compute_loss(model, _trl_inputs(prompt_ids, completion_ids, cmask, adv, old, ref))
    trl_loss.backward()
    g_trl = _param_grads(model)

    model.zero_grad()
    batch = _tk_batch(prompt_ids, completion_ids, cmask, adv, old, ref, tok.pad_token_id, trainer.max_completion_length)
    res = algo.loss(batch, forward(model, batch))
    res.loss.backward()
    return res, trl_loss, _param_grads(model), g_trl


@pytest.mark.parametrize(("loss_type", "beta"), GRPO_CASES)
def test_grpo_parity_tiny_model(tiny_model, tmp_path, loss_type, beta):
    """Real forward passes of the tiny model: TRL's fused-head log-probs vs tokalign's ``tokalign.forward.forward``;
    behaviour/reference log-probs = the model's own ± seeded noise; losses and all parameter gradients match."""
    trainer = _grpo_trainer(tiny_model, tmp_path, loss_type=loss_type, beta=beta)
    algo = GRPO(GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, beta=beta, aggregation=AGGREGATION[loss_type]))
    res, trl_loss, g_tk, g_trl = _tiny_model_parity(trainer, algo, seed=31)
    tk_loss = res.loss

    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    worst = _assert_same_grads(g_trl, g_tk)
    print(f"\nGRPO {loss_type} β={beta} tiny model: |Δloss| = {_max_abs(tk_loss, trl_loss):.2e}, max|Δgrad| = {worst:.2e}")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_parity_gradient_accumulation(tiny_model, tmp_path, loss_type):
    """Two micro-batches of 2 rows (one group each; 9 and 3 completion tokens): TRL with gradient_accumulation_steps=2
    (``num_items_in_batch`` = tokens of the whole generation batch, as _generate_and_score_completions sets it) vs
    tokalign's ``micro_batches`` with the batch totals. Summed losses and accumulated gradients match, and equal the
    full-batch tokalign loss. ("bnpo" is left out: it normalises by each micro-batch's own token count.)"""
    trainer = _grpo_trainer(tiny_model, tmp_path, loss_type=loss_type, beta=0.04, batch_size=2, grad_accum=2)
    model, tok = trainer.model, trainer.processing_class
    prompt_ids, completion_ids, cmask, adv, g = _grpo_case(len(tok), tok.pad_token_id, seed=32)
    p = prompt_ids.shape[1]
    plain = _tk_batch(prompt_ids, completion_ids, cmask, adv, torch.zeros(cmask.shape), None, tok.pad_token_id, 5)
    with torch.no_grad():
        comp = forward(model, plain).logps[:, p - 1:]
    old = comp + 0.4 * torch.randn(comp.shape, generator=g)
    ref = comp + 0.3 * torch.randn(comp.shape, generator=g)

    model.zero_grad()
    trl_total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        # the micro-batch's completions, cut to its own longest completion as TRL's padding would
        width = int(cmask[rows].sum(-1).max())
        inputs = _trl_inputs(prompt_ids[rows], completion_ids[rows, :width], cmask[rows, :width], adv[rows],
                             old[rows, :width], ref[rows, :width], num_items=cmask.sum())
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        trl_total += float(loss)
    g_trl = _param_grads(model)

    model.zero_grad()
    batch = _tk_batch(prompt_ids, completion_ids, cmask, adv, old, ref, tok.pad_token_id, trainer.max_completion_length)
    algo = GRPO(GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, aggregation=AGGREGATION[loss_type]))
    with torch.no_grad():
        full = float(algo.loss(batch, forward(model, batch)).loss)
    tk_total = 0.0
    mbs = micro_batches(batch, 2)
    assert [len(mb) for mb in mbs] == [2, 2]
    for mb in mbs:
        loss = algo.loss(mb, forward(model, mb)).loss
        loss.backward()
        tk_total += float(loss)
    g_tk = _param_grads(model)

    assert tk_total == pytest.approx(trl_total, abs=ATOL)
    assert tk_total == pytest.approx(full, abs=ATOL)
    worst = _assert_same_grads(g_trl, g_tk)
    print(f"\nGRPO {loss_type} grad-accum 2: |Δloss| = {abs(tk_total - trl_total):.2e}, max|Δgrad| = {worst:.2e}")


_REWARDS = [1.0, 0.0, 0.25, 0.75, 0.5, 0.5]


def _reward_fixed(completions, **kwargs):
    return _REWARDS[: len(completions)]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_parity_advantages_and_loss_end_to_end(tiny_model, tmp_path, scale_rewards):
    """TRL samples 3 groups × 2 completions from the tiny model and scores them (rewards (1, 0 | 0.25, 0.75 |
    0.5, 0.5)) in GRPOTrainer._generate_and_score_completions. tokalign's GRPO.prepare (adv_eps = 1e-4, TRL's
    constant) on the same rewards and group ids gives TRL's advantages; then the loss on TRL's own batch (on-policy:
    TRL uses per_token_logps.detach() as the behaviour log-probs, tokalign's loop does the same) and its gradients
    match, with scale_rewards="none" ↔ Dr.GRPO's centred advantages."""
    trainer = _grpo_trainer(tiny_model, tmp_path, loss_type="grpo", beta=0.0, batch_size=6, max_completion_length=4,
                            scale_rewards=scale_rewards, reward=_reward_fixed, cache=False)
    model, tok = trainer.model, trainer.processing_class
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": "hello world"}] * 6)
    cmask, pmask = out["completion_mask"], out["prompt_mask"]
    assert bool(pmask.all())  # one prompt: no left padding

    seqs = [Seq(out["prompt_ids"][i].tolist(), out["completion_ids"][i, : int(cmask[i].sum())].tolist(), i // 2,
                row={"rewards": _REWARDS[i]}) for i in range(6)]
    batch = collate(seqs, tok.pad_token_id, trainer.max_completion_length)
    algo = GRPO(GRPOConfig(scale_rewards=scale_rewards, adv_eps=1e-4, aggregation="seq-mean-token-mean"))
    algo.prepare(batch)
    print(f"\nGRPO advantages scale_rewards={scale_rewards}: max|ΔA| = {_max_abs(batch.fields['advantages'], out['advantages']):.2e}")
    assert_close(batch.fields["advantages"], out["advantages"], atol=ATOL, rtol=0)
    assert float(out["advantages"].abs().max()) > 0.1

    model.zero_grad()
    trl_loss = trainer._compute_loss(model, out)
    trl_loss.backward()
    g_trl = _param_grads(model)

    model.zero_grad()
    pol = forward(model, batch)
    batch.fields["old_logps"] = pol.logps.detach()
    tk_loss = algo.loss(batch, pol).loss
    tk_loss.backward()
    g_tk = _param_grads(model)
    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    _assert_same_grads(g_trl, g_tk)


# ---------------------------------------------------------------------------------------------------
# GSPO

LENGTHS = (5, 2, 4, 1, 3, 5, 2, 4)  # 8 completions, 4 groups of 2 (GSPO)


def _gspo_trainer(model_dir, out_dir, *, loss_type, beta, epsilon, epsilon_high) -> GRPOTrainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TRLGRPOConfig(
        output_dir=str(out_dir), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True, seed=0,
        per_device_train_batch_size=8, num_generations=2, max_completion_length=5, beta=beta, loss_type=loss_type,
        epsilon=epsilon, epsilon_high=epsilon_high, use_bias_correction_kl=False, importance_sampling_level="sequence",
    )
    trainer = GRPOTrainer(model=model, reward_funcs=_reward_constant, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hello world"] * 8}), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


# (ε_low, ε_high, behaviour-noise scale): GSPO's own narrow band with per-token noise 1e-3 (sequence log-ratios of
# a few 1e-4, so some sequences fall inside the band and some outside), and a GRPO-like band with noise 0.4
GSPO_CLIPS = [(3e-4, 4e-4, 1e-3), (0.2, 0.28, 0.4)]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("eps_low", "eps_high", "noise"), GSPO_CLIPS)
def test_gspo_parity_random_logps(tiny_model, tmp_path, loss_type, beta, eps_low, eps_high, noise):
    """Random per-token log-probs (behaviour = policy + seeded noise, reference = policy ± 0.3), random advantages,
    8 completions of lengths 1–5: tokalign GSPO equals GRPOTrainer._compute_loss with importance_sampling_level=
    "sequence" — loss and gradient w.r.t. every per-token policy log-prob; some sequences are clipped, some not."""
    trainer = _gspo_trainer(tiny_model, tmp_path, loss_type=loss_type, beta=beta, epsilon=eps_low, epsilon_high=eps_high)
    algo = GSPO(GSPOConfig(epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, aggregation=AGGREGATION[loss_type]))
    res, tk_logps, trl_loss, trl_logps = _random_logps_parity(trainer, algo, seed=45, lengths=LENGTHS, noise=noise)

    assert 0.0 < res.metrics["clip_fraction"] < 1.0
    print(f"\nGSPO {loss_type} β={beta} ε=({eps_low},{eps_high}) random logps: |Δloss| = "
          f"{_max_abs(res.loss, trl_loss):.2e}, max|Δgrad| = {_max_abs(tk_logps.grad, trl_logps.grad):.2e}")
    assert_close(res.loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logps.grad, trl_logps.grad, atol=ATOL, rtol=0)
    assert float(trl_logps.grad.abs().max()) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_parity_tiny_model(tiny_model, tmp_path, beta):
    """Real forward passes of the tiny model (TRL's fused-head log-probs vs ``tokalign.forward.forward``), behaviour
    log-probs = the model's own + 1e-3 noise, GSPO's default band and aggregation: losses and all parameter gradients
    match."""
    trainer = _gspo_trainer(tiny_model, tmp_path, loss_type="grpo", beta=beta, epsilon=3e-4, epsilon_high=4e-4)
    res, trl_loss, g_tk, g_trl = _tiny_model_parity(trainer, GSPO(GSPOConfig(beta=beta)), seed=41, lengths=LENGTHS,
                                                    noise=1e-3)

    assert 0.0 < res.metrics["clip_fraction"] < 1.0
    assert_close(res.loss, trl_loss, atol=ATOL, rtol=0)
    worst = _assert_same_grads(g_trl, g_tk)
    print(f"\nGSPO β={beta} tiny model: |Δloss| = {_max_abs(res.loss, trl_loss):.2e}, max|Δgrad| = {worst:.2e}")


# ---------------------------------------------------------------------------------------------------
# SimPO

_PREFS = {"prompt": ["hello world", "2+3=", "abc", "x"], "chosen": [" yes", "5", " d e f", " y z"],
          "rejected": [" no no", "6", " x", " w w w w"]}


def _cpo_trainer(model_dir, out_dir, *, beta, gamma, label_smoothing=0.0, policy=None) -> CPOTrainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = policy if policy is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    args = CPOConfig(output_dir=str(out_dir), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True,
                     per_device_train_batch_size=len(_PREFS["prompt"]), loss_type="simpo", cpo_alpha=0.0, beta=beta,
                     simpo_gamma=gamma, label_smoothing=label_smoothing)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_dict(_PREFS), processing_class=tok)
    trainer.model.train()
    return trainer


def _cpo_batch(trainer) -> tuple[dict, TokenBatch]:
    """TRL's collated batch, and the same rows as a tokalign TokenBatch: TRL's concatenated layout
    [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}], right-padded, completion = labels ≠ -100."""
    inputs = next(iter(trainer.get_train_dataloader()))
    cat = trainer.concatenated_inputs(inputs, is_encoder_decoder=False, padding_value=trainer.pad_token_id, device="cpu")
    p = inputs["chosen_input_ids"].shape[0]
    batch = TokenBatch(
        input_ids=cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"],
        completion_mask=(cat["concatenated_labels"][:, 1:] != -100).float(),
        fields={"is_chosen": torch.tensor([1.0] * p + [0.0] * p), "group_ids": torch.arange(p).repeat(2)},
        totals={"groups": float(p)},
    )
    return inputs, batch


class LogitStub(torch.nn.Module):
    """Stands in for the causal LM in ``CPOTrainer.concatenated_forward``: returns the given logits [2P, L, V]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


SIMPO_CASES = [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.0), (2.0, 0.5, 0.2)]


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), SIMPO_CASES)
def test_simpo_parity_random_logits(tiny_model, tmp_path, beta, gamma, label_smoothing):
    """Random logits [2P, L, V] for TRL's own tokenised batch of 4 pairs (completion lengths 2–5): CPOTrainer's
    simpo loss (TRL's length-averaged log-probs, cpo_loss, mean over pairs) equals tokalign's
    ``selective_log_softmax`` + SimPO.loss; gradients w.r.t. every logit match."""
    trainer = _cpo_trainer(tiny_model, tmp_path, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    inputs, batch = _cpo_batch(trainer)
    g = torch.Generator().manual_seed(50)
    logits = torch.randn(*batch.input_ids.shape, len(trainer.processing_class), generator=g) * 3

    trl_logits = logits.clone().requires_grad_(True)
    trl_loss = trainer.compute_loss(LogitStub(trl_logits), inputs)
    trl_loss.backward()

    tk_logits = logits.clone().requires_grad_(True)
    logps = ops.selective_log_softmax(tk_logits[:, :-1], batch.input_ids[:, 1:])
    tk_loss = SimPO(SimPOConfig(beta=beta, gamma=gamma, label_smoothing=label_smoothing)).loss(batch, PolicyOutput(logps)).loss
    tk_loss.backward()

    print(f"\nSimPO β={beta} γ={gamma} s={label_smoothing} random logits: |Δloss| = {_max_abs(tk_loss, trl_loss):.2e}, "
          f"max|Δgrad| = {_max_abs(tk_logits.grad, trl_logits.grad):.2e}")
    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    assert_close(tk_logits.grad, trl_logits.grad, atol=ATOL, rtol=0)
    assert float(trl_logits.grad.abs().max()) > 1e-3
    # γ is the margin itself, not γ/β: reading it as γ/β gives another loss
    wrong = SimPO(SimPOConfig(beta=beta, gamma=gamma * beta, label_smoothing=label_smoothing)).loss(batch, PolicyOutput(logps))
    assert abs(float(wrong.loss.detach()) - float(trl_loss.detach())) > 1e-3


def test_simpo_parity_tiny_model(tiny_model, tmp_path):
    """Real forward passes of the tiny model, SimPO defaults β = 2, γ = 0.5 (4 pairs):
    CPOTrainer.compute_loss and tokalign's forward + SimPO.loss give the same loss and parameter gradients."""
    trainer = _cpo_trainer(tiny_model, tmp_path, beta=2.0, gamma=0.5)
    model = trainer.model
    inputs, batch = _cpo_batch(trainer)

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    g_trl = _param_grads(model)

    model.zero_grad()
    tk_loss = SimPO(SimPOConfig()).loss(batch, forward(model, batch)).loss
    tk_loss.backward()
    g_tk = _param_grads(model)

    assert_close(tk_loss, trl_loss, atol=ATOL, rtol=0)
    worst = _assert_same_grads(g_trl, g_tk)
    print(f"\nSimPO defaults tiny model: |Δloss| = {_max_abs(tk_loss, trl_loss):.2e}, max|Δgrad| = {worst:.2e}")


# ---------------------------------------------------------------------------------------------------
# RLOO advantages

_RLOO_REWARDS = [1.0, 0.0, 0.0, 0.25, 0.75, 0.5, 0.5, 0.5, 1.0]


def _rloo_reward_fixed(completions, **kwargs):
    return _RLOO_REWARDS[: len(completions)]


def test_rloo_advantages_parity_end_to_end(tiny_model, tmp_path):
    """TRL's RLOOTrainer samples 3 groups × 3 completions from the tiny model and scores them (rewards (1, 0, 0 |
    0.25, 0.75, 0.5 | 0.5, 0.5, 1)) in _generate_and_score_completions; tokalign's RLOO.prepare on the same rewards
    and group ids gives TRL's advantages, e.g. group 1: 1 − 0 = 1, 0 − 0.5 = −0.5, −0.5."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = TRLRLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True,
                         seed=0, per_device_train_batch_size=9, num_generations=3, max_completion_length=4, beta=0.0,
                         normalize_advantages=False)
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), reward_funcs=_rloo_reward_fixed, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hello world"] * 9}), processing_class=tok)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": "hello world"}] * 9)
    cmask = out["completion_mask"]
    seqs = [Seq(out["prompt_ids"][i].tolist(), out["completion_ids"][i, : int(cmask[i].sum())].tolist(), i // 3,
                row={"rewards": _RLOO_REWARDS[i]}) for i in range(9)]
    batch = RLOO(RLOOConfig()).prepare(collate(seqs, tok.pad_token_id))
    print(f"\nRLOO advantages: max|ΔA| = {_max_abs(batch.fields['advantages'], out['advantages']):.2e}")
    assert_close(batch.fields["advantages"], out["advantages"], atol=ATOL, rtol=0)
    assert_close(batch.fields["advantages"][:3], torch.tensor([1.0, -0.5, -0.5]))
