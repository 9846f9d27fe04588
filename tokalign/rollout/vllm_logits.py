"""The decoding hooks (``tokalign.decoding``) inside vLLM: one class-based V1 logits processor, installed on the
engines tokalign builds for steered runs (``LLM(logits_processors=[SteeredLogits])``).

vLLM V1 dropped the per-request ``SamplingParams.logits_processors`` callables; its processors are classes built once
per engine that see the whole persistent batch: ``update_state(BatchUpdate)`` before each step says which requests
were added (with their params, prompt ids and a live reference to their output ids), removed or moved between rows,
and ``apply(logits [rows, V])`` changes the rows. A request asks for a chain by the key it carries in
``SamplingParams.extra_args[EXTRA_KEY]``; :func:`register` puts the chain under a fresh key for one ``generate`` call
and :func:`unregister` drops it after. The chain object stays in this process, so the engine core must be in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which ``vllm_engine`` sets by default).

``is_argmax_invariant()`` is False: vLLM then runs it with the processors that can change greedy picks, on float32
logits after the allowed-token and bad-words masks and before penalties, temperature, min-p and top-k/top-p; its
``processed_logprobs`` (what ``sampler_logps`` record) include its effect.

Not supported here: vLLM's Model Runner V2 (a different processor interface; ``vllm_engine`` builds steered engines on
the V1 runner), speculative decoding (vLLM refuses custom processors with it).
"""

from __future__ import annotations

import uuid

from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    process_dict_updates,
)

EXTRA_KEY = "tokalign_logits_processors"
_CHAINS: dict[str, object] = {}  # key -> tokalign.decoding.Chain, for the requests of one generate call


def register(chain) -> str:
    key = uuid.uuid4().hex
    _CHAINS[key] = chain
    return key


def unregister(key: str) -> None:
    _CHAINS.pop(key, None)


class SteeredLogits(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory: bool):
        # row -> (chain, prompt ids, live output ids, the request's temperature)
        self.rows: dict[int, tuple[object, list[int], list[int], float]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it can ban the argmax: greedy requests must see it too

    def _new(self, params, prompt_ids, output_ids):
        key = (params.extra_args or {}).get(EXTRA_KEY)
        if key is None:
            return None
        chain = _CHAINS.get(key)
        if chain is None:
            raise RuntimeError("a request names tokalign logits processors this process does not hold: the vLLM engine "
                               "core must run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        return chain, list(prompt_ids or []), output_ids, float(params.temperature)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new)

    def apply(self, logits):
        if not self.rows:
            return logits
        import torch

        groups: dict[tuple[int, float], list[int]] = {}
        for row, (chain, _, _, temperature) in self.rows.items():
            groups.setdefault((id(chain), temperature), []).append(row)
        for rows in groups.values():
            chain, _, _, temperature = self.rows[rows[0]]
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            steered = chain(logits[index], [self.rows[r][1] for r in rows], [self.rows[r][2] for r in rows], temperature)
            logits[index] = steered
        return logits
