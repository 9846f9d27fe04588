from __future__ import annotations

from typing import List, Optional

import typer

from tokalign.cli.common import (BRANCHING_HELP, ENV_HELP, MAX_TURNS_HELP, OUT_HELP, OVERWRITE, PROCESSOR_HELP, PROCESSOR_OPT_HELP,
                                 default_out, emit, episode_spec, input_path, processor_chain, sampling_spec)


def rollout(
    prompts: Optional[str] = typer.Argument(None, help="A prompts artifact; '-' or omitted: read its path from stdin."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("", "--model", "-m", help="Model dir, tokalign checkpoint or hub id (default: the bundled tiny model)."),
    n: int = typer.Option(4, "--n", min=1, help="Samples per prompt."),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers generate) or vllm."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the model's tokalign.yaml, else 256."),
    seed: int = typer.Option(0, "--seed"),
    env: Optional[str] = typer.Option(None, "--env", help=ENV_HELP),
    max_turns: int = typer.Option(4, "--max-turns", min=1, help=MAX_TURNS_HELP),
    max_episode_tokens: int = typer.Option(0, "--max-episode-tokens", min=0, help="With --env: tokens after the prompt (model and environment); 0 = max-turns × max-new-tokens."),
    branching: str = typer.Option("", "--branching", help=BRANCHING_HELP),
    branch_opt: List[str] = typer.Option([], "--branch-opt", help="With --branching: a strategy option KEY=VALUE (repeatable), e.g. beam=3 (see `tokalign.rollout.branching`)."),
    logits_processor: List[str] = typer.Option([], "--logits-processor", help=PROCESSOR_HELP),
    processor_opt: List[str] = typer.Option([], "--processor-opt", help=PROCESSOR_OPT_HELP),
    overwrite: bool = OVERWRITE,
):
    """Sample completions with per-token sampler log-probs into a `rollouts` artifact."""
    from tokalign.stages.rollout import rollout as run

    src = input_path(prompts, "prompts artifact")
    spec = sampling_spec(model, n, temperature, top_p, max_new_tokens, seed)
    episodes = episode_spec(env, max_turns, max_episode_tokens, branching, branch_opt)
    processors = processor_chain(logits_processor, processor_opt)
    emit(run(src, default_out("rollouts", out), model=model, backend=backend, spec=spec, overwrite=overwrite, episodes=episodes,
             processors=processors))
