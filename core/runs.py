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


def existing_file(value, base_dir, key):
    """A spec's file path, relative to the spec's folder; RunFailure if missing."""
    path = Path(value)
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.exists():
        raise RunFailure(f"{key}: {path}: no such file")
    return path


def make_dataset(cfg, rng, base_dir="."):
    """Build the dataset a run's ``data:`` block describes."""
    # targets given as rows (row j is y_j); else one-hot or the file's own
    given = (
        np.asarray(cfg.targets, dtype=float) if isinstance(cfg.targets, list) else None
    )
    if cfg.source == "clusters":
        return data_mod.clusters(
            cfg.classes,
            cfg.dim,
            cfg.points,
            cfg.radius,
            rng,
            distribution=cfg.distribution,
            layout=cfg.layout,
            scale=cfg.scale,
            separation=cfg.separation,
            means=cfg.means,
            targets=given,
        )
    if cfg.source == "sls":
        from .sls import make_sls_data

        return make_sls_data(
            cfg.classes,
            cfg.dim,
            cfg.points,
            rng,
            order=cfg.order,
            distance=cfg.distance,
            length=cfg.length,
            width=cfg.width,
            gap=cfg.gap,
            offset=cfg.offset,
            targets=given,
        )
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
    elif given is not None:
        if given.shape[0] != ds.n_classes:
            raise data_mod.DataError(
                f"data.targets has {given.shape[0]} rows but {path} has "
                f"{ds.n_classes} classes"
            )
        ds.Y = given
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
    try:
        return RUNNERS[run.kind](run, progress)
    except Exception as exc:  # a bug: report it on this run, let the others go on
        summary = base_summary(run, "failed")
        summary["message"] = (
            f"internal error {type(exc).__name__}: {exc} "
            "(please report it with the spec that caused it)"
        )
        summary["wall_time"] = None
        return summary


def base_summary(run, status="ok", message=""):
    return {
        "run_id": run.run_id,
        "experiment": run.experiment,
        "kind": run.kind,
        "status": status,
        "path": str(run.path),
        "message": message,
        "seed": run.seed,
        "point": run.point,
        "wall_time": time.perf_counter(),
    }


def skipped_summary(run):
    """Summary of a run already complete on disk, read back from its file."""
    summary = store.root_attr(run.path, "summary") or {}
    summary = dict(summary) if isinstance(summary, dict) else {}
    wall = summary.get("wall_time")
    summary.update(
        base_summary(run, "skipped", "complete result with the same spec exists")
    )
    summary["wall_time"] = wall
    return summary


def _open_writer(run, **attrs):
    """A run's result writer, with its provenance and spec already written."""
    w = store.ResultWriter(
        run.path,
        kind=run.kind,
        experiment=run.experiment,
        run_id=run.run_id,
        seed=run.seed,
        run_key=str(run.run_key),
        spec_hash=run.spec_hash,
        point=run.point,
        **attrs,
    )
    w.array("spec", "run", run.spec_text)
    w.array("spec", "source", run.source_text, file=run.spec_file)
    return w


def _write_data(w, ds):
    w.array("data", "X", ds.X)
    w.array("data", "labels", ds.labels)
    w.array("data", "Y", ds.Y)
    if ds.centers is not None:
        w.array("data", "centers", ds.centers)
    w.set_attrs(
        "data",
        source=ds.source,
        radius=ds.radius,
        distribution=ds.distribution,
        n_samples=ds.X.shape[0],
        n_classes=ds.n_classes,
        dim=ds.X.shape[1],
    )


# --------------------------------------------------------------- construct


def run_construct(run, progress=None):
    """Build the run's explicit minimizer (its ``construct.method``); write the file."""
    from .spec import hidden_problem

    cfg, copt = run.config, run.config.construct
    rng = run.rng()
    summary = base_summary(run)
    try:
        ds = make_dataset(cfg.data, run.rng("data"), Path(run.spec_file).parent)
    except (data_mod.DataError, OSError) as exc:
        return _fail_without_data(run, summary, str(exc))
    hidden = cfg.network.hidden
    w = _open_writer(run, method=copt.method)
    try:
        _write_data(w, ds)
        problem = hidden_problem(
            copt.method, copt.reduced_width, hidden, ds.X.shape[1], ds.n_classes
        )
        if problem:
            return _finish(
                w, summary, "failed", f"network.hidden = {hidden}: needs {problem}"
            )
        build = METHOD_BUILDERS[copt.method]
        status, message = build(w, summary, ds, copt, hidden, rng, progress)
        return _finish(w, summary, status, message)
    except BaseException:
        w.abort()
        raise


def _build_deep(w, summary, ds, copt, hidden, rng, progress):
    """Methods ``clustered`` (square or reduced width) and ``sls``."""
    rows = _kept_rows(ds.X.shape[0], copt.store_limit, rng)
    result = deep_construction(ds, copt, hidden, rows, progress)
    heldout = _heldout_error(result, ds, copt.heldout, rng)
    _write_construction(w, result, rows)
    summary.update(_construct_scalars(result, heldout, copt.method))
    if copt.method == "sls":
        summary.update(_write_sls(w, result))
    if copt.reduced_width and result.layers:
        summary["weights"] = cons.weight_count(result.layers)
        summary["widths"] = [int(W.shape[1]) for W, _ in result.layers] + [
            int(result.layers[-1][0].shape[0])
        ]
    return result.status, result.message


def deep_construction(ds, copt, hidden, rows=None, progress=None):
    """The Construction (A, reduced A, or B) a ``construct:`` block asks for."""
    common = dict(
        hidden_layers=len(hidden) if hidden else None,
        intercept=copt.intercept,
        keep_rows=rows,
        progress=progress,
    )
    if copt.method == "sls":
        from . import sls  # SciPy's optimize loads only for the LP-based method

        planes = None if copt.planes is None else np.asarray(copt.planes, dtype=float)
        return sls.build_sls(
            ds.X,
            ds.labels,
            ds.Y,
            order=copt.order,
            planes=planes,
            theta_frac=copt.theta_frac,
            **common,
        )
    if copt.reduced_width:
        from .reduced import build_clustered_reduced as build
    else:
        build = cons.build_clustered
    return build(
        ds.X,
        ds.labels,
        ds.Y,
        mu_factor=copt.mu_factor,
        theta0=copt.theta0,
        radius=_build_radius(copt.radius, ds),
        order=copt.order,
        strict=copt.strict,
        **common,
    )


def _write_sls(w, result):
    search = result.search
    order = [int(j) for j in result.order] if result.order is not None else None
    extra = {"order": order, "hyperplanes": None}
    if search is not None and not search.found:
        w.set_attrs("sls", found=False, message=search.message)
        return extra
    if result.planes:
        H = np.array([np.append(p.normal, p.offset) for p in result.planes])
        w.array("sls", "hyperplanes", H, columns="unit normal h_j, offset c_j")
        w.array(
            "sls",
            "description",
            result.description,
            columns="theta_j, h_j (dim numbers), t_j",
        )
        w.array("sls", "theta", result.theta)
        w.array("sls", "theta_min", result.theta_min)
        w.array("sls", "t", np.array([p.t for p in result.planes]))
        w.set_attrs("sls", found=True, cond=result.cond, cost_tol=result.cost_tol)
        extra["hyperplanes"] = H.tolist()
    return extra


def _build_shallow(w, summary, ds, copt, hidden, rng, progress):
    """Method ``shallow``: one hidden layer, the O(delta_P) bound, exact LS values."""
    from . import shallow

    result = shallow.build_shallow(ds.X, ds.labels, ds.Y)
    if result.layers:
        store.store_layers(w, "network", result.layers)
        w.set_attrs(
            "network",
            activation="relu",
            hidden_layers=1,
            weights=cons.weight_count(result.layers),
        )
    values = {k: _finite_or_none(v) for k, v in result.as_dict().items()}
    w.set_attrs(
        "metrics",
        **values,
        **result.costs,
        identity_regime=result.identity_regime,
        beta=result.beta,
        max_output_error=result.max_output_error,
        gap_within_bound=bool(result.gap.within) if result.gap else None,
    )
    heldout = _heldout_error(result, ds, copt.heldout, rng)
    summary.update(values)
    summary.update(
        {
            "cost_kind": "C_N",
            "cost_spread": result.costs.get("C_N_spread"),
            "cost_mismatch": result.costs.get("C_N_mismatch"),
            "certified": bool(result.identity_regime),
            "max_output_error": _finite_or_none(result.max_output_error),
            "heldout_max_output_error": heldout,
            "method": "shallow",
            "gap_within_bound": bool(result.gap.within) if result.gap else None,
        }
    )
    return result.status, result.message


def _build_family(w, summary, ds, copt, hidden, rng, progress):
    """Method ``collapse-keep``: every pattern and the local-minimum check."""
    from . import family

    try:
        fam = family.all_patterns(
            ds.X,
            ds.labels,
            ds.Y,
            max_classes=copt.max_classes,
            rng=rng,
            mu_factor=copt.mu_factor,
            nu_rule=copt.nu_rule,
        )
    except ValueError as exc:
        return "failed", str(exc)
    rows = fam.rows()
    w.array("patterns", "s", np.array([p.s for p in fam.patterns]))
    for key in ("cost_no_intercept", "cost_intercept", "trace_own", "trace_raw"):
        w.array("patterns", key, np.array([r[key] for r in rows], dtype=float))
    w.array("patterns", "certified", np.array([r["certified"] for r in rows]))
    w.set_attrs("patterns", rows=rows)
    best = fam.patterns[0]
    if best.layers:
        store.store_layers(w, "network", best.layers)
        w.set_attrs("network", activation="relu", pattern="0" * ds.n_classes)
    check = fam.local_min
    scalars = {
        "configurations": fam.configurations,
        "certified": all(p.certified for p in fam.patterns),
        "cost": _finite_or_none(best.cost_no_intercept),
        "cost_kind": "C_N",
        "all_keep_cost_intercept": _finite_or_none(fam.patterns[-1].cost_intercept),
        "local_min_checked": check is not None,
        "local_min_passed": bool(check.passed) if check else None,
        "local_min_min_change": check.min_change if check else None,
        "method": "collapse-keep",
    }
    w.set_attrs("metrics", **{k: v for k, v in scalars.items() if v is not None})
    summary.update(scalars)
    failed = [p.row()["pattern"] for p in fam.patterns if p.status != "ok"]
    if failed:
        return (
            "failed",
            f"patterns {', '.join(failed)} failed: {fam.patterns[0].message}",
        )
    return "ok", ""


METHOD_BUILDERS = {
    "clustered": _build_deep,
    "sls": _build_deep,
    "shallow": _build_shallow,
    "collapse-keep": _build_family,
}


def _finish(w, summary, status, message):
    summary["status"], summary["message"] = status, message
    summary["wall_time"] = time.perf_counter() - summary["wall_time"]
    w.set_attrs(summary=summary)
    w.finish(status, message, wall_time=summary["wall_time"])
    return summary


def _fail_without_data(run, summary, message):
    with _open_writer(run) as w:
        _finish(w, summary, "failed", message)
    return summary


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
    w.set_attrs(
        "network",
        activation="relu",
        widths=widths,
        hidden_layers=len(result.layers) - 1,
        weights=cons.weight_count(result.layers),
    )
    w.array("truncation", "rows", rows)
    for ell, Xt in enumerate(result.truncated):
        w.array("truncation", f"layer{ell}", Xt)
    w.array("truncation", "apexes", result.apexes)
    w.array("truncation", "order", np.asarray(result.order))
    w.array("truncation", "margins", result.margins, columns=["collapse", "keep"])
    w.set_attrs(
        "metrics",
        **result.costs,
        certified=result.certified,
        max_output_error=result.max_output_error,
        composition_error=result.composition_error,
        squeeze_factor=result.lam,
        output_rank=result.output_fit.rank,
        output_cond=result.output_fit.cond,
    )


def _construct_scalars(result, heldout, method="clustered"):
    cond = result.conditions
    return {
        "cost": result.costs.get("C_N"),
        "cost_kind": "C_N",
        "cost_spread": result.costs.get("C_N_spread"),
        "cost_mismatch": result.costs.get("C_N_mismatch"),
        "certified": bool(result.certified),
        "max_output_error": _finite_or_none(result.max_output_error),
        "heldout_max_output_error": heldout,
        "delta": cond.delta,
        "radius": cond.radius,
        "c0": cond.c0,
        "theta_star": _finite_or_none(cond.theta_star),
        "max_theta_j": _finite_or_none(float(np.max(cond.theta_j))),
        "method": method,
    }


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


# -------------------------------------------------------------------- flow


def initial_params(cfg, ds, rng, base_dir):
    """Initial weights of a flow: drawn from the seed, or read from a file."""
    from . import network
    from .predict import load_network

    init = cfg.network.init
    out_dim = ds.sample_targets().shape[1]
    if init.source == "seed":
        widths = [ds.X.shape[1], *cfg.network.hidden, out_dim]
        return network.init_params(
            widths,
            rng=rng,
            scheme=init.scheme,
            scale=init.scale,
            bias_scale=init.bias_scale,
        )
    if init.source == "partial":
        from .truncview import partial_truncation_start

        built = deep_construction(ds, cfg.construct, None)
        if not built.layers:
            raise RunFailure(
                f"network.init: partial needs the construction, which failed: "
                f"{built.message}"
            )
        return partial_truncation_start(built, ds.X, ds.labels, init.layer, init.weight)
    path = existing_file(init.path, base_dir, "network.init.path")
    if init.source == "file":
        params = network.load_npz(path)
    elif init.pattern is not None:
        params = _pattern_network(path, init.pattern, cfg.construct)
    else:
        params = load_network(path).layers
    if init.source == "result" and init.perturb > 0:
        params = perturb_params(params, init.perturb, init.relative, rng)
    widths = network.widths_of(params)
    if widths[0] != ds.X.shape[1] or widths[-1] != out_dim:
        raise RunFailure(
            f"network.init.path: {path} maps R^{widths[0]} to R^{widths[-1]}, "
            f"but the data have {ds.X.shape[1]} inputs and {out_dim} targets per sample"
        )
    return [(np.array(W, dtype=float), np.array(b, dtype=float)) for W, b in params]


def perturb_params(params, size, relative, rng):
    """Add to each W and b an independent Gaussian direction of norm ``size``.

    With ``relative`` the norm is ``size`` times the tensor's own norm.
    """
    from .landscape import perturb, random_direction

    return perturb(params, (size, random_direction(params, rng, relative)))


def _pattern_network(path, pattern, copt=None, key="network.init.pattern", res=None):
    """The collapse/keep network of ``pattern`` on the data of a result file.

    Its output layer is the least-squares fit with an intercept: the best
    output layer for the hidden ones (the papers' fit has no output bias, and
    the network's free bias would then move at once under training).
    ``copt`` (a ``construct:`` block) gives ``mu_factor`` and ``nu_rule``;
    ``key`` is the spec key errors name; ``res`` the file already read.
    """
    from .family import build_collapse_keep

    res = store.load(path) if res is None else res
    if "data" not in res or "labels" not in res["data"]:
        raise RunFailure(
            f"{key.rsplit('.', 1)[0]}.path: {path} holds no labelled data for a pattern"
        )
    X, labels, Y = res["data"]["X"], res["data"]["labels"], res["data"]["Y"]
    if len(pattern) != Y.shape[0]:
        raise RunFailure(
            f"{key}: found {len(pattern)} entries; allowed: one 0 or 1 per class of "
            f"{path} ({Y.shape[0]})"
        )
    shifts = (
        {} if copt is None else {"mu_factor": copt.mu_factor, "nu_rule": copt.nu_rule}
    )
    built = build_collapse_keep(X, labels, Y, np.asarray(pattern), **shifts)
    if built.status != "ok" or not built.layers_intercept:
        raise RunFailure(f"{key} {pattern}: {built.message}")
    return built.layers_intercept


def flow_targets(cfg, ds):
    """Per-sample targets; label smoothing ``(1 - e) y + e / Q`` for cross-entropy."""
    return cost_targets(cfg.flow, ds.sample_targets())


def cost_targets(fcfg, targets, smoothed=False):
    """Per-sample targets of a ``flow:`` block's cost, shape (N, Q).

    ``flow.label_smoothing`` applies unless the targets are ``smoothed``
    already (as a result file stores them); cross-entropy needs them > 0.
    """
    Y = np.asarray(targets, dtype=float)
    eps = 0.0 if smoothed else fcfg.label_smoothing
    if eps:
        Y = (1.0 - eps) * Y + eps / Y.shape[1]
    if fcfg.loss == "ce" and not np.all(Y > 0):
        raise RunFailure(
            "flow.loss: ce needs strictly positive label vectors (one-hot labels "
            "have no finite minimizer); set flow.label_smoothing (e.g. 0.1) or give "
            "positive data.targets"
        )
    return Y


def flow_options(fcfg):
    from .flows import FlowOptions

    return FlowOptions(
        kind=fcfg.kind,
        alpha=fcfg.alpha,
        loss=fcfg.loss,
        time=fcfg.time,
        solver=fcfg.solver,
        rtol=fcfg.rtol,
        atol=fcfg.atol,
        step=fcfg.step,
        max_step=np.inf if fcfg.max_step is None else fcfg.max_step,
        record=fcfg.record.points,
        grid=fcfg.record.grid,
        damping=fcfg.damping,
        rank_cutoff=fcfg.rank_cutoff,
        stop_cost=fcfg.stop_cost,
        wall_limit=fcfg.wall_limit,
        store_theta=fcfg.store_theta,
        route=fcfg.route,
        spectrum=fcfg.spectrum,
        lr=fcfg.lr,
        batch=fcfg.batch,
        momentum=fcfg.momentum,
        nesterov=fcfg.nesterov,
        epochs=100 if fcfg.epochs is None else fcfg.epochs,
    )


def flow_start(run, base_dir):
    """Data, per-sample targets and initial weights of a run that trains a network."""
    cfg = run.config
    ds = make_dataset(cfg.data, run.rng("data"), base_dir)
    Y = flow_targets(cfg, ds)
    return ds, Y, initial_params(cfg, ds, run.rng("init"), base_dir)


def write_flow_start(w, ds, Y, params):
    """Store the data, the targets and the initial network of a flow."""
    _write_data(w, ds)
    w.array("data", "targets", Y)
    store.store_layers(w, "network/initial", params)


def clamped(progress):
    """A flow's ``progress(s, s_max)`` that never reports past ``s_max``."""
    if progress is None:
        return None
    return lambda s, s_max: progress(min(s, s_max), s_max)


def run_flow(run, progress=None):
    """Integrate the run's gradient flow, streaming the orbit into its file."""
    from . import flows, network

    cfg = run.config
    summary = base_summary(run)
    base_dir = Path(run.spec_file).parent
    try:
        ds, Y, params = flow_start(run, base_dir)
        options = flow_options(cfg.flow)
    except (data_mod.DataError, RunFailure, OSError, ValueError) as exc:
        return _fail_without_data(run, summary, str(exc))
    w = _open_writer(run, flow_kind=cfg.flow.kind, loss=cfg.flow.loss)
    try:
        write_flow_start(w, ds, Y, params)
        widths = network.widths_of(params)
        w.set_attrs("network", activation=cfg.network.activation, widths=widths)

        def on_record(rec):
            for key, value in rec.items():
                w.append("trajectory", key, value)
            w.flush()

        try:
            result = flows.integrate(
                params,
                ds.X,
                Y,
                options,
                cfg.network.activation,
                on_record=on_record,
                progress=clamped(progress),
                seed=run.rng(),
            )
        except ValueError as exc:
            return _finish(w, summary, "failed", str(exc))
        store.store_layers(w, "network", result.params)
        scalars = _flow_scalars(result)
        summary.update(scalars)
        w.set_attrs("metrics", **scalars)
        w.set_attrs(
            "trajectory",
            cost_kind="flow: |x - y|^2 / (2N)"
            if cfg.flow.loss == "l2"
            else "cross-entropy: -(1/N) sum_n <y_n, log softmax(x_n)>",
        )
        return _finish(w, summary, result.status, result.message)
    except KeyboardInterrupt:
        w.abort(
            keep=True,
            status="interrupted",
            message="interrupted by the user; the trajectory so far is readable",
        )
        raise
    except BaseException:
        w.abort()
        raise


def _flow_scalars(result):
    return {
        "cost_initial": result.cost_initial,
        "cost_final": result.cost_final,
        "cost": result.cost_final,
        "cost_kind": "flow" if result.options.loss == "l2" else "cross-entropy",
        "s_final": result.s_final,
        "steps": result.steps,
        "rhs_evaluations": result.rhs_evaluations,
        "min_ntk_eigenvalue": result.min_ntk_eigenvalue,
        "exp_rel_error": result.exp_rel_error,
        "line_rel_error": result.line_rel_error,
        "stop_reason": result.stop_reason,
        "K": result.K,
        "QN": result.QN,
        "parametrization": result.parametrization,
        "rank_changes": result.rank_changes,
        "solver": result.options.solver,
        "flow_kind": result.options.kind,
        "epochs": _last_epoch(result.records),
    }


def _last_epoch(records):
    """Epochs an ``sgd`` run completed (fractional when stopped mid-epoch)."""
    epochs = records.get("epoch")
    return None if epochs is None or not len(epochs) else float(epochs[-1])


def _run_collapse(run, progress=None):
    from .collapse_run import run_collapse

    return run_collapse(run, progress)


def _run_trap(run, progress=None):
    from .trap_run import run_trap

    return run_trap(run, progress)


def _run_truncate(run, progress=None):
    from .truncate_run import run_truncate

    return run_truncate(run, progress)


def _run_landscape(run, progress=None):
    from .landscape_run import run_landscape

    return run_landscape(run, progress)


RUNNERS = {
    "construct": run_construct,
    "flow": run_flow,
    "trap": _run_trap,
    "collapse": _run_collapse,
    "truncate": _run_truncate,
    "landscape": _run_landscape,
}
