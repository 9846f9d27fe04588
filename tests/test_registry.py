"""Entry-point registry: built-ins, `module:attr` names, a broken third-party plug-in that breaks nothing else."""

import json
import os
import subprocess
import sys

import pytest

from tokalign import registry
from tokalign.errors import UserError


def test_builtins_are_registered_through_entry_points():
    assert {"grpo", "dpo", "sft", "dr_grpo", "dapo"} <= set(registry.available("algorithm"))
    assert registry.info("verifier", "exact_match").distribution == "tokalign"
    assert registry.check("algorithm", "grpo") is None


def test_unknown_name_did_you_mean():
    with pytest.raises(UserError, match="Unknown algorithm 'gpro'. Did you mean 'grpo'"):
        registry.load("algorithm", "gpro")


def test_module_attr_path_is_accepted():
    assert registry.load("algorithm", "tokalign.algorithms.grpo:GRPO").__name__ == "GRPO"
    with pytest.raises(UserError, match="module 'nope' not found"):
        registry.load("algorithm", "nope.mod:X")


def _fake_distribution(root, name, module_src):
    """A minimal installed distribution (dist-info with entry points) on a PYTHONPATH dir."""
    dist = root / f"{name.replace('-', '_')}-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(f"[tokalign.rewards]\nbroken_reward = {name.replace('-', '_')}_mod:Reward\n")
    (root / f"{name.replace('-', '_')}_mod.py").write_text(module_src)


def test_broken_plugin_is_reported_and_breaks_nothing_else(tmp_path):
    _fake_distribution(tmp_path, "tokalign-broken", "raise ImportError('needs libfoo')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "tokalign", "plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    broken = rows[("reward", "broken_reward")]
    assert broken["status"] == "broken" and "needs libfoo" in broken["error"] and broken["distribution"] == "tokalign-broken"
    assert rows[("algorithm", "grpo")]["status"] == "ok"
    assert {"name", "group", "distribution", "version", "status"} <= set(broken)
    proc = subprocess.run([sys.executable, "-m", "tokalign", "train", "grpo", "--data", "arith", "--dry-run"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tokalign", "train", "grpo", "--data", "arith", "--reward", "broken_reward",
                           "--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "failed to import: ImportError: needs libfoo" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_algorithm_table_matches_the_registry():
    """Every algorithm registered by tokalign resolves, appears in the README's algorithm table with an arXiv id or a
    stated reason for none, and every module named there exists."""
    import re

    from conftest import ROOT, cli

    listed = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout) if p["kind"] == "algorithm" and p["distribution"] == "tokalign"}
    assert all(p["status"] == "ok" for p in listed.values())
    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \| (.+) \| .+ \| (`algorithms/[a-z0-9_]+\.py`)", line)
        if m:
            for name in re.findall(r"`([a-z0-9_]+)`", m.group(1)):
                table[name] = (m.group(2), m.group(3).strip("`"))
    assert set(listed) == set(table), set(listed) ^ set(table)
    for name, (text, module) in table.items():
        assert (ROOT / "tokalign" / module).is_file(), module
        assert name == "sft" or "arXiv" in text or "no code" in text, name
