"""Peak memory and wall time of `tokalign prepare` and `tokalign score` on big inputs (issue #14 item 7).

For each ``--rows`` N: writes an N-row JSONL of arith-like prompts (``{"prompt": "1234+567=", "answer": "1801"}``,
operands below 10,000, seeded), runs ``tokalign prepare FILE --out P`` (the bundled tiny model's tokenizer), then
builds an N-row rollouts artifact straight from P with pyarrow (no model: two samples per prompt of the first N/2
prompts, sample 0 the correct answer, sample 1 a wrong one, streamed row group by row group, with a manifest written
through ``artifacts.writing`` so it verifies) and runs ``tokalign score R --reward exact_match --out S`` (in-process,
with a fresh score cache). Each command runs under ``/usr/bin/time -v``: its wall time and peak RSS (``--workers 1``
scores in the command's own process) are recorded. ``--rows 10`` measures the start-up floor, which does not depend
on rows (prepare imports transformers for the tokenizer; score imports neither it nor torch). Peak RSS that stays flat
from 100k to 1M rows is bounded.

    python benchmarks/streaming.py [--rows 10 100000 1000000] [--label after] [--only prepare score] [--keep DIR]

Results merge into benchmarks/results/streaming.json under ``--label`` (e.g. "before" for a run of the old,
whole-in-memory path, "after" for the streaming one), and a table of all labels is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "streaming.json"
ROOT = HERE.parent


def write_jsonl(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")


def write_rollouts(prompts: Path, out: Path, n: int, tokenizer) -> None:
    """An n-row rollouts artifact from a prompts artifact, without sampling: prompt k gives rows 2k (its answer)
    and 2k+1 (a wrong one), for the first ceil(n/2) prompts; written one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokalign import artifacts

    src = artifacts.read(prompts, ["prompts"])
    prov = artifacts.Provenance(config={"synthetic": True, "rows": n, "from": str(prompts)}, inputs=[src.ref()],
                                extra={"default_reward": "exact_match"})
    written = 0
    with artifacts.writing(out, "rollouts", prov) as w:
        writer = None
        for batch in pq.ParquetFile(prompts / artifacts.DATA).iter_batches(batch_size=20_000):
            if written >= n:
                break
            cols = {c: batch.column(c).to_pylist() for c in ("id", "prompt", "prompt_text", "prompt_ids", "reference")}
            rows: dict[str, list] = {c: [] for c in ("id", "prompt_id", "group_id", "sample_idx", "prompt", "prompt_text", "prompt_ids",
                                                      "reference", "completion", "completion_ids", "sampler_logps", "finish_reason",
                                                      "max_new_tokens")}
            texts = []
            for j, pid in enumerate(cols["id"]):
                answer = json.loads(cols["reference"][j])
                for k in range(2):
                    if written + len(texts) >= n:
                        break
                    texts.append(answer if k == 0 else str(int(answer) + 1))
                    rows["id"].append(f"{pid}#{k}")
                    rows["prompt_id"].append(pid)
                    rows["group_id"].append((written + len(texts) - 1) // 2)
                    rows["sample_idx"].append(k)
                    for c in ("prompt", "prompt_text", "prompt_ids", "reference"):
                        rows[c].append(cols[c][j])
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            rows["completion"] = texts
            rows["completion_ids"] = [x + [tokenizer.eos_token_id] for x in ids]
            rows["sampler_logps"] = [[-0.5] * len(x) for x in rows["completion_ids"]]
            rows["finish_reason"] = ["stop"] * len(texts)
            rows["max_new_tokens"] = [16] * len(texts)
            table = pa.table(rows)
            if writer is None:
                writer = pq.ParquetWriter(w.path / artifacts.DATA, table.schema)
            writer.write_table(table)
            written += len(texts)
        writer.close()
        w.counts[artifacts.DATA] = written


def timed(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (MB) of ``cmd`` under /usr/bin/time -v."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1])
    line = next((x for x in p.stderr.splitlines() if x.startswith(("score:", "prepare:"))), "")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(kb / 1024, 1), **({"stderr": line} if line else {})}


def table(results: dict) -> str:
    lines = [f"{'label':<8} {'stage':<8} {'rows':>9} {'wall s':>8} {'peak RSS MB':>12}"]
    for label, runs in results.items():
        if not isinstance(runs, dict) or label == "notes":
            continue
        for stage in ("prepare", "score"):
            for rows, r in sorted(runs.get(stage, {}).items(), key=lambda kv: int(kv[0])):
                lines.append(f"{label:<8} {stage:<8} {int(rows):>9,} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10, 100_000, 1_000_000])
    ap.add_argument("--label", default="after")
    ap.add_argument("--only", nargs="+", choices=("prepare", "score"), default=["prepare", "score"])
    ap.add_argument("--keep", type=Path, default=None, help="Work in this directory and keep its files (default: a temporary one).")
    a = ap.parse_args()

    from tokalign import models

    tokenizer = models.load_tokenizer("")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    mine = results.setdefault(a.label, {})
    tmp = tempfile.TemporaryDirectory() if a.keep is None else None
    work = Path(tmp.name) if tmp else a.keep
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "tokalign"]
    mine["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()[0]}
    try:
        for n in a.rows:
            data, prompts, rollouts, scored = (work / f"{x}-{n}{ext}" for x, ext in (("data", ".jsonl"), ("P", ""), ("R", ""), ("S", "")))
            if not data.exists():
                write_jsonl(data, n)
            if "prepare" in a.only or not prompts.exists():
                if prompts.exists():
                    subprocess.run(["rm", "-rf", str(prompts)], check=True)
                r = timed([*cli, "prepare", str(data), "--out", str(prompts)], env)
                if "prepare" in a.only:
                    mine.setdefault("prepare", {})[str(n)] = r
                    print(f"prepare {n:>9,} rows: {r['wall_s']:7.1f} s, peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
            if "score" in a.only:
                if not rollouts.exists():
                    write_rollouts(prompts, rollouts, n, tokenizer)
                if scored.exists():
                    subprocess.run(["rm", "-rf", str(scored)], check=True)
                cache = work / f"cache-{n}"  # a fresh score cache: every sample is computed
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                r = timed([*cli, "score", str(rollouts), "--reward", "exact_match", "--out", str(scored)], {**env, "TOKALIGN_CACHE": str(cache)})
                mine.setdefault("score", {})[str(n)] = r
                print(f"score   {n:>9,} rows: {r['wall_s']:7.1f} s, peak RSS {r['peak_rss_mb']:7.1f} MB  ({r.get('stderr', '')})", flush=True)
            if a.keep is None:
                for p in (data, prompts, rollouts, scored, work / f"cache-{n}"):
                    subprocess.run(["rm", "-rf", str(p)], check=True)
    finally:
        if tmp:
            tmp.cleanup()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
