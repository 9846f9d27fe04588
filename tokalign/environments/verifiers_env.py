"""Environments written for the ``verifiers`` library (Prime Intellect's ``vf.Environment``) as tokalign environments.

What is adapted: verifiers' classic API — ``vf.MultiTurnEnv`` and what subclasses it (``SingleTurnEnv``, ``ToolEnv``,
``StatefulToolEnv``, an environment of your own with ``env_response`` and ``@vf.stop`` conditions) — in the versions
whose messages are pydantic objects (``vf.AssistantMessage``, ``vf.ToolMessage``) and whose tools are ``tool_defs``:
verifiers 0.1.11 up to 0.3.x (0.3 keeps that API as ``verifiers.legacy``, still reached as ``import verifiers as vf``).
verifiers 0.4 removed it: its ``verifiers.v1`` environments are tasksets played by harness programs that call the
model themselves through an intercepted endpoint, which is not a turn-by-turn protocol; loading one says so.

An episode makes the calls vf's own ``MultiTurnEnv.rollout`` makes, in the same order, with tokalign's model turns
where vf would ask its client for a response:

* ``start(row)`` builds the rollout input from the prompt row (``prompt``; ``answer`` = the row's ``reference``;
  ``info``, ``example_id`` and ``task`` from the vf environment's own dataset row with the same prompt, when its
  dataset is loaded) and runs ``env.init_state`` and ``env.setup_state``.
* ``step(state, text)`` turns the model's text into a ``vf.AssistantMessage`` whose ``tool_calls`` are the calls
  tokalign parses from it (Hermes ``<tool_call>`` or Llama 3 JSON, ``tokalign.environments.calls``), adds it as a
  trajectory step (``env.add_trajectory_step``), and asks ``env.is_completed(state)`` (the ``@vf.stop`` conditions:
  max turns, no tool called, an error, ...). If the episode goes on, ``env.get_prompt_messages(state)`` (which calls
  ``env_response``) gives the reply; its new messages go back to the model, a ``vf.ToolMessage`` as
  ``{"role": "tool", "name": <the called tool>, "content": ...}``, and a reward the environment put on the turn's
  trajectory step (``state.add_step_reward``) is the turn's reward. An episode that ends runs ``env.cleanup``.
  Coroutines run on one event loop per environment, in its own thread, so what ``setup_state`` opens stays usable.

Where tokalign differs from vf's loop: a tool call tokalign cannot read (bad JSON, no name) is not passed to vf —
as when an OpenAI server's tool parser fails, the turn then holds no call (it is still counted in the episode's
``tool_calls`` as malformed). An episode that tokalign's own budget ends (``--max-turns``, the token budget) gets no
``cleanup``: the environment protocol has no end hook. An environment that asks the model itself (``state["client"]``)
is refused with an error, one that rewrites the conversation instead of appending to it (``get_prompt_messages``
overridden that way) too; ``EnvGroup`` and environments that replace ``rollout`` are not ``MultiTurnEnv``s and are
refused; tools given per row (``info["tool_defs"]``) run, but the prompt shows only the environment's own tools.

How to name one. Plug-in names are entry points or ``module:attr`` with no arguments, so a vf environment id cannot
ride on ``--env`` itself. The simplest honest design is an environment variable plus a subclass:

* ``TOKALIGN_VF_ENV=ENV_ID tokalign rollout P --env tokalign.environments.verifiers_env:VerifiersEnvironment`` loads
  ``vf.load_environment(ENV_ID, **json.loads($TOKALIGN_VF_ENV_ARGS or "{}"))`` (an installed module named like the id,
  e.g. by ``vf-install``);
* a subclass that sets ``env_id`` (and ``env_args``) is a plug-in of its own — ``class Wordle(VerifiersEnvironment):
  env_id = "wordle"`` registered in the ``tokalign.environments`` entry-point group, or passed as ``--env mymod:Wordle``;
* ``VerifiersEnvironment(my_vf_env)`` wraps an environment object built in Python (``--env mymod:env`` with
  ``env = VerifiersEnvironment(...)`` in ``mymod``).

``VerifiersTask`` (``tokalign prepare tokalign.environments.verifiers_env:VerifiersTask:ENV_ID --split train|eval``)
gives the environment's own dataset as prompts (``reference``: its ``answer``). ``RubricReward``
(``--reward tokalign.environments.verifiers_env:RubricReward``; the environment named by the same variables or by
its options) scores a sample with the environment's rubric (``rubric.score_rollout``: its reward functions and
weights) after replaying the episode's model turns through a fresh episode of the environment, so the rubric sees a
real vf state; tools run again, so an environment whose replies depend on chance or on the outside world may score
differently from what the model saw. Group reward functions (``states``, ``completions``, ... arguments) are not
supported: a reward sees one sample at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import json
import os
import re
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from tokalign.environments import calls as calls_mod
from tokalign.environments.base import Environment, Reply
from tokalign.errors import PluginError, UserError
from tokalign.protocols import Reward

ENV_ID_VAR = "TOKALIGN_VF_ENV"
ENV_ARGS_VAR = "TOKALIGN_VF_ENV_ARGS"
SUPPORTED = "verifiers>=0.1.11,<0.4"
_HERMES_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)
_loaded: dict[str, Any] = {}  # vf environments by id and arguments: one load per process


def vf_module():
    """``import verifiers as vf``, checked to have the classic API this adapter drives."""
    try:
        import verifiers as vf
    except ImportError as e:
        raise UserError(f"The verifiers library is not installed: pip install '{SUPPORTED}'.") from e
    if not all(hasattr(vf, a) for a in ("MultiTurnEnv", "AssistantMessage", "ToolCall", "Client", "Error")):
        raise UserError(f"verifiers {getattr(vf, '__version__', '?')} has no classic vf.MultiTurnEnv API (verifiers 0.4 "
                        f"replaced it with verifiers.v1, which tokalign does not adapt): pip install '{SUPPORTED}'.")
    return vf


def load_vf_env(env_id: str | None = None, env_args: dict | None = None):
    """``vf.load_environment(env_id, **env_args)``, once per process; ``None`` reads ``$TOKALIGN_VF_ENV`` and
    ``$TOKALIGN_VF_ENV_ARGS`` (a JSON object)."""
    env_id = env_id or os.environ.get(ENV_ID_VAR)
    if not env_id:
        raise UserError(f"Name the verifiers environment: {ENV_ID_VAR}=ENV_ID (its module installed), or subclass "
                        "VerifiersEnvironment with env_id = '...'.")
    env_args = env_args if env_args is not None else _args(os.environ.get(ENV_ARGS_VAR))
    key = json.dumps([env_id, env_args], sort_keys=True, default=str)
    if key not in _loaded:
        vf = vf_module()
        try:
            _loaded[key] = vf.load_environment(env_id, **env_args)
        except Exception as e:
            raise PluginError(f"verifiers environment '{env_id}' failed to load: {type(e).__name__}: {e}") from e
    return _loaded[key]


def _args(text: str | None) -> dict:
    """``load_environment`` arguments written as a JSON object (empty: none)."""
    try:
        args = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"{ENV_ARGS_VAR} is not JSON ({e.msg}); write a JSON object of load_environment arguments.") from None
    if not isinstance(args, dict):
        raise UserError(f"{ENV_ARGS_VAR} must be a JSON object of load_environment arguments, got {args!r}.")
    return args


def _module_hash(env_id: str) -> str:
    """The content hash of the module ``vf.load_environment(env_id)`` imports (found, not imported), or ''."""
    try:
        spec = importlib.util.find_spec(env_id.replace("-", "_").split("/")[-1])
        with open(spec.origin, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (ImportError, ValueError, AttributeError, TypeError, OSError):
        return ""


def _decoded(value: Any) -> Any:
    """A prompt row's JSON-encoded column, decoded (a value that is not JSON as it is)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _field(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else getattr(message, key, None)


def _text(content: Any) -> str:
    """Message content as text (the text of content parts; images and audio have none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(_field(p, "text") or "") for p in content if _field(p, "type") == "text")
    return str(content)


def _normalized(messages: list) -> list:
    """``messages`` as vf message objects (what vf's own loop does with what ``get_prompt_messages`` returns)."""
    try:
        from verifiers.utils.message_utils import normalize_messages
    except ImportError:
        return messages
    return normalize_messages(messages) if any(isinstance(m, dict) for m in messages) else messages


def _prompt_key(prompt: Any) -> str:
    if not isinstance(prompt, list):
        return json.dumps(_text(prompt))
    return json.dumps([[_field(m, "role"), _text(_field(m, "content"))] for m in prompt], ensure_ascii=False)


class Episode:
    """One episode's state: ``vf_state`` (the vf ``State``), ``messages`` (the conversation as vf messages), the tool
    names behind the call ids given so far, and whether the episode has ended."""

    def __init__(self, vf_state, messages: list):
        self.vf_state, self.messages = vf_state, messages
        self.names: dict[str, str] = {}
        self.turns = 0
        self.done = False


class VerifiersEnvironment(Environment):
    """A vf ``MultiTurnEnv`` as a tokalign environment. ``vf_env``: the environment object (None: load ``env_id`` with
    ``env_args``, each falling back to ``$TOKALIGN_VF_ENV`` / ``$TOKALIGN_VF_ENV_ARGS``); ``parser``: the tool-call
    format (``tokalign.environments.calls.FAMILIES``)."""

    name = "verifiers"
    env_id: str | None = None
    env_args: dict | None = None

    def __init__(self, vf_env: Any = None, parser: str = "auto"):
        self.vf = vf_module()
        self.env = vf_env if vf_env is not None else load_vf_env(self.env_id, self.env_args)
        if not isinstance(self.env, self.vf.MultiTurnEnv):
            raise PluginError(f"verifiers environment {type(self.env).__name__} is not a vf.MultiTurnEnv (SingleTurnEnv, "
                              "ToolEnv, ...): only those can be run turn by turn.")
        self.parser = parser
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._client = None
        self._examples: dict[str, dict] | None = None

    def run(self, value: Any) -> Any:
        """``value``, awaited on this environment's event loop if it is awaitable."""
        if not inspect.isawaitable(value):
            return value
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="tokalign-verifiers", daemon=True).start()

        async def wait():
            return await value

        return asyncio.run_coroutine_threadsafe(wait(), self._loop).result()

    def tools(self) -> list[dict] | None:
        schemas = []
        for tool in getattr(self.env, "tool_defs", None) or []:
            d = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
            schemas.append({"type": "function", "function": {
                "name": d["name"], "description": d.get("description") or "",
                "parameters": d.get("parameters") or {"type": "object", "properties": {}}}})
        return schemas or None

    def client(self):
        """The vf client the state holds: one that refuses, since tokalign's model speaks only in its own turns."""
        if self._client is None:
            env_name = type(self.env).__name__

            def refuse(*args, **kwargs):
                raise PluginError(f"verifiers environment {env_name} asked the model for a response itself; tokalign's "
                                  "model speaks only in its own turns (environments that sample the model are not supported).")

            async def arefuse(*args, **kwargs):
                refuse()

            async def close(*args, **kwargs):
                return None

            base = self.vf.Client
            methods = {n: arefuse if inspect.iscoroutinefunction(getattr(base, n)) else refuse for n in base.__abstractmethods__}
            methods.update(get_response=arefuse, close=close)
            self._client = type("TokalignTurns", (base,), methods)(None)
        return self._client

    def example(self, prompt: Any) -> dict | None:
        """The row of the vf environment's loaded dataset (train, then eval) whose prompt is ``prompt``, if any."""
        if self._examples is None:
            self._examples = {}
            for ds in (getattr(self.env, "dataset", None), getattr(self.env, "eval_dataset", None)):
                for row in ds if ds is not None else []:
                    self._examples.setdefault(_prompt_key(row.get("prompt")), row)
        return self._examples.get(_prompt_key(prompt))

    def start(self, row: dict) -> Episode:
        prompt = _decoded(row.get("prompt"))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        reference = _decoded(row.get("reference"))
        example = self.example(prompt) or {}
        vf_input: dict[str, Any] = {"prompt": prompt, "answer": reference if reference is not None else example.get("answer", ""),
                                    "info": example.get("info") or {},
                                    "example_id": int(example.get("example_id", zlib.crc32(_prompt_key(prompt).encode())))}
        if example.get("task") is not None:
            vf_input["task"] = example["task"]
        state = self.run(self.env.init_state(vf_input, self.client(), "tokalign"))
        try:
            state = self.run(self.env.setup_state(state)) or state
        except self.vf.Error as e:  # as vf's rollout: the error is recorded and stops the episode at its first turn
            state["error"] = e
        return Episode(state, list(state["prompt"]))

    def step(self, state: Episode, text: str) -> Reply:
        return self.turn(state, text)

    def turn(self, ep: Episode, text: str, truncated: bool = False) -> Reply:
        """``step``; ``truncated``: the turn was cut by the token budget (recorded, and the episode ends there)."""
        vf, s = self.vf, ep.vf_state
        found = calls_mod.parse(text, self.parser)
        info = {"tool_calls": [c.as_dict() for c in found]}
        tool_calls = []
        for c in found:
            if c.error is None:
                call_id = f"call_{ep.turns}_{len(tool_calls)}"
                ep.names[call_id] = c.name
                tool_calls.append(vf.ToolCall(id=call_id, name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
        ep.turns += 1
        content = text if not tool_calls else _HERMES_BLOCK.sub("", text).strip() if "<tool_call>" in text else ""
        message = vf.AssistantMessage(content=content, tool_calls=tool_calls or None)
        self.run(self.env.add_trajectory_step(s, {
            "prompt": list(ep.messages), "completion": [message], "response": None, "tokens": None, "reward": None,
            "advantage": None, "is_truncated": truncated, "trajectory_id": s.get("trajectory_id"), "extras": {}}))
        ep.messages.append(message)
        if self.run(self.env.is_completed(s)) or truncated:
            return self.end(ep, info)
        try:
            context = self.run(self.env.get_prompt_messages(s))
        except vf.Error as e:  # as vf's rollout: recorded, and the has_error stop condition ends the episode
            s["error"] = e
            self.run(self.env.is_completed(s))
            return self.end(ep, info)
        if s.get("final_env_response") is not None:
            return self.end(ep, info)
        context = list(context)
        n = len(ep.messages)
        if len(context) < n or any(a is not b and a != b for a, b in zip(context, ep.messages)):
            raise PluginError(f"verifiers environment {type(self.env).__name__} rewrote the conversation in "
                              "get_prompt_messages; tokalign's episodes only append to it.")
        context = _normalized(context)
        new = [self._message(m, ep) for m in context[n:]]
        ep.messages = context
        return Reply(new, reward=self._step_reward(s), info=info)

    def end(self, ep: Episode, info: dict | None = None) -> Reply:
        """End the episode: the environment's ``@vf.cleanup`` handlers run (once)."""
        if not ep.done:
            ep.done = True
            if hasattr(self.env, "cleanup"):  # verifiers 0.1.14 on: @vf.cleanup handlers, the completion rendered by one
                self.run(self.env.cleanup(ep.vf_state))
            else:  # 0.1.11-0.1.12: is_completed ran the handlers if a stop condition fired; the completion is apart
                if not ep.vf_state.get("is_completed"):
                    self.run(self.env._cleanup(ep.vf_state))
                self.run(self.env.render_completion(ep.vf_state))
        return Reply(done=True, reward=self._step_reward(ep.vf_state),
                     info={**(info or {}), "stop_condition": ep.vf_state.get("stop_condition")})

    @staticmethod
    def _step_reward(s) -> float | None:
        """The reward vf environments may give the latest turn (``state.add_step_reward``), if any."""
        trajectory = s.get("trajectory") or []
        reward = trajectory[-1].get("reward") if trajectory else None
        return float(reward) if isinstance(reward, (int, float)) and not isinstance(reward, bool) else None

    def _message(self, message: Any, ep: Episode) -> dict:
        """A vf message as a tokalign chat message (a tool result named after the tool its call id belongs to)."""
        if isinstance(message, str):
            return {"role": "user", "content": message}
        role, content = _field(message, "role"), _text(_field(message, "content"))
        if role == "tool":
            call_id = _field(message, "tool_call_id")
            return {"role": "tool", "name": ep.names.get(call_id) or _field(message, "name") or "tool", "content": content}
        return {"role": "user" if role == "text" else role, "content": content}

    def score(self, ep: Episode) -> tuple[float, dict]:
        """The rubric's reward and metrics for an ended episode (``rubric.score_rollout``, then ``rubric.cleanup``)."""
        rubric = self.env.rubric
        if getattr(rubric, "has_group_rewards", False):
            raise PluginError(f"verifiers environment {type(self.env).__name__}: its rubric has group reward functions, "
                              "which need the whole group of rollouts; tokalign scores one sample at a time.")
        try:
            self.run(rubric.score_rollout(ep.vf_state))
        except AssertionError as e:  # vf's own check: no reward function at all
            raise PluginError(f"verifiers environment {type(self.env).__name__}: its rubric cannot score ({e}).") from e
        if hasattr(rubric, "cleanup"):  # verifiers 0.1.12 on
            self.run(rubric.cleanup(ep.vf_state))
        metrics = {k: float(v) for k, v in (ep.vf_state.get("metrics") or {}).items()}
        return float(ep.vf_state.get("reward") or 0.0), metrics


class VerifiersTask:
    """A vf environment's own dataset as prompts: ``tokalign prepare
    tokalign.environments.verifiers_env:VerifiersTask:ENV_ID --split train|eval`` (no ``:ENV_ID``: ``$TOKALIGN_VF_ENV``).
    ``eval`` falls back to the train set where the environment has none (as vf does)."""

    splits = ("train", "eval")

    def __init__(self, env_id: str | None = None):
        self.env_id = env_id

    def records(self, split: str) -> list[dict]:
        env = load_vf_env(self.env_id)
        ds = env.get_dataset() if split == "train" else env.get_eval_dataset()
        records = []
        for i, row in enumerate(ds):
            prompt = row["prompt"]
            if isinstance(prompt, list):  # Arrow fills absent keys with None
                prompt = [{"role": _field(m, "role"), "content": _text(_field(m, "content"))} for m in prompt]
            records.append({"id": str(row.get("example_id", i)), "prompt": prompt, "reference": row.get("answer")})
        return records


@dataclass
class RubricRewardConfig:
    """Which vf environment's rubric scores: ``env_id`` and ``env_args`` (a JSON object), by default
    ``$TOKALIGN_VF_ENV`` and ``$TOKALIGN_VF_ENV_ARGS`` (``--reward-opt NAME.env_id=...`` to set them).
    ``env_source`` is filled in with the environment module's content hash: with the other two it keeps the score
    cache from serving one environment's scores, or an edited one's, for another."""

    env_id: str = field(default_factory=lambda: os.environ.get(ENV_ID_VAR, ""))
    env_args: str = field(default_factory=lambda: os.environ.get(ENV_ARGS_VAR, ""))
    env_source: str = ""

    def __post_init__(self):
        if not self.env_source and self.env_id:
            self.env_source = _module_hash(self.env_id)


class RubricReward:
    """The vf environment's rubric as a tokalign reward (``--reward tokalign.environments.verifiers_env:RubricReward``).

    Each sample's model turns (``metadata["messages"]`` for an episode, else the completion) are replayed through a
    fresh episode of the environment; when it ends, ``rubric.score_rollout`` scores it."""

    Config = RubricRewardConfig

    def __init__(self, config: RubricRewardConfig | None = None):
        self.config = config if config is not None else RubricRewardConfig()
        self._env: VerifiersEnvironment | None = None

    def environment(self) -> VerifiersEnvironment:
        if self._env is None:
            self._env = VerifiersEnvironment(load_vf_env(self.config.env_id or None, _args(self.config.env_args)))
        return self._env

    def __call__(self, samples: list) -> list[Reward]:
        return [self.score(s) for s in samples]

    def score(self, sample) -> Reward:
        env = self.environment()
        messages = (sample.metadata or {}).get("messages")
        turns = [m["content"] for m in messages if m.get("role") == "assistant"] if messages else [sample.completion]
        # the last turn was cut by the budget (not answered by the environment) when the sample stopped on "length"
        # with no reply after it
        cut = sample.finish_reason == "length" and (not messages or messages[-1].get("role") == "assistant")
        ep = env.start({"prompt": json.dumps(sample.prompt), "reference": json.dumps(sample.reference)})
        for i, text in enumerate(turns):
            if env.turn(ep, text, truncated=cut and i == len(turns) - 1).done:
                break
        env.end(ep)
        value, metrics = env.score(ep)
        return Reward(value, info={"metrics": metrics, "stop_condition": ep.vf_state.get("stop_condition")})
