"""Device placement on the GPU: for algorithms that between them use every batch component (reference, full-vocabulary
reference logits, prompt variants, a value head, a trained second model, behaviour log-probs) and both kinds of data
(online sampling with transformers on the GPU, preference pairs), two in-process steps in the default precision; every
model, every tensor of the prepared batch, of each micro-batch and of each policy output, and the optimiser's state
are on the GPU. (The collectives' placement: tests/gpu/test_two_processes_gpu.py.)"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import DEVICE, GPU, ON_CUDA, Recorder, models_of, offline, online, pairs_file, train_state

from tokalign.train.loop import step_once

pytestmark = GPU

# algorithm -> (data, the models it holds besides the policy, fields of its prepared batch, outputs of its policy forward)
CASES = {
    "grpo": ("online", set(), {"rewards", "advantages", "sampler_logps"}, {"logps", "entropy"}),
    "sspo": ("online", set(), {"rewards", "advantages"}, {"logps"}),
    "ppo": ("online", {"reference", "value_head"}, {"ref_logps", "old_values", "old_logps", "returns"}, {"values", "hidden"}),
    "prime": ("online", {"reference", "prm"}, {"ref_logps", "prm_logps", "process_rewards"}, {"logps"}),
    "dpo": ("pairs", {"reference"}, {"ref_logps", "is_chosen"}, {"logps"}),
    "tdpo": ("pairs", {"reference"}, {"ref_logps"}, {"logits", "ref_logits"}),  # ref_logits: a tensor or chunked (HeadLogits)
    "treg": ("pairs", {"reference"}, {"ref_logps", "better_logps", "worse_logps"}, {"logps"}),
}
def _off(where: str, name: str, t: torch.Tensor) -> list[str]:
    return [] if t.device.type == DEVICE else [f"{where}: {name} on {t.device}"]


@pytest.mark.parametrize("algo", list(CASES))
def test_every_model_batch_and_output_tensor_is_on_the_device(monkeypatch, tmp_path, algo):
    data, extra_models, fields, outputs = CASES[algo]
    layer = online(micro_batch_size=4) if data == "online" else offline(pairs_file(tmp_path), micro_batch_size=4)
    if algo == "prime":
        layer["reward"] = ["exact_match"]
    state = train_state(monkeypatch, algo, layer)
    assert state.device.type == DEVICE
    held = models_of(state)
    assert set(held) == {"policy", *extra_models}
    rec = Recorder(state)
    for step in range(2):
        metrics = step_once(state, step)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    off = [m for role, model in held.items() for name, t in [*model.named_parameters(), *model.named_buffers()]
           for m in _off(role, name, t)]
    assert len(rec.prepared) == 2 and len(rec.losses) >= 2
    for k, tensors in enumerate(rec.prepared):
        assert fields <= {n[len("fields["):-1] for n in tensors if n.startswith("fields[")}
        off += [m for name, t in tensors.items() for m in _off(f"prepared batch {k}", name, t)]
    for k, (tensors, loss) in enumerate(rec.losses):
        assert outputs <= {name.split(".")[0] for name in tensors}
        off += [m for name, t in [*tensors.items(), ("loss", loss)] for m in _off(f"micro-batch {k}", name, t)]
    optimisers = {"policy": state.optimizer, **{c.name: c.optimizer for c in state.components if getattr(c, "optimizer", None)}}
    for role, opt in optimisers.items():
        assert opt.state, f"{role}: the optimiser has no state after two steps"
        off += [m for s in opt.state.values() for name, t in s.items() if name != "step" for m in _off(f"{role} optimiser", name, t)]
    assert not off, "\n".join(off)
    if ON_CUDA:  # the policy trained in bf16 (auto: bf16-mixed on CUDA)
        assert rec.head_dtypes["policy"] == {torch.bfloat16}
