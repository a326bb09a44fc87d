"""`dlmin show`: a readable summary of a result file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import fail_usage, json_safe
from .runcmd import JsonOpt

HEADER_KEYS = (
    "kind",
    "experiment",
    "run_id",
    "status",
    "message",
    "complete",
    "seed",
    "point",
    "method",
    "spec_hash",
    "created",
    "wall_time",
    "git_commit",
    "versions",
)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(json_safe(value))
    return str(value)


def _datasets(f, prefix=""):
    import h5py

    rows = []
    for name, node in f.items():
        path = f"{prefix}/{name}"
        if isinstance(node, h5py.Group):
            rows += _datasets(node, path)
        else:
            rows.append((
                path,
                "x".join(map(str, node.shape)) or "scalar",
                str(node.dtype),
            ))
    return rows


def summarize(path):
    """Everything `show` prints, as a dict."""
    import h5py
    from dlmin.core.store import root_attrs

    attrs = root_attrs(path)
    with h5py.File(path, "r") as f:
        groups = {
            g: {k: f[g].attrs[k] for k in f[g].attrs}
            for g in f
            if isinstance(f[g], h5py.Group) and f[g].attrs
        }
        datasets = _datasets(f)
    from dlmin.core.store import _decode

    groups = {g: {k: _decode(v) for k, v in a.items()} for g, a in groups.items()}
    attrs.pop("summary", None)
    return {"file": str(path), "attrs": attrs, "groups": groups, "datasets": datasets}


def register(app):
    @app.command()
    def show(
        path: Path = typer.Argument(
            ..., help="A result file (.h5 or .h5.partial), or a folder of them."
        ),
        as_json: bool = JsonOpt,
    ):
        """Print a readable summary of a result file."""
        if not path.exists():
            fail_usage(f"{path}: no such file")
        if path.is_dir():
            _show_folder(path, as_json)
            return
        try:
            info = summarize(path)
        except OSError as exc:
            fail_usage(f"{path}: not a readable HDF5 result file ({exc})")
        if as_json:
            print(json.dumps(json_safe(info)))
            return
        _print(info)


def _print(info):
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    attrs = info["attrs"]
    title = f"{info['file']}"
    if not attrs.get("complete"):
        title += "  [bold yellow](INCOMPLETE: partial file)[/]"
    console.print(title)
    head = Table(show_header=False, box=None, padding=(0, 2))
    for key in HEADER_KEYS:
        if key in attrs and attrs[key] not in ("", None):
            head.add_row(key, _fmt(attrs[key]))
    console.print(head)
    for group, values in info["groups"].items():
        table = Table(
            title=group + "/",
            title_justify="left",
            show_header=False,
            box=None,
            padding=(0, 2),
        )
        for key, value in values.items():
            table.add_row(key, _fmt(value))
        console.print(table)
    table = Table(
        "dataset",
        "shape",
        "dtype",
        box=None,
        padding=(0, 2),
        title="arrays",
        title_justify="left",
    )
    for row in info["datasets"]:
        table.add_row(*row)
    console.print(table)


def _show_folder(folder, as_json):
    from collections import Counter

    from dlmin.core.gather import gather
    from rich.console import Console
    from rich.table import Table

    rows, _ = gather(folder)
    if as_json:
        for row in rows:
            print(json.dumps(json_safe(row)))
        return
    table = Table(
        "experiment", "run", "kind", "status", "cost", box=None, padding=(0, 2)
    )
    for row in rows:
        cost = row.get("cost")
        table.add_row(
            str(row["experiment"]),
            str(row["run_id"]),
            str(row["kind"]),
            str(row["status"]),
            "-" if cost is None else f"{cost:.3e}",
        )
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    counts = Counter(row["status"] for row in rows)
    console.print(
        f"{len(rows)} runs in {folder}: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    )
