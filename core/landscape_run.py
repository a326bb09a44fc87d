"""Runs of ``kind: landscape``: the cost around a constructed or stored minimizer.

The minimizer is built here from the run's data and ``construct:`` block
(``of: construct``; with ``pattern`` the collapse/keep network of that
pattern) or read from a result file (``of: result``; with ``pattern`` that
pattern rebuilt on the file's data). Around it the run evaluates 1-D slices
and a 2-D plane along random directions, and perturbed trials per
``lambda``, trained with the ``flow:`` block when ``train: true`` (any
solver; ``sgd`` is training as practitioners do it). The mathematics is in
:mod:`dlmin.core.landscape`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import landscape as ls
from . import store
from .runs import (
    RunFailure,
    _finish,
    _open_writer,
    _pattern_network,
    _write_data,
    base_summary,
    cost_targets,
    deep_construction,
    existing_file,
    flow_options,
    make_dataset,
)

# Default return threshold above the minimizer's cost (``threshold: auto``).
AUTO_THRESHOLD = 1e-4


@dataclass
class Minimizer:
    """The point the landscape is drawn around, with the data it minimizes on.

    Attributes
    ----------
    layers : list of (W, b) pairs
    activation : str
    X : ndarray, shape (n_samples, n_inputs)
    labels : ndarray of int, shape (n_samples,), or None
    targets : ndarray, shape (n_samples, n_outputs)
        Per-sample targets of the cost.
    what : str
        A phrase naming it ("clustered construction", "collapse/keep 011").
    smoothed : bool
        The targets are a result file's stored per-sample targets, label
        smoothing already applied: ``flow.label_smoothing`` is not applied again.
    """

    layers: list
    activation: str
    X: np.ndarray
    labels: np.ndarray | None
    targets: np.ndarray
    what: str
    smoothed: bool = False


def run_landscape(run, progress=None):
    """Slices, plane and trials around the run's minimizer; write the file."""
    cfg, land = run.config, run.config.landscape
    summary = base_summary(run)
    base_dir = Path(run.spec_file).parent
    w = _open_writer(run, source=land.of)
    try:
        try:
            mini = SOURCES[land.of](w, run, base_dir)
            Y = cost_targets(cfg.flow, mini.targets, mini.smoothed)
            options = _trial_options(cfg.flow) if land.train else None
        except (RunFailure, ValueError, OSError) as exc:
            return _finish(w, summary, "failed", str(exc))
        store.store_layers(w, "network", mini.layers)
        w.set_attrs("network", activation=mini.activation, minimizer=mini.what)
        w.array("data", "targets", Y)
        result = _compute(run, mini, Y, options, progress)
        _write(w, result)
        summary.update(_row(result))
        return _finish(w, summary, "ok", _message(result))
    except BaseException:
        w.abort()
        raise


# ------------------------------------------------------------------ sources


def _of_construct(w, run, base_dir):
    """Build the minimizer from the run's data and ``construct:`` block."""
    cfg, land = run.config, run.config.landscape
    ds = make_dataset(cfg.data, run.rng("data"), base_dir)
    _write_data(w, ds)
    pattern = land.pattern
    if pattern is None and cfg.construct.method == "collapse-keep":
        pattern = [0] * ds.n_classes  # all collapse: the family's global minimum
    if pattern is not None:
        what = _pattern_name(pattern)
        layers = _collapse_keep(ds, cfg.construct, pattern)
    elif cfg.construct.method == "shallow":
        from .shallow import build_shallow

        built = build_shallow(ds.X, ds.labels, ds.Y)
        layers, what = _built(built), "shallow construction"
    else:
        built = deep_construction(ds, cfg.construct, cfg.network.hidden)
        layers, what = _built(built), f"{cfg.construct.method} construction"
    return Minimizer(layers, "relu", ds.X, ds.labels, ds.sample_targets(), what)


def _collapse_keep(ds, copt, pattern):
    from .family import build_collapse_keep

    if len(pattern) != ds.n_classes:
        raise RunFailure(
            f"landscape.pattern: found {len(pattern)} entries; allowed: one 0 or 1 "
            f"per class ({ds.n_classes})"
        )
    built = build_collapse_keep(
        ds.X,
        ds.labels,
        ds.Y,
        np.asarray(pattern),
        mu_factor=copt.mu_factor,
        nu_rule=copt.nu_rule,
    )
    what = _pattern_name(pattern)
    return _built(built, what, built.layers_intercept)


def _built(built, what="the construction", layers=None):
    layers = built.layers if layers is None else layers
    if getattr(built, "status", "ok") != "ok" or not layers:
        raise RunFailure(
            f"{what} failed, there is no minimizer to look around: {built.message}"
        )
    return [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in layers]


def _pattern_name(pattern):
    return "collapse/keep " + "".join(str(int(s)) for s in pattern)


def _of_result(w, run, base_dir):
    """Read the minimizer, its data and targets from ``landscape.path``."""
    from .predict import load_network

    land = run.config.landscape
    path = existing_file(land.path, base_dir, "landscape.path")
    res = store.load(path)
    data = res.get("data", {})
    if "X" not in data:
        raise RunFailure(f"landscape.path: {path} holds no data/X to evaluate on")
    X, labels = np.asarray(data["X"], dtype=float), data.get("labels")
    stored = "targets" in data
    if stored:  # the per-sample targets its cost used, smoothing included
        targets = np.asarray(data["targets"], dtype=float)
    elif labels is not None and "Y" in data:
        targets = np.asarray(data["Y"], dtype=float)[np.asarray(labels)]
    else:
        raise RunFailure(f"landscape.path: {path} holds no targets for the cost")
    if land.pattern is not None:
        layers = _pattern_network(
            path, land.pattern, run.config.construct, "landscape.pattern", res
        )
        activation = "relu"
        what = f"{_pattern_name(land.pattern)} on {path.name}"
    else:
        try:
            net = load_network(path, res)
        except ValueError as exc:
            raise RunFailure(f"landscape.path: {exc}") from exc
        layers, activation, what = net.layers, net.activation, f"network of {path.name}"
    w.array("data", "X", X)
    if labels is not None:
        w.array("data", "labels", np.asarray(labels))
    return Minimizer(layers, activation, X, labels, targets, what, smoothed=stored)


SOURCES = {"construct": _of_construct, "result": _of_result}


def _trial_options(fcfg):
    """The ``flow:`` block as checked FlowOptions for training the trials.

    Trials record neither theta nor the NTK spectrum: both would cost more
    than the training. A bad option fails the run here, before any trial.
    """
    from .flows import check_options

    options = flow_options(fcfg)
    options.spectrum = False
    options.store_theta = False
    check_options(options)
    return options


# ------------------------------------------------------------------ compute


@dataclass
class LandscapeResult:
    """Everything a landscape run measured (see :func:`_compute`)."""

    minimizer: Minimizer
    loss: str
    minimizer_cost: float
    grad_norm: float
    threshold: float
    lambdas: np.ndarray
    quantiles: np.ndarray
    coords: np.ndarray
    slices: np.ndarray
    plane_coords: np.ndarray | None
    plane: np.ndarray | None
    plane_cosine: float
    grid: list
    stats: dict
    trained: bool
    relative: bool


def _compute(run, mini, Y, options, progress):
    """Slices, plane, trials and statistics around ``mini`` (targets ``Y``).

    Directions come from ``stream([run_key, seed], purpose, ...)``: slice
    ``i`` from ``("slice", i)``, the plane from ``("plane", 0)`` and
    ``("plane", 1)``, trial ``t`` of size ``lam`` from ``("trial", lam, t)``.
    """
    land, loss = run.config.landscape, run.config.flow.loss
    root = [run.run_key, run.seed]
    lambdas = np.asarray(land.lambdas, dtype=float)
    span = land.span or (float(lambdas.max()) if lambdas.max() > 0 else 1.0)
    evaluate = dict(activation=mini.activation, loss=loss)
    c_star = ls.cost(mini.layers, mini.X, Y, **evaluate)
    grad_norm = ls.gradient_norm(mini.layers, mini.X, Y, **evaluate)
    plane_rows = land.plane_points if land.plane else 0
    tick = _Ticker(progress, land.directions + plane_rows + lambdas.size * land.trials)

    coords = ls.slice_grid(span, land.points)
    slices = _slices(mini, Y, coords, root, land, evaluate, tick)
    plane_coords = plane = None
    cos = math.nan
    if land.plane:
        plane_coords = ls.slice_grid(span, land.plane_points)
        plane, cos = _plane(mini, Y, plane_coords, root, land, evaluate, tick)
    grid = ls.run_trials(
        mini.layers,
        mini.X,
        Y,
        lambdas,
        land.trials,
        root,
        relative=land.relative,
        options=options,
        progress=tick,
        **evaluate,
    )
    threshold = c_star + AUTO_THRESHOLD if land.threshold == "auto" else land.threshold
    stats = ls.statistics(grid, c_star, threshold, land.quantiles)
    return LandscapeResult(
        mini,
        loss,
        c_star,
        grad_norm,
        float(threshold),
        lambdas,
        np.asarray(land.quantiles),
        coords,
        slices,
        plane_coords,
        plane,
        cos,
        grid,
        stats,
        options is not None,
        land.relative,
    )


def _slices(mini, Y, coords, root, land, evaluate, tick):
    """Cost along ``land.directions`` random lines, shape (directions, points)."""
    dirs = [
        ls.random_direction(mini.layers, ls.stream(root, "slice", i), land.relative)
        for i in range(land.directions)
    ]
    return ls.slice_costs(
        mini.layers, dirs, coords, mini.X, Y, progress=tick, **evaluate
    )


def _plane(mini, Y, coords, root, land, evaluate, tick):
    """Cost on the random plane (rows b, columns a) and the directions' cosine."""
    d1, d2 = (
        ls.random_direction(mini.layers, ls.stream(root, "plane", i), land.relative)
        for i in range(2)
    )
    d2 = ls.orthogonalize(d2, d1)
    plane = ls.plane_costs(
        mini.layers, d1, d2, coords, mini.X, Y, progress=tick, **evaluate
    )
    return plane, ls.cosine(d1, d2)


class _Ticker:
    """Counts finished work units and reports ``progress(done, total)``.

    Called with whatever the piece of work reports (nothing, or its own
    counts), which it ignores.
    """

    def __init__(self, progress, total):
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def __call__(self, *_):
        self.done += 1
        if self.progress is not None:
            self.progress(float(self.done), float(self.total))


# ------------------------------------------------------------------ output


def _write(w, r):
    """Store a LandscapeResult under ``landscape/`` (layout in the README)."""
    w.array("landscape", "lambdas", r.lambdas)
    w.array("landscape", "quantiles", r.quantiles)
    if r.slices.size:
        w.array("landscape", "coords", r.coords)
        w.array("landscape", "slices", r.slices, rows="direction", columns="coords")
    if r.plane is not None:
        w.array("landscape", "plane_coords", r.plane_coords)
        w.array("landscape", "plane", r.plane, rows="b (d2)", columns="a (d1)")
    w.set_attrs(
        "landscape",
        minimizer=r.minimizer.what,
        minimizer_cost=r.minimizer_cost,
        minimizer_grad_norm=r.grad_norm,
        threshold=r.threshold,
        loss=r.loss,
        relative=r.relative,
        trained=r.trained,
        plane_cosine=None if math.isnan(r.plane_cosine) else r.plane_cosine,
        cost_kind="flow: |x - y|^2 / (2N)" if r.loss == "l2" else "cross-entropy",
    )
    for key, value in r.stats.items():
        w.array("landscape/stats", key, np.asarray(value))
    trials = _trial_arrays(r.grid)
    for key, value in trials.items():
        w.array("landscape/trials", key, value)


def _trial_arrays(grid):
    """The trials as arrays of shape (n_lambdas, trials[, n_records])."""
    flat = [t for row in grid for t in row]
    shape = (len(grid), len(grid[0]))
    out = {
        key: np.array([getattr(t, key) for t in flat], dtype=float).reshape(shape)
        for key in ("start_cost", "start_distance", "final_cost", "distance", "s_final")
    }
    out["steps"] = np.array([t.steps for t in flat], dtype=np.int64).reshape(shape)
    out["stop_reason"] = np.array([t.stop_reason for t in flat]).reshape(shape)
    longest = max(t.costs.size for t in flat)
    if longest:
        for key, attr in (("costs", "costs"), ("times", "times")):
            padded = np.full(shape + (longest,), math.nan)
            for i, t in enumerate(flat):
                series = getattr(t, attr)
                padded[i // shape[1], i % shape[1], : series.size] = series
            out[key] = padded
    return out


ROW_KEYS = (
    "fraction_returned",
    "fraction_below_minimum",
    "fraction_failed",
    "fraction_cut_short",
    "final_mean",
    "start_mean",
    "distance_median",
)


def _row(r):
    """The JSON row: the minimizer's cost and per-lambda statistics as lists."""
    row = {
        "minimizer": r.minimizer.what,
        "minimizer_cost": r.minimizer_cost,
        "minimizer_grad_norm": r.grad_norm,
        "cost": r.minimizer_cost,
        "cost_kind": "flow" if r.loss == "l2" else "cross-entropy",
        "threshold": r.threshold,
        "lambdas": r.lambdas.tolist(),
        "trials": len(r.grid[0]),
        "trained": r.trained,
        "quantiles": r.quantiles.tolist(),
        "start_cost_quantiles": _lists(r.stats["start_quantiles"]),
        "final_cost_quantiles": _lists(r.stats["final_quantiles"]),
        "slice_max": _finite_extreme(r.slices, np.max),
        "slice_min": _finite_extreme(r.slices, np.min),
        "plane_max": _finite_extreme(r.plane, np.max),
    }
    for key in ROW_KEYS:
        row[key] = [_clean(v) for v in r.stats[key]]
    return row


def _finite_extreme(values, reduce):
    """``reduce`` over the finite values (overflowed costs are inf), or None."""
    if values is None:
        return None
    finite = np.asarray(values)[np.isfinite(values)]
    return float(reduce(finite)) if finite.size else None


def _lists(a):
    return [[_clean(v) for v in row] for row in np.asarray(a)]


def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _message(r):
    """One line: the minimizer, and what the trials did."""
    text = (
        f"{r.minimizer.what}: C* = {r.minimizer_cost:.3e}, "
        f"|grad C*| = {r.grad_norm:.1e}"
    )
    if not r.trained:
        return text + f"; {r.lambdas.size} sizes x {len(r.grid[0])} starts evaluated"
    parts = [
        f"lambda {lam:g}: {frac:.0%} returned"
        + (f" ({below:.0%} below C*)" if below > 0 else "")
        for lam, frac, below in zip(
            r.lambdas,
            r.stats["fraction_returned"],
            r.stats["fraction_below_minimum"],
        )
    ]
    trials = [t for row in r.grid for t in row]
    failed = sum(t.status == "failed" for t in trials)
    if failed:
        parts.append(f"{failed} trials failed numerically (see trials/stop_reason)")
    cut = sum(t.stop_reason == "wall" for t in trials)
    if cut:
        parts.append(f"{cut} trials stopped by flow.wall_limit before the end")
    return text + f" (threshold {r.threshold:.1e}); " + ", ".join(parts)
