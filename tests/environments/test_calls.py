"""Tool-call parsing (Hermes and Llama 3 JSON), the calculator, tool schemas and the tool environment's replies."""

from __future__ import annotations

import pytest

from tokalign.environments import calls, load
from tokalign.environments.builtin import Calculator, calculator
from tokalign.environments.tools import ToolEnvironment
from tokalign.errors import UserError


def test_hermes_calls_several_and_malformed():
    text = ('think <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>\n'
            '<tool_call>{"name":"f","arguments":"{\\"x\\": 1}"}</tool_call>')
    got = calls.parse(text)
    assert [(c.name, c.arguments, c.error) for c in got] == [("calculator", {"expression": "2*3"}, None), ("f", {"x": 1}, None)]
    bad = calls.parse('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}</tool_call>')
    assert bad[0].name is None and "not valid JSON" in bad[0].error
    assert "not closed" in calls.parse('<tool_call>{"name": "x"')[0].error
    assert "must be a JSON object" in calls.parse('<tool_call>{"name": "x", "arguments": [1]}</tool_call>')[0].error
    assert 'with a "name"' in calls.parse('<tool_call>{"arguments": {}}</tool_call>')[0].error


def test_llama3_json_calls_and_no_call():
    got = calls.parse('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1;2"}}; {"name": "g", "parameters": {}}')
    assert [(c.name, c.arguments) for c in got] == [("calculator", {"expression": "1;2"}), ("g", {})]
    assert calls.parse("The answer is 42.") == []
    assert calls.parse('{"not": "a call"}') == []  # auto: a JSON object naming no tool is text
    with pytest.raises(UserError, match="tool-call format"):
        calls.parse("x", "nope")


def test_hermes_text_round_trip():
    text = calls.hermes_text("calculator", {"expression": "12*34"})
    assert text == '<tool_call>{"name":"calculator","arguments":{"expression":"12*34"}}</tool_call>'
    assert calls.parse(text)[0].as_dict() == {"name": "calculator", "arguments": {"expression": "12*34"}}


@pytest.mark.parametrize("expr, want", [("1234*5678", "7006652"), ("(2+3)**2 - 1", "24"), ("7/2", "3.5"), ("8/4", "2"),
                                        ("-3 % 5", "2"), ("2^10", "1024"), ("10//3", "3")])
def test_calculator_exact(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr, err", [("__import__('os')", "only numbers"), ("2**1000", "too large"), ("1+", "cannot read"),
                                       ("9**99*9**99*9**99*9**99*9**99*9**99*9**99*9**99*9**99*9**99*9**99*9**99", "too large")])
def test_calculator_refuses(expr, err):
    with pytest.raises(ValueError, match=err):
        calculator(expr)


def test_schema_from_signature_and_docstring():
    (schema,) = Calculator().tools()
    fn = schema["function"]
    assert fn["name"] == "calculator" and fn["parameters"]["required"] == ["expression"]
    assert fn["parameters"]["properties"]["expression"]["type"] == "string"


def test_tool_environment_replies():
    env = Calculator()
    reply = env.step(None, calls.hermes_text("calculator", {"expression": "6*7"}))
    assert not reply.done and reply.messages == [{"role": "tool", "name": "calculator", "content": "42"}]
    assert reply.info == {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}], "tool_errors": 0}
    assert env.step(None, "42").done  # no call: the turn is the answer
    # what goes wrong is answered as an error the model sees, never raised
    for text, says in ((calls.hermes_text("nope", {}), "no tool named 'nope'"),
                       (calls.hermes_text("calculator", {"x": "1"}), "wrong arguments"),
                       (calls.hermes_text("calculator", {"expression": "1/0"}), "ZeroDivisionError"),
                       ("<tool_call>{bad</tool_call>", "not valid JSON")):
        reply = env.step(None, text)
        assert reply.messages[0]["content"].startswith("error:") and says in reply.messages[0]["content"], reply.messages
        assert reply.info["tool_errors"] == 1


def test_tool_results_are_cut_and_encoded():
    def big() -> dict:
        """Return a lot.
        """
        return {"x": "y" * 5000}

    env = ToolEnvironment([big])
    out = env.step(None, calls.hermes_text("big", {})).messages[0]["content"]
    assert out.startswith('{"x": "yyy') and out.endswith("…(cut)") and len(out) < 2100


def test_load_by_name_and_unknown():
    assert isinstance(load("calculator"), Calculator)
    with pytest.raises(UserError, match="environment"):
        load("no_such_env")


def test_python_tool_runs_in_the_sandbox():
    from tokalign.environments.builtin import Python, python

    assert python("print(6 * 7)").strip() == "42"
    assert python("x = 1") == "(no output)"
    assert python("raise SystemExit(3)").startswith("error: exit code 3")
    reply = Python().step(None, calls.hermes_text("python", {"code": "import os; print(len(os.listdir('.')))"}))
    assert reply.messages[0]["name"] == "python" and reply.info["tool_errors"] == 0
