"""train.precision on the GPU, in-process DPO steps on the bundled model (a policy and a frozen reference):
bf16-mixed keeps float32 master weights, gradients and AdamW state while both models compute in bfloat16 (log-probs
and the loss in float32); fp32 and bf16 store and compute in their own dtype; ``auto`` is bf16-mixed on CUDA; and,
as on the CPU (tests/train/test_precision.py), bf16-mixed's small updates follow fp32's while pure bf16 rounds most of
them away."""

from __future__ import annotations

import math

import pytest
import torch
from gpu_helpers import DEVICE, GPU, ON_CUDA, Recorder, models_of, offline, pairs_file, train_state

from tokalign.train.loop import step_once

pytestmark = GPU
F32, BF16 = torch.float32, torch.bfloat16
# precision -> (trained weights, frozen models, what the models compute in)
DTYPES = {"fp32": (F32, F32, F32), "bf16-mixed": (F32, BF16, BF16), "bf16": (BF16, BF16, BF16)}


def _dpo(monkeypatch, tmp_path, precision: str, steps: int = 1, lr: float = 1e-6):
    state = train_state(monkeypatch, "dpo", offline(pairs_file(tmp_path), precision=precision, lr=lr, max_steps=steps,
                                                    micro_batch_size=4))
    rec = Recorder(state)
    w0 = {k: v.detach().clone() for k, v in state.policy.state_dict().items()}
    metrics = [step_once(state, s) for s in range(steps)]
    return state, rec, w0, metrics


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32", "bf16"])
def test_weights_compute_and_loss_dtypes(monkeypatch, tmp_path, precision):
    weights, frozen, compute = DTYPES[precision]
    state, rec, _, metrics = _dpo(monkeypatch, tmp_path, precision)
    assert state.precision.name == precision
    held = models_of(state)
    assert set(held) == {"policy", "reference"}
    for p in state.policy.parameters():
        assert p.dtype == weights and p.device.type == DEVICE
        assert p.grad is not None and p.grad.dtype == weights  # gradients of the master weights, in their dtype
    assert all(p.dtype == frozen and p.device.type == DEVICE for p in held["reference"].parameters())
    # every LM-head output (policy in training and the reference's frozen pass) was computed in the compute dtype
    assert rec.head_dtypes == {"policy": {compute}, "reference": {compute}}
    for tensors, loss in rec.losses:
        assert tensors["logps"].dtype == F32 and tensors["fields[ref_logps]"].dtype == F32  # log-softmax in float32
        assert loss.dtype == F32 and torch.isfinite(loss)
    for group in state.optimizer.state.values():  # AdamW's moments: float32 beside float32 masters
        assert group["exp_avg"].dtype == weights and group["exp_avg_sq"].dtype == weights
        assert group["exp_avg"].device.type == DEVICE
    # step 1: the policy is the reference, so the margin is 0 and the loss log 2 up to the two models' compute noise
    loss = metrics[0]["loss"]
    assert math.isfinite(loss) and math.isfinite(metrics[0]["grad_norm"])
    assert loss == pytest.approx(math.log(2), abs=1e-4 if precision == "fp32" else 2e-2)


@pytest.mark.skipif(not ON_CUDA, reason="auto is fp32 off CUDA")
def test_auto_is_bf16_mixed_on_cuda(monkeypatch, tmp_path):
    state = train_state(monkeypatch, "dpo", offline(pairs_file(tmp_path)))
    assert state.precision.name == "bf16-mixed" and state.device.type == "cuda"


def test_bf16_mixed_updates_like_fp32_and_pure_bf16_loses_them(monkeypatch, tmp_path):
    """5 steps at lr 1e-6 (Adam moves each weight by about 1e-6 a step, below bf16's resolution at the weights'
    magnitude); the same thresholds as the CPU test."""
    deltas = {}
    for precision in DTYPES:
        state, _, w0, metrics = _dpo(monkeypatch, tmp_path, precision, steps=5)
        assert all(math.isfinite(m["loss"]) for m in metrics)
        w = state.policy.state_dict()
        keys = sorted(k for k in w0 if w0[k].is_floating_point())
        deltas[precision] = torch.cat([(w[k].float() - w0[k].float()).flatten() for k in keys])
    ref, mixed, pure = deltas["fp32"], deltas["bf16-mixed"], deltas["bf16"]
    assert float((ref != 0).float().mean()) > 0.99  # fp32: (nearly) every weight moves
    assert float((mixed != 0).float().mean()) > 0.99
    assert float((mixed - ref).norm() / ref.norm()) < 0.15
    assert float((pure != 0).float().mean()) < 0.1  # most updates rounded away
    assert float((pure - ref).norm() / ref.norm()) > 0.8
