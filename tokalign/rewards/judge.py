"""``judge``: an LLM judge behind an OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, llama.cpp,
hosted APIs) — LLM-as-a-judge as in "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", Zheng et
al. 2023, arXiv:2306.05685.

Each sample becomes one ``POST {base_url}/chat/completions`` request whose user message is ``template``
with ``{prompt}``, ``{completion}`` and ``{reference}`` filled in (other braces are left alone). The
last match of ``score_pattern`` (first group, case-insensitive) in the answer is the raw score s:

    value = clip((s − min_score) / (max_score − min_score), 0, 1)          e.g. "Score: 7" -> 0.7

An answer without a score is recorded as such — value ``unparsed_value`` (default 0), info
``{"parsed": false, "response": ...}`` — and so is a request the server rejects (HTTP 4xx) or that keeps
timing out; a server that cannot be reached at all is a UserError. Requests run on ``concurrency``
threads over one shared client of the ``openai`` package (``pip install openai``; imported only when the
judge runs), which retries connection failures, timeouts and HTTP 408/409/429/5xx ``retries`` times with
its own exponential backoff: 0.5 s doubling per try up to 8 s, less up to 25 % jitter, or the delay the
server asks for in ``Retry-After``.

Options (``--reward-opt judge.KEY=VALUE``): base_url (required; ".../v1" is added to a bare host),
model (default: the first the server lists), template or template_file, system, score_pattern
"Score:\\s*([-+]?\\d+(?:\\.\\d+)?)", min_score 0, max_score 10, unparsed_value 0, max_tokens 256,
temperature 0, timeout 60 s (per try), retries 2, backoff 0.5 s (accepted for older configs and
ignored: the client's backoff above starts at 0.5 s), concurrency 8, api_key_env OPENAI_API_KEY (the
name of the environment variable holding the key, sent as a Bearer token; unset or empty: "EMPTY", which
servers started without a key ignore).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokalign.errors import UserError
from tokalign.protocols import Reward, Sample

DEFAULT_TEMPLATE = """Please act as an impartial judge and rate the quality of the response to the user's prompt below.
Consider correctness, helpfulness and clarity; if a reference answer is given, a response that disagrees with it is wrong.

[Prompt]
{prompt}

[Reference answer]
{reference}

[Response]
{completion}

Explain briefly, then end with one line of the form "Score: N", where N is an integer from 0 (worst) to 10 (best)."""

_RETRY_STATUS = (408, 409, 429)  # and 5xx: what the openai client retries
NEEDS_OPENAI = "the judge reward needs the openai package: pip install openai"
NO_KEY = "EMPTY"  # the openai client wants a key; servers started without one ignore it (as in vLLM's docs)
DOWN_MEMORY_S = 10.0  # after finding the server unreachable, fail at once for this long
_FIELDS = re.compile(r"\{(prompt|completion|reference)\}")


def check_limits(config) -> None:
    """The checks every scoring judge's config shares: a score range, at least one token and one request at a time."""
    if not config.max_score > config.min_score:
        raise ValueError(f"max_score must be greater than min_score, got {config.min_score}..{config.max_score}")
    _at_least_one(config)


def check_requests(config) -> None:
    """The request options of a judge without a score range (pairwise, rubric): at least one token and one request at
    a time, retries ≥ 0, a positive timeout."""
    _at_least_one(config)
    if config.retries < 0 or config.timeout <= 0:
        raise ValueError("retries must be >= 0 and timeout > 0")


def _at_least_one(config) -> None:
    for key in ("max_tokens", "concurrency"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(config, key)}")


@dataclass
class JudgeConfig:
    base_url: str = ""
    model: str = ""
    template: str = DEFAULT_TEMPLATE
    template_file: str = ""
    system: str = ""
    score_pattern: str = r"Score:\s*([-+]?\d+(?:\.\d+)?)"
    min_score: float = 0.0
    max_score: float = 10.0
    unparsed_value: float = 0.0
    max_tokens: int = 256
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 2
    backoff: float = 0.5  # accepted and ignored: the openai client's own backoff (0.5 s, doubling) is used
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        check_limits(self)
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        try:
            groups = re.compile(self.score_pattern).groups
        except re.error as e:
            raise ValueError(f"score_pattern is not a regular expression: {e}") from None
        if groups < 1:
            raise ValueError("score_pattern needs a group around the number, e.g. Score:\\s*(\\d+)")
        if not self.template_file and "{completion}" not in self.template:
            raise ValueError("template must contain {completion}")


def render_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def fill(template: str, sample: Sample) -> str:
    ref = sample.reference
    values = {
        "prompt": render_prompt(sample.prompt),
        "completion": sample.completion,
        "reference": "" if ref is None else ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False),
    }
    return _FIELDS.sub(lambda m: values[m[1]], template)  # one pass: a completion's own "{prompt}" stays as it is


def endpoint(base_url: str, name: str = "judge") -> str:
    """The API root: ``base_url`` without a trailing slash, with ``/v1`` added to a bare host. ``name``: the reward
    the error lines name (a judge built on this one: its own)."""
    url = base_url.rstrip("/")
    if not url:
        raise UserError(f"{name} needs a server: --reward-opt {name}.base_url=http://HOST:PORT/v1")
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{name}: base_url '{url}' is not an http(s) URL; e.g. --reward-opt {name}.base_url=http://localhost:8000/v1")
    return url if parts.path else url + "/v1"


class Unreachable(Exception):
    pass


class RequestFailed(Exception):
    """A request that the server rejected or that kept timing out: the sample is recorded as unparsed."""


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception below ``e`` (e.g. the ConnectionRefusedError under openai's "Connection error.")."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return e


class Judge:
    Config = JudgeConfig
    name = "judge"
    batched = True  # scoring hands it lists of samples; it sends them `concurrency` at a time

    def __init__(self, config: JudgeConfig | None = None):
        self.config = config or JudgeConfig()
        self._model: str | None = None
        self._template: str | None = None
        self._client = None
        self._lock = threading.Lock()
        self._down: tuple[float, str] | None = None  # (when, why) the server was last found unreachable
        self.base_url = endpoint(self.config.base_url, self.name)  # a missing or malformed URL fails here, before any sample
        if importlib.util.find_spec("openai") is None:  # so does a missing client (imported at the first request)
            raise UserError(NEEDS_OPENAI)

    # --------------------------------------------------------------------------------------- setup

    def template(self) -> str:
        if self._template is None:
            if self.config.template_file:
                try:
                    self._template = Path(self.config.template_file).expanduser().read_text(encoding="utf-8")
                except OSError as e:
                    raise UserError(f"judge: cannot read template_file '{self.config.template_file}': {e.strerror}.") from e
                if "{completion}" not in self._template:
                    raise UserError(f"judge: template_file '{self.config.template_file}' must contain {{completion}}.")
            else:
                self._template = self.config.template
        return self._template

    def client(self):
        """The one ``openai.OpenAI`` client all threads share (created at the first request)."""
        with self._lock:
            if self._client is None:
                try:
                    import openai
                except ImportError:
                    raise UserError(NEEDS_OPENAI) from None
                c = self.config
                key = os.environ.get(c.api_key_env, "") if c.api_key_env else ""
                self._client = openai.OpenAI(base_url=self.base_url, api_key=key or NO_KEY, timeout=c.timeout,
                                             max_retries=c.retries)
            return self._client

    def model(self) -> str:
        if self._model is None:
            if self.config.model:
                self._model = self.config.model
            else:
                failed = ""
                try:
                    listed = self.call_api(lambda client: client.models.list().data)
                    self._model = str(listed[0].id)
                except RequestFailed as e:
                    failed = f" ({e})"
                except (AttributeError, IndexError, TypeError):
                    pass
                if self._model is None:
                    raise UserError(f"judge: {self.base_url}/models lists no model{failed}; pass --reward-opt judge.model=NAME.")
        return self._model

    # --------------------------------------------------------------------------------------- http

    def call_api(self, request):
        """``request(client)`` through the openai client, whose retries it leaves as they are. Raises
        Unreachable (no connection) or RequestFailed (an HTTP error or timeouts that retrying did not fix)."""
        client = self.client()
        import openai  # imported by client()

        c = self.config
        tries = f"(after {c.retries + 1} tries)"
        try:
            return request(client)
        except openai.APITimeoutError:  # before APIConnectionError, its base class
            raise RequestFailed(f"timed out after {c.timeout:g} s {tries}") from None
        except openai.APIConnectionError as e:
            root = _root_cause(e)
            raise Unreachable(f"{type(root).__name__}: {root}" if root is not e else str(e)) from None
        except openai.APIStatusError as e:
            code = e.status_code
            detail = e.response.text[:300] if e.response is not None else str(e.message)[:300]
            retried = code in _RETRY_STATUS or code >= 500
            raise RequestFailed(f"HTTP {code}: {detail}" + (f" {tries}" if retried else "")) from None
        except openai.APIError as e:  # e.g. an answer that is not what the API promises
            raise RequestFailed(f"{type(e).__name__}: {e}"[:300]) from None

    # --------------------------------------------------------------------------------------- scoring

    def parse(self, text: str) -> Reward:
        c = self.config
        found = list(re.finditer(c.score_pattern, text, re.IGNORECASE))
        raw = None
        if found:
            try:
                raw = float(found[-1].group(1))
            except (TypeError, ValueError):
                raw = None
        if raw is None or not math.isfinite(raw):
            return Reward(c.unparsed_value, None, {"parsed": False, "response": text[:1000],
                                                   "detail": "no score in the judge's answer"})
        norm = (raw - c.min_score) / (c.max_score - c.min_score)
        info = {"parsed": True, "score": raw, "response": text[:1000]}
        if not 0.0 <= norm <= 1.0:
            info["clipped"] = True
        return Reward(min(1.0, max(0.0, norm)), None, info)

    def judge_one(self, sample: Sample) -> Reward:
        c = self.config
        messages = ([{"role": "system", "content": c.system}] if c.system else []) + \
            [{"role": "user", "content": fill(self.template(), sample)}]
        model = self.model()
        try:
            answer = self.call_api(lambda client: client.chat.completions.create(
                model=model, messages=messages, max_tokens=c.max_tokens, temperature=c.temperature))
        except RequestFailed as e:
            return Reward(c.unparsed_value, None, {"parsed": False, "error": str(e)})
        try:
            text = answer.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            shown = answer.model_dump_json() if hasattr(answer, "model_dump_json") else json.dumps(answer, default=str)
            return Reward(c.unparsed_value, None, {"parsed": False, "error": f"malformed answer: {shown[:300]}"})
        return self.parse(text)

    def __call__(self, samples: list[Sample]) -> list[Reward]:
        if not samples:
            return []
        from concurrent.futures import ThreadPoolExecutor

        # scoring retries a failed batch sample by sample: do not wait out the retries again for each
        if self._down and time.monotonic() - self._down[0] < DOWN_MEMORY_S:
            raise UserError(self._down[1])
        try:
            self.model()
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(samples))) as pool:
                return list(pool.map(self.judge_one, samples))
        except Unreachable as e:
            msg = f"judge: cannot reach {self.base_url}: {e}; start the server or fix --reward-opt judge.base_url."
            self._down = (time.monotonic(), msg)
            raise UserError(msg) from None
