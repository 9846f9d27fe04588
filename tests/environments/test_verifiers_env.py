"""Environments written for the verifiers library, run turn by turn through tokalign's adapter: tool calls parsed
from the model's text reach a vf ToolEnv's tools (sync and async) and their results come back as tool messages;
vf's stop conditions end the episode; async setup_state / env_response / stop conditions work; an environment loads
by id; its dataset is a task; its rubric is a reward. No network, no downloads: the environments are built here."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import types

import pytest
from conftest import Scripted

vf = pytest.importorskip("verifiers")
if getattr(vf, "__file__", None) is None:  # not installed: the name found is the tests/verifiers folder (a namespace)
    pytest.skip("the verifiers library is not installed", allow_module_level=True)
if not hasattr(vf, "MultiTurnEnv"):
    pytest.skip(f"verifiers {getattr(vf, '__version__', '?')} has no classic vf.MultiTurnEnv API (0.4 removed it)",
                allow_module_level=True)
datasets = pytest.importorskip("datasets")

from tokalign import environments
from tokalign.environments import verifiers_env
from tokalign.environments.calls import hermes_text
from tokalign.environments.verifiers_env import (
    RubricReward,
    VerifiersEnvironment,
    VerifiersTask,
)
from tokalign.errors import PluginError, UserError
from tokalign.protocols import Sample

PROMPT = [{"role": "user", "content": "What is 2+3? Use the tools."}]


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """vf environments install SIGINT/SIGTERM handlers when built; the test process keeps its own."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer
        b: the second integer
    """
    return a + b


async def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: the key
    """
    return {"pi": "3.14159"}.get(key, "unknown")


def explode(x: str) -> str:
    """Always fails.

    Args:
        x: anything
    """
    raise ValueError("boom")


def correct(completion, answer, **kwargs) -> float:
    last = [m for m in completion if m.role == "assistant"][-1]
    return 1.0 if (last.content or "").strip() == answer else 0.0


def tool_env(max_turns: int = 4):
    ds = datasets.Dataset.from_list([{"prompt": PROMPT, "answer": "5", "info": {"level": 1}}])
    return vf.ToolEnv(tools=[add, lookup, explode], dataset=ds, max_turns=max_turns, rubric=vf.Rubric(funcs=[correct]))


def row(prompt=PROMPT, reference="5") -> dict:
    return {"id": "p0", "prompt": json.dumps(prompt), "reference": json.dumps(reference)}


def test_tool_env_tool_calls_come_back_as_tool_messages():
    env = VerifiersEnvironment(tool_env(max_turns=5))
    schemas = env.tools()
    assert [s["function"]["name"] for s in schemas] == ["add", "lookup", "explode"]
    assert schemas[0]["type"] == "function" and set(schemas[0]["function"]["parameters"]["properties"]) == {"a", "b"}

    ep = env.start(row())
    s = ep.vf_state
    assert s["answer"] == "5" and s["info"] == {"level": 1}  # info from the vf dataset row with this prompt
    # a Hermes call to a sync tool, with text around it
    reply = env.step(ep, "Let me add. " + hermes_text("add", {"a": 2, "b": 3}))
    assert not reply.done and reply.messages == [{"role": "tool", "name": "add", "content": "5"}]
    assert reply.info["tool_calls"] == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    step = s["trajectory"][-1]["completion"][-1]
    assert step.content == "Let me add." and step.tool_calls[0].name == "add" and json.loads(step.tool_calls[0].arguments) == {"a": 2, "b": 3}
    # two calls in one turn: an async tool, and one that raises (vf's error_formatter answers it)
    reply = env.step(ep, hermes_text("lookup", {"key": "pi"}) + "\n" + hermes_text("explode", {"x": "y"}))
    assert reply.messages == [{"role": "tool", "name": "lookup", "content": "3.14159"},
                              {"role": "tool", "name": "explode", "content": "boom"}]
    # Llama 3 JSON calls are read too
    reply = env.step(ep, '{"name": "add", "parameters": {"a": 1, "b": 1}}')
    assert reply.messages == [{"role": "tool", "name": "add", "content": "2"}]
    # a turn without a call ends it (ToolEnv's no_tools_called), and cleanup renders vf's completion
    reply = env.step(ep, "5")
    assert reply.done and reply.info["stop_condition"] == "no_tools_called" and ep.done
    assert [m.role for m in s["completion"]] == ["assistant", "tool", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
    assert env.score(ep)[0] == 1.0


def test_unreadable_call_is_no_call_for_vf_and_max_turns_ends():
    env = VerifiersEnvironment(tool_env(max_turns=2))
    ep = env.start(row())
    reply = env.step(ep, "<tool_call>{not json</tool_call>")
    # recorded as malformed for tokalign's metrics; vf sees a turn without a call, as from a failed server-side parser
    assert reply.done and reply.info["tool_calls"][0]["name"] is None and "error" in reply.info["tool_calls"][0]
    assert ep.vf_state["stop_condition"] == "no_tools_called"
    ep = env.start(row())
    assert not env.step(ep, hermes_text("add", {"a": 1, "b": 2})).done
    reply = env.step(ep, hermes_text("add", {"a": 1, "b": 2}))
    assert reply.done and reply.info["stop_condition"] == "max_turns_reached"


class Guess(vf.MultiTurnEnv):
    """Guess the answer; async setup_state, env_response and stop condition; a step reward per wrong guess."""

    async def setup_state(self, state, **kwargs):
        state["wrong"] = 0
        return await super().setup_state(state)

    @vf.stop
    async def guessed(self, state, **kwargs) -> bool:
        trajectory = state["trajectory"]
        return bool(trajectory) and trajectory[-1]["completion"][-1].content.strip() == state["answer"]

    async def env_response(self, messages, state, **kwargs):
        state["wrong"] += 1
        state["trajectory"][-1]["reward"] = -0.1
        guess = int(messages[-1].content.strip())
        return [vf.UserMessage(content="higher" if guess < int(state["answer"]) else "lower")]


def guess_env():
    ds = datasets.Dataset.from_list([{"question": "Guess my number (1-10).", "answer": "7"}])
    return Guess(dataset=ds, max_turns=5, rubric=vf.Rubric(funcs=[correct]))


def test_multi_turn_env_async_methods_and_stop_condition():
    env = VerifiersEnvironment(guess_env())
    assert env.tools() is None
    prompt = [{"role": "user", "content": "Guess my number (1-10)."}]
    ep = env.start(row(prompt, "7"))
    assert ep.vf_state["wrong"] == 0  # async setup_state ran
    reply = env.step(ep, "3")
    assert reply.messages == [{"role": "user", "content": "higher"}] and reply.reward == -0.1 and not reply.done
    assert env.step(ep, "9").messages == [{"role": "user", "content": "lower"}]
    reply = env.step(ep, "7")
    assert reply.done and reply.info["stop_condition"] == "guessed" and ep.vf_state["wrong"] == 2
    assert env.score(ep)[0] == 1.0


def test_a_conversation_rewritten_is_refused():
    class Forgetful(Guess):
        async def get_prompt_messages(self, state):
            return [vf.UserMessage(content="start again")]

    ds = datasets.Dataset.from_list([{"question": "q", "answer": "7"}])
    env = VerifiersEnvironment(Forgetful(dataset=ds, max_turns=5))
    ep = env.start(row([{"role": "user", "content": "q"}], "7"))
    with pytest.raises(PluginError, match="rewrote the conversation"):
        env.step(ep, "3")


def test_an_environment_that_asks_the_model_itself_is_refused():
    class Sampler(Guess):
        async def env_response(self, messages, state, **kwargs):
            await self.get_model_response(state, messages)
            return []

    ds = datasets.Dataset.from_list([{"question": "q", "answer": "7"}])
    env = VerifiersEnvironment(Sampler(dataset=ds, max_turns=5))
    with pytest.raises(PluginError, match="asked the model for a response itself"):
        env.step(env.start(row([{"role": "user", "content": "q"}], "7")), "3")


MODULE = '''
import datasets
import verifiers as vf


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer
        b: the second integer
    """
    return a + b


def correct(completion, answer, **kwargs) -> float:
    return 1.0 if (completion[-1].content or "").strip() == answer else 0.0


def load_environment(max_turns: int = 4, **kwargs):
    ds = datasets.Dataset.from_list([{"question": "2+3?", "answer": "5", "info": {"n": 0}},
                                     {"question": "4+4?", "answer": "8", "info": {"n": 1}}])
    return vf.ToolEnv(tools=[add], dataset=ds, max_turns=max_turns, rubric=vf.Rubric(funcs=[correct]))
'''


@pytest.fixture
def installed_env(tmp_path, monkeypatch):
    """A vf environment module on the path, named by id in the environment variables."""
    (tmp_path / "tiny_vf_env.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(verifiers_env.ENV_ID_VAR, "tiny-vf-env")
    monkeypatch.setenv(verifiers_env.ENV_ARGS_VAR, '{"max_turns": 3}')
    monkeypatch.setattr(verifiers_env, "_loaded", {})
    yield "tiny-vf-env"
    sys.modules.pop("tiny_vf_env", None)


def test_loaded_by_id_through_the_plugin_path_and_its_dataset_is_a_task(installed_env):
    env = environments.load("tokalign.environments.verifiers_env:VerifiersEnvironment")
    assert isinstance(env, VerifiersEnvironment) and env.env.max_turns == 3
    assert [s["function"]["name"] for s in env.tools()] == ["add"]
    assert environments.load("tokalign.environments.verifiers_env:VerifiersEnvironment").env is env.env  # loaded once
    records = VerifiersTask(installed_env).records("train")
    assert records == [{"id": "0", "prompt": [{"role": "user", "content": "2+3?"}], "reference": "5"},
                       {"id": "1", "prompt": [{"role": "user", "content": "4+4?"}], "reference": "8"}]
    assert VerifiersTask().records("eval") == records  # no eval set: the train set, as vf does
    ep = env.start(row(records[1]["prompt"], records[1]["reference"]))
    assert ep.vf_state["info"] == {"n": 1} and ep.vf_state["example_id"] == 1

    class Mine(VerifiersEnvironment):
        env_id, env_args = installed_env, {"max_turns": 6}

    assert Mine().env.max_turns == 6


def test_bad_settings_are_one_line_errors(installed_env, monkeypatch):
    monkeypatch.setenv(verifiers_env.ENV_ARGS_VAR, "[1]")
    with pytest.raises(UserError, match="must be a JSON object"):
        VerifiersEnvironment()
    monkeypatch.delenv(verifiers_env.ENV_ID_VAR)
    with pytest.raises(UserError, match="Name the verifiers environment"):
        VerifiersEnvironment()
    with pytest.raises(PluginError, match="'no-such-env' failed to load"):
        verifiers_env.load_vf_env("no-such-env", {})
    monkeypatch.setitem(sys.modules, "verifiers", types.SimpleNamespace(__version__="0.4.0"))  # v1 only
    with pytest.raises(UserError, match="no classic vf.MultiTurnEnv API"):
        verifiers_env.vf_module()


def test_rubric_reward_replays_the_episode(installed_env):
    reward = RubricReward()
    call = hermes_text("add", {"a": 2, "b": 3})
    episode = [{"role": "assistant", "content": call}, {"role": "tool", "name": "add", "content": "5"},
               {"role": "assistant", "content": "5"}]

    def sample(messages, reference="5", completion="5", finish="stop"):
        meta = {"messages": messages} if messages else {}
        return Sample(id="p0#0", prompt=[{"role": "user", "content": "2+3?"}], completion=completion,
                      reference=reference, finish_reason=finish, metadata=meta)

    right, wrong, single = reward([sample(episode), sample(episode, reference="6"), sample(None)])
    assert right.value == 1.0 and right.info["metrics"]["correct"] == 1.0 and right.info["stop_condition"] == "no_tools_called"
    assert right.info["metrics"]["total_tool_calls"] == 1.0  # ToolEnv's own metric saw the replayed call
    assert wrong.value == 0.0 and single.value == 1.0
    # an episode tokalign cut mid-call (finish "length", no reply after it) is scored as it stands
    cut = reward([sample(episode[:1], finish="length", completion=call)])[0]
    assert cut.value == 0.0 and cut.info["stop_condition"] is None


def test_the_score_cache_tells_environments_apart(installed_env, tmp_path, monkeypatch):
    from tokalign import rewards

    name = "tokalign.environments.verifiers_env:RubricReward"
    fingerprint = rewards.build(name)[4]
    assert rewards.build(name)[4] == fingerprint
    monkeypatch.setenv(verifiers_env.ENV_ARGS_VAR, '{"max_turns": 9}')
    assert rewards.build(name)[4] != fingerprint  # other load_environment arguments
    (tmp_path / "tiny_vf_env.py").write_text(textwrap.dedent(MODULE) + "\n# edited\n")
    assert rewards.build(name, {"env_args": '{"max_turns": 3}'})[4] != fingerprint  # the environment's code changed


def test_episode_engine_runs_a_vf_tool_env_and_the_rubric_scores_it(installed_env):
    from tokalign import models
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.episodes import EpisodeEngine
    from tokalign.rows import rollout_rows, to_sample

    tok = models.load_tokenizer("")
    env = VerifiersEnvironment()
    prompt = [{"role": "user", "content": "2+3?"}]
    ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt_row = {"id": "0", "prompt": json.dumps(prompt), "prompt_text": "", "prompt_ids": ids, "reference": json.dumps("5")}
    engine = Scripted(tok, [hermes_text("add", {"a": 2, "b": 3}), "5"])
    (ep,) = EpisodeEngine(engine, env, max_turns=4).generate([ids], SamplingSpec(n=1, max_new_tokens=64), rows=[prompt_row])[0]
    assert [m["role"] for m in ep.episode["messages"]] == ["assistant", "tool", "assistant"]
    assert ep.episode["messages"][1] == {"role": "tool", "name": "add", "content": "5"} and ep.text == "5"
    e0, e1, who = ep.episode["turns"][1]
    assert who == "env" and tok.decode(ep.ids[e0:e1]) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    sample = to_sample(rollout_rows([prompt_row], [[ep]])[0])
    assert RubricReward()([sample])[0].value == 1.0
