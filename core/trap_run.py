"""Runs of ``kind: trap``: trapped stretches of a standard-flow orbit.

The orbit is integrated here from the run's data, network and flow blocks
(optionally after a scenario that makes it trap on purpose), or read from a
stored flow result (``trap.path``). Every interval's bound check is stored;
a violated bound fails the run loudly, since it can only mean an
integration error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from . import store
from . import trap as tp
from .runs import (
    RunFailure,
    _finish,
    _finite_or_none,
    _open_writer,
    base_summary,
    clamped,
    existing_file,
    flow_start,
    write_flow_start,
)

ROW_KEYS = (
    "intervals",
    "trapped_time",
    "bound_violations",
    "eps",
    "intervals_per_eps",
    "trapped_share",
    "time_to_threshold_standard",
    "time_to_threshold_adapted",
    "speedup",
    "trapped_share_standard",
    "trapped_share_adapted",
    "min_slack",
    "rank_D",
    "critical_dimension",
    "grad_norm_final",
    "cost_initial",
    "cost_final",
    "s_final",
    "K",
    "QN",
    "adapted_damping",
    "interpolation_defect",
    "source",
)


def trap_flow_options(fcfg):
    """Tight standard-flow options from a ``flow:`` block (kind and solver fixed)."""
    changes = {
        "time": fcfg.time,
        "stop_cost": fcfg.stop_cost,
        "wall_limit": fcfg.wall_limit,
        "record": fcfg.record.points,
        "grid": fcfg.record.grid,
    }
    if fcfg.max_step is not None:
        changes["max_step"] = fcfg.max_step
    return tp.trap_options(**changes)


def run_trap(run, progress=None):
    """Measure trapping on the run's orbit and write the file."""
    tcfg = run.config.trap
    summary = base_summary(run)
    base_dir = Path(run.spec_file).parent
    w = _open_writer(run, source="stored orbit" if tcfg.path else "integrated")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tp.BoundViolationWarning)
            result = (_from_file if tcfg.path else _integrated)(
                w, run, base_dir, progress
            )
        for key, value in result.arrays().items():
            w.array("trap", key, np.asarray(value))
        values = result.as_dict()
        w.set_attrs(
            "trap",
            **{
                k: v
                for k, v in values.items()
                if k != "interval_table" and v is not None
            },
        )
        summary.update({k: _clean(values.get(k)) for k in ROW_KEYS})
        summary["interval_table"] = values.get("interval_table")
        summary.update(cost=values.get("cost_final"), cost_kind="flow")
        status = "ok" if result.status == "ok" else "failed"
        return _finish(w, summary, status, result.message)
    except (RunFailure, ValueError, NotImplementedError, OSError) as exc:
        return _finish(w, summary, "failed", str(exc))
    except BaseException:
        w.abort()
        raise


def _integrated(w, run, base_dir, progress):
    cfg, tcfg = run.config, run.config.trap
    ds, Y, params = flow_start(run, base_dir)
    X = ds.X
    if tcfg.scenario is not None:
        params, X, Y = tp.apply_scenario(
            tcfg.scenario.name,
            params,
            X,
            Y,
            rng=run.rng("init"),
            activation=cfg.network.activation,
            **tcfg.scenario.knobs(),
        )
        ds.X = np.asarray(X)
    write_flow_start(w, ds, Y, params)
    result = tp.trap(
        params,
        X,
        Y,
        list(tcfg.eps),
        trap_flow_options(cfg.flow),
        activation=cfg.network.activation,
        compare=tcfg.compare,
        threshold=tcfg.threshold,
        compare_damping=tcfg.compare_damping,
        grid_points=tcfg.grid_points,
        progress=clamped(progress),
    )
    if result.flow is not None:
        store.store_layers(w, "network", result.flow.params)
        w.set_attrs("network", activation=cfg.network.activation)
    return result


def _from_file(w, run, base_dir, progress):
    from . import network
    from .predict import load_network

    tcfg = run.config.trap
    path = existing_file(tcfg.path, base_dir, "trap.path")
    res = store.load(path)
    traj = res.get("trajectory", {})
    if "theta" not in traj:
        raise RunFailure(
            f"trap.path: {path} has no recorded theta; rerun the flow with "
            "flow.store_theta: true"
        )
    solver = (res["attrs"].get("summary") or {}).get("solver")
    if solver in ("euler", "sgd"):
        raise RunFailure(
            f"trap.path: {path} was trained with solver {solver}; the trapping "
            "bound is about the continuous standard flow (use an ODE solver)"
        )
    if res["attrs"].get("flow_kind") not in (None, "standard"):
        raise RunFailure(
            f"trap.path: {path} is a {res['attrs'].get('flow_kind')} flow; the "
            "trapping bound is about the standard flow"
        )
    net = load_network(path, res)
    X, Y = res["data"]["X"], res["data"].get("targets")
    if Y is None:
        Y = res["data"]["Y"][res["data"]["labels"]]
    w.array("data", "X", X)
    w.array("data", "targets", Y)
    return tp.trap_records(
        traj["s"],
        traj["theta"],
        X,
        Y,
        network.widths_of(net.layers),
        list(tcfg.eps),
        activation=net.activation,
        grid_points=tcfg.grid_points,
    )


def _clean(value):
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
