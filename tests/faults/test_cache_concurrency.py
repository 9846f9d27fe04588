"""Runs sharing one score cache at once: both finish with the same scores, and the cache is whole afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import CLI_ENV
from fault_harness import cache_state
from score_plugins import make_rollouts

from tokalign import artifacts

HAMMER = """
import sys, time
from pathlib import Path
from tokalign.scoring.cache import ScoreCache
directory, me, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
cache = ScoreCache(directory)
for round in range(40):  # shared keys (k0..k99) and this process's own, interleaved with the others' writes
    keys = [f"k{(round * 7 + i) % 100}" for i in range(10)] + [f"p{me}-{round}-{i}" for i in range(5)]
    got = cache.get_many(keys)
    assert all(v[0] == float(k[1:]) for k, v in got.items() if k.startswith("k")), got
    cache.put_many([(k, (float(k[1:]) if k.startswith("k") else float(me), None, {"by": me})) for k in keys])
cache.close()
print("broken" if cache.broken else "ok", cache.broken or "")
"""


def test_two_score_runs_sharing_a_cache_at_once_both_finish_with_the_same_scores(tmp_path):
    make_rollouts(tmp_path / "R", 400)
    env = {**CLI_ENV, "TOKALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "tokalign", "score", "R", "-r", "exact_match", "-r", "length",
                              "--out", out], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for out in ("S1", "S2")]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "warning" not in err, err  # no "score cache unusable"
    one, two = (artifacts.read(tmp_path / s, ["scored"]).rows() for s in ("S1", "S2"))
    assert one == two and len(one) == 400
    entries = cache_state(tmp_path / "cache")  # SQLite's integrity check, every value whole
    assert len(entries) == 400 * 2  # one per sample and reward, whichever run wrote it
    # a third run reads every score from the cache, and they are the same
    third = subprocess.run([sys.executable, "-m", "tokalign", "score", "R", "-r", "exact_match", "-r", "length", "--out", "S3"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert third.returncode == 0 and "0 computed, 800 cached" in third.stderr, third.stderr
    assert artifacts.read(tmp_path / "S3", ["scored"]).rows() == one
    assert json.loads((tmp_path / "S3" / "manifest.json").read_text())["scoring"]["cache"]


def test_processes_hammering_one_cache_lose_nothing(tmp_path):
    start = time.time() + 2.0  # all of them begin together, past their imports
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path / "cache"), str(me), str(start)], env=CLI_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err or out
    entries = cache_state(tmp_path / "cache")
    assert {k for k in entries if k.startswith("k")} == {f"k{i}" for i in range(100)}
    assert all(json.loads(entries[f"p{me}-{r}-{i}"])[0] == float(me) for me in range(4) for r in range(40) for i in range(5))


OPEN = """
import sys, time
from pathlib import Path
from tokalign.scoring.cache import ScoreCache
directory, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
cache = ScoreCache(directory)
cache.put_many([("k", (1.0, None, {}))])
print("broken" if cache.broken else "ok", cache.broken or "")
"""


def test_processes_opening_a_new_cache_at_once_all_get_it(tmp_path):
    """The first open of a cache switches it to WAL, which SQLite answers with an immediate "database is locked" when
    several processes do it at once (before the fix: 5 of 90 openers on a loaded machine, so the hammering test above
    failed in a fresh-clone run); each must wait its turn, not score without the cache."""
    for trial in range(3):
        start = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(tmp_path / f"cache{trial}"), str(start)], env=CLI_ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, outs)), outs
