"""Stage ``rollout``: prompts + model -> a ``rollouts`` artifact (n samples per prompt)."""

from __future__ import annotations

from pathlib import Path

from tokalign import artifacts, models
from tokalign.rollout import SamplingSpec, check_backend


def make_engine(backend: str, model: str, tokenizer, max_model_len: int | None = None, seed: int = 0):
    check_backend(backend)
    if backend == "vllm":
        from tokalign.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(models.resolve_model(model)[0], tokenizer, max_model_len=max_model_len, seed=seed)
    from tokalign.rollout.hf import HFEngine

    return HFEngine(models.load_model(model), tokenizer)


def sample(rows: list[dict], model: str, backend: str, spec: SamplingSpec, tokenizer) -> list[dict]:
    """Generate ``spec.n`` completions per prompt row (already rendered for ``tokenizer``) -> rollout rows."""
    import torch

    from tokalign.rows import rollout_rows

    torch.manual_seed(spec.seed)
    longest = max((len(r["prompt_ids"]) for r in rows), default=0)
    engine = make_engine(backend, model, tokenizer, max_model_len=longest + spec.max_new_tokens, seed=spec.seed)
    return rollout_rows(rows, engine.generate([r["prompt_ids"] for r in rows], spec), spec.max_new_tokens)


def rollout(prompts: str, out: str, *, model: str = "", backend: str = "hf", spec: SamplingSpec = SamplingSpec(),
            overwrite: bool = False) -> Path:
    from tokalign.data.render import retokenize

    check_backend(backend)
    out_path = artifacts.check_output(out, overwrite)
    src = artifacts.read(prompts, ["prompts"])
    tokenizer = models.load_tokenizer(model)
    out_rows = sample(retokenize(src.rows(), tokenizer), model, backend, spec, tokenizer)
    prov = artifacts.Provenance(
        config={"backend": backend, "model": model or "(bundled)", **spec.__dict__},
        inputs=[src.ref()],
        model=models.identity(model),
        seed=spec.seed,
    )
    with artifacts.writing(out_path, "rollouts", prov, overwrite) as w:
        w.write_rows(out_rows)
    return out_path
