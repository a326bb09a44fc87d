"""Benchmark: streamed collapse metrics on N = 10^6 samples, D = 512, C = 10.

Two sources, each measured in a fresh child process so that its peak
resident memory (``ru_maxrss``) belongs to that source alone:

- ``generated``: every chunk is drawn again from its own seed on each pass,
  so the data never exist in memory as a whole;
- ``npy``: a float32 ``.npy`` file (2 GB) written chunk by chunk to a
  temporary folder, then read by :func:`dlmin.core.collapse.npy_chunks`.

Results go to bench/results/collapse.json.

    .venv/bin/python bench/bench_collapse.py [--points 1000000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = 10
CHUNK_ROWS = 32768
SIGMA = 0.5  # within-class noise, against class means of norm 5
OFFSET = 20.0  # common offset, so centring is exercised


def class_means(dim):
    """ETF means of norm 5 plus a common offset, shape (CLASSES, dim)."""
    rng = np.random.default_rng(7)
    U, _ = np.linalg.qr(rng.standard_normal((dim, CLASSES)))
    star = np.sqrt(CLASSES / (CLASSES - 1)) * (np.eye(CLASSES) - 1 / CLASSES)
    t = rng.standard_normal(dim)
    return 5.0 * (U @ star).T + OFFSET * t / np.linalg.norm(t)


def chunk(i, rows, means):
    """Chunk ``i``: float32 features (rows, dim), labels, 5 % wrong guesses."""
    rng = np.random.default_rng([11, i])
    y = rng.integers(0, CLASSES, rows)
    H = means[y] + SIGMA * rng.standard_normal((rows, means.shape[1]))
    wrong = rng.random(rows) < 0.05
    return H.astype(np.float32), y, np.where(wrong, (y + 1) % CLASSES, y)


def generated_factory(points, dim):
    means = class_means(dim)

    def factory():
        for i, start in enumerate(range(0, points, CHUNK_ROWS)):
            yield chunk(i, min(CHUNK_ROWS, points - start), means)

    return factory


def write_npy(folder, points, dim):
    """Write features, labels, predictions as .npy files, chunk by chunk."""
    fmt = np.lib.format
    paths = [folder / f"{name}.npy" for name in ("h", "y", "p")]
    specs = [((points, dim), np.float32), ((points,), np.int64), ((points,), np.int64)]
    handles = [open(p, "wb") for p in paths]
    for fh, (shape, dtype) in zip(handles, specs):
        fmt.write_array_header_1_0(
            fh,
            {
                "descr": fmt.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False,
                "shape": shape,
            },
        )
    for parts in generated_factory(points, dim)():
        for fh, part in zip(handles, parts):
            fh.write(np.ascontiguousarray(part).tobytes())
    for fh in handles:
        fh.close()
    return paths


def child(mode, points, dim, folder):
    """Run one source and print its record as JSON."""
    from dlmin.core.collapse import collapse_metrics_streaming, npy_chunks

    factory = (
        generated_factory(points, dim)
        if mode == "generated"
        else npy_chunks(
            *[Path(folder) / f"{n}.npy" for n in ("h", "y", "p")], chunk_rows=CHUNK_ROWS
        )
    )
    start = time.perf_counter()
    for _ in factory():
        pass
    read_once = time.perf_counter() - start
    start = time.perf_counter()
    res = collapse_metrics_streaming(factory)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keys = (
        "nc1",
        "nc1_quotient",
        "cdnv",
        "rank",
        "ncc_acc",
        "ncc_mismatch",
        "equinorm_means",
        "etf_gap_means",
    )
    print(
        json.dumps({
            "wall_s": round(wall, 2),
            "one_read_s": round(read_once, 2),
            "metric_overhead_s": round(wall - 2 * read_once, 2),
            "peak_rss_mib": round(peak, 1),
            "metrics": {k: res.as_dict()[k] for k in keys},
        })
    )


def run_child(mode, points, dim, folder):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--points",
        str(points),
        "--dim",
        str(dim),
        "--folder",
        str(folder),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", choices=("generated", "npy"))
    parser.add_argument("--folder", default="")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.points, args.dim, args.folder)

    record = {
        "points": args.points,
        "dim": args.dim,
        "classes": CLASSES,
        "chunk_rows": CHUNK_ROWS,
        "feature_dtype": "float32",
        "machine": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_before": os.getloadavg(),
    }
    record["generated"] = run_child("generated", args.points, args.dim, "")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_npy(Path(tmp), args.points, args.dim)
        record["npy_write_s"] = round(time.perf_counter() - start, 2)
        record["npy"] = run_child("npy", args.points, args.dim, tmp)
    out = HERE / "results" / "collapse.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
