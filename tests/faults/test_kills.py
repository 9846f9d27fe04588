"""SIGKILL every stage at random moments and check what it leaves: never a partial artifact, an intact score cache,
and a rerun (``--resume`` for train) that ends with exactly the uninterrupted run's result.

Each stage first runs uninterrupted on tiny inputs (the reference), as a fresh process and forked from the fork
server (``zygote.py``, which has done the imports once): both give the same result. Then, per stage, at least
``KILLS`` runs are killed, each case seeded (``random.Random``): a few as fresh ``python -m tokalign`` processes at a
moment drawn over their whole life (Python start-up and imports included); the rest forked, at a moment drawn over
the run, or shortly after ``<out>.tmp-*`` appears (the final write), or just after it is gone again (renamed into
place: train then removes its resume point), or (train) shortly after a checkpoint's temp dir appears. A case starts
with no output, or with a finished one being overwritten, and with an empty, partial or full score cache; half the
time a killed run's rerun is killed too. After every kill:

* ``--out`` does not exist or is a complete artifact (every file as its manifest says) equal to the reference; nothing
  else of it is there but temp dirs ``<out>.tmp-<hex>`` (and train's ``<out>.partial/`` resume point);
* the score cache passes SQLite's integrity check and holds only entries of the reference run, with its values;

and after every case's completing rerun (``--resume`` where train left a resume point, ``--overwrite`` where an
output is), the output equals the reference, no temp dir or resume point is left (the write cleared those of the
killed runs) and the cache holds exactly the reference's entries.

By hand: ``TOKALIGN_FAULT_KILLS=100`` (kills per stage; default 20), ``TOKALIGN_FAULT_SEED``,
``TOKALIGN_FAULT_JOBS`` (runs at once; default 2), ``TOKALIGN_FAULT_COLD`` (fresh-process kills per stage; default 2),
``TOKALIGN_FAULT_STAGES=train,score`` (only those), ``TOKALIGN_FAULT_REPORT=FILE`` (the counts as JSON; they are
printed on stderr too).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fault_harness as fh
import pytest

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("TOKALIGN_FAULT_KILLS", "20"))
SEED = int(os.environ.get("TOKALIGN_FAULT_SEED", "0"))
JOBS = int(os.environ.get("TOKALIGN_FAULT_JOBS", "2"))
COLD = int(os.environ.get("TOKALIGN_FAULT_COLD", "2"))
CHAIN = 0.5  # the chance that a killed run's rerun is killed too
OUT = "out"
TMP = re.compile(re.escape(OUT) + r"\.tmp-[0-9a-f]{8}")
TRAIN = ["train", "grpo", "--data", "{P}", "--max-steps", "3", "--batch-size", "4", "--n", "4", "--lr", "1e-3",
         "--set", "rollout.max_new_tokens=6", "--set", "train.save_every=1", "--quiet"]
STAGES = {  # name: (argv, artifact kind); {P}, {R}: the reference prompts and rollouts
    "train": (TRAIN, "checkpoint"),
    "rollout": (["rollout", "{P}", "--n", "2", "--max-new-tokens", "8"], "rollouts"),
    "eval": (["eval", "--data", "{P}", "--n", "2", "--max-new-tokens", "8", "--quiet"], "eval"),
    "prepare": (["prepare", "arith", "--limit", "8"], "prompts"),
    "score": (["score", "{R}", "--reward", "exact_match"], "scored"),
}


# ---------------------------------------------------------------- what an artifact holds, less its timestamps


def content(path: Path, kind: str):
    """What must not depend on a kill: the rows; eval's results; train's weights and metrics (less timings)."""
    from tokalign import artifacts

    art = artifacts.read(path, [kind])  # kind, schema, columns, and every file against the manifest's size and sha256
    if kind == "checkpoint":
        from safetensors.torch import load_file

        weights = {name: t.numpy().tobytes() for name, t in sorted(load_file(path / "model.safetensors").items())}
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "tokens_per_s"}
                   for line in (path / "metrics.jsonl").read_text().splitlines()]
        return {"weights": weights, "metrics": metrics}
    out = {"rows": art.rows()}
    if kind == "eval":
        out["results"] = json.loads((path / "results.json").read_text())
    return out


@dataclass
class Stage:
    name: str
    argv: list[str]
    kind: str
    reference: dict | None = None
    cache: dict = field(default_factory=dict)  # the reference run's score cache
    cold_s: float = 0.0  # uninterrupted fresh process
    warm_s: float = 0.0  # uninterrupted forked run (then averaged with the runs that finished before their kill)
    forked_s: float = 0.0  # the reference's forked run
    write_s: float = 0.0  # from <out>.tmp-* appearing to the end
    kills: int = 0
    kinds: dict = field(default_factory=dict)  # kill moments: cold / uniform / write / committed / checkpoint
    finished_first: int = 0  # runs that ended before their kill came
    out_after_kill: dict = field(default_factory=lambda: {"absent": 0, "complete": 0})
    stale_tmp: int = 0  # kills that left a <out>.tmp-* dir (cleared by the next write)
    resume_points: int = 0  # train kills that left <out>.partial with a checkpoint
    cases: int = 0
    recovered: int = 0  # cases whose completing rerun matched the reference
    in_flight: int = 0


class Sweep:
    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # idle fork servers
        self.lanes: list[fh.Lane] = []
        self.failed = threading.Event()
        self.stages = {name: Stage(name, argv, kind) for name, (argv, kind) in STAGES.items()}
        chosen = os.environ.get("TOKALIGN_FAULT_STAGES", ",".join(STAGES)).split(",")  # by hand: a few stages only
        self.swept = [name for name in STAGES if name in chosen]

    # ---- running

    @contextmanager
    def lane(self):
        """An idle fork server (started on first need: at most JOBS, as at most JOBS threads run)."""
        try:
            lane = self.free.get_nowait()
        except queue.Empty:
            lane = fh.Lane(fh.env_for(self.root / "zygote-cache"))
            with self.lock:
                self.lanes.append(lane)
        try:
            yield lane
        finally:
            self.free.put(lane)

    def run(self, stage: Stage, case: Path, kill: fh.Kill | None) -> fh.Result:
        with self.lane() as lane:
            return lane.run(self.argv(stage, case), case, kill, self.env(case))

    def argv(self, stage: Stage, case: Path) -> list[str]:
        """The stage's command for ``case``'s state: --resume where a train resume point is, --overwrite where an
        output is."""
        args = [a.format(P=self.root / "ref" / "prompts", R=self.root / "ref" / "rollouts") for a in stage.argv]
        if stage.name == "train" and (case / f"{OUT}.partial").exists():
            return [*args, "--out", OUT, "--resume"]
        return [*args, "--out", OUT, *(["--overwrite"] if (case / OUT).exists() else [])]

    def env(self, case: Path) -> dict:
        return {"TOKALIGN_CACHE": str(case / "cache")}

    # ---- the reference

    def references(self) -> None:
        ref = self.root / "ref"
        ref.mkdir()
        needed = {"prepare", *self.swept, *(["rollout"] if "score" in self.swept else [])}
        for group in (["prepare"], ["rollout"], ["score", "eval", "train"]):
            with ThreadPoolExecutor(JOBS) as pool:
                list(pool.map(self.reference, [self.stages[n] for n in group if n in needed]))
            for name, copy in (("prepare", "prompts"), ("rollout", "rollouts")):  # the inputs of the later stages
                if name in group and name in needed:
                    shutil.copytree(ref / name / OUT, ref / copy)

    def reference(self, stage: Stage) -> None:
        case = self.root / "ref" / stage.name
        case.mkdir()
        res = fh.cold(self.argv(stage, case), case, {**fh.env_for(case / "cache")})
        assert res.rc == 0, f"{stage.name}: {res.stderr}"
        stage.cold_s = res.wall
        stage.reference = content(case / OUT, stage.kind)
        stage.cache = fh.cache_state(case / "cache")
        # the same run forked from the fork server: the same result (the sweep's runs are forked), and its timings
        warm = self.root / "ref" / f"{stage.name}-warm"
        warm.mkdir()
        res = self.run(stage, warm, fh.Kill(600, after=f"{OUT}.tmp-*"))
        assert res.rc == 0, f"{stage.name}: {res.stderr}"
        stage.warm_s = stage.forked_s = res.wall
        stage.write_s = res.wall - res.trigger_at if res.trigger_at is not None else 0.1  # (polling missed it)
        assert content(warm / OUT, stage.kind) == stage.reference, f"{stage.name}: a forked run differs from a fresh process's"
        assert fh.cache_state(warm / "cache") == stage.cache

    # ---- checks

    def check_killed(self, stage: Stage, case: Path) -> None:
        """After a kill: no partial artifact visible, the cache intact and a subset of the reference's."""
        names = {p.name for p in case.iterdir()} - {"cache"}
        stale = {n for n in names if TMP.fullmatch(n)}
        partial = f"{OUT}.partial" if stage.name == "train" else None
        other = names - stale - {OUT, partial}
        assert not other, f"{stage.name}: a kill left {sorted(other)}"
        with self.lock:
            stage.stale_tmp += bool(stale)
            if OUT in names:
                stage.out_after_kill["complete"] += 1
            else:
                stage.out_after_kill["absent"] += 1
            stage.resume_points += bool(partial in names and any((case / partial).glob("checkpoint-*[0-9]")))
        if OUT in names:  # never a half artifact: whole, and the reference's
            assert content(case / OUT, stage.kind) == stage.reference, f"{stage.name}: {OUT} differs from the reference"
        cache = fh.cache_state(case / "cache")
        assert all(stage.cache.get(k) == v for k, v in cache.items()), f"{stage.name}: the cache holds entries the reference has not"

    def check_finished(self, stage: Stage, case: Path, res: fh.Result) -> None:
        assert res.rc == 0, f"{stage.name}: the rerun exited {res.rc}:\n{res.stderr[-3000:]}"
        left = sorted({p.name for p in case.iterdir()} - {"cache", OUT})
        assert not left, f"{stage.name}: a finished run left {left}"
        assert content(case / OUT, stage.kind) == stage.reference, f"{stage.name}: the rerun's result differs from the reference"
        assert fh.cache_state(case / "cache") == stage.cache, f"{stage.name}: the cache differs from the reference's"

    # ---- one case: a start state, one kill or a few in a row, a completing rerun

    def draw_kill(self, stage: Stage, rng: random.Random) -> tuple[str, fh.Kill]:
        """A kill moment: anywhere in the run; in its final write (``<out>.tmp-*`` there); just after that write was
        renamed into place (train: while the resume point is removed); train: while a checkpoint is written."""
        moments = ["uniform", "uniform", "write", "write", "committed"] + (["checkpoint"] * 2 if stage.name == "train" else [])
        how = rng.choice(moments)
        if how == "uniform":
            return how, fh.Kill(rng.uniform(0, stage.warm_s))
        if how == "write":
            return how, fh.Kill(rng.uniform(0, stage.write_s), after=f"{OUT}.tmp-*")
        if how == "committed":
            return how, fh.Kill(rng.uniform(0, 0.02), after=f"{OUT}.tmp-*", gone=True)
        return how, fh.Kill(rng.uniform(0, 0.3), after=f"{OUT}.partial/checkpoint-*.tmp")

    def prepare_case(self, stage: Stage, case: Path, rng: random.Random) -> None:
        case.mkdir()
        if rng.random() < 0.3:  # a finished output, to be --overwrite-n
            shutil.copytree(self.root / "ref" / stage.name / OUT, case / OUT)
        if stage.cache and rng.random() < 0.5:  # a cache holding all or some of the reference's entries
            (case / "cache").mkdir()
            src = sqlite3.connect(self.root / "ref" / stage.name / "cache" / "score-cache.sqlite")
            dst = sqlite3.connect(case / "cache" / "score-cache.sqlite")
            src.backup(dst)
            src.close()
            if rng.random() < 0.5:
                keys = sorted(stage.cache)
                with dst:
                    dst.executemany("DELETE FROM results WHERE key = ?", [(k,) for k in rng.sample(keys, len(keys) // 2)])
            dst.close()

    def run_case(self, stage: Stage, index: int, cold: bool) -> None:
        rng = random.Random(f"{SEED}:{stage.name}:{index}")
        case = self.root / f"{stage.name}-{index:03d}"
        self.prepare_case(stage, case, rng)
        trail = [f"start: {'output there' if (case / OUT).exists() else 'no output'}"]
        try:
            if not self._attempts(stage, case, rng, cold, trail):
                trail.append("completing rerun")
                res = self.run(stage, case, None)
                self.check_finished(stage, case, res)
        except AssertionError as e:
            raise AssertionError(f"{e}\n  runs: {'; '.join(trail)}") from e
        with self.lock:
            stage.recovered += 1
            stage.cases += 1
            stage.in_flight -= 1
        shutil.rmtree(case, ignore_errors=True)

    def _attempts(self, stage: Stage, case: Path, rng: random.Random, cold: bool, trail: list[str]) -> bool:
        """One kill, sometimes followed by a kill of the rerun too (at most 4), each checked; True when the last run
        finished before its kill came (it was checked as a completing rerun)."""
        for attempt in range(4):
            argv = self.argv(stage, case)
            if cold and attempt == 0:
                how, kill = "cold", fh.Kill(rng.uniform(0, stage.cold_s))
                res = fh.cold(argv, case, {**fh.env_for(case / "cache")}, kill)
            else:
                how, kill = self.draw_kill(stage, rng)
                res = self.run(stage, case, kill)
            trail.append(f"{' '.join(argv[argv.index('--out'):])} {how} kill {kill.describe()}: "
                         + ("killed" if res.killed else f"finished first (exit {res.rc})"))
            if not res.killed:
                with self.lock:
                    stage.finished_first += 1
                    if how != "cold" and "--resume" not in argv:  # runs got quicker than the reference's (warm caches)
                        stage.warm_s = (stage.warm_s + res.wall) / 2
                self.check_finished(stage, case, res)
                return True
            with self.lock:
                stage.kills += 1
                stage.kinds[how] = stage.kinds.get(how, 0) + 1
            self.check_killed(stage, case)
            if rng.random() >= CHAIN:  # else the rerun is killed too
                return False
        return False

    def next_case(self):
        """The stage furthest from its kill count (a case in flight counts as one kill); None when all are done."""
        with self.lock:
            open_ = [self.stages[n] for n in self.swept if self.stages[n].kills + self.stages[n].in_flight < KILLS]
            if not open_:
                return None
            stage = min(open_, key=lambda s: ((s.kills + s.in_flight) / KILLS, list(self.stages).index(s.name)))
            index = stage.cases + stage.in_flight
            stage.in_flight += 1
            return stage, index, index < COLD

    def worker(self) -> None:
        while not self.failed.is_set() and (job := self.next_case()) is not None:
            stage, index, cold = job
            try:
                self.run_case(stage, index, cold)
            except BaseException as e:
                self.failed.set()
                raise AssertionError(f"{stage.name} case {index} (seed {SEED}; {self.root / f'{stage.name}-{index:03d}'}): {e}") from e

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    def report(self, wall: float) -> dict:
        return {"wall_s": round(wall, 1), "kills_per_stage_target": KILLS, "seed": SEED, "jobs": JOBS,
                "stages": {s.name: {"cases": s.cases, "kills": s.kills, "kill_moments": s.kinds, "recovered": s.recovered,
                                    "finished_before_kill": s.finished_first, "out_after_kill": s.out_after_kill,
                                    "kills_leaving_tmp_dir": s.stale_tmp, "kills_leaving_resume_point": s.resume_points,
                                    "uninterrupted_s": {"fresh_process": round(s.cold_s, 2), "forked": round(s.forked_s, 2),
                                                        "final_write": round(s.write_s, 3)}}
                           for s in map(self.stages.get, self.swept)}}


def test_kills_at_every_stage_leave_no_partial_artifact_and_reruns_recover(tmp_path, capsys):
    start = time.monotonic()
    sweep = Sweep(tmp_path)
    try:
        sweep.references()
        with ThreadPoolExecutor(JOBS) as pool:
            for f in [pool.submit(sweep.worker) for _ in range(JOBS)]:
                f.result()
    finally:
        sweep.close()
        report = sweep.report(time.monotonic() - start)
        with capsys.disabled():  # in CI's log, passed or not
            sys.stderr.write("\nfault sweep: " + json.dumps(report) + "\n")
        if os.environ.get("TOKALIGN_FAULT_REPORT"):
            Path(os.environ["TOKALIGN_FAULT_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    for s in map(sweep.stages.get, sweep.swept):
        assert s.kills >= KILLS and s.recovered == s.cases, s
