"""Benchmark: a sweep of 200 small construct runs, serial against a pool.

Measures, in fresh processes (medians of --repeats):
  - the sweep on 1 worker (in-process executor) and on 2 workers (pool), as
    whole commands and as executors alone inside one process;
  - the executor's per-run overhead: serial wall time minus the runs' own
    work (their recorded wall_time), divided by the number of runs;
  - a rerun that skips everything.
Writes bench/results/sweep.json.

    .venv/bin/python bench/bench_sweep.py [--runs 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SPEC = """\
experiments:
  - name: sweep
    kind: construct
    data: {{source: clusters, classes: 4, dim: 6, points: {points}, radius: 0.05}}
    construct: {{heldout: 50}}
    sweep:
      seed: {seeds}
"""


def timed(args):
    exe = Path(sys.executable).with_name("dlmin")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dlmin {' '.join(args)} failed:\n{proc.stderr}")
    return wall, [json.loads(line) for line in proc.stdout.splitlines()]


def in_process(spec, out, repeats):
    """Executor time alone (no interpreter start): serial vs a pool of 2, median."""
    from dlmin.core import executors as ex
    from dlmin.core.spec import load_spec, plan

    runs = plan(load_spec(spec), out)
    serial, pool = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        list(ex.run_serial(runs, force=True))
        serial.append(time.perf_counter() - start)
        start = time.perf_counter()
        list(ex.run_pool(runs, 2, force=True))
        pool.append(time.perf_counter() - start)
    return statistics.median(serial), statistics.median(pool)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    record = {"benchmark": "sweep", "runs": args.runs, "points_per_class": args.points}
    serial, pool, rerun, overhead = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "sweep.yaml"
        spec.write_text(SPEC.format(points=args.points, seeds=list(range(args.runs))))
        base = [str(spec), "-o", str(Path(tmp) / "out"), "--json", "-q"]
        for _ in range(args.repeats):
            wall, rows = timed(["construct", *base, "--force", "-j", "1"])
            serial.append(wall)
            overhead.append((wall - sum(r["wall_time"] for r in rows)) / len(rows))
            pool.append(timed(["construct", *base, "--force", "-j", "2"])[0])
            wall, rows = timed(["construct", *base, "-j", "2"])
            assert all(r["status"] == "skipped" for r in rows)
            rerun.append(wall)
        ex_serial, ex_pool = in_process(spec, Path(tmp) / "out2", args.repeats)
    med = statistics.median
    record.update(
        serial_s=med(serial),
        pool2_s=med(pool),
        speedup=med(serial) / med(pool),
        overhead_ms_per_run=1e3 * med(overhead),
        rerun_skip_s=med(rerun),
        executor_serial_s=ex_serial,
        executor_pool2_s=ex_pool,
        executor_speedup=ex_serial / ex_pool,
        all={"serial": serial, "pool2": pool, "rerun": rerun},
    )
    out = HERE / "results" / "sweep.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"sweep of {args.runs} construct runs ({args.points} points per class)")
    print(
        f"  1 worker : {record['serial_s']:.2f} s   "
        f"2 workers: {record['pool2_s']:.2f} s   speed-up {record['speedup']:.2f}x"
    )
    print(
        f"  executors alone (no interpreter start): 1 worker {ex_serial:.2f} s, "
        f"2 workers {ex_pool:.2f} s, speed-up {ex_serial / ex_pool:.2f}x"
    )
    print(
        f"  executor overhead: {record['overhead_ms_per_run']:.1f} ms per run "
        "(whole command, process start included)"
    )
    print(f"  rerun skipping everything: {record['rerun_skip_s']:.2f} s")


if __name__ == "__main__":
    main()
