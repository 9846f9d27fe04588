"""Decoding hooks: logits processors that steer sampling token by token (plug-in group ``tokalign.logits_processors``;
``--logits-processor NAME`` (repeatable, applied in order) with ``--processor-opt NAME.key=value`` on ``rollout``,
``train`` (online) and ``eval``; config keys ``rollout.logits_processors`` and ``rollout.logits_processor_options``).

The contract is ``tokalign.protocols.LogitsProcessor``: ``__call__(logits [B, V], prompt_ids, output_ids) -> [B, V]``
on float32 next-token logits before temperature and top-p, with the per-row histories; optionally
``temperature(prompt_ids, output_ids)`` (a per-token temperature per row) and ``bind(tokenizer)``. A class is built as
``Cls(Cls.Config(**options))`` (``Cls()`` without a ``Config``), like a reward. The same object runs in both engines;
:class:`Chain` is what they call: the processors in order, then the per-token temperatures.

Built-ins: ``ban_tokens`` (``decoding/ban_tokens.py``: never sample these tokens), ``cyclic_reflex``
(``decoding/cyclic_reflex.py``: CyclicReflex's triangular wave on reflection-token logits, arXiv:2506.11077) and
``adaptive_temperature`` (``decoding/adaptive_temperature.py``: HAPO's entropy-adaptive per-token temperature,
arXiv:2509.16591).

Where the chain runs:

* ``hf`` (transformers generate, ``tokalign.rollout.hf``): one transformers logits processor, before the temperature
  and top-p warpers and before the recorder of sampler log-probs; greedy decoding (temperature 0) takes the argmax of
  the processed logits.
* ``vllm`` (``tokalign.rollout.vllm_logits``): vLLM V1's class-based logits processor
  (``vllm.v1.sample.logits_processor.LogitsProcessor``, given as ``LLM(logits_processors=[...])``) on engines built
  for a steered run; each request names its chain in ``SamplingParams.extra_args``. It runs with vLLM's
  non-argmax-invariant processors: after the allowed-token and bad-words masks, before penalties, temperature and
  top-k/top-p, so greedy requests are steered too. What does not work there: the per-request
  ``SamplingParams.logits_processors`` of the old engine (gone from V1; not used), vLLM's Model Runner V2 (it has its
  own processor interface: tokalign builds steered engines on the V1 runner, ``VLLM_USE_V2_MODEL_RUNNER=0``, and
  refuses when that variable says 1), an engine core in another process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``: the
  chain is a Python object of this process; tokalign sets 0 unless told otherwise), and speculative decoding (vLLM
  refuses custom processors with it).

Log-probs: a steered rollout's ``sampler_logps`` are those of the distribution actually sampled from — the processed
logits, at the per-token or run temperature, after top-p — in both engines (vLLM's ``processed_logprobs`` mode
includes custom processors). The trainer's own log-probs (behaviour ``old_logps``, reference, frozen models) stay the
model's: processors act in sampling only. So ``sampler_logps`` differ from the model's where a processor acted, and
``algorithm.mismatch_correction`` (π_model / π_sampled) corrects for the steering as for any other sampler mismatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tokalign import registry
from tokalign.errors import UserError, did_you_mean

KIND = "logits_processor"
WHAT = "logits processor"


@dataclass
class Resolved:
    name: str  # as the user wrote it: a registered name or module:attr
    processor: Any
    plugin: registry.PluginInfo
    config: dict[str, Any] | None  # the resolved Config (defaults included); None without a Config


class Chain:
    """The run's logits processors, in order (empty: plain sampling). Engines call it on each step's logits."""

    def __init__(self, resolved: list[Resolved] | tuple = ()):
        self.resolved = list(resolved)

    def __bool__(self) -> bool:
        return bool(self.resolved)

    def __len__(self) -> int:
        return len(self.resolved)

    def names(self) -> list[str]:
        return [r.name for r in self.resolved]

    def bind(self, tokenizer) -> Chain:
        """Give each processor the run's tokenizer (``bind``, where it has one) before any sampling."""
        from tokalign import plugin_errors

        for r in self.resolved:
            fn = getattr(r.processor, "bind", None)
            if callable(fn):
                with plugin_errors.guard(KIND, r.name, "bind"):
                    fn(tokenizer)
        return self

    def __call__(self, logits, prompt_ids, output_ids, temperature: float):
        """``logits`` [B, V] float32 of B rows with their histories -> processed [B, V]; ``temperature`` is the run's
        (a row's per-token temperature t is applied as logits · temperature / t, so that the engine's own division by
        the run's temperature leaves logits / t; nothing when the run is greedy)."""
        import torch

        from tokalign import plugin_errors

        rows = logits.shape[0]
        temps: list[float | None] = [None] * rows
        for r in self.resolved:
            with plugin_errors.guard(KIND, r.name, "__call__"):
                out = r.processor(logits, prompt_ids, output_ids)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                plugin_errors.contract(KIND, r.name, "__call__", f"it must return logits of shape {list(logits.shape)}, got {got}")
            logits = out
            fn = getattr(r.processor, "temperature", None)
            if not callable(fn):
                continue
            with plugin_errors.guard(KIND, r.name, "temperature"):
                given = fn(prompt_ids, output_ids)
            if given is None:
                continue
            if len(given) != rows:
                plugin_errors.contract(KIND, r.name, "temperature", f"it must give one temperature per row ({rows}), got {len(given)}")
            for i, t in enumerate(given):
                if t is None:
                    continue
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                    plugin_errors.contract(KIND, r.name, "temperature", f"a temperature must be a number > 0 (or None), got {t!r}")
                temps[i] = float(t)
        if temperature > 0 and any(t is not None for t in temps):
            scale = torch.tensor([temperature / t if t is not None else 1.0 for t in temps], dtype=logits.dtype,
                                 device=logits.device)
            logits = logits * scale[:, None]
        return logits

    def config(self) -> list[dict[str, Any]]:
        """What a manifest's config records: each processor's name and resolved options, in order."""
        return [{"name": r.name, **({"options": r.config} if r.config is not None else {})} for r in self.resolved]

    def plugin_refs(self) -> list[dict[str, Any]]:
        """The processors as an artifact's provenance ``plugins`` entries."""
        return [{"kind": KIND, "name": r.name, "distribution": r.plugin.distribution, "version": r.plugin.version,
                 **({"options": r.config} if r.config is not None else {})} for r in self.resolved]

    def describe(self) -> str:
        """One line for the dry run."""
        return ", ".join(f"{r.name} ({r.plugin.label})" for r in self.resolved) or "none"


def parse_options(items: list[str], flag: str = "--processor-opt") -> dict[str, dict[str, Any]]:
    """['ban_tokens.ids=[5,7]'] -> {'ban_tokens': {'ids': [5, 7]}} (values typed like --set). The key is what follows
    the last dot, so ``pkg.mod:Cls.key=v`` names the processor ``pkg.mod:Cls``."""
    from tokalign.config import parse_plugin_options

    return parse_plugin_options(items, flag, "ban_tokens.ids=[5,7]")


def _lookup(name: str) -> tuple[Any, registry.PluginInfo]:
    if not name.strip():
        raise UserError("--logits-processor needs a name (see `tokalign plugins`), got an empty one.")
    if ":" not in name:
        found = registry.available(KIND)
        if name not in found:
            from tokalign.errors import unknown

            raise unknown(WHAT, name, found)
    obj = registry.load(KIND, name)
    info = registry.info(KIND, name)
    problem = registry.check_obj(KIND, obj)
    if problem:
        raise UserError(f"{WHAT} '{name}' ({info.label}) does not satisfy the protocol: {problem}.")
    return obj, info


def _construct(name: str, obj: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """``Cls(Cls.Config(**options))``, ``Cls()``, or the object itself (a function or an instance)."""
    from tokalign import config

    if not isinstance(options, dict):
        raise UserError(f"rollout.logits_processor_options.{name} must be a mapping of option: value, got {options!r}.")
    cfg_cls = getattr(obj, "Config", None) if isinstance(obj, type) else None
    try:
        if cfg_cls is None:
            if options:
                raise UserError(f"{WHAT} '{name}' takes no options (it defines no Config dataclass); got "
                                f"{', '.join(sorted(options))}.")
            return (obj() if isinstance(obj, type) else obj), None
        valid = [f.name for f in dataclasses.fields(cfg_cls)]
        for key in options:
            if key not in valid:
                raise UserError(f"{WHAT} '{name}' has no option '{key}'.{did_you_mean(key, valid)} Valid options: "
                                f"{', '.join(valid) or '(none)'}.")
        try:
            cfg = config.build(cfg_cls, options, prefix=f"{name}.")
        except UserError as e:
            raise UserError(f"{WHAT} '{name}': bad option value: {e} Valid options: {', '.join(valid)}.") from e
        return obj(cfg), dataclasses.asdict(cfg)
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # the plug-in rejecting a value names it
        raise UserError(f"{WHAT} '{name}': {e} (options: {options}).") from e
    except Exception as e:
        raise UserError(f"{WHAT} '{name}' failed to construct: {type(e).__name__}: {e}") from e


def resolve(names: list[str] | None, options: dict[str, dict] | None = None) -> Chain:
    """The chain of ``names`` (registered names or ``module:attr``), each built with its ``options[name]``; an option
    for a processor the run does not use, or a name given twice, is refused. Loads no model and no tokenizer."""
    options = dict(options or {})
    out: list[Resolved] = []
    for name in names or []:
        if name in [r.name for r in out]:
            raise UserError(f"{WHAT} '{name}' is given twice; give it once (its options apply to it once).")
        obj, info = _lookup(name)
        proc, cfg = _construct(name, obj, options.get(name) or {})
        out.append(Resolved(name, proc, info, cfg))
    used = [r.name for r in out]
    for name in options:
        if name not in used:
            raise UserError(f"Options given for {WHAT} '{name}', which this run does not use.{did_you_mean(name, used)} "
                            f"Logits processors in this run: {', '.join(used) or '(none)'} (add --logits-processor {name}).")
    return Chain(out)


def token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` as one token: a vocabulary entry (``Wait``, or ``ĠWait`` in byte-level BPE), else text that
    encodes to exactly one token (`` Wait``); None otherwise."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None
