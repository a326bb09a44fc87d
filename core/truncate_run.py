"""Runs of ``kind: truncate``: a network seen through its truncation maps.

The network is trained here by the run's flow (``of: flow``, viewed at every
recorded time), built by its construction (``of: construct``), or read from
a result file (``of: result``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import store
from . import truncview as tv
from .runs import (
    RunFailure,
    _finish,
    _open_writer,
    _write_data,
    base_summary,
    clamped,
    deep_construction,
    existing_file,
    flow_options,
    flow_start,
    make_dataset,
    write_flow_start,
)


def run_truncate(run, progress=None):
    """View the run's network layer by layer (and over time) and write the file."""
    cfg = run.config
    summary = base_summary(run)
    base_dir = Path(run.spec_file).parent
    w = _open_writer(run, source=cfg.truncate.of)
    try:
        view, over, labels, n, message = SOURCES[cfg.truncate.of](
            w, run, base_dir, progress
        )
        tv.write_view(w, view, labels, n, over)
        summary.update(_row(view, over))
        notes = "; ".join([message] + view.failures if message else view.failures)
        return _finish(w, summary, "ok", notes)
    except (RunFailure, ValueError, OSError) as exc:
        return _finish(w, summary, "failed", str(exc))
    except BaseException:
        w.abort()
        raise


def _of_flow(w, run, base_dir, progress):
    from . import flows, network

    cfg = run.config
    ds, Y, params = flow_start(run, base_dir)
    write_flow_start(w, ds, Y, params)
    options = flow_options(cfg.flow)
    options.store_theta = True
    result = flows.integrate(
        params,
        ds.X,
        Y,
        options,
        cfg.network.activation,
        progress=clamped(progress),
        seed=run.rng(),
    )
    for key, value in result.records.items():
        w.array("trajectory", key, np.asarray(value))
    store.store_layers(w, "network", result.params)
    w.set_attrs("network", activation=cfg.network.activation)
    thetas = np.asarray(result.records["theta"])
    if cfg.truncate.time == "last":
        thetas = thetas[-1:]
    widths = network.widths_of(result.params)
    over = tv.truncation_over_time(
        thetas,
        widths,
        ds.X,
        ds.labels,
        s=np.asarray(result.records["s"])[-len(thetas) :],
    )
    view = tv.truncation_view(result.params, ds.X, ds.labels)
    return view, over, ds.labels, ds.X.shape[0], result.message


def _of_construct(w, run, base_dir, progress):
    cfg = run.config
    ds = make_dataset(cfg.data, run.rng("data"), base_dir)
    _write_data(w, ds)
    result = deep_construction(ds, cfg.construct, cfg.network.hidden)
    if not result.layers:
        raise RunFailure(f"the construction failed, nothing to view: {result.message}")
    store.store_layers(w, "network", result.layers)
    w.set_attrs("network", activation="relu")
    view = tv.truncation_view(result.layers, ds.X, ds.labels)
    return view, None, ds.labels, ds.X.shape[0], ""


def _of_result(w, run, base_dir, progress):
    path = existing_file(run.config.truncate.path, base_dir, "truncate.path")
    src = tv.load_source(path)
    w.array("data", "X", src.X)
    w.array("data", "labels", src.labels)
    store.store_layers(w, "network", src.layers)
    view = tv.truncation_view(src.layers, src.X, src.labels)
    over = None
    if src.thetas is not None and run.config.truncate.time == "all":
        over = tv.truncation_over_time(
            src.thetas, src.widths, src.X, src.labels, s=src.s
        )
    return view, over, src.labels, src.X.shape[0], ""


SOURCES = {"flow": _of_flow, "construct": _of_construct, "result": _of_result}


def _row(view, over):
    """Per-layer truncated fractions and spreads (for the last time)."""
    fr = view.fractions  # (L, Q, 3): collapsed, partly, fixed
    row = {
        "layers": len(view.layers),
        "conditions_ok": not view.failures,
        "failures": view.failures,
        "composition_error": view.composition_error,
        "collapsed": _lists(fr[..., 0]),
        "partly": _lists(fr[..., 1]),
        "fixed": _lists(fr[..., 2]),
        "spread": _lists(view.spread),
    }
    if over is not None:
        row["times"] = int(over.fractions.shape[0])
    return row


def _lists(a):
    return [
        [None if not np.isfinite(v) else float(v) for v in r] for r in np.asarray(a)
    ]
