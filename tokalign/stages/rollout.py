"""Stage ``rollout``: prompts + model -> a ``rollouts`` artifact (n samples per prompt)."""

from __future__ import annotations

from pathlib import Path

from tokalign import artifacts, models
from tokalign.rollout import SamplingSpec, check_backend
from tokalign.rollout.episodes import EpisodeSpec


def make_engine(backend: str, model: str, tokenizer, max_model_len: int | None = None, seed: int = 0, processors=None):
    """``processors``: the run's decoding hooks (a ``tokalign.decoding.Chain``), bound here to ``tokenizer``."""
    check_backend(backend)
    processors = processors.bind(tokenizer) if processors else None  # before any model loads: a bad token fails fast
    if backend == "vllm":
        from tokalign.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(models.resolve_model(model)[0], tokenizer, max_model_len=max_model_len, seed=seed, processors=processors)
    from tokalign.rollout.hf import HFEngine

    return HFEngine(models.load_model(model), tokenizer, processors=processors)


def sample(rows: list[dict], model: str, backend: str, spec: SamplingSpec, tokenizer,
           episodes: EpisodeSpec = EpisodeSpec(), processors=None) -> list[dict]:
    """Generate ``spec.n`` completions (with ``episodes.env``: episodes) per prompt row (already rendered for
    ``tokenizer``, with the environment's tools) -> rollout rows; ``processors`` steer the sampling
    (``tokalign.decoding``)."""
    import torch

    from tokalign.rows import rollout_rows
    from tokalign.rollout.episodes import generate_rows

    torch.manual_seed(spec.seed)
    longest = max((len(r["prompt_ids"]) for r in rows), default=0)
    engine = make_engine(backend, model, tokenizer, max_model_len=longest + episodes.budget(spec), seed=spec.seed,
                         processors=processors)
    return rollout_rows(rows, generate_rows(episodes.wrap(engine), rows, spec), spec.max_new_tokens)


def episode_config(episodes: EpisodeSpec) -> dict:
    """The multi-turn settings for a manifest's config (nothing when single-turn)."""
    if not episodes.env:
        return {}
    out = {"env": episodes.env, "max_turns": episodes.max_turns, "max_episode_tokens": episodes.max_tokens}
    if episodes.branching:
        out.update(branching=episodes.branching, branch_options=dict(episodes.branch_options))
    return out


def processor_config(processors) -> dict:
    """The decoding hooks for a manifest's config (nothing without them)."""
    return {"logits_processors": processors.config()} if processors else {}


def rollout(prompts: str, out: str, *, model: str = "", backend: str = "hf", spec: SamplingSpec = SamplingSpec(),
            overwrite: bool = False, episodes: EpisodeSpec = EpisodeSpec(), processors=None) -> Path:
    from tokalign.data.render import retokenize

    check_backend(backend)
    out_path = artifacts.check_output(out, overwrite)
    src = artifacts.read(prompts, ["prompts"])
    tokenizer = models.load_tokenizer(model)
    out_rows = sample(retokenize(src.rows(), tokenizer, episodes.tools()), model, backend, spec, tokenizer, episodes,
                      processors)
    prov = artifacts.Provenance(
        config={"backend": backend, "model": model or "(bundled)", **spec.__dict__, **episode_config(episodes),
                **processor_config(processors)},
        inputs=[src.ref()],
        plugins=processors.plugin_refs() if processors else [],
        model=models.identity(model),
        seed=spec.seed,
        extra={"default_reward": src.manifest.get("default_reward")},  # the data's reward, for `score` without --reward
    )
    with artifacts.writing(out_path, "rollouts", prov, overwrite) as w:
        w.write_rows(out_rows)
    return out_path
