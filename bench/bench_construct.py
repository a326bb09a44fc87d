"""Benchmark: `dlmin construct` on 10^6 points, Q = M = 10.

Runs the whole command (data generation, construction, certificate,
held-out check, HDF5 write) in a fresh process several times and records
the median wall time and the peak resident memory of the child, plus the
time of the core construction alone. Results go to bench/results/construct.json.

    .venv/bin/python bench/bench_construct.py [--repeats 3] [--points 1000000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SPEC = """\
experiments:
  - name: big
    kind: construct
    data: {{source: clusters, classes: 10, dim: 10, points: {per_class}, radius: 0.05}}
    construct: {{heldout: 1000}}
"""


def run_cli(spec, out):
    """Wall time and the child's peak RSS (MiB) of one `dlmin construct`."""
    exe = Path(sys.executable).with_name("dlmin")
    start = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "construct", str(spec), "-o", str(out), "--force", "--json", "-q"],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dlmin construct failed:\n{proc.stdout}\n{proc.stderr}")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak_mib, json.loads(proc.stdout)


def core_only(per_class, repeats):
    """Median time of build_clustered alone on already generated data."""
    import numpy as np

    from dlmin.core import construct, data

    ds = data.clusters(10, 10, per_class, 0.05, np.random.default_rng(0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = construct.build_clustered(
            ds.X, ds.labels, ds.Y, keep_rows=np.arange(1000)
        )
        times.append(time.perf_counter() - start)
    assert result.status == "ok", result.message
    return statistics.median(times), result.costs["C_N"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=1_000_000)
    args = parser.parse_args()
    per_class = args.points // 10

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "big.yaml"
        spec.write_text(SPEC.format(per_class=per_class))
        runs = [run_cli(spec, Path(tmp) / "out") for _ in range(args.repeats)]
    walls = [r[0] for r in runs]
    row = runs[-1][2]
    core_time, core_cost = core_only(per_class, args.repeats)
    record = {
        "benchmark": "construct",
        "points": per_class * 10,
        "classes": 10,
        "dim": 10,
        "cli_wall_s_median": statistics.median(walls),
        "cli_wall_s_all": walls,
        "cli_peak_rss_mib": max(r[1] for r in runs),
        "core_build_s_median": core_time,
        "cost": row["cost"],
        "certified": row["certified"],
        "heldout_max_output_error": row["heldout_max_output_error"],
        "core_cost": core_cost,
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor(),
            "system": platform.platform(),
        },
    }
    out = HERE / "results" / "construct.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"construct, {record['points']} points, Q = M = 10")
    print(
        f"  dlmin construct (whole command): median "
        f"{record['cli_wall_s_median']:.2f} s of {args.repeats}, "
        f"peak RSS {record['cli_peak_rss_mib']:.0f} MiB"
    )
    print(f"  build_clustered alone:           median {core_time:.2f} s")
    print(
        f"  C_N = {row['cost']:.3g}, certified = {row['certified']}, "
        f"held-out max error = {row['heldout_max_output_error']:.3g}"
    )
    print(f"  recorded in {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
