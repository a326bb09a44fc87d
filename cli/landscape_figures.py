"""Figures of ``kind: landscape`` results: the cost around a minimizer.

Four pictures, each for one result file (see :mod:`dlmin.cli.figures` for
the conventions): histograms of where the trials ended per perturbation size,
the cost along the 1-D slices (with the cost at the perturbed starts against
the size), the 2-D contour on the random plane, and the trials' cost curves.
A collapse/keep minimizer gets the same pictures; its name is in the title.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.ticker import MaxNLocator

from .figures import FigureKind, PlotError, _color, need, title

HIST_BINS = 20  # bins per histogram, on a log axis
# Costs are drawn on log axes; zeros (a zero-cost minimizer, exact returns)
# sit at this fraction of the smallest positive value, labelled as zero.
ZERO_FRACTION = 1e-2
# ... but no lower than this fraction of the return threshold: a minimizer's
# rounding-level cost (1e-31) would otherwise squeeze every other value.
THRESHOLD_DEPTH = 1e-6
CONTOUR_LEVELS = 14
LOG_CONTOUR_SPAN = 1e3  # plane costs spanning more than this get log levels


def _landscape(res):
    return need(res, "landscape", "a landscape run (kind: landscape)")


def _minimizer(res):
    land = _landscape(res)
    a = land.get("attrs", {})
    return str(a.get("minimizer", "minimizer")), float(
        a.get("minimizer_cost", math.nan)
    )


def _floor(*arrays):
    """Where zeros are drawn on a log axis: below the smallest positive value."""
    values = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in arrays])
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.min()) * ZERO_FRACTION if positive.size else 1e-300


def _lifted(values, floor):
    v = np.array(values, dtype=float)
    return np.where(np.isfinite(v), np.maximum(v, floor), np.nan)


def draw_histograms(fig, results):
    """Final costs of the trained trials per lambda (start costs if untrained)."""
    res = results[0]
    land = _landscape(res)
    trials = need(res, "landscape/trials", "a landscape run")
    lambdas = np.asarray(land["lambdas"], dtype=float)
    a = land.get("attrs", {})
    trained = bool(a.get("trained")) and np.isfinite(trials["final_cost"]).any()
    costs = np.asarray(trials["final_cost" if trained else "start_cost"], dtype=float)
    c_star, threshold = float(a.get("minimizer_cost")), float(a.get("threshold"))
    floor = max(_floor(costs, [c_star, threshold]), THRESHOLD_DEPTH * threshold)
    logs = np.log10(_lifted(costs, floor))
    marks = np.log10(_lifted([c_star, threshold], floor))
    lo = np.nanmin(np.concatenate([logs.ravel(), marks]))
    hi = np.nanmax(np.concatenate([logs.ravel(), marks]))
    edges = np.linspace(lo - 0.5, hi + 0.5, HIST_BINS + 1)
    rows = lambdas.size
    fig.set_size_inches(8, 1.3 + 1.25 * rows)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, lam) in enumerate(zip(axes, lambdas)):
        ax.hist(logs[i][np.isfinite(logs[i])], bins=edges, color=_color(i), alpha=0.8)
        ax.axvline(marks[0], color="0.2", lw=1.0, label="C* (minimizer)")
        ax.axvline(marks[1], color="0.2", lw=1.0, ls="--", label="threshold")
        note = _fractions(res, i) if trained else ""
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("trials")
        ax.set_title(f"λ = {lam:g}{note}", fontsize=8, loc="left")
    axes[0].legend(loc="upper right")
    what = "final cost after training" if trained else "cost at the perturbed start"
    clipped = bool(np.nanmin(costs) < floor)
    note = f" (values below {floor:.0e} drawn at {math.log10(floor):.1f})"
    axes[-1].set_xlabel(f"log10 {what}" + (note if clipped else ""))
    name, _ = _minimizer(res)
    title(fig, results, f"final costs per λ around {name}")


def _fractions(res, i):
    """``", 100% at most the threshold, 25% below C*"`` for lambda number i."""
    stats = (res.get("landscape") or {}).get("stats") or {}
    parts = []
    for key, what in (
        ("fraction_returned", "at most the threshold"),
        ("fraction_below_minimum", "below C*"),
        ("fraction_failed", "failed"),
    ):
        values = stats.get(key)
        if (
            values is not None
            and np.isfinite(values[i])
            and (values[i] > 0 or key == "fraction_returned")
        ):
            parts.append(f"{float(values[i]):.0%} {what}")
    return ", " + ", ".join(parts) if parts else ""


def draw_slices(fig, results):
    """Cost along the random 1-D slices, and at the perturbed starts against lambda."""
    res = results[0]
    land = _landscape(res)
    coords = np.asarray(land["coords"], dtype=float)
    slices = np.atleast_2d(
        np.asarray(land.get("slices", np.zeros((0, 0))), dtype=float)
    )
    if slices.size == 0:
        raise PlotError("the run evaluated no slices (landscape.directions: 0)")
    name, c_star = _minimizer(res)
    fig.set_size_inches(10, 4)
    left, right = fig.subplots(1, 2)
    for i, row in enumerate(slices):
        left.plot(coords, row, color=_color(i), label=f"direction {i + 1}")
    left.axhline(c_star, color="0.2", lw=0.8, ls=":", label="C*")
    for lam in np.asarray(land["lambdas"], dtype=float):
        if 0 < lam <= coords[-1]:
            for x in (-lam, lam):
                left.axvline(x, color="0.6", lw=0.6, ls="--")
    left.set_xlabel("a (each tensor moved by |a|; dashed: the λ of the trials)")
    left.set_ylabel("cost C(θ* + a d)")
    left.legend(loc="upper center")
    _start_costs(right, res, c_star)
    title(fig, results, f"cost along random directions around {name}")


def _start_costs(ax, res, c_star):
    land = res["landscape"]
    trials = need(res, "landscape/trials", "a landscape run")
    lambdas = np.asarray(land["lambdas"], dtype=float)
    start = np.asarray(trials["start_cost"], dtype=float)
    keep = lambdas > 0
    if not keep.any():
        ax.set_axis_off()
        return
    lam, start = lambdas[keep], start[keep]
    if not np.isfinite(start).any():
        ax.text(
            0.5,
            0.5,
            "no perturbed start has a finite cost",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    floor = _floor(start)
    for i in range(start.shape[1]):
        ax.scatter(lam, _lifted(start[:, i], floor), s=10, color="0.45", alpha=0.6)
    ax.plot(
        lam,
        _lifted(np.median(start, axis=1), floor),
        color=_color(0),
        marker="o",
        label="median over trials",
    )
    if c_star >= floor:
        ax.axhline(c_star, color="0.2", lw=0.8, ls=":", label="C*")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("perturbation size λ")
    ax.set_ylabel("cost at θ* + λ d (random d)")
    ax.legend(loc="upper left")


def draw_plane(fig, results):
    """Contour of the cost on a random plane through the minimizer."""
    res = results[0]
    land = _landscape(res)
    if "plane" not in land:
        raise PlotError("the run evaluated no plane (landscape.plane: false)")
    coords = np.asarray(land["plane_coords"], dtype=float)
    Z = np.asarray(land["plane"], dtype=float)
    name, c_star = _minimizer(res)
    fig.set_size_inches(6.2, 5.2)
    ax = fig.subplots()
    positive = Z[np.isfinite(Z) & (Z > 0)]
    log = positive.size and positive.max() > LOG_CONTOUR_SPAN * max(
        np.median(positive), positive.min()
    )
    if log:
        shown = np.log10(_lifted(Z, _floor(Z)))
        label = "log10 cost"
    else:
        shown, label = Z, "cost"
    shown = np.ma.masked_invalid(shown)  # overflowed costs are left blank
    if shown.count() == 0:
        raise PlotError("no point of the plane has a finite cost")
    filled = ax.contourf(coords, coords, shown, levels=CONTOUR_LEVELS)
    ax.contour(
        coords,
        coords,
        shown,
        levels=filled.levels,
        colors="k",
        linewidths=0.3,
        alpha=0.5,
    )
    fig.colorbar(filled, ax=ax, label=label)
    ax.plot(
        [0],
        [0],
        marker="*",
        color="w",
        markeredgecolor="k",
        markersize=12,
        ls="none",
        label=f"θ* (C* = {c_star:.2e})",
    )
    ax.set_aspect("equal")
    ax.set_xlabel("a (direction d1)")
    ax.set_ylabel("b (direction d2, orthogonal to d1 per tensor)")
    ax.legend(loc="upper right")
    ax.grid(False)
    title(fig, results, f"cost on a random plane around {name}")


def draw_trials(fig, results):
    """Cost against training time of every trained trial, coloured by lambda."""
    res = results[0]
    land = _landscape(res)
    trials = need(res, "landscape/trials", "a landscape run")
    if "costs" not in trials:
        raise PlotError("the trials were not trained (landscape.train: false)")
    costs = np.asarray(trials["costs"], dtype=float)
    times = np.asarray(trials["times"], dtype=float)
    lambdas = np.asarray(land["lambdas"], dtype=float)
    a = land.get("attrs", {})
    floor = max(_floor(costs), THRESHOLD_DEPTH**3 * float(a.get("threshold", 0)))
    fig.set_size_inches(7, 4.2)
    ax = fig.subplots()
    for i, lam in enumerate(lambdas):
        for t in range(costs.shape[1]):
            ax.plot(
                times[i, t],
                _lifted(costs[i, t], floor),
                color=_color(i),
                lw=0.8,
                alpha=0.7,
                label=f"λ = {lam:g}" if t == 0 else None,
            )
    ax.axhline(
        _lifted([a.get("threshold", math.nan)], floor)[0],
        color="0.2",
        ls="--",
        lw=0.8,
        label="threshold",
    )
    ax.set_yscale("log")
    ax.set_xlabel("s (lr × steps for sgd)")
    ax.set_ylabel(f"cost (values below {floor:.0e} drawn there)")
    ax.legend(loc="upper right", ncol=2)
    name, _ = _minimizer(res)
    title(fig, results, f"training from perturbed starts around {name}")


FIGURES = {
    f.name: f
    for f in (
        FigureKind(
            "landscape-hist",
            draw_histograms,
            "landscape",
            "file",
            "histograms of the trials' final costs per lambda",
            also=("landscape/trials",),
        ),
        FigureKind(
            "landscape-slices",
            draw_slices,
            "landscape",
            "file",
            "cost along random 1-D slices, and at the perturbed starts",
            also=("landscape/slices",),
        ),
        FigureKind(
            "landscape-plane",
            draw_plane,
            "landscape",
            "file",
            "contour of the cost on a random 2-D plane through the minimizer",
            also=("landscape/plane",),
        ),
        FigureKind(
            "landscape-trials",
            draw_trials,
            "landscape",
            "file",
            "cost curves of the trials trained from perturbed starts",
            also=("landscape/trials/costs",),
        ),
    )
}
