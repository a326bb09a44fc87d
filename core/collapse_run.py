"""Runs of ``kind: collapse``: neural-collapse metrics and the effective flow.

``collapse.of`` says where the features come from: a network built here by a
construction (``construct``) or trained here by a flow (``flow``), a stored
result file (``result``), a features file (``features``); or ``effective``
integrates the (beta, R) equations of cluster truncation instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from . import collapse as nc
from . import store
from .runs import (
    RunFailure,
    _finish,
    _finite_or_none,
    _open_writer,
    _write_data,
    base_summary,
    clamped,
    deep_construction,
    flow_options,
    flow_start,
    make_dataset,
    write_flow_start,
)

ROW_KEYS = (
    "nc1",
    "nc1_quotient",
    "cdnv",
    "equinorm_means",
    "equiangular_means",
    "maxangle_means",
    "self_duality",
    "ncc_mismatch",
    "rank",
    "ncc_acc",
)


def metric_options(ccfg):
    """Keywords of collapse_metrics from a ``collapse:`` block."""
    return {
        "weighting": ccfg.weighting,
        "ddof": ccfg.ddof,
        "rank_tol": ccfg.rank_tol,
        "center_classifier": ccfg.center_classifier,
    }


def run_collapse(run, progress=None):
    """Measure collapse (or integrate the effective flow) and write the file."""
    cfg = run.config
    summary = base_summary(run)
    base_dir = Path(run.spec_file).parent
    of = cfg.collapse.of
    w = _open_writer(run, source=of)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", nc.CollapseWarning)
            status, message = SOURCES[of](w, summary, run, base_dir, progress)
        notes = sorted({str(c.message) for c in caught})
        if notes:
            w.set_attrs("collapse", warnings=notes)
            summary["warnings"] = notes
        return _finish(w, summary, status, message)
    except (RunFailure, ValueError, OSError) as exc:
        return _finish(w, summary, "failed", str(exc))
    except BaseException:
        w.abort()
        raise


# ----------------------------------------------------------- feature sources


def _of_construct(w, summary, run, base_dir, progress):
    cfg = run.config
    ds = make_dataset(cfg.data, run.rng("data"), base_dir)
    _write_data(w, ds)
    result = deep_construction(ds, cfg.construct, cfg.network.hidden)
    if not result.layers:
        return (
            "failed",
            f"the construction failed, nothing to measure: {result.message}",
        )
    store.store_layers(w, "network", result.layers)
    w.set_attrs("network", activation="relu")
    cumulative = result.cumulative[:-1] if cfg.collapse.truncation else None
    _per_layer(
        w,
        summary,
        result.layers,
        "relu",
        ds.X,
        ds.labels,
        ds.Y,
        cfg.collapse,
        cumulative,
        progress,
    )
    return "ok", result.message


def _of_result(w, summary, run, base_dir, progress):
    from .predict import load_network

    cfg = run.config
    path = _resolve(cfg.collapse.path, base_dir)
    res = store.load(path)
    if "data" not in res or "X" not in res["data"]:
        raise RunFailure(f"collapse.path: {path} holds no data to measure on")
    net = load_network(path, res)
    X, labels = res["data"]["X"], res["data"]["labels"]
    w.array("data", "X", X)
    w.array("data", "labels", labels)
    traj = res.get("trajectory", {})
    if "theta" in traj:
        _along_orbit(
            w,
            summary,
            net.layers,
            net.activation,
            X,
            labels,
            net.Y,
            traj,
            cfg.collapse,
            progress,
        )
        return "ok", ""
    cumulative = (
        net.cumulative[:-1] if net.cumulative and cfg.collapse.truncation else None
    )
    _per_layer(
        w,
        summary,
        net.layers,
        net.activation,
        X,
        labels,
        net.Y,
        cfg.collapse,
        cumulative,
        progress,
    )
    return "ok", ""


def _of_flow(w, summary, run, base_dir, progress):
    from . import flows

    cfg = run.config
    ds, Y, params = flow_start(run, base_dir)
    write_flow_start(w, ds, Y, params)
    options = flow_options(cfg.flow)
    options.store_theta = True
    result = flows.integrate(
        params, ds.X, Y, options, cfg.network.activation, seed=run.rng()
    )
    traj = {k: np.asarray(v) for k, v in result.records.items()}
    for key, value in traj.items():
        w.array("trajectory", key, value)
    store.store_layers(w, "network", result.params)
    w.set_attrs("network", activation=cfg.network.activation)
    summary.update(
        cost_initial=result.cost_initial,
        cost_final=result.cost_final,
        s_final=result.s_final,
        flow_kind=cfg.flow.kind,
    )
    _along_orbit(
        w,
        summary,
        result.params,
        cfg.network.activation,
        ds.X,
        ds.labels,
        ds.Y,
        traj,
        cfg.collapse,
        progress,
    )
    return result.status, result.message


def _of_features(w, summary, run, base_dir, progress):
    cfg = run.config
    path = _resolve(cfg.collapse.path, base_dir)
    res = features_file_metrics(path, metric_options(cfg.collapse), progress)
    _store_rows(w, "collapse", [res], ["features"])
    summary.update(_row(res))
    return "ok", ""


def features_file_metrics(path, options, progress=None):
    """Collapse metrics of a features ``.npz`` (two streaming passes).

    Arrays: ``features`` (N, D), ``labels`` (N,), optional ``W`` (C, D), ``b``
    (C,), ``predictions`` (N,), and held-out ``heldout_features``,
    ``heldout_labels``.
    """
    import zipfile

    path = Path(path)
    if not path.exists():
        raise RunFailure(f"{path}: no such file")
    with zipfile.ZipFile(path) as zf:
        names = {Path(n).stem for n in zf.namelist()}
    missing = {"features", "labels"} - names
    if missing:
        raise RunFailure(
            f"{path}: missing array(s) {', '.join(sorted(missing))}; found "
            f"{', '.join(sorted(names))}; expected features (N, D), labels (N,)"
        )
    small = {}
    with np.load(path, allow_pickle=False) as f:
        for key in ("W", "b"):
            if key in names:
                small[key] = np.asarray(f[key], dtype=float)
    has_pred = "predictions" in names

    chunks = nc.npz_chunks(path, predictions="predictions" if has_pred else None)
    held = None
    if {"heldout_features", "heldout_labels"} <= names:
        held = nc.npz_chunks(
            path, features="heldout_features", labels="heldout_labels", predictions=None
        )
    return nc.collapse_metrics_streaming(
        chunks, heldout_factory=held, progress=progress, **small, **options
    )


def _of_effective(w, summary, run, base_dir, progress):
    from . import effective as eff

    e = run.config.effective
    scen = eff.effective_scenario(
        e.dim,
        e.points,
        e.radius,
        run.rng("data"),
        rotation=e.rotation,
        truncated=e.truncated,
        n_clusters=e.clusters,
        trapped=e.trapped,
    )
    result = eff.integrate_effective(
        scen.clusters,
        scen.y_tilde,
        scen.beta0,
        scen.R0,
        time=e.time,
        step=e.step,
        method=e.method,
        freeze_R=e.freeze_R,
        record=e.record,
        progress=clamped(progress),
    )
    for c, pts in enumerate(scen.clusters):
        w.array("effective/clusters", f"cluster{c}", pts)
    w.array("effective", "y_tilde", scen.y_tilde)
    for key, value in result.records.items():
        w.array("effective", key, np.asarray(value))
    values = {k: v for k, v in result.as_dict().items() if k != "wall_time"}
    w.set_attrs("effective", **{k: v for k, v in values.items() if v is not None})
    summary.update({
        k: _finite_or_none(v) if isinstance(v, float) else v for k, v in values.items()
    })
    summary.update(cost=values.get("final_cost"), cost_kind="effective")
    return "ok", values.get("message", "")


SOURCES = {
    "construct": _of_construct,
    "result": _of_result,
    "flow": _of_flow,
    "features": _of_features,
    "effective": _of_effective,
}


# --------------------------------------------------------------- measuring


def _per_layer(
    w, summary, layers, activation, X, labels, Y, ccfg, cumulative, progress
):
    """Metrics of every layer's features, and of the truncation images."""
    opts = metric_options(ccfg)
    results = nc.network_collapse(
        layers, X, labels, activation=activation, targets=Y, progress=progress, **opts
    )
    _store_rows(w, "collapse", results, _layer_names(len(layers) + 1))
    if cumulative:
        images = nc.truncation_features(cumulative, X)
        trunc = nc.metrics_per_layer(images, labels, **opts)
        _store_rows(
            w, "collapse/truncation", trunc, [f"tau {l}" for l in range(len(images))]
        )
    summary.update(_row(results[-2]))
    summary["layers"] = len(layers) - 1
    summary["measured_layer"] = "last hidden"


def _along_orbit(
    w, summary, final_layers, activation, X, labels, Y, traj, ccfg, progress
):
    """Metrics of every layer at every recorded time of a flow."""
    from . import network

    widths = network.widths_of(final_layers)
    thetas = np.asarray(traj["theta"])
    per_time = []
    for k, theta in enumerate(thetas):
        params = network.unflatten(theta, widths)
        per_time.append(
            nc.network_collapse(
                params,
                X,
                labels,
                activation=activation,
                targets=Y,
                **metric_options(ccfg),
            )
        )
        if progress is not None:
            progress(k + 1, len(thetas))
    # collapse/: the last hidden layer against s; collapse/by_layer/: (time, layer)
    s = np.asarray(traj["s"])
    w.array("collapse", "s", s)
    dicts = [[r.as_dict() for r in row] for row in per_time]  # each once
    for key in _numeric_keys(per_time[0][0]):
        table = np.array([[_num(d[key]) for d in row] for row in dicts])
        w.array("collapse", key, table[:, -2])
        w.array("collapse/by_layer", key, table, axes="time, layer")
    names = _layer_names(len(per_time[0]))
    w.array("collapse/by_layer", "layer_name", np.array(names))
    w.set_attrs("collapse", layer=names[-2], options=_options_of(per_time[0][0]))
    summary.update(_row(per_time[-1][-2]))
    summary["nc1_initial"] = _finite_or_none(dicts[0][-2]["nc1"])
    summary["times"] = len(per_time)
    summary["measured_layer"] = "last hidden, final time"


BOOKKEEPING = (
    "n_",
    "min_",
    "max_class",
    "dim",
    "ddof",
    "rank_tol",
    "l2_lam",
    "flag_",
    "log10_",
    "wall",
)  # numbers about the input, not collapse metrics


def _numeric_keys(result):
    """The metric names of a result (what gets one stored array each)."""
    return [
        k
        for k, v in result.as_dict().items()
        if not k.startswith(BOOKKEEPING)
        and (
            isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, bool)
            or v is None
            and k in ROW_KEYS
        )
    ]


def _num(value):
    return np.nan if value is None else float(value)


def _layer_names(n):
    return ["input"] + [f"hidden {l}" for l in range(1, n - 1)] + ["output"]


def _store_rows(w, group, results, names):
    """One array per numeric metric along the layers (``layer``, ``layer_name``)."""
    w.array(group, "layer", np.arange(len(results)))
    w.array(group, "layer_name", np.array(names))
    dicts = [r.as_dict() for r in results]
    for key in _numeric_keys(results[0]):
        w.array(group, key, np.array([_num(d[key]) for d in dicts]))
    w.set_attrs(group, options=_options_of(results[0]))


def _options_of(result):
    d = result.as_dict()
    return {
        k: d[k]
        for k in ("weighting", "ddof", "rank_tol", "center_classifier", "loss")
        if k in d
    }


def _row(result):
    d = result.as_dict()
    row = {k: d.get(k) for k in ROW_KEYS}
    row.update({k: v for k, v in _options_of(result).items()})
    flags = [k for k, v in d.items() if k.startswith("flag_") and v]
    row["flags"] = flags
    return row


def _resolve(path, base_dir):
    p = Path(path)
    return p if p.is_absolute() else Path(base_dir) / p
