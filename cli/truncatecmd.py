"""`dlmin truncate`: any ReLU network seen through its truncation maps.

SOURCE is a dlmin result file (a construction, or a flow: its final network,
or a recorded time with ``--time``) or an ``.npz`` of weights ``W1, b1, ...``
with ``W`` of shape (out, in); DATA (``.npz`` with ``X``, ``labels``, or
``.csv``) is then required. A PyTorch ``nn.Sequential`` of ``Linear`` and
``ReLU`` layers exports to that format in two lines::

    sd = [v.detach().numpy() for v in model.state_dict().values()]
    np.savez("net.npz", **{f"{'Wb'[i % 2]}{i // 2 + 1}": a for i, a in enumerate(sd)})

(``state_dict`` lists each ``Linear`` as weight (out, in), then bias.)
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import fail_usage, json_safe
from .runcmd import JsonOpt

# at most this many truncated points stored per layer


def register(app):
    @app.command()
    def truncate(
        source: Path = typer.Argument(
            ..., help="Result file (.h5) or weights (.npz with W1, b1, ...)."
        ),
        data: Path = typer.Argument(
            None, help="Data (.npz with X, labels, or .csv); required for .npz weights."
        ),
        time: str = typer.Option(
            None,
            "--time",
            help="Recorded time index of a flow, or 'all' for every time.",
        ),
        out: Path = typer.Option(
            None, "-o", "--out", help="Write the view to this HDF5 file."
        ),
        as_json: bool = JsonOpt,
    ):
        """See a network's hidden layers as truncation maps of its input data."""
        index, every = _parse_time(time)
        src = _load(source, data, index)
        from dlmin.core import truncview as tv

        try:
            view = tv.truncation_view(src.layers, src.X, src.labels)
            over = _over_time(src) if every else None
        except ValueError as exc:
            fail_usage(f"{source}: {exc}")
        if out is not None:
            _write(out, source, src, view, over)
        summary = _summary(source, src, view, over, out)
        if as_json:
            print(json.dumps(json_safe(summary)))
        else:
            _print(summary)


def _parse_time(time):
    if time is None:
        return None, False
    if time == "all":
        return None, True
    try:
        return int(time), False
    except ValueError:
        fail_usage(f"--time: expected an integer index or 'all', got {time!r}")


def _load(source, data, index):
    from dlmin.core.truncview import load_source

    try:
        return load_source(source, data, index)
    except (ValueError, FileNotFoundError) as exc:
        fail_usage(str(exc))


def _over_time(src):
    from dlmin.core.truncview import truncation_over_time

    if src.thetas is None:
        raise ValueError("--time all needs a flow result with trajectory/theta stored")
    return truncation_over_time(src.thetas, src.widths, src.X, src.labels, src.s)


def _summary(source, src, view, over, out):
    import numpy as np

    layers = []
    for lv in view.layers:
        layers.append({
            "layer": lv.layer,
            "width": int(lv.W.shape[0]),
            "sv_ratio": lv.sv_ratio,
            "nest_residual": lv.nest_residual,
            "composition_error": lv.composition_error,
            "failures": lv.failures,
            "base_point_norm": float(np.linalg.norm(lv.base_point)),
            "collapsed": lv.fractions[:, 0].tolist(),
            "partly": lv.fractions[:, 1].tolist(),
            "fixed": lv.fractions[:, 2].tolist(),
            "spread": lv.spread.tolist(),
        })
    summary = {
        "source": str(source),
        "time": src.time,
        "n_samples": int(src.X.shape[0]),
        "n_classes": view.n_classes,
        "layers": layers,
        "composition_error": view.composition_error,
        "conditions_ok": not view.failures,
        "failures": view.failures,
        "out": None if out is None else str(out),
    }
    if over is not None:
        summary["times"] = int(over.fractions.shape[0])
        summary["s_last"] = None if over.s is None else float(over.s[-1])
    return summary


def _write(out, source, src, view, over):
    from dlmin.core.store import ResultWriter
    from dlmin.core.truncview import write_view

    try:
        w = ResultWriter(out, kind="truncate", source=str(source), time=src.time)
    except OSError as exc:
        fail_usage(f"{out}: cannot write ({exc})")
    with w:
        write_view(w, view, src.labels, src.X.shape[0], over)
        w.finish(status="ok", message="; ".join(view.failures))


def _print(summary):
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    when = "" if summary["time"] is None else f" at recorded time {summary['time']}"
    console.print(
        f"{summary['source']}{when}: {summary['n_samples']} points, "
        f"{summary['n_classes']} classes, composition error "
        f"{summary['composition_error']:.2e}"
    )
    for layer in summary["layers"]:
        conds = "ok" if not layer["failures"] else "FAILS"
        console.print(
            f"layer {layer['layer']} (width {layer['width']}): conditions "
            f"{conds}, s_min/s_max {layer['sv_ratio']:.3g}, base point norm "
            f"{layer['base_point_norm']:.4g}"
        )
        for msg in layer["failures"]:
            console.print(f"  [yellow]{msg}[/]")
        table = Table(
            "class", "collapsed", "partly", "fixed", "spread", box=None, padding=(0, 2)
        )
        for j in range(summary["n_classes"]):
            table.add_row(
                str(j),
                *(_pct(layer[k][j]) for k in ("collapsed", "partly", "fixed")),
                _num(layer["spread"][j]),
            )
        console.print(table)
    if "times" in summary:
        console.print(f"{summary['times']} recorded times viewed")
    if summary["out"]:
        console.print(f"written: {summary['out']}")


def _pct(x):
    import numpy as np

    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def _num(x):
    import numpy as np

    return "-" if x is None or not np.isfinite(x) else f"{x:.3e}"
