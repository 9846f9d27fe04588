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
  ``Algo(config)``; ``needs`` (a ``Needs``) says which data it trains on and which *batch components* and *sampling
  hooks* it uses; ``prepare(batch)`` (once per step, after every component has filled its fields) computes
  advantages/targets without gradients; ``loss(batch, out) -> LossOutput``. An algorithm with state across steps
  (e.g. running statistics per prompt, keyed by ``batch.fields["prompt_index"]``) is ``Stateful``: it defines
  ``state_dict()``/``load_state_dict(d)`` and resumes with the run.
* **Batch component** (``BatchComponent``; ``tokalign.components`` has the built-ins and a base class) — fills named
  per-row ``[B]`` or per-token ``[B, L-1]`` fields of a step's batch before ``prepare`` (reference log-probs, a
  value head's values, a trained model's log-probs, …) and may touch each training micro-batch's ``PolicyOutput``;
  it may own models, parameters, an optimiser and state, which are checkpointed and resumed with the run.
* **Sampling hook** (``SamplingHook``; ``tokalign.sampling`` has the built-ins and a base class) — steers online
  sampling: weights for picking prompts, which groups to accept (and so how often to resample), the whole per-step
  collection (multi-round adaptive sampling), and extra samples or values added to the chosen rows (a greedy
  baseline, reference samples, segment values).
* **Logits processor** (``LogitsProcessor``; ``tokalign.decoding`` has the built-ins and the plumbing) — a decoding
  hook: changes each sampled token's next-token logits (and optionally its temperature), the same object in both
  rollout engines. Built as ``Cls(Cls.Config(**options))`` (``Cls()`` without a ``Config``), like a reward.

The train loop is a fixed pipeline over these: it never branches on an algorithm's name or probes it for features.

The public API a plug-in may build on: this module, ``tokalign.ops`` (shared maths), ``tokalign.forward`` (the one
forward path: per-token log-probs, entropies, logits, hidden states), ``tokalign.batching`` (``Seq``, ``collate``,
micro-batches), ``tokalign.rows`` (the row schema: ``rollout_rows``, ``to_sample``), ``tokalign.errors``
(``UserError``: a one-line message, exit code 2), ``tokalign.components``, ``tokalign.sampling``, and the built-in
algorithm classes (to subclass). ``tokalign.train``, ``tokalign.stages`` and ``tokalign.cli`` are internal; the
import contracts in pyproject.toml keep ``tokalign.algorithms`` itself to this surface. Engines'
``generate(prompt_ids, spec)`` return, per prompt, a list of ``tokalign.rollout.Completion`` (ids, logps,
finish_reason, text).
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
    """What an algorithm asks of the train loop: generic requirements, plus the components and hooks it uses."""

    data: tuple[str, ...]  # what it trains on, in order of preference: online, scored, pairs, triples, unpaired, completions, stepwise
    reference: bool = False  # frozen reference model log-probs in batch.fields["ref_logps"] (components.Reference)
    groups: bool = False  # several samples per prompt (rollout.n > 1)
    old_logps: bool = False  # behaviour-policy log-probs in batch.fields["old_logps"] (components.BehaviourLogps)
    full_vocab: bool = False  # PolicyOutput.logits (and .ref_logits / .extra_logits of the frozen models), per micro-batch
    # roles of extra frozen models (e.g. "teacher"): the user names each with --with ROLE=PATH (or --teacher PATH) and
    # their per-token log-probs land in batch.fields["<role>_logps"] (components.FrozenModel)
    models: tuple[str, ...] = ()
    # BatchComponent instances, run in this order after the reference and the frozen models (and before the
    # behaviour log-probs, which are computed only if no component provides them)
    components: tuple = ()
    hooks: tuple = ()  # SamplingHook instances for online training (and their group filters for scored data)
    # the loss is a sum over rows given the fields ``prepare`` filled and the batch's totals (no pairing or group
    # statistics inside ``loss``), so a group larger than a micro-batch may be split across micro-batches
    split_groups: bool = False
    # online multi-turn: the rollout branching it samples with unless rollout.branching says otherwise
    # (tokalign.rollout.branching: "entropy", "tree"; "" = independent episodes); it then needs an environment
    branching: str = ""


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
    values: "torch.Tensor | None" = None  # [B, L-1] value-head outputs V(s_t) (with grad), from components.ValueHead
    # [B, L-1, V] reference logits (no grad) with full_vocab + reference: a tensor, or an ops.HeadLogits
    # whose .split(rows) yields them chunk by chunk; ops.position_kl takes either
    ref_logits: Any = None
    # the same for each extra frozen model (Needs.models) when full_vocab: {role: logits or HeadLogits}
    extra_logits: dict = field(default_factory=dict)
    # [B, L-1, H] the policy's final hidden states (with grad: read them under no_grad) when a component asks for
    # them (forward_outputs = ("hidden",)); values: set by the value-head component from them
    hidden: "torch.Tensor | None" = None


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


@runtime_checkable
class Stateful(Protocol):
    """Anything the train loop checkpoints and resumes: an algorithm, a component or a hook with state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainContext(Protocol):
    """What the train loop gives components (``tokalign.train.state.TrainState`` implements it)."""

    cfg: Any  # the resolved run config (tokalign.config.RunConfig): cfg.train, cfg.rollout, cfg.models, cfg.model
    policy: Any  # the model being trained
    tokenizer: Any
    device: Any
    needs: Needs  # the algorithm's
    resume_from: Any  # the checkpoint directory being resumed (a Path), or None
    step: int  # the current step (0-based), during fill/on_forward
    seqs: list  # the step's sequences (tokalign.batching.Seq: prompt_ids, completion_ids, raw prompt, ...)

    def load_model(self, source: str, trainable: bool = False) -> Any: ...  # a path/hub id, in the run's dtype, on device

    def reference_model(self) -> Any: ...  # the run's frozen reference, loaded once and shared

    def frozen_logps(self, model: Any, batch: TokenBatch) -> "torch.Tensor": ...  # no grad, micro-batched like training

    # fn(micro_batch) -> {name: [b, T] tensor} over the whole batch, micro-batched like training and shared between
    # processes (each computes its share of the rows; all get every row); models: those fn runs
    def map_micro_batches(self, batch: TokenBatch, fn: Any, *models: Any) -> dict[str, "torch.Tensor"]: ...

    def micro_batches(self, batch: TokenBatch) -> list[TokenBatch]: ...  # the run's micro-batching


@runtime_checkable
class BatchComponent(Protocol):
    """Fills named fields of every step's batch. ``tokalign.components.Component`` implements every method as a no-op;
    subclass it and override what you need. Called in this order: ``setup`` once (models load here; on resume
    ``ctx.resume_from`` holds the checkpoint, and ``load_state_dict`` follows with what ``state_dict`` returned), then
    each step ``fill`` (before ``prepare``) and ``on_forward`` for every training micro-batch; ``save`` writes the
    component's files into each checkpoint and into the final artifact."""

    name: str  # unique within a run: the key of its state in checkpoints, and of its metrics
    provides: tuple[str, ...]  # the batch.fields it fills (the dry run lists them; a field is filled once)
    forward_outputs: tuple[str, ...]  # what it needs from the policy's training forward: "hidden"

    def roles(self) -> dict[str, bool]: ...  # model roles it takes (--with ROLE=PATH) -> required?

    def describe(self) -> str: ...  # what it holds, for the dry run's "models in memory" ("" = nothing)

    def setup(self, ctx: TrainContext) -> None: ...

    def parameters(self) -> list: ...  # trained by the policy's optimiser (a value head); its own optimiser stays inside

    def models(self) -> list: ...  # the models it holds (memory accounting)

    def fill(self, batch: TokenBatch, ctx: TrainContext) -> dict[str, float]: ...  # -> metrics

    def on_forward(self, batch: TokenBatch, out: PolicyOutput, ctx: TrainContext) -> None: ...

    def save(self, directory: Any) -> None: ...


class SamplingContext(Protocol):
    """What the online source gives sampling hooks (``tokalign.train.sources.OnlineSource`` implements it). Rows are
    the row schema's dicts (``tokalign.rows``); a hook adds per-row numbers for the algorithm under
    ``row["fields"][name]`` and per-completion-token lists under ``row["token_fields"][name]``."""

    rows: list[dict]  # the data's prompt rows (id, prompt, prompt_ids, reference, ...)
    spec: Any  # the run's tokalign.rollout.SamplingSpec (n, temperature, max_new_tokens, ...)
    batch_size: int  # prompts per step
    seed: int
    step: int
    tokenizer: Any
    rounds_used: int  # after the default rounds: how many were sampled this step
    accepted_groups: int  # ... and how many groups every hook accepted

    def pick(self, step: int, round_: int) -> list[int]: ...  # prompts of a round (uses the hooks' prompt weights)

    def sample(self, prompts: list[dict], **spec: Any) -> list[dict]: ...  # sample and score; group_id k = prompts[k]

    def generate(self, prompt_ids: list[list[int]], **spec: Any) -> list: ...  # raw completions, seeded per call

    def score(self, rows: list[dict]) -> list[dict]: ...  # the run's rewards on rollout rows

    def reference_engine(self) -> Any: ...  # an HF engine on the run's reference model (generate(prompts, spec))


@runtime_checkable
class SamplingHook(Protocol):
    """Steers online sampling. ``tokalign.sampling.Hook`` implements every method with its neutral default."""

    name: str

    def prompt_weights(self, n_prompts: int) -> "list[float] | None": ...  # None: uniform prompts

    def accept(self, group: list[dict]) -> bool: ...  # keep this scored group? (also filters scored data)

    def rounds(self, rollout_config: Any) -> int: ...  # sampling rounds allowed to fill the batch with accepted groups

    # the step's whole collection, replacing the default rounds: (groups of rows, every sampled row, metrics) or None
    def collect(self, ctx: SamplingContext) -> "tuple[list[list[dict]], list[dict], dict] | None": ...

    # add fields (set_field / set_token_field), or append rows (each with its group_id and prompt_index: they join
    # the batch, e.g. BRPO's summaries, SAPO's shared groups); -> metrics
    def after_batch(self, rows: list[dict], ctx: SamplingContext) -> dict[str, float]: ...


@runtime_checkable
class LogitsProcessor(Protocol):
    """A decoding hook, called once per generated token on a batch of B sequences (``tokalign.decoding``).

    ``__call__(logits, prompt_ids, output_ids) -> logits``:

    * ``logits``: ``[B, V]`` float32 next-token logits, before temperature and top-p (and after the processors listed
      before this one);
    * ``prompt_ids[b]``: row b's prompt token ids (for a multi-turn episode: everything before this turn);
    * ``output_ids[b]``: the ids row b generated so far in this turn, so ``len(output_ids[b])`` is the position of the
      token being sampled (0 for the first);
    * returns ``[B, V]`` logits (modifying ``logits`` in place and returning it is fine); ``-inf`` bans a token.

    It must be a function of its arguments only — no state per sequence: the engines batch, reorder and fork sequences
    in their own ways (HF generate: one row per sample; vLLM: a persistent batch whose rows move between steps).

    Optional methods:

    * ``temperature(prompt_ids, output_ids) -> list[float | None] | None`` — per-token temperature: the temperature
      row b's next token is sampled at, replacing the run's ``temperature`` for that token (None: the run's). Applied
      after every processor's logits; when several processors give one for a row, the last one wins. Greedy runs
      (temperature 0) ignore it.
    * ``bind(tokenizer) -> None`` — called once with the run's tokenizer before sampling (turn token strings into ids;
      raise ``UserError`` for a token the tokenizer does not have).
    """

    def __call__(self, logits: "torch.Tensor", prompt_ids: Any, output_ids: Any) -> "torch.Tensor": ...


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
        for c in needs.components:
            if not isinstance(c, BatchComponent):
                return f"Needs.components holds {type(c).__name__}, which is not a BatchComponent (subclass tokalign.components.Component)"
        for h in needs.hooks:
            if not isinstance(h, SamplingHook):
                return f"Needs.hooks holds {type(h).__name__}, which is not a SamplingHook (subclass tokalign.sampling.Hook)"
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
    if kind == "environment":  # tokalign.environments.base.Environment
        missing = [a for a in ("tools", "start", "step") if not callable(getattr(obj, a, None))]
        return f"an environment needs a '{missing[0]}' method (see tokalign.environments.base.Environment)" if missing else None
    if kind == "logits_processor":  # LogitsProcessor
        has_call = any("__call__" in vars(c) for c in obj.__mro__[:-1]) if isinstance(obj, type) else callable(obj)
        if not has_call:
            return "a logits processor must be callable(logits, prompt_ids, output_ids) -> logits"
        cfg = getattr(obj, "Config", None) if isinstance(obj, type) else None
        if cfg is not None and not dataclasses.is_dataclass(cfg):
            return "a logits processor's Config must be a dataclass"
        return None
    return f"unknown plug-in kind {kind!r}"
