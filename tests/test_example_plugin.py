"""`pip install ./plugins/tokalign-example` adds an algorithm, a per-token reward and a verifier that the
real CLI lists and uses; `pip uninstall` removes them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli
from tokalign import artifacts

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # installs into the venv: never beside other tests
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
NEW = {("algorithm", "reinforce_mean"), ("reward", "brevity"), ("verifier", "numeric_close")}


def listed() -> dict:
    return {(r["kind"], r["name"]): r for r in json.loads(cli("plugins", "--json").stdout)}


@pytest.fixture
def installed():
    subprocess.run([*PIP, "install", "--no-deps", str(ROOT / "plugins" / "tokalign-example")], check=True)
    try:
        yield
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "tokalign-example"], check=True)


def test_install_use_uninstall(installed, tmp_path):
    rows = listed()
    for key in NEW:
        assert rows[key]["distribution"] == "tokalign-example" and rows[key]["status"] == "ok", rows.get(key)

    cli("train", "reinforce_mean", "--data", "arith", "--reward", "numeric_close", "--max-steps", "2", "--batch-size", "2",
        "--n", "4", "--set", "rollout.max_new_tokens=6", "--out", "C", cwd=tmp_path)
    plugins = json.loads((tmp_path / "C" / "manifest.json").read_text())["plugins"]
    assert {(p["name"], p["distribution"]) for p in plugins} == {("reinforce_mean", "tokalign-example"), ("numeric_close", "tokalign-example"),
                                                                 ("arith", "tokalign")}  # the task, a built-in

    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "2", "--max-new-tokens", "6", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "numeric_close", "--reward", "brevity*0.5", "--out", "S", cwd=tmp_path)
    for r in artifacts.read(tmp_path / "S", ["scored"]).rows():
        n = len(r["completion_ids"])
        assert len(r["token_rewards"]) == n  # the per-token contract survives into the artifact
        expected_brevity = -0.25 * max(0, n - 4)
        assert r["rewards"]["brevity"] == pytest.approx(expected_brevity)
        assert r["reward"] == pytest.approx(r["rewards"]["numeric_close"] + 0.5 * expected_brevity)
        assert r["token_rewards"] == pytest.approx([0.0 if t < 4 else -0.125 for t in range(n)])


def test_uninstalled_plugins_are_gone():
    assert not NEW & set(listed())
