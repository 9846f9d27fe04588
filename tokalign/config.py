"""Run configuration: defaults < the model's ``tokalign.yaml`` < ``--config run.yaml`` < CLI flags
< ``--set a.b=c``. Every key is validated (name and type) before any model loads."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokalign.errors import UserError, did_you_mean

MODEL_DEFAULTS_FILE = "tokalign.yaml"
RENAMED = {"train.dtype": "use train.precision (fp32 | bf16-mixed | bf16 | auto); bf16-mixed keeps fp32 master weights"}


@dataclass
class TrainSection:
    lr: float = 1e-6
    max_steps: int = 100
    batch_size: int = 8  # per optimiser step: prompts (online), groups (scored), pairs, or examples
    micro_batch_size: int = 0  # rows per forward/backward; 0 = the whole batch at once
    # > 0: micro-batches by tokens, similar lengths together (overrides micro_batch_size): rows × longest sequence, or
    # with packing the sequences' own tokens
    micro_batch_tokens: int = 0
    updates_per_batch: int = 1  # optimiser steps on each batch (GRPO's μ); >1 makes the ratio ≠ 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024  # prompt + completion tokens, offline data is truncated to this
    save_every: int = 25  # checkpoint every N steps (resume point); the final model is always saved
    # fp32 | bf16-mixed (fp32 master weights and optimiser state, bf16 compute, fp32 log-softmax and losses; frozen
    # models held in bf16) | bf16 (everything in bf16) | auto: bf16-mixed on CUDA, fp32 elsewhere
    precision: str = "auto"
    # always: per-token log-probs through the fused head (tokalign/head.py: no [tokens, vocab] logits held, the head's
    # matmul recomputed in the backward) | never: from the model's logits | auto: fused when a micro-batch's logits
    # would exceed 64M values (256 MiB in fp32), where memory matters more than the recompute
    fused_head: str = "auto"
    # padding-free: each micro-batch's sequences run packed end to end in rows as wide as its longest (tokalign/packing.py:
    # attention kept within each sequence; flash-attention varlen on CUDA, a block mask with SDPA), for models that honour it
    packing: bool = False
    # online: sample the batches of the next K steps in a background thread while a step trains (K steps off-policy;
    # the sampler's log-probs are the behaviour policy, corrected by algorithm.mismatch_correction; tokalign/train/overlap.py)
    async_rollouts: int = 0
    distributed: str = "ddp"  # under torchrun: ddp (full copy per process, gradients summed) | fsdp (FSDP2: parameters sharded)
    lora_r: int = 0  # > 0: train a LoRA adapter of this rank (PEFT); the reference is the base with the adapter off
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # or a comma-separated list of module names
    lora_4bit: bool = False  # QLoRA: the frozen base in 4-bit (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more compute)
    log: list[str] = field(default_factory=list)  # experiment trackers beside metrics.jsonl: tensorboard, wandb (train/tracking.py)


@dataclass
class RolloutSection:
    backend: str = "hf"  # hf | vllm
    n: int = 8  # samples per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # prompts per sampling chunk, each under its own seed; under torchrun the chunks are shared between the processes
    # (0: one chunk per process). A run with N processes samples exactly what one process with the same chunk does
    sampling_chunk: int = 0
    max_sampling_rounds: int = 3  # algorithms that drop uninformative groups (DAPO) resample up to this often
    vllm_gpu_memory_utilization: float = 0.3  # online training with --backend vllm on a GPU: vLLM's share, the trainer keeps the rest
    # online training with --backend vllm on a GPU: the engine sleeps while the trainer trains (weights and KV cache
    # freed, vLLM's sleep mode level 2) and wakes for the next step's sampling
    vllm_sleep: bool = False
    # multi-turn episodes: the environment that answers the model between its turns (an environments plug-in, e.g.
    # calculator; "" = single-turn), the model turns per episode, and the episode's tokens after the prompt
    # (model and environment; 0 = max_turns × max_new_tokens)
    env: str = ""
    max_turns: int = 4
    max_episode_tokens: int = 0
    # with env: the prompt's n episodes grown as a tree forking where the environment answered (tokalign/rollout/
    # branching.py): "" = the algorithm's own (independent episodes for most), none, entropy (ARPO's), tree (PORTool's)
    branching: str = ""
    branch_options: dict[str, Any] = field(default_factory=dict)  # the strategy's options, e.g. {beam: 3}
    # decoding hooks (tokalign.decoding; a tokalign.logits_processors plug-in each, applied in order) on every sampled
    # token's logits, and their options {name: {option: value}}, checked against each one's Config
    logits_processors: list[str] = field(default_factory=list)
    logits_processor_options: dict[str, dict] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: str = ""  # "" = the bundled tiny model
    ref_model: str = ""  # "" = the starting model
    models: dict[str, str] = field(default_factory=dict)  # extra frozen models by role, e.g. {teacher: path}
    data: str = ""
    reward: list[str] = field(default_factory=list)  # online: rewards/verifiers; "name" or "name*weight"
    reward_options: dict[str, dict] = field(default_factory=dict)  # {reward name: {option: value}}, checked against its Config
    seed: int = 0
    train: TrainSection = field(default_factory=TrainSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: dict[str, Any] = field(default_factory=dict)  # validated against the algorithm's Config


# ---------------------------------------------------------------- merging


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str], flag: str = "--set", example: str = "train.lr=1e-5") -> dict:
    """['train.lr=1e-5', 'algorithm.beta=0.04'] -> nested dict (values parsed as YAML scalars); ``flag`` and
    ``example`` name the option in the error of a malformed item."""
    out: dict = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"{flag} expects key=value (e.g. {flag} {example}), got '{item}'.")
        value = parse_scalar(raw)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def parse_plugin_options(items: list[str], flag: str, example: str) -> dict[str, dict[str, Any]]:
    """``flag``'s NAME.key=value items (--reward-opt, --processor-opt) -> {NAME: {key: value}}, values typed like
    --set. The key is what follows the last dot, so ``pkg.mod:Cls.key=v`` names the plug-in ``pkg.mod:Cls``;
    ``example`` (e.g. ``math.tolerance=1e-6``) goes into the error for a malformed item."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        lhs, eq, raw = item.partition("=")
        name, dot, key = lhs.strip().rpartition(".")
        if not eq or not dot or not name or not key.isidentifier():
            raise UserError(f"{flag} expects NAME.key=value (e.g. {flag} {example}), got '{item}'.")
        out.setdefault(name, {})[key] = parse_scalar(raw)
    return out


def parse_scalar(raw: str) -> Any:
    """A --set (or --reward-opt) value as YAML, except that 1e-5 is a number (YAML 1.1 would keep it a string), and a
    text that is not YAML, or is a mapping only by accident (``RM {prompt} ANSWER: {completion}``: lists and mappings
    are written [..] and {..}), is that text; an unclosed list or mapping is an error."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        if raw.lstrip()[:1] in "[{":
            raise UserError(f"'{raw}' is not a valid YAML list or mapping ({getattr(e, 'problem', e)}); close it, or quote "
                            "the value to pass it as text.") from e
        return raw
    if isinstance(value, (dict, list)) and raw.lstrip()[:1] not in "[{":  # "A: b" read as a mapping: the text was meant
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_yaml(path: str | Path, what: str = "config") -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file '{p}' does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} file '{p}' is not valid YAML{where}: {getattr(e, 'problem', e)}.") from e
    if not isinstance(data, dict):
        raise UserError(f"{what} file '{p}' must hold a mapping of keys, not {type(data).__name__}.")
    return data


# ---------------------------------------------------------------- typed building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is Any:
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"Config key '{key}' must be a mapping, got {value!r}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"Config key '{key}' must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"Config key '{key}' must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"Config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"Config key '{key}' must be a string, got {value!r}.")
        return str(value)
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a nested dict; unknown keys and bad types are UserErrors."""
    if not isinstance(data, dict):
        raise UserError(f"Config key '{prefix.rstrip('.') or '(root)'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise UserError(f"Config key '{full}' was replaced: {RENAMED[full]}.")
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            raise UserError(f"Unknown config key '{full}'.{did_you_mean(full, known)} Known keys: {', '.join(known)}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a Config's own validation (__post_init__) names the bad value
        raise UserError(f"Config section '{prefix.rstrip('.') or '(root)'}': {e}.") from e


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def model_defaults(model_dir: Path | None, data: str | None = None) -> dict:
    """Recommended settings a model directory may ship in ``tokalign.yaml`` (like
    generation_config.json does for sampling); the user's config and flags override them. Its optional ``tasks:``
    mapping holds settings for one task (by the name given to ``--data``), merged over the others when that task is
    the data — e.g. longer turns for a tool-using task."""
    if model_dir is None or not (model_dir / MODEL_DEFAULTS_FILE).is_file():
        return {}
    found = load_yaml(model_dir / MODEL_DEFAULTS_FILE, what="model defaults")
    per_task = found.pop("tasks", None) or {}
    if not isinstance(per_task, dict):
        raise UserError(f"{model_dir / MODEL_DEFAULTS_FILE}: 'tasks' must map task names to settings.")
    return deep_merge(found, per_task.get(data or "", None) or {})


def merge(layers: list[dict]) -> dict:
    """Later layers override earlier ones, key by key (nested mappings merge)."""
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    return merged


def resolve(layers: list[dict]) -> RunConfig:
    return build(RunConfig, merge(layers))
