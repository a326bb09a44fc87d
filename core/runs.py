"""Execute planned runs: make the data, compute, write the result file.

Each kind has one function ``(run, progress) -> summary`` that writes the
run's HDF5 file and returns a small dict (the JSON row of the CLI). Errors
that belong to the run (an assumption that fails, a file that cannot be
read) become ``status: failed`` with a message; only an interrupt escapes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import construct as cons
from . import data as data_mod
from . import store

class RunFailure(Exception):
    """A run cannot go on; the message says why and what to try."""


def make_dataset(cfg, rng, base_dir="."):
    """Build the dataset a run's ``data:`` block describes."""
    if cfg.source == "clusters":
        targets = None if cfg.targets == "onehot" else np.asarray(cfg.targets, dtype=float)
        return data_mod.clusters(
            cfg.classes, cfg.dim, cfg.points, cfg.radius, rng, distribution=cfg.distribution,
            layout=cfg.layout, scale=cfg.scale, separation=cfg.separation, means=cfg.means,
            targets=targets)
    if cfg.source == "sklearn":
        ds = data_mod.load_sklearn(cfg.name, cfg.standardize, cfg.dim)
        if cfg.augment:  # centred data have dependent means; a constant lifts them
            ds.X = np.hstack([ds.X, np.ones((ds.X.shape[0], 1))])
        path = f"scikit-learn's {cfg.name}"
    else:
        path = Path(cfg.path)
        path = path if path.is_absolute() else Path(base_dir) / path
        ds = data_mod.load_file(path)
    if cfg.targets == "onehot":
        ds.Y = data_mod.one_hot(ds.n_classes)
    elif isinstance(cfg.targets, list):
        Y = np.asarray(cfg.targets, dtype=float)
        if Y.shape[0] != ds.n_classes:
            raise data_mod.DataError(
                f"data.targets has {Y.shape[0]} rows but {path} has {ds.n_classes} classes")
        ds.Y = Y
    return ds


def execute(run, force=False, progress=None):
    """Run one planned run unless an equal complete result exists.

    Returns
    -------
    dict
        The run's summary; ``status`` is ``ok``, ``failed`` or ``skipped``.
    """
    if not force and store.is_done(run.path, run.spec_hash):
        return skipped_summary(run)
    return RUNNERS[run.kind](run, progress)


def base_summary(run, status="ok", message=""):
    return {"run_id": run.run_id, "experiment": run.experiment, "kind": run.kind,
            "status": status, "path": str(run.path), "message": message,
            "seed": run.seed, "point": run.point, "wall_time": time.perf_counter()}


def skipped_summary(run):
    """Summary of a run already complete on disk, read back from its file."""
    attrs = store.root_attrs(run.path)
    summary = attrs.get("summary") or {}
    summary = dict(summary) if isinstance(summary, dict) else {}
    wall = summary.get("wall_time")
    summary.update(base_summary(run, "skipped", "complete result with the same spec exists"))
    summary["wall_time"] = wall
    return summary


def _open_writer(run, **attrs):
    return store.ResultWriter(
        run.path, kind=run.kind, experiment=run.experiment, run_id=run.run_id,
        seed=run.seed, run_key=str(run.run_key), spec_hash=run.spec_hash,
        point=run.point, **attrs)


def _write_spec_and_data(w, run, ds):
    w.array("spec", "run", run.spec_text)
    w.array("spec", "source", run.source_text, file=run.spec_file)
    w.array("data", "X", ds.X)
    w.array("data", "labels", ds.labels)
    w.array("data", "Y", ds.Y)
    if ds.centers is not None:
        w.array("data", "centers", ds.centers)
    w.set_attrs("data", source=ds.source, radius=ds.radius, distribution=ds.distribution,
                n_samples=ds.X.shape[0], n_classes=ds.n_classes, dim=ds.X.shape[1])


# --------------------------------------------------------------- construct

def run_construct(run, progress=None):
    """Construction A on the run's data; writes the result file."""
    cfg, copt = run.config, run.config.construct
    rng = run.rng()
    summary = base_summary(run)
    try:
        ds = make_dataset(cfg.data, rng, Path(run.spec_file).parent)
    except (data_mod.DataError, OSError) as exc:
        return _fail_without_data(run, summary, str(exc))
    hidden = cfg.network.hidden
    w = _open_writer(run, method=copt.method)
    try:
        _write_spec_and_data(w, run, ds)
        shape_problem = _hidden_problem(hidden, ds)
        if shape_problem:
            return _finish(w, summary, "failed", shape_problem)
        rows = _kept_rows(ds.X.shape[0], copt.store_limit, rng)
        result = cons.build_clustered(
            ds.X, ds.labels, ds.Y, mu_factor=copt.mu_factor, theta0=copt.theta0,
            radius=_build_radius(copt.radius, ds), order=copt.order,
            hidden_layers=len(hidden) if hidden else None, strict=copt.strict,
            intercept=copt.intercept, keep_rows=rows, progress=progress)
        heldout = _heldout_error(result, ds, copt.heldout, rng)
        _write_construction(w, result, rows)
        summary.update(_construct_scalars(result, heldout))
        return _finish(w, summary, result.status, result.message)
    except BaseException:
        w.abort()
        raise


def _finish(w, summary, status, message):
    summary["status"], summary["message"] = status, message
    summary["wall_time"] = time.perf_counter() - summary["wall_time"]
    w.set_attrs(summary=summary)
    w.finish(status, message, wall_time=summary["wall_time"])
    return summary


def _fail_without_data(run, summary, message):
    with _open_writer(run) as w:
        w.array("spec", "run", run.spec_text)
        _finish(w, summary, "failed", message)
    return summary


def _hidden_problem(hidden, ds):
    dim = ds.X.shape[1]
    if hidden and any(h != dim for h in hidden):
        return (f"network.hidden = {hidden}: Construction A needs every hidden width "
                f"equal to the input dimension {dim}")
    return ""


def _build_radius(option, ds):
    """Radius the network must cover: the generator's balls when known."""
    if option == "data":
        return None
    if option == "auto":
        if ds.centers is None or ds.distribution != "ball":
            return None
        means = cons.class_stats(ds.X, ds.labels, ds.n_classes).means
        return float(np.linalg.norm(means - ds.centers, axis=1).max() + ds.radius)
    return float(option)


def _kept_rows(n, limit, rng):
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _heldout_error(result, ds, per_class, rng):
    if result.status != "ok" or per_class == 0:
        return None
    fresh = ds.resample(np.full(ds.n_classes, per_class), rng)
    if fresh is None:
        return None
    X2, labels2 = fresh
    return cons.max_output_error(result.predict(X2), labels2, ds.Y)


def _write_construction(w, result, rows):
    cond = result.conditions
    w.array("metrics", "theta_j", cond.theta_j)
    w.array("metrics", "f", cond.f)
    w.set_attrs("metrics", **cond.as_dict(), failures=cond.failures)
    if not result.layers:
        return
    store.store_layers(w, "network", result.layers)
    store.store_layers(w, "network/cumulative", result.cumulative)
    widths = [W.shape[1] for W, _ in result.layers] + [result.layers[-1][0].shape[0]]
    w.set_attrs("network", activation="relu", widths=widths,
                hidden_layers=len(result.layers) - 1,
                weights=cons.weight_count(result.layers))
    w.array("truncation", "rows", rows)
    for ell, Xt in enumerate(result.truncated):
        w.array("truncation", f"layer{ell}", Xt)
    w.array("truncation", "apexes", result.apexes)
    w.array("truncation", "order", np.asarray(result.order))
    w.array("truncation", "margins", result.margins, columns=["collapse", "keep"])
    w.set_attrs("metrics", **result.costs, certified=result.certified,
                max_output_error=result.max_output_error,
                composition_error=result.composition_error,
                squeeze_factor=result.lam, output_rank=result.output_fit.rank,
                output_cond=result.output_fit.cond)


def _construct_scalars(result, heldout):
    cond = result.conditions
    return {
        "cost": result.costs.get("C_N"), "cost_kind": "C_N",
        "cost_spread": result.costs.get("C_N_spread"),
        "cost_mismatch": result.costs.get("C_N_mismatch"),
        "certified": bool(result.certified),
        "max_output_error": _finite_or_none(result.max_output_error),
        "heldout_max_output_error": heldout,
        "delta": cond.delta, "radius": cond.radius, "c0": cond.c0,
        "theta_star": _finite_or_none(cond.theta_star),
        "max_theta_j": _finite_or_none(float(np.max(cond.theta_j))),
        "method": "clustered",
    }


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


RUNNERS = {"construct": run_construct}
