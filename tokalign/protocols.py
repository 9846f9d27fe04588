"""The contracts between tokalign's core and its plug-ins.

Shapes use B = rows in a batch, L = padded sequence length; per-token tensors over a sequence
are ``[B, L-1]`` and aligned with the *predicted* token (position ``t`` holds the log-prob of
``input_ids[:, t+1]``), and ``completion_mask`` marks the completion tokens among them.

Plug-in kinds:

* **Verifier** — ``verify(sample: Sample) -> Verdict``. Optional: ``answer(sample) -> str | None``, the
  sample's final answer as a comparable string (None: no answer), which ``eval``'s maj@k votes on;
  without it the stripped completion is the answer.
* **Reward function** — batched ``__call__(samples: list[Sample]) -> list[Reward | float]``.
  ``Reward.token_values``, when given, holds exactly one value per completion token
  (``len(sample.completion_ids)``): this is the per-token reward contract, carried by ``score``
  into the ``token_rewards`` column of the ``scored`` artifact. A verifier is usable as a reward
  (its ``Verdict.score`` becomes the value).
* **Task** — a class with ``splits`` and ``records(split) -> list[dict]`` in a TRL dataset format,
  optionally ``default_reward`` (the reward online training uses when none is given). A task whose
  constructor takes one argument also answers ``NAME:ARG`` data sources (``gsm8k:data/train.jsonl``:
  a local copy of its dataset), built as ``Task(ARG)``.
* **Algorithm** — a class with a ``Config`` dataclass (defaults = the paper's), constructed as
  ``Algo(config)``; ``needs`` says which data and models it wants; ``prepare(batch)`` (called once
  per step, after ``ref_logps``/``old_logps`` are in ``batch.fields``) computes
  advantages/targets without gradients; ``loss(batch, out) -> LossOutput``. An algorithm with
  state across steps (e.g. running statistics per prompt, keyed by ``batch.fields["prompt_index"]``)
  defines ``state_dict()``/``load_state_dict(d)`` and resumes with the run. Optional hooks the online
  source uses: ``prompt_weights(n_prompts)`` (prioritised prompt sampling) and ``adaptive_sampling``
  (an object with ``max_rounds``, ``round_n`` and ``select(pool, n, final)``: per-prompt multi-round
  sampling); with ``needs.trained_models``, ``aux_lr(role)`` and ``aux_loss(role, batch, out)``. The
  train loop never branches on algorithm names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays out of `--help`
    import torch


@dataclass
class Sample:
    """One completion as rewards and verifiers see it."""

    id: str
    prompt: Any  # str, or a list of {"role", "content"} messages
    completion: str
    completion_ids: list[int] = field(default_factory=list)
    reference: Any = None  # ground truth: answer string, tests, ...
    finish_reason: str = "stop"  # "stop" | "length"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    passed: bool
    score: float
    detail: str = ""
    first_error_token: int | None = None  # index into completion_ids, when the verifier knows


@dataclass
class Reward:
    value: float
    token_values: list[float] | None = None  # one per completion token, or None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    def verify(self, sample: Sample) -> Verdict: ...


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, samples: list[Sample]) -> list[Reward | float]: ...


@dataclass(frozen=True)
class Needs:
    """What an algorithm asks of the train loop."""

    data: tuple[str, ...]  # what it trains on, in order of preference: "online", "scored", "pairs", "completions"
    reference: bool = False  # frozen reference model log-probs (batch.fields["ref_logps"])
    groups: bool = False  # several samples per prompt (rollout.n > 1)
    old_logps: bool = False  # behaviour-policy log-probs (batch.fields["old_logps"])
    old_logps_upfront: bool = False  # ... computed before prepare() even with one update per batch (KL in the reward)
    value_head: bool = False  # a trainable critic V(s_t) on the policy's trunk: PolicyOutput.values, fields["old_values"]
    greedy_baseline: bool = False  # online: one greedy completion per prompt, scored, in fields["baseline"] (ReMax)
    informative_groups: bool = False  # drop groups whose rewards are all equal; online: resample to refill
    full_vocab: bool = False  # PolicyOutput.logits (and .ref_logits with reference=True), per micro-batch
    # roles of extra frozen models (e.g. "teacher"): the user names each with --with ROLE=PATH (or
    # --teacher PATH) and the loop puts their per-token log-probs in batch.fields["<role>_logps"]
    models: tuple[str, ...] = ()
    # roles of extra models the algorithm *trains* beside the policy (PRIME's implicit PRM): each starts from
    # --with ROLE=PATH or else the starting model, has its own optimiser (lr from the algorithm's aux_lr(role)),
    # is updated once per step on aux_loss(role, batch, out) before prepare(), and its per-token log-probs from
    # that update's forward pass (before the update) are in batch.fields["<role>_logps"]; saved in <out>/<role>/
    trained_models: tuple[str, ...] = ()
    # online: this many completions per prompt sampled from the *reference* model (seeded per prompt, cached) and
    # scored with the run's rewards, in fields["ref_reward_0" ...] (PAR's reference rewards)
    reference_samples: int = 0
    hidden_states: bool = False  # PolicyOutput.hidden: the policy's final hidden states (detached), per micro-batch
    # names of prompt variants: for each, the algorithm's prompt_variant(name, prompt) rewrites a row's prompt and the
    # reference model's log-probs of the *same* completion after it land in batch.fields["<name>_logps"] (T-REG)
    prompt_variants: tuple[str, ...] = ()


@dataclass
class TokenBatch:
    """A padded batch. ``fields`` holds per-row ``[B]`` or per-token ``[B, L-1]`` tensors
    (rewards, group_ids, prompt_index — stable across steps —, advantages, old_logps, ref_logps,
    token_rewards, ...).

    ``totals`` holds global denominators (``tokens``, ``seqs``, ``pairs``) of the *whole*
    optimiser batch, so a loss summed over micro-batches equals the full-batch loss exactly.
    """

    input_ids: "torch.Tensor"  # [B, L] long
    attention_mask: "torch.Tensor"  # [B, L] long
    completion_mask: "torch.Tensor"  # [B, L-1] float, 1 on completion tokens
    fields: dict[str, "torch.Tensor"] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def aggregate(self, values: "torch.Tensor", mode: str) -> "torch.Tensor":
        """Reduce per-token ``values`` [B, L-1] over the completion tokens with one of
        ``ops.AGGREGATIONS``, normalised by the whole optimiser batch's totals (so micro-batch
        results sum to the full-batch value)."""
        from tokalign import ops

        t = self.totals
        return ops.aggregate(values, self.completion_mask, mode, total_tokens=t.get("tokens"), total_seqs=t.get("seqs"),
                             max_len=t.get("max_completion_len"))

    def select(self, index: "torch.Tensor") -> "TokenBatch":
        """Rows ``index`` of every tensor; totals are kept (they are global)."""
        return TokenBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            completion_mask=self.completion_mask[index],
            fields={k: v[index] for k, v in self.fields.items()},
            totals=dict(self.totals),
        )


@dataclass
class PolicyOutput:
    logps: "torch.Tensor"  # [B, L-1] log π_θ of each next token (with grad)
    entropy: "torch.Tensor | None" = None  # [B, L-1], no grad, for metrics
    logits: "torch.Tensor | None" = None  # [B, L-1, V] policy logits (with grad), only with Needs.full_vocab
    values: "torch.Tensor | None" = None  # [B, L-1] value-head outputs V(s_t) (with grad), only with Needs.value_head
    # [B, L-1, V] reference logits (no grad) with full_vocab + reference: a tensor, or an ops.HeadLogits
    # whose .split(rows) yields them chunk by chunk; ops.position_kl takes either
    ref_logits: Any = None
    # the same for each extra frozen model (Needs.models) when full_vocab: {role: logits or HeadLogits}
    extra_logits: dict = field(default_factory=dict)
    hidden: "torch.Tensor | None" = None  # [B, L-1, H] final hidden states (no grad), only with Needs.hidden_states


@dataclass
class LossOutput:
    loss: "torch.Tensor"  # scalar, this micro-batch's share of the batch loss
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Algorithm(Protocol):
    Config: type
    needs: Needs

    def prepare(self, batch: TokenBatch) -> TokenBatch: ...

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput: ...


def check_plugin(kind: str, obj: Any) -> str | None:
    """None if ``obj`` satisfies the protocol of its kind, else the reason in one line."""
    if kind == "algorithm":
        if not isinstance(obj, type):
            return "an algorithm entry point must name a class"
        cfg = getattr(obj, "Config", None)
        if cfg is None or not dataclasses.is_dataclass(cfg):
            return "algorithm class needs a dataclass attribute 'Config'"
        for attr in ("loss", "prepare"):
            if not callable(getattr(obj, attr, None)):
                return f"algorithm class lacks a '{attr}' method"
        try:
            needs = getattr(obj(cfg()), "needs", None)
        except Exception as e:
            return f"cannot construct with its default Config: {type(e).__name__}: {e}"
        if not isinstance(needs, Needs):
            return "algorithm instances need a 'needs' attribute of type tokalign.protocols.Needs"
        return None
    if kind == "verifier":
        return None if callable(getattr(obj, "verify", None)) else "verifier lacks a verify(sample) method"
    if kind == "reward":
        if isinstance(obj, type):
            has_call = any("__call__" in vars(c) for c in obj.__mro__[:-1])
        else:
            has_call = callable(obj)
        return None if has_call or hasattr(obj, "verify") else "reward must be callable(samples) -> list[Reward]"
    if kind == "task":
        ok = callable(getattr(obj, "records", None)) and isinstance(getattr(obj, "splits", None), (tuple, list))
        return None if ok else "task must have 'splits' (a tuple of names) and records(split) -> list[dict]"
    return f"unknown plug-in kind {kind!r}"
