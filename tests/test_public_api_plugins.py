"""A third party can publish PRIME-, PAR-, SPO-, ReMax- and T-REG-like methods without touching tokalign.

``tests/fixtures/public_api_pkg`` is an ordinary installable package (distribution ``thirdparty-algos``, package
``thirdparty_algos``) whose five algorithms — entry points ``tp_prime``, ``tp_par``, ``tp_spo``, ``tp_remax`` and
``tp_treg`` in ``tokalign.algorithms`` — are written against the public API only: ``tokalign.protocols``,
``tokalign.ops``, ``tokalign.components``, ``tokalign.sampling`` and the public GRPO/DPO plug-in classes; ``tp_spo``
brings its own sampling hook and ``tp_remax`` its own batch component. The tests install it with pip into a private
``--target`` directory (found through PYTHONPATH, so the venv is left alone), statically check its imports, run each
method through the real CLI, and check that on a fixed seed each one reproduces its built-in counterpart's numbers."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli

pytestmark = pytest.mark.slow

PKG = ROOT / "tests" / "fixtures" / "public_api_pkg"
DIST = "thirdparty-algos"
NAMES = ("tp_prime", "tp_par", "tp_spo", "tp_remax", "tp_treg")
# the public surface a plug-in may import from tokalign (and modules of its own package / third-party libraries)
PUBLIC = ("tokalign.protocols", "tokalign.ops", "tokalign.components", "tokalign.sampling",
          "tokalign.algorithms.grpo", "tokalign.algorithms.dpo")
FORBIDDEN = ("tokalign.train", "tokalign.stages", "tokalign.cli")
VOLATILE_PREFIXES = ("time/", "memory/", "tokens_per_s")  # as tests/train/golden_runs.py: these vary run to run

ONLINE = ("--data", "arith", "--n", "4", "--reward", "exact_match")
FLAGS = {  # per method, beyond COMMON; "@pairs" is the preference file written by the `trained` fixture
    "prime": ONLINE,
    "remax": ONLINE,
    "par": (*ONLINE, "--set", "algorithm.num_references=2"),
    "spo": ("--data", "arith", "--n", "2", "--reward", "exact_match", "--set", "algorithm.rollouts=2"),
    "treg": ("--data", "@pairs"),
}
COMMON = ("--max-steps", "2", "--batch-size", "2", "--seed", "0", "--quiet")


# ---------------------------------------------------------------------------------------------------------------------
# static check: the package imports tokalign's public API only


def private(name: str) -> bool:
    """``_x`` is private; dunders (``__future__``, ``__init__``) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def api_violations(source: str, filename: str = "<src>") -> list[str]:
    """Why ``source`` reaches past tokalign's public plug-in API: a tokalign module outside PUBLIC (in particular
    train/stages/cli), a private (``_``-prefixed) module or name, a ``_`` attribute of something imported from
    tokalign, or a dynamic import that would dodge this check. Empty when it is clean."""
    tree = ast.parse(source, filename)
    bad: list[str] = []
    tokalign_names: set[str] = set()  # local names bound to tokalign modules or objects

    def module_ok(module: str, where: int) -> None:
        if any(private(part) for part in module.split(".")):
            bad.append(f"{filename}:{where}: private module {module}")
        if module == "tokalign" or module.startswith("tokalign."):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{filename}:{where}: imports {module} (tokalign's internals)")
            elif module not in PUBLIC:
                bad.append(f"{filename}:{where}: imports {module}, outside the public API {PUBLIC}")
        if module.split(".")[0] == "importlib":
            bad.append(f"{filename}:{where}: imports {module} (dynamic imports dodge this check)")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_ok(alias.name, node.lineno)
                if alias.name.split(".")[0] == "tokalign":
                    tokalign_names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the plug-in's own package
                continue
            module = node.module or ""
            if module not in ("tokalign", "tokalign.algorithms"):  # those two: each imported name is the module
                module_ok(module, node.lineno)
            for alias in node.names:
                if alias.name == "*":
                    bad.append(f"{filename}:{node.lineno}: star import from {module}")
                elif private(alias.name):
                    bad.append(f"{filename}:{node.lineno}: imports private name {alias.name} from {module}")
                if module.split(".")[0] == "tokalign":
                    tokalign_names.add(alias.asname or alias.name)
                    if module == "tokalign" or module == "tokalign.algorithms":  # `from tokalign import train`
                        module_ok(f"{module}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            bad.append(f"{filename}:{node.lineno}: __import__ call")
    for node in ast.walk(tree):  # `ops._blocks`, `components.base._x`, ...
        if isinstance(node, ast.Attribute):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id == "tokalign":  # `import tokalign.ops` binds `tokalign`, which
                dotted = ".".join(["tokalign", *reversed(chain)])  # reaches everything: tokalign.train.x
                if not any(dotted == m or dotted.startswith(m + ".") for m in PUBLIC) and not any(
                        m.startswith(dotted + ".") for m in PUBLIC):
                    bad.append(f"{filename}:{node.lineno}: reaches {dotted}")
            if isinstance(root, ast.Name) and root.id in tokalign_names:
                hidden = [a for a in chain if private(a)]
                if hidden:
                    bad.append(f"{filename}:{node.lineno}: private attribute {hidden[0]} of {root.id}")
    return sorted(set(bad))


def test_api_check_catches_violations():
    """The checker itself: each of these reaches past the public API."""
    for src in ("from tokalign.train.loop import run", "import tokalign.stages", "from tokalign import cli",
                "from tokalign.ops import _blocks", "from tokalign import ops\nops._blocks", "from tokalign.rows import rollout_rows",
                "import importlib", "__import__('tokalign.train')", "from tokalign.components.base import *",
                "import tokalign.ops\ntokalign.train.loop.run", "import tokalign", "from tokalign.algorithms import prime"):
        assert api_violations(src), src
    assert api_violations("from tokalign import ops\nfrom tokalign.sampling import Hook\nimport torch\nsuper().__init__()") == []


def test_package_uses_only_the_public_api():
    files = sorted((PKG / "thirdparty_algos").glob("*.py"))
    assert {f.stem for f in files} >= {"prime", "par", "spo", "remax", "treg", "hooks", "components"}
    bad = [v for f in files for v in api_violations(f.read_text(), f.relative_to(PKG).as_posix())]
    assert bad == [], "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------------------
# installed: the CLI finds, checks and runs them


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package pip-installed (no deps, no index, no build isolation: setuptools is in the venv) into a fresh
    ``--target`` directory, from a copy (pip builds in the source tree)."""
    tmp = tmp_path_factory.mktemp("public_api")
    src = tmp / "pkg"
    shutil.copytree(PKG, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(src)], check=True)
    assert (target / "thirdparty_algos").is_dir()
    return target


@pytest.fixture(scope="module")
def env(site) -> dict:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def trained(site, env, tmp_path_factory):
    """``trained(algo)``: the output directory of a 2-step run of ALGO (built-in or tp_) with FLAGS[method], run once."""
    work = tmp_path_factory.mktemp("runs")
    pairs = work / "pairs.jsonl"  # as tests/train/golden_runs.py
    facts = [(f"{a}+{b}=", str(a + b), str(a + b + 1)) for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in facts))
    done: dict[str, Path] = {}

    def run(algo: str) -> Path:
        if algo not in done:
            flags = [str(pairs) if f == "@pairs" else f for f in FLAGS[algo.removeprefix("tp_")]]
            out = work / algo
            cli("train", algo, *flags, *COMMON, "--out", str(out), cwd=work, env=env)
            done[algo] = out
        return done[algo]

    return run


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_plugins_check_lists_them_ok(env):
    proc = cli("plugins", "--check", env=env, check=False)
    rows = {(r["kind"], r["name"]): r for r in json.loads(cli("plugins", "--json", env=env).stdout)}
    assert proc.returncode == 0, [r for r in rows.values() if r["status"] != "ok"]
    for name in NAMES:
        r = rows[("algorithm", name)]
        assert (r["status"], r["distribution"], r["version"], r["group"]) == ("ok", DIST, "0.1.0", "tokalign.algorithms"), r
        assert r["value"].startswith("thirdparty_algos."), r
        assert name in proc.stdout


def test_own_hook_and_component_are_wired(env, tmp_path):
    """The dry run shows the package's own extension points in the pipeline, in place of the built-ins."""
    remax = cli("train", "tp_remax", *FLAGS["remax"], "--dry-run", cwd=tmp_path, env=env).stdout
    assert "tp_upfront_logps -> old_logps" in remax and "behaviour -> old_logps" not in remax, remax
    assert "sampling hooks: greedy_baseline" in remax
    spo = cli("train", "tp_spo", *FLAGS["spo"], "--dry-run", cwd=tmp_path, env=env).stdout
    assert "sampling hooks: tp_mc_segments" in spo and "segment_rollouts" not in spo, spo


@pytest.mark.parametrize("name", NAMES)
def test_trains_through_the_cli(trained, name):
    out = trained(name)
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(isinstance(m["loss"], float) and math.isfinite(m["loss"]) for m in lines), lines
    manifest = json.loads((out / "manifest.json").read_text())
    algos = [p for p in manifest["plugins"] if p["kind"] == "algorithm"]
    assert algos == [{"kind": "algorithm", "name": name, "distribution": DIST, "version": "0.1.0"}], manifest["plugins"]
    if name == "tp_spo":  # the package's own hook ran and its values reached the algorithm
        assert all(m["tp_segments/per_completion"] >= 1 for m in lines), lines
    if name == "tp_prime":  # the PRM (a TrainedModel component) was trained and saved as a model of its own
        from safetensors.torch import load_file

        from tokalign.models import BUNDLED_MODEL

        prm = out / "prm"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in prm.iterdir()}
        start, weights = load_file(str(BUNDLED_MODEL / "model.safetensors")), load_file(str(prm / "model.safetensors"))
        assert set(weights) == set(start)
        assert any(not weights[k].equal(start[k]) for k in weights), "the PRM was saved untrained"
        assert all(m["prm/loss"] > 0 and math.isfinite(m["prm/grad_norm"]) for m in lines), lines
        assert lines[1]["process_reward/mean"] != 0.0  # step 2 reads the PRM updated in step 1


@pytest.mark.parametrize("method", ["remax", "treg", "prime", "par", "spo"])
def test_matches_the_builtin(trained, method):
    """Same seed and flags: the re-implementation's per-step numbers equal the built-in's (1e-6) — loss, gradient norm
    and every other metric both report (not timings) — and so do the trained weights."""
    from safetensors.torch import load_file

    ours, theirs = metrics(trained(f"tp_{method}")), metrics(trained(method))
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        shared = sorted(k for k in set(a) & set(b) if not k.startswith(VOLATILE_PREFIXES) and isinstance(a[k], (int, float)))
        assert {"loss", "grad_norm"} <= set(shared)
        diff = {k: (a[k], b[k]) for k in shared if a[k] != pytest.approx(b[k], rel=1e-6, abs=1e-6)}
        assert diff == {}, f"step {a['step']}: tp_{method} vs {method}: {diff}"
    dirs = [trained(f"tp_{method}"), trained(method)]
    files = ["model.safetensors"] + (["prm/model.safetensors"] if method == "prime" else [])
    for f in files:
        w_ours, w_theirs = (load_file(str(d / f)) for d in dirs)
        assert set(w_ours) == set(w_theirs)
        assert all(w_ours[k].allclose(w_theirs[k], rtol=1e-6, atol=1e-7) for k in w_ours), f"{f} differs"
