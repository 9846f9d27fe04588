"""completions/ holds scripts generated from the CLI; they must match what the CLI generates now,
and the bash one must actually complete."""

import subprocess

from conftest import ROOT
from tokalign.cli.completions import render_all


def test_completion_scripts_are_current():
    for name, text in render_all().items():
        path = ROOT / "completions" / name
        assert path.is_file() and path.read_text() == text, f"{path} is stale: run `python -m tokalign.cli.completions completions`"


def test_bash_completion_completes_commands_and_options():
    script = f"""source {ROOT / 'completions' / 'tokalign.bash'}
COMP_WORDS=(tokalign tr); COMP_CWORD=1; _tokalign; echo "${{COMPREPLY[@]}}"
COMP_WORDS=(tokalign rollout --max-n); COMP_CWORD=2; _tokalign; echo "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "train" and out[1] == "--max-new-tokens"
