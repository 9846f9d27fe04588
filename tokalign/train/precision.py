"""``train.precision``: what the weights are stored in and what models compute in.

==========  ==================  =====================  =========================================
precision   trained weights     frozen models          compute
==========  ==================  =====================  =========================================
fp32        float32             float32                float32
bf16-mixed  float32 (masters;   bfloat16 (no master    bfloat16 under torch.autocast; log-softmax,
            AdamW state fp32)   needed)                ratios and losses in float32
bf16        bfloat16            bfloat16               bfloat16 (updates below bf16's resolution
                                                       round away: for memory-bound experiments)
==========  ==================  =====================  =========================================

``auto`` is bf16-mixed on CUDA, fp32 elsewhere. Under FSDP2, bf16-mixed is its MixedPrecisionPolicy (bf16
parameters in compute, fp32 gradient reduction)."""

from __future__ import annotations

from dataclasses import dataclass

from tokalign.errors import UserError

CHOICES = ("auto", "fp32", "bf16-mixed", "bf16")


@dataclass(frozen=True)
class Precision:
    name: str
    weights: str  # dtype name for trained models (models.load_model)
    frozen: str  # ... and for frozen ones
    compute: str | None  # autocast dtype name, or None

    def compute_dtype(self):
        import torch

        return {"bfloat16": torch.bfloat16, None: None}[self.compute]


def resolve(name: str, device: str) -> Precision:
    if name not in CHOICES:
        raise UserError(f"train.precision must be one of {', '.join(CHOICES)}, got '{name}'.")
    if name == "auto":
        name = "bf16-mixed" if str(device).startswith("cuda") else "fp32"
    return {"fp32": Precision("fp32", "float32", "float32", None),
            "bf16-mixed": Precision("bf16-mixed", "float32", "bfloat16", "bfloat16"),
            "bf16": Precision("bf16", "bfloat16", "bfloat16", None)}[name]
