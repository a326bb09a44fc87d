"""Collect the result files of a folder into one table, a row per run.

Each row holds the run's identity, its sweep values (one column per dotted
key) and the scalars of its summary. Partial files appear with their status
(``interrupted``, ``running``) so a table of a live sweep tells what is left.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import store

FIRST_COLUMNS = ("experiment", "run_id", "kind", "status", "path")
SKIPPED_KEYS = ("point", "message")


def result_files(folder):
    """Every result file below ``folder``, complete or partial, sorted."""
    folder = Path(folder)
    files = list(folder.rglob("*.h5")) + list(
        folder.rglob(f"*.h5{store.PARTIAL_SUFFIX}")
    )
    return sorted(files)


def row_of(path):
    """One table row for a result file, and the names of its sweep columns."""
    attrs = store.root_attrs(path)
    summary = attrs.get("summary")
    summary = dict(summary) if isinstance(summary, dict) else {}
    row = {
        "experiment": attrs.get("experiment"),
        "run_id": attrs.get("run_id"),
        "kind": attrs.get("kind"),
        "status": attrs.get("status"),
        "path": str(path),
    }
    if not attrs.get("complete"):
        row["status"] = attrs.get("status") or "incomplete"
    point = attrs.get("point") if isinstance(attrs.get("point"), dict) else {}
    row.update({key: _cell(value) for key, value in point.items()})
    for key, value in summary.items():
        if key not in row and key not in SKIPPED_KEYS:
            row[key] = _cell(value)
    row["message"] = attrs.get("message", "")
    return row, list(point)


def _cell(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def gather(folder):
    """Rows of every result file below ``folder`` and the ordered column names."""
    pairs = [row_of(p) for p in result_files(folder)]
    rows = [row for row, _ in pairs]
    columns = list(FIRST_COLUMNS)
    for _, swept in pairs:
        columns += [k for k in swept if k not in columns]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "message"]
    return rows, columns + ["message"]


def write_table(rows, columns, path):
    """Write rows as CSV, or Parquet when ``path`` ends in ``.parquet``."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RuntimeError(
                "writing Parquet needs pyarrow: pip install pyarrow"
            ) from exc
        table = pa.table({c: [r.get(c) for r in rows] for c in columns})
        pq.write_table(table, path)
        return path
    with path.open("w", newline="") as fh:
        write_csv(rows, columns, fh)
    return path


def write_csv(rows, columns, fh):
    import csv

    writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
