"""Parity of tokalign's GSPO, SimPO and RLOO with TRL 1.16: equal losses AND equal gradients (atol 1e-6), on random
inputs and on a real tiny model. TRL is a test-only dependency; helpers come from tests/test_trl_parity.py.

What is driven in TRL (line numbers in the installed trl 1.16.0):

* GSPO — ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py:3020) with ``importance_sampling_level="sequence"``:
  the log-weight is the masked per-sequence mean of ℓ − ℓ_old, shape (B, 1), *with* gradient through every token
  (:3088-3090), clipped as in GRPO (:3112-3120) and broadcast over the tokens; aggregation ``loss_type="grpo"`` ↔
  seq-mean-token-mean (:3154), ``"dapo"`` ↔ token-mean (:3170). tokalign uses the token form
  ℓ_t − sg(ℓ_t) + sg(log s_i) (verl ``compute_policy_loss_gspo``), which has the same value and gradient.
  Pinned as in test_trl_parity: ``bf16=False``, ``use_bias_correction_kl=False``.
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
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_trl_parity import (  # noqa: E402
    ATOL,
    _assert_same_grads,
    _max_abs,
    _param_grads,
    _random_logps_parity,
    _tiny_model_parity,
    _reward_constant,
)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig as TRLGRPOConfig  # noqa: E402
from trl import GRPOTrainer, RLOOConfig as TRLRLOOConfig, RLOOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

from tokalign import ops  # noqa: E402
from tokalign.algorithms.gspo import GSPO, GSPOConfig  # noqa: E402
from tokalign.algorithms.rloo import RLOO, RLOOConfig  # noqa: E402
from tokalign.algorithms.simpo import SimPO, SimPOConfig  # noqa: E402
from tokalign.protocols import PolicyOutput, TokenBatch  # noqa: E402
from tokalign.batching import Seq, collate  # noqa: E402
from tokalign.forward import forward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
AGGREGATION = {"grpo": "seq-mean-token-mean", "dapo": "token-mean"}
LENGTHS = (5, 2, 4, 1, 3, 5, 2, 4)  # 8 completions, 4 groups of 2


# ---------------------------------------------------------------------------------------------------
# GSPO


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

_REWARDS = [1.0, 0.0, 0.0, 0.25, 0.75, 0.5, 0.5, 0.5, 1.0]


def _reward_fixed(completions, **kwargs):
    return _REWARDS[: len(completions)]


def test_rloo_advantages_parity_end_to_end(tiny_model, tmp_path):
    """TRL's RLOOTrainer samples 3 groups × 3 completions from the tiny model and scores them (rewards (1, 0, 0 |
    0.25, 0.75, 0.5 | 0.5, 0.5, 1)) in _generate_and_score_completions; tokalign's RLOO.prepare on the same rewards
    and group ids gives TRL's advantages, e.g. group 1: 1 − 0 = 1, 0 − 0.5 = −0.5, −0.5."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = TRLRLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False, disable_tqdm=True,
                         seed=0, per_device_train_batch_size=9, num_generations=3, max_completion_length=4, beta=0.0,
                         normalize_advantages=False)
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), reward_funcs=_reward_fixed, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hello world"] * 9}), processing_class=tok)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": "hello world"}] * 9)
    cmask = out["completion_mask"]
    seqs = [Seq(out["prompt_ids"][i].tolist(), out["completion_ids"][i, : int(cmask[i].sum())].tolist(), i // 3,
                row={"rewards": _REWARDS[i]}) for i in range(9)]
    batch = RLOO(RLOOConfig()).prepare(collate(seqs, tok.pad_token_id))
    print(f"\nRLOO advantages: max|ΔA| = {_max_abs(batch.fields['advantages'], out['advantages']):.2e}")
    assert_close(batch.fields["advantages"], out["advantages"], atol=ATOL, rtol=0)
    assert_close(batch.fields["advantages"][:3], torch.tensor([1.0, -0.5, -0.5]))
