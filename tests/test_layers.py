"""The package's layering (pyproject's ``[tool.importlinter]`` contracts) and its private-name rule, as tests, so that
``pytest`` alone catches an import that breaks them (CI also runs both tools before pytest, in tests/run.sh)."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is not installed (tokalign[dev])")
def test_import_contracts_are_kept():
    """cli > stages > train > algorithms > components|sampling > scoring > rewards > data > verifiers|rollout|inspect
    > core; algorithms never import train/stages/cli; no import cycles."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (tokalign[dev])")
def test_no_private_names_imported_from_other_packages():
    out = _run([sys.executable, "-m", "ruff", "check", "--preview", "--select", "PLC2701", "--output-format", "concise", "tokalign"])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
