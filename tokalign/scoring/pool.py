"""Worker processes for CPU-bound rewards.

Each worker is a fresh ``spawn``ed interpreter (safe after torch or threads are loaded, the same on
every OS) that rebuilds the rewards from their entry points and options, then scores chunks of
samples (``calls.call_many``: one sample per call, or the whole chunk for a ``batched`` reward). The
parent hands one chunk at a time to each worker and reads results as they come, so order is
restored by position, not by arrival.

Timeouts: a worker interrupts a sample at ``timeout`` with SIGALRM (``calls.Alarm``). A worker that
does not come back (stuck in C code, ignoring the alarm) is killed at a hard deadline: that sample
is recorded as timed out, the rest of its chunk goes back in the queue, and a new worker starts.
A worker that dies (segfault, ``os._exit``, the OOM killer) fails only the sample it was running.
A reward breaking its contract in a worker stops the run in the parent with the worker's one-line error
(and, under ``--debug``, the worker's traceback on stderr). A ``Pool`` keeps its workers across runs (the score stage
scores a big artifact chunk after chunk with one pool); ``run`` is one run in a pool of its own.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tokalign.errors import UserError
from tokalign.plugin_errors import ContractViolation
from tokalign.scoring.calls import BATCH, ERROR, TIMEOUT, Alarm, call_many, call_one, is_batched, one_line

POLL_S = 0.05
MAX_FRUITLESS_DEATHS = 3  # workers dying while running no sample: a broken environment, not a bad sample


def hard_deadline(timeout: float | None) -> float | None:
    """Seconds after a sample's start at which its worker is killed: the alarm gets its chance first."""
    return None if not timeout or timeout <= 0 else timeout + max(2.0, 0.5 * timeout)


def chunk_size(n_items: int, workers: int) -> int:
    """About four chunks per worker (load balance) and no more than BATCH samples each (a killed
    worker loses little); per-chunk overhead is a pickle and a pipe round trip, ~0.1 ms."""
    return max(1, min(BATCH, math.ceil(n_items / (4 * workers))))


def _worker_main(conn, refs: list[tuple[str, str, str, dict]], timeout: float | None, slot) -> None:
    """slot = [reward index, position (-1: a batched call on the whole chunk), start time (0 = idle),
    time budget of the running call (0 = none)], shared with the parent."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    except (ValueError, OSError):
        pass
    try:
        from tokalign.rewards import rebuild

        fns = [rebuild(*ref) for ref in refs]
    except BaseException as e:
        conn.send(("init_error", one_line(f"{type(e).__name__}: {e}")))
        return
    conn.send(("ready", os.getpid()))
    with Alarm(timeout) as alarm:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            task_id, ri, items = msg
            try:
                out = _run_task(fns[ri], refs[ri][0], ri, items, timeout, slot, alarm)
            except ContractViolation as e:  # the reward is broken: the parent stops the run
                import traceback

                slot[2] = 0.0
                conn.send(("contract", (str(e), traceback.format_exc())))
                return
            slot[2] = 0.0
            conn.send((task_id, out))


def _run_task(fn, name: str, ri: int, items: list, timeout: float | None, slot, alarm: Alarm) -> list:
    if is_batched(fn) and len(items) > 1:
        slot[2] = 0.0
        slot[0], slot[1], slot[3] = ri, -1, 2 * (timeout or 0) * len(items)  # the call, then maybe one by one
        slot[2] = time.monotonic()
        return call_many(fn, name, [sample for _, sample in items], alarm)
    out = []
    for pos, sample in items:
        slot[2] = 0.0
        slot[0], slot[1], slot[3] = ri, pos, timeout or 0
        slot[2] = time.monotonic()
        out.append(call_one(fn, name, sample, alarm))
    return out


@dataclass
class _Worker:
    proc: Any
    conn: Any
    slot: Any
    ready: bool = False
    task: int | None = None  # the task id it is working on


@dataclass
class _Run:
    refs: list[tuple[str, str, str, dict]]  # (name, entry-point value, kind, options)
    timeout: float | None
    ctx: Any
    queue: deque = field(default_factory=deque)  # (ri, [(pos, sample)])
    tasks: dict = field(default_factory=dict)  # task id -> (ri, items)
    results: dict = field(default_factory=dict)  # (ri, pos) -> (status, payload)
    next_id: int = 0
    fruitless: int = 0
    progress: Any = None  # progress(done, total)
    total: int = 0

    def start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        slot = self.ctx.Array("d", 4, lock=False)
        proc = self.ctx.Process(target=_worker_main, args=(child, self.refs, self.timeout, slot), daemon=True)
        proc.start()
        child.close()  # only the worker holds its end: its death reads as EOF here
        return _Worker(proc, parent, slot)

    def dispatch(self, w: _Worker) -> None:
        if w.ready and w.task is None and self.queue:
            ri, items = self.queue.popleft()
            task_id, self.next_id = self.next_id, self.next_id + 1
            self.tasks[task_id] = (ri, items)
            w.task = task_id
            w.conn.send((task_id, ri, items))

    def receive(self, w: _Worker, msg) -> None:
        kind, payload = msg
        if kind == "ready":
            w.ready = True
        elif kind == "init_error":
            raise UserError(f"A reward worker process could not load the rewards: {payload}")
        elif kind == "contract":
            message, worker_traceback = payload
            if os.environ.get("TOKALIGN_DEBUG", "") not in ("", "0"):
                import sys

                sys.stderr.write(f"reward worker {w.proc.pid}:\n{worker_traceback}")
            raise ContractViolation(message)
        else:
            ri, items = self.tasks.pop(kind)
            for (pos, _), result in zip(items, payload):
                self.results[(ri, pos)] = result
            w.task = None
            if self.progress:
                self.progress(len(self.results), self.total)

    def bury(self, w: _Worker, killed_at_start: float | None = None) -> None:
        """Account for a dead (or just killed) worker: its running sample fails, the rest is re-queued."""
        try:
            while w.conn.poll():  # results it sent before dying still count
                self.receive(w, w.conn.recv())
        except (EOFError, OSError):
            pass
        w.proc.join(5)
        code = w.proc.exitcode
        if not w.ready:
            raise UserError(f"A reward worker process exited (code {code}) before loading the rewards; run with --workers 1 to see the error.")
        ri, pos, start, budget = int(w.slot[0]), int(w.slot[1]), w.slot[2], w.slot[3]
        failed = []
        if w.task is not None:
            t_ri, items = self.tasks.pop(w.task)
            if start and (killed_at_start is None or start == killed_at_start):
                failed = [(t_ri, p) for p, _ in items if (t_ri, p) not in self.results] if pos == -1 else [(ri, pos)]
                if killed_at_start is not None:
                    call = f" in a batched call of {len(failed)} samples" if pos == -1 else ""
                    result = (TIMEOUT, f"timed out after {budget:g}s{call} (worker killed)")
                else:
                    where = f"during a batched call of {len(failed)} samples" if pos == -1 else "on this sample"
                    result = (ERROR, f"the worker process died (exit code {code}) {where}")
                for key in failed:
                    self.results[key] = result
            rest = [(p, s) for p, s in items if (t_ri, p) not in failed and (t_ri, p) not in self.results]
            if rest:
                self.queue.appendleft((t_ri, rest))
        if not failed and killed_at_start is None:
            self.fruitless += 1
            if self.fruitless > MAX_FRUITLESS_DEATHS:
                raise UserError(f"Reward worker processes keep dying (last exit code {code}) while running no sample; check memory limits, or use --workers 1.")
        w.conn.close()


class Pool:
    """``workers`` reward processes kept across ``run`` calls: the score stage scores chunk after chunk of a big
    artifact with one pool (started on the first call that has work, grown to what a call can use)."""

    def __init__(self, refs: list[tuple[str, str, str, dict]], workers: int, timeout: float | None):
        import multiprocessing as mp

        self.refs, self.workers, self.timeout = refs, workers, timeout
        self.ctx = mp.get_context("spawn")
        self.live: list[_Worker] = []

    def run(self, items: list[tuple[int, int, Any]], progress=None) -> dict:
        """Score ``items`` = [(reward index, position, sample)]. Returns {(reward index, position): (status,
        payload)} as ``calls.call_one`` gives them. A run that raises stops (kills) every worker."""
        from multiprocessing.connection import wait

        r = _Run(self.refs, self.timeout, self.ctx, progress=progress, total=len(items))
        size = chunk_size(len(items), self.workers)
        by_reward: dict[int, list] = {}
        for ri, pos, sample in items:
            by_reward.setdefault(ri, []).append((pos, sample))
        for ri, entries in by_reward.items():
            for i in range(0, len(entries), size):
                r.queue.append((ri, entries[i : i + size]))
        hard = hard_deadline(self.timeout)
        pool, self.live = self.live, []
        pool += [r.start() for _ in range(min(self.workers, len(r.queue)) - len(pool))]
        try:
            while r.queue or any(w.task is not None for w in pool):
                for w in pool:
                    r.dispatch(w)
                waitables = [w.conn for w in pool] + [w.proc.sentinel for w in pool]
                ready = set(wait(waitables, timeout=POLL_S if hard else None))
                alive = []
                for w in pool:
                    dead = w.proc.sentinel in ready
                    if w.conn in ready and not dead:
                        try:
                            r.receive(w, w.conn.recv())
                        except (EOFError, OSError):
                            dead = True
                    killed_at = None
                    if not dead and hard and w.task is not None:
                        start, budget = w.slot[2], w.slot[3]
                        if start and budget and time.monotonic() - start > hard_deadline(budget):
                            w.proc.kill()
                            killed_at, dead = start, True
                    if dead:
                        r.bury(w, killed_at)
                        if r.queue:
                            alive.append(r.start())
                    else:
                        alive.append(w)
                pool = alive
        except BaseException:
            _stop(pool, clean=False)
            raise
        self.live = pool
        return r.results

    def close(self, clean: bool = True) -> None:
        """Stop the workers: asked to exit when ``clean``, else killed."""
        pool, self.live = self.live, []
        _stop(pool, clean)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(clean=exc_type is None)


def _stop(pool: list[_Worker], clean: bool) -> None:
    for w in pool:
        if clean:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        else:
            w.proc.kill()
    for w in pool:
        w.proc.join(2 if clean else 5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(5)
        w.conn.close()


def run(refs: list[tuple[str, str, str, dict]], items: list[tuple[int, int, Any]], workers: int, timeout: float | None,
        progress=None) -> dict:
    """Score ``items`` = [(reward index, position, sample)] in ``workers`` processes started for this call.
    Returns {(reward index, position): (status, payload)} as ``calls.call_one`` gives them."""
    with Pool(refs, workers, timeout) as pool:
        return pool.run(items, progress)
