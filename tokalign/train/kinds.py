"""The kinds of training data, in one table: what ``train.batch_size`` counts, how many sequences each item gives,
and where a step's batch comes from. Plan, dry run and loop read this table instead of comparing kind names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tokalign.errors import UserError
from tokalign.train import sources


@dataclass(frozen=True)
class DataKind:
    name: str
    unit: str  # what train.batch_size counts
    per_item: int | None  # sequences per item; None: the group size (rollout.n online, the data's groups when scored)
    sampled: bool  # sampled from the live policy during training (rewards, rollout backend and sampling hooks apply)
    keeps_ids: bool  # rows keep the sampler's own token ids (prompts are not re-rendered for this tokenizer)
    source: Callable[[Any, list[dict], Any], Any]  # (plan, rows, train state) -> a source with batch(step)
    # the sampler's max_new_tokens, for length-normalised aggregations (None: the batch's longest completion)
    length_limit: Callable[[Any], int | None] = lambda plan: None


def _online(plan, rows, state):
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    cfg, r = plan.cfg, plan.cfg.rollout
    # HF generate on a sharded policy is a collective: every process makes as many calls (vLLM samples from its own copy)
    lockstep = state.dist.active and cfg.train.distributed == "fsdp" and r.backend != "vllm"
    spec = SamplingSpec(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed)
    episodes = plan.episodes
    processors = plan.processors.bind(state.tokenizer) if plan.processors else None  # decoding hooks (tokalign.decoding)
    if r.backend == "vllm":  # sampling in vLLM; the trainer's weights are pushed into it before every step
        from tokalign import models
        from tokalign.rollout.vllm_engine import VLLMEngine

        longest = max(len(x["prompt_ids"]) for x in rows) + episodes.budget(spec)
        engine = VLLMEngine(models.resolve_model(cfg.model)[0], state.tokenizer, longest + 1, cfg.seed, r.vllm_gpu_memory_utilization,
                            sleep=r.vllm_sleep, processors=processors)
    else:
        engine = HFEngine(state.policy, state.tokenizer, synced_gpus=lockstep, processors=processors)
    engine = episodes.wrap(engine)  # with rollout.env: multi-turn episodes
    source = sources.OnlineSource(rows, engine, plan.rewards, spec, cfg.train.batch_size, cfg.seed, hooks=tuple(plan.needs.hooks),
                                  rollout_config=r, policy=state.policy, reference=state.reference_model,
                                  sharing=sources.Sharing(state.dist, r.sampling_chunk, lockstep))
    if cfg.train.async_rollouts > 0:  # sampled ahead in a background thread, from a copy of the policy
        from tokalign.train.overlap import Overlapped

        return Overlapped(source, state.policy, cfg.train.async_rollouts, cfg.train.max_steps)
    return source


def _scored(plan, rows, state):
    return sources.ScoredSource(rows, plan.cfg.train.batch_size, plan.cfg.seed, hooks=tuple(plan.needs.hooks))


def _pairs(with_gold: bool):
    return lambda plan, rows, state: sources.PairSource(rows, state.tokenizer, plan.cfg.train.batch_size, plan.cfg.seed, with_gold=with_gold)


def _unpaired(plan, rows, state):
    return sources.UnpairedSource(rows, state.tokenizer, plan.cfg.train.batch_size, plan.cfg.seed)


def _completions(plan, rows, state):
    rows = [r for r in rows if r.get("completion")]
    return sources.CompletionSource(rows, state.tokenizer, plan.cfg.train.batch_size, plan.cfg.seed)


def _stepwise(plan, rows, state):
    """The algorithm lays each row out itself (``encode(tokenizer, row)``): the steps' layout is its choice."""
    encode = getattr(plan.algorithm, "encode", None)
    if encode is None:
        raise UserError(f"algorithm '{plan.algo_name}' trains on stepwise data but has no encode(tokenizer, row) method.")
    return sources.StepwiseSource(rows, lambda row: encode(state.tokenizer, row), plan.cfg.train.batch_size, plan.cfg.seed)


KINDS: dict[str, DataKind] = {k.name: k for k in (
    DataKind("online", "prompts", None, True, False, _online, lambda plan: plan.cfg.rollout.max_new_tokens),
    DataKind("scored", "groups", None, False, True, _scored, lambda plan: plan.extra.get("max_new_tokens")),
    DataKind("pairs", "pairs", 2, False, False, _pairs(False)),
    DataKind("triples", "triples", 3, False, False, _pairs(True)),
    DataKind("unpaired", "labelled examples", 2, False, False, _unpaired),
    DataKind("completions", "examples", 1, False, False, _completions),
    DataKind("stepwise", "examples", 1, False, False, _stepwise),
)}

# What rows of each shape can be trained as, in order of preference. The shape is what the rows hold: prompts alone,
# prompts with completions, labelled completions, preference pairs (with a gold reference: also triples), scored
# rollouts (also pairs: best vs worst of each group), labelled steps (stepwise supervision), text alone (language
# modelling). Preference pairs are also labelled completions (chosen desirable, rejected not), as TRL's KTO reads them.
KINDS_OF_SHAPE = {
    "prompt-only": ("online",),
    "prompt-completion": ("online", "completions"),
    "unpaired": ("unpaired", "online", "completions"),
    "language-modelling": ("completions",),
    "preference": ("pairs", "unpaired"),
    "preference+gold": ("pairs", "triples", "unpaired"),
    "scored": ("scored", "pairs"),
    "stepwise": ("stepwise",),
}
# an artifact kind or a normalised file format -> its shape (prompts are refined by their rows)
SHAPE_OF = {"pairs": "preference", "preference": "preference", "unpaired": "unpaired", "scored": "scored", "stepwise": "stepwise"}


def shape(kind_or_format: str, rows: list[dict], gold: bool) -> str:
    """The shape of these rows (``kind_or_format``: an artifact kind or ``data.formats.normalise``'s format;
    ``gold``: every row's reference is a usable gold completion)."""
    found = SHAPE_OF.get(kind_or_format)
    if found is None:  # prompts: what their rows hold
        found = ("stepwise" if any(r.get("step_labels") is not None for r in rows)
                 else "unpaired" if any(r.get("label") is not None for r in rows)
                 else "language-modelling" if rows and all(r.get("prompt") in ("", '""') for r in rows)  # TRL's ``text``
                 else "prompt-completion" if any(r.get("completion") for r in rows) else "prompt-only")
    return "preference+gold" if found == "preference" and gold else found


def convert(shape_: str, kind: str, rows: list[dict]) -> list[dict]:
    """Rows of one shape trained as a kind that needs other rows: scored rollouts as preference pairs."""
    if shape_ == "scored" and kind == "pairs":
        return sources.pairs_from_scored(rows)
    if shape_.startswith("preference") and kind == "unpaired":  # TRL's KTO on a paired dataset
        return sources.unpaired_from_pairs(rows)
    return rows
