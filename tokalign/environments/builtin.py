"""The built-in tools and their environments: ``calculator`` (arithmetic, evaluated exactly) and ``python``
(a program run in tokalign's code sandbox, its output returned)."""

from __future__ import annotations

import ast
import operator

from tokalign.environments.tools import ToolEnvironment

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT, MAX_DIGITS = 100, 1000  # bounds on ** and on the size of any intermediate integer


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
            raise ValueError("the result is too large")
        return value
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "1234*5678".
    """
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else format(value, ".12g")
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox (no network, no files kept) and return what it printed.

    Args:
        code: the program's source; print() what you want to see.
    """
    from tokalign import sandbox

    limits = sandbox.Limits(timeout_s=10.0, cpu_s=5, memory_mb=512)
    sandbox.check_available(limits)
    result = sandbox.run(sandbox.Job({"main.py": code}, "main.py"), limits)
    if not result.ok:
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        return f"error: {result.reason()}" + (f" ({tail[0][:300]})" if tail and tail[0] not in result.reason() else "")
    return result.stdout if result.stdout.strip() else "(no output)"


class Calculator(ToolEnvironment):
    """``--env calculator``: one tool, ``calculator(expression)``."""

    name = "calculator"

    def __init__(self, parser: str = "auto"):
        super().__init__([calculator], parser)


class Python(ToolEnvironment):
    """``--env python``: one tool, ``python(code)``, run in tokalign's code sandbox."""

    name = "python"

    def __init__(self, parser: str = "auto"):
        super().__init__([python], parser)
