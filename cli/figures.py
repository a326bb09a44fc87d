"""Figures of dlmin results: from loaded result dicts to a matplotlib Figure.

Each ``draw_*`` function solves one picture: it takes an empty
``matplotlib.figure.Figure`` and ``results``, a list of dicts as
:func:`dlmin.core.store.load` returns them (``{"attrs": {...}, "<group>":
{...}}``), sets the figure size, adds the axes and returns nothing. A file
gives a list of one; a sweep folder gives one dict per run, in file-name
order. Nothing here reads files, writes files or prints: when a result lacks
what a picture needs, :class:`PlotError` says what is missing.

This module imports matplotlib at the top and is therefore imported only
inside the ``plot`` command. :data:`FIGURES` lists every picture, the groups
it needs and whether it applies to a single file, a folder, or both.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import matplotlib
import matplotlib.transforms as mtransforms
import numpy as np

COLORS = tuple(matplotlib.colormaps["tab10"].colors)  # classes, runs, eps levels
REFERENCE_COLOR = "0.2"
ARROW_FRACTION = 0.3  # cone axis and generators, as a fraction of the view's extent
RANK_RTOL = 1e-10  # singular values below this times the largest span no direction
LOG_SPAN = 1e3  # a positive series spanning more than this ratio gets a log axis
TITLE_CHARS_PER_INCH = 15  # characters of a 10-point title line per inch of figure
FAILED_Y = 0.03  # height (axes fraction) of the marks of runs without a value
CAMERA_TILT = 25.0  # degrees below face-on, so that 3-D clouds keep some depth
ROUNDING_LEVEL = 1e-8  # positive values all below this are drawn on a log axis

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.4,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.framealpha": 0.85,
    "image.cmap": "viridis",
}


class PlotError(ValueError):
    """A result has nothing to draw for the asked figure; the message says why."""


# --------------------------------------------------------------- lookups


def group(res, path):
    """The nested group ``path`` (e.g. ``"trap/intervals"``) of a result, or None."""
    node = res
    for part in path.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def need(res, path, what):
    """:func:`group`, raising :class:`PlotError` naming ``what`` writes it."""
    node = group(res, path)
    if node is None:
        raise PlotError(f"{run_name(res)} has no {path}/ group ({what} writes one)")
    return node


def run_name(res):
    """``experiment/run_id``, or what the file says it is."""
    a = res.get("attrs", {})
    if a.get("experiment") and a.get("run_id"):
        return f"{a['experiment']}/{a['run_id']}"
    return str(a.get("run_id") or a.get("kind") or "result")


def last_time(res):
    """Largest recorded flow time of a result, or None when it has none."""
    for path in ("trajectory", "trap", "effective", "collapse"):
        node = group(res, path)
        if node is not None and np.size(node.get("s", [])):
            return float(np.asarray(node["s"])[-1])
    return None


def partial_note(res):
    """``"(partial: interrupted at s = 12.5)"`` for an incomplete file, else ``""``."""
    a = res.get("attrs", {})
    if a.get("complete", True):
        return ""
    status = a.get("status") or "incomplete"
    s = last_time(res)
    return (
        f"(partial: {status} at s = {s:.4g})"
        if s is not None
        else f"(partial: {status}, nothing recorded yet)"
    )


def title(fig, results, subject):
    """Set the title: run or experiment name, subject, partial note, failure."""
    a = results[0].get("attrs", {})
    if len(results) == 1:
        text = f"{run_name(results[0])} — {subject}"
        note = partial_note(results[0])
        text += f" {note}" if note else ""
        if a.get("status") == "failed" and a.get("message"):
            width = int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)
            text += "\n" + _wrap(f"failed: {a['message']}", width)
    else:
        text = f"{a.get('experiment') or 'sweep'} — {subject}"
    fig.suptitle(text, fontsize=10)


def _wrap(text, width):
    return "\n".join(textwrap.wrap(text, width, max_lines=3, placeholder=" …"))


def run_labels(results):
    """One legend label per run: the sweep values that differ between the runs.

    Returns
    -------
    labels : list of str
    heading : str
        The varying keys (a legend title), or ``""`` when labels are run ids.
    """
    points = [r["attrs"].get("point") or {} for r in results]
    keys = [
        k for k in _ordered_keys(points) if len({repr(p.get(k)) for p in points}) > 1
    ]
    if keys:
        labels = [", ".join(str(p.get(k)) for k in keys) for p in points]
        heading = ", ".join(keys)
    else:
        labels, heading = (
            [str(r["attrs"].get("run_id", i)) for i, r in enumerate(results)],
            "",
        )
    return [
        lab + (" (partial)" if not r["attrs"].get("complete", True) else "")
        for lab, r in zip(labels, results)
    ], heading


def _ordered_keys(points):
    keys = []
    for p in points:
        keys += [k for k in p if k not in keys]
    return keys


def _positive(values):
    """Float copy with non-positive and non-finite entries set to NaN (log axes)."""
    v = np.array(values, dtype=float)
    v[~(np.isfinite(v) & (v > 0))] = np.nan
    return v


def _color(i):
    return COLORS[i % len(COLORS)]


# ------------------------------------------------------------- construct


@dataclass
class View:
    """Drawing coordinates for points of R^M.

    Native axes when ``M <= 3`` (M = 1 is drawn on a line); for ``M > 3`` the
    orthonormal directions spanned by the class means about their
    barycenter: two when they span at most two (Q <= 3, completed by the
    data's leading principal direction when Q = 2), three otherwise.

    Attributes
    ----------
    origin : ndarray, shape (M,)
    basis : ndarray, shape (M, k)
        Columns are the drawn directions (k = 2 or 3).
    projected : bool
        Whether the view is a projection (cone boundaries are then not drawn).
    """

    origin: np.ndarray
    basis: np.ndarray
    projected: bool

    @property
    def dim(self):
        return self.basis.shape[1]

    def points(self, X):
        """Coordinates of rows of ``X`` (shape (n, M)), shape (n, k)."""
        return (np.asarray(X, dtype=float) - self.origin) @ self.basis

    def vectors(self, V):
        """Coordinates of directions (shape (n, M)), shape (n, k)."""
        return np.asarray(V, dtype=float) @ self.basis

    def axis_labels(self):
        return [
            f"$u_{i + 1}$" if self.projected else f"$x_{i + 1}$"
            for i in range(self.dim)
        ]

    def camera(self, X):
        """``(elev, azim)`` in degrees that show the points ``X`` (n, M) face-on.

        The viewing direction is the drawn cloud's direction of least
        spread, tilted by CAMERA_TILT, so flat data (clusters on a simplex)
        show their shape.
        """
        P = self.points(X)
        _, _, Vt = np.linalg.svd(P - P.mean(axis=0), full_matrices=False)
        n = Vt[-1] * (1.0 if Vt[-1].sum() >= 0 else -1.0)
        elev = math.degrees(math.asin(float(np.clip(n[2], -1.0, 1.0))))
        azim = math.degrees(math.atan2(n[1], n[0]))
        return elev - CAMERA_TILT, azim


def make_view(X, labels):
    """The :class:`View` of data ``X`` (shape (n, M)) with class ``labels`` (n,)."""
    X = np.asarray(X, dtype=float)
    M = X.shape[1]
    if M == 1:
        return View(np.zeros(1), np.array([[1.0, 0.0]]), False)
    if M <= 3:
        return View(np.zeros(M), np.eye(M), False)
    classes = np.unique(labels)
    means = np.stack([X[labels == c].mean(axis=0) for c in classes])
    origin = means.mean(axis=0)
    spanned = _directions(means - origin)
    k = 3 if len(spanned) >= 3 else 2
    candidates = np.vstack([spanned, _directions(X - origin)])
    return View(origin, _orthonormal(candidates, k), True)


def _directions(A):
    """Right singular vectors of ``A`` above the rank cut-off, strongest first."""
    if A.shape[0] == 0:
        return np.zeros((0, A.shape[1]))
    _, sv, Vt = np.linalg.svd(A, full_matrices=False)
    keep = sv > RANK_RTOL * max(sv[0], np.finfo(float).tiny)
    return Vt[keep]


def _orthonormal(rows, k):
    """Gram-Schmidt on ``rows`` (candidate directions) until ``k`` are found."""
    basis = []
    for v in rows:
        w = v - sum((b @ v) * b for b in basis) if basis else v.copy()
        n = np.linalg.norm(w)
        if n > 1e-8:
            b = w / n
            basis.append(b * (1.0 if b[np.argmax(np.abs(b))] > 0 else -1.0))
        if len(basis) == k:
            break
    return np.stack(basis, axis=1)


def _n_classes(res, labels):
    Y = res.get("data", {}).get("Y")
    return int(Y.shape[0]) if Y is not None else int(np.max(labels)) + 1


def _view_limits(view, clouds):
    """Common, equal-aspect limits for every panel: (lo, hi) per drawn axis."""
    pts = np.vstack([c for c in clouds if c.size])
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    center, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-12) * 1.12
    return [(c - half, c + half) for c in center]


def _new_panel(fig, view, nrows, ncols, index, limits, camera=None):
    if view.dim == 3:
        ax = fig.add_subplot(nrows, ncols, index, projection="3d")
        ax.set_box_aspect((1, 1, 1))
        ax.set_zlim(*limits[2])
        if camera is not None:
            ax.view_init(*camera)
        ax.tick_params(labelsize=6, pad=0)
        ax.locator_params(nbins=4)
    else:
        ax = fig.add_subplot(nrows, ncols, index)
        ax.set_aspect("equal")
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    if index == 1:
        names = view.axis_labels()
        ax.set_xlabel(names[0], labelpad=0)
        ax.set_ylabel(names[1], labelpad=0)
        if view.dim == 3:
            ax.set_zlabel(names[2], labelpad=0)
    return ax


def _scatter(ax, P, **kw):
    return ax.scatter(*P.T[:3], **kw)


def _segment(ax, a, b, **kw):
    return ax.plot(*np.stack([a, b]).T, **kw)


def _draw_cone(ax, view, apex, axis, theta, length, color):
    """Draw the cone ``apex + C_theta[axis]``: axis, and boundary when native.

    ``theta`` is the full opening angle (rad); ``None`` or non-finite draws
    only the axis.
    """
    p = view.points(apex[None])[0]
    h = view.vectors(axis[None])[0]
    if not np.linalg.norm(h) > 0:
        return
    h = h / np.linalg.norm(h)
    _segment(ax, p, p + length * h, color=color, lw=1.6)
    if theta is None or not np.isfinite(theta) or theta >= np.pi or view.projected:
        return
    half = theta / 2
    for g in _generators(h, half, 4 if view.dim == 3 else 2):
        _segment(ax, p, p + length * g, color=color, lw=0.7, ls="--", alpha=0.8)
    if view.dim == 3:
        ring = _generators(h, half, 48)
        ax.plot(
            *(p + length * np.vstack([ring, ring[:1]])).T,
            color=color,
            lw=0.6,
            alpha=0.6,
        )


def _generators(h, half, count):
    """Unit vectors at angle ``half`` from the unit vector ``h`` (2-D: the two rays)."""
    if h.size == 2:
        rot = [
            np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            for a in (half, -half)
        ]
        return np.stack([R @ h for R in rot])
    e1 = np.cross(h, np.eye(3)[np.argmin(np.abs(h))])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(h, e1)
    phi = np.linspace(0.0, 2 * np.pi, count, endpoint=False)
    ring = np.outer(np.cos(phi), e1) + np.outer(np.sin(phi), e2)
    return np.cos(half) * h + np.sin(half) * ring


def draw_layers(fig, results):
    """The data before and after each truncation layer, with each layer's cone.

    Panel 0 is the input; panel l shows the images after layer l, the cone
    of layer l (apex, axis, and its boundary in native coordinates) and a
    star at the apex of every class collapsed so far.
    """
    res = results[0]
    tr = need(res, "truncation", "a construct run with methods clustered or sls")
    layers = _truncation_layers(tr)
    labels = np.asarray(res["data"]["labels"])[np.asarray(tr["rows"])]
    Q = _n_classes(res, labels)
    apexes, order = np.asarray(tr["apexes"], dtype=float), [int(j) for j in tr["order"]]
    cones = _cones(res, order)
    view = make_view(layers[0], labels)
    placed = apexes[np.isfinite(apexes[:, 0])]
    clouds = [view.points(L) for L in layers] + [view.points(placed)]
    limits = _view_limits(view, clouds)
    length = ARROW_FRACTION * (limits[0][1] - limits[0][0])
    camera = view.camera(layers[0]) if view.dim == 3 else None
    ncols = min(len(layers), 4)
    nrows = math.ceil(len(layers) / ncols)
    fig.set_size_inches(3.0 * ncols, 3.1 * nrows + 0.7)
    for ell, P in enumerate(clouds[:-1]):
        ax = _new_panel(fig, view, nrows, ncols, ell + 1, limits, camera)
        for c in range(Q):
            _scatter(
                ax,
                P[labels == c],
                s=6,
                color=_color(c),
                alpha=0.8,
                lw=0,
                label=f"class {c}",
            )
        done = order[:ell]
        if done:
            _scatter(
                ax,
                view.points(apexes[done]),
                s=110,
                marker="*",
                c=[_color(j) for j in done],
                edgecolors="k",
                linewidths=0.6,
                label="apex (class collapsed)",
                zorder=5,
            )
            j = done[-1]
            if cones[ell - 1] is not None:
                _draw_cone(ax, view, apexes[j], *cones[ell - 1], length, _color(j))
        ax.set_title(
            "input"
            if ell == 0
            else f"after layer {ell}: class {order[ell - 1]} → apex",
            fontsize=8,
        )
    handles, texts = ax.get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside lower center", ncols=len(texts), fontsize=8)
    where = "projected onto the class means' span" if view.projected else ""
    title(
        fig,
        results,
        f"truncation layers ({res['attrs'].get('method', 'construct')})"
        + (f", {where}" if where else ""),
    )


def _cones(res, order):
    """``(axis, full angle)`` of each cone layer in collapse order (None if unknown).

    Construction B stores each layer's unit normal ``h_j`` and angle in
    ``sls/``; Construction A uses the class directions ``f_j`` of
    ``metrics/f`` and the common angle ``theta_star``.
    """
    sls = group(res, "sls")
    if sls is not None and "hyperplanes" in sls and "theta" in sls:
        H, theta = np.atleast_2d(sls["hyperplanes"]), np.atleast_1d(sls["theta"])
        return [
            (H[k, :-1], float(theta[k])) if k < len(H) else None
            for k in range(len(order))
        ]
    metrics = res.get("metrics", {})
    f, theta = metrics.get("f"), metrics.get("attrs", {}).get("theta_star")
    if f is None:
        return [None] * len(order)
    return [(np.asarray(f)[j], theta) for j in order]


def _truncation_layers(tr):
    layers, ell = [], 0
    while f"layer{ell}" in tr:
        layers.append(np.asarray(tr[f"layer{ell}"], dtype=float))
        ell += 1
    if not layers:
        raise PlotError("the truncation/ group holds no layer0, layer1, ... arrays")
    return layers


def draw_data(fig, results):
    """The data (projected as in :func:`make_view`) with class means and centers."""
    res = results[0]
    data = need(res, "data", "every run with data")
    if "X" not in data or "labels" not in data:
        raise PlotError(f"{run_name(res)}: data/ holds no X and labels")
    X, labels = np.asarray(data["X"], dtype=float), np.asarray(data["labels"])
    Q = _n_classes(res, labels)
    view = make_view(X, labels)
    P = view.points(X)
    present = [c for c in range(Q) if np.any(labels == c)]
    means = np.stack([X[labels == c].mean(axis=0) for c in present])
    limits = _view_limits(view, [P, view.points(means)])
    fig.set_size_inches(5.2, 4.8)
    camera = view.camera(X) if view.dim == 3 else None
    ax = _new_panel(fig, view, 1, 1, 1, limits, camera)
    for c in range(Q):
        _scatter(
            ax,
            P[labels == c],
            s=8,
            color=_color(c),
            alpha=0.8,
            lw=0,
            label=f"class {c} ({int(np.sum(labels == c))})",
        )
    _scatter(
        ax,
        view.points(means),
        s=70,
        marker="X",
        c=[_color(c) for c in present],
        edgecolors="k",
        linewidths=0.6,
        label="class means",
        zorder=5,
    )
    ax.legend(loc="best", fontsize=7)
    title(
        fig,
        results,
        f"data, {X.shape[0]} points in R^{X.shape[1]}"
        + (" (projected onto the class means' span)" if view.projected else ""),
    )


def draw_patterns(fig, results):
    """Cost of every collapse/keep pattern, without and with an output intercept."""
    res = results[0]
    pat = need(res, "patterns", "a construct run with method collapse-keep")
    s = np.atleast_2d(np.asarray(pat["s"]))
    names = ["".join("C" if v == 0 else "K" for v in row) for row in s]
    x = np.arange(len(names))
    certified = np.asarray(pat.get("certified", np.ones(len(names), bool)), dtype=bool)
    fig.set_size_inches(max(5.0, 0.55 * len(names) + 2.5), 4.0)
    ax = fig.add_subplot()
    for k, (key, text) in enumerate((
        ("cost_no_intercept", "no output bias"),
        ("cost_intercept", "with output bias"),
    )):
        if key in pat:
            bars = ax.bar(
                x + (k - 0.5) * 0.38,
                _positive(pat[key]),
                0.38,
                color=_color(k),
                label=text,
            )
            for bar, ok in zip(bars, certified):
                if not ok:
                    bar.set_hatch("///")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_xlabel("pattern (class 0 first; C = collapsed to its apex, K = kept)")
    ax.set_ylabel("cost $C_N$")
    if not certified.all():
        ax.bar(
            [np.nan],
            [np.nan],
            color="w",
            edgecolor="k",
            hatch="///",
            label="not certified",
        )
    ax.legend(loc="best")
    check = res.get("metrics", {}).get("attrs", {}).get("local_min_passed")
    if check is not None:
        verdict = "passed (local minimum)" if check else "failed"
        ax.text(
            0.99,
            0.98,
            f"all-keep pattern: perturbation check {verdict}",
            ha="right",
            va="top",
            transform=ax.transAxes,
            fontsize=7,
        )
    title(fig, results, "collapse/keep family")


# ------------------------------------------------------------------ flow


def _trajectory(res):
    traj = need(res, "trajectory", "a flow run")
    if np.size(traj.get("s", [])) == 0:
        raise PlotError(f"{run_name(res)}: the trajectory has no records yet")
    return traj


def _n_samples(res):
    X = res.get("data", {}).get("X")
    if X is not None:
        return int(np.shape(X)[0])
    return int(res["data"]["attrs"]["n_samples"])


def _is_l2(res):
    return res["attrs"].get("loss", "l2") == "l2"


def _cost_panel(ax, results, labels, heading):
    """Cost against s (log), with C(0) exp(-2s/N) for the L2 runs."""
    refs = set()
    for i, (res, lab) in enumerate(zip(results, labels)):
        traj = _trajectory(res)
        s, cost = np.asarray(traj["s"], float), _positive(traj["cost"])
        ax.plot(
            s, cost, color=_color(i), label=lab, marker="." if s.size < 30 else None
        )
        if _is_l2(res) and np.isfinite(cost[0]):
            refs.add((float(cost[0]), _n_samples(res), float(s[-1])))
        if _rank_lost(traj) and np.isfinite(cost[-1]):
            ax.axhline(
                cost[-1],
                color=_color(i),
                ls=":",
                lw=1,
                label=f"final cost {cost[-1]:.4g} (rank D < QN)",
            )
    for k, (c0, N, s_end) in enumerate(sorted(refs)):
        grid = np.linspace(0.0, s_end, 200)
        ax.plot(
            grid,
            c0 * np.exp(-2 * grid / N),
            color=REFERENCE_COLOR,
            ls="--",
            lw=1,
            label=f"$C(0)\\,e^{{-2s/N}}$, N = {N}" if k == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_xlabel("s (flow time)")
    kinds = {_cost_name(r) for r in results}
    ax.set_ylabel(kinds.pop() if len(kinds) == 1 else "cost")
    ax.set_title("cost against flow time")
    _legend(ax, heading)


def _rank_lost(traj):
    """Whether the adapted part of the flow projected onto a proper subspace."""
    rank = np.asarray(traj.get("projector_rank", []))
    QN = np.shape(traj["x"])[1]
    return bool(np.any((rank >= 0) & (rank < QN)))


def _cost_name(res):
    """``"cost |x - y|^2 / (2N)"`` or ``"cross-entropy cost"`` from the stored kind."""
    kind = (group(res, "trajectory") or {}).get("attrs", {}).get("cost_kind", "")
    name, _, formula = str(kind).partition(":")
    if name == "flow" and formula:
        return f"cost {formula.strip()}"
    return f"{name} cost" if name and name != "flow" else "cost"


def _legend(ax, heading=""):
    handles, texts = ax.get_legend_handles_labels()
    if any(texts):
        ax.legend(title=heading or None, loc="best", title_fontsize=8)


def _reference_point(res):
    """The point the outputs should reach: y (L2) or the fiber minimizer x* (CE)."""
    traj = _trajectory(res)
    targets = np.asarray(res["data"]["targets"], dtype=float)
    if _is_l2(res):
        return targets.ravel(), "y"
    from dlmin.core.flows import ce_minimizer

    x0 = np.asarray(traj["x"], dtype=float)[0].reshape(targets.shape)
    return ce_minimizer(x0, targets).ravel(), "x*"


def _output_panel(ax, results, labels, heading):
    """Residual paths x(s) - y in the plane of their two principal directions.

    The projection is linear, so the straight segment from x(0) to the
    target stays straight and ends at the origin.
    """
    Z, names = [], set()
    for res in results:
        ref, name = _reference_point(res)
        Z.append(np.asarray(_trajectory(res)["x"], dtype=float) - ref)
        names.add(name)
    if len({z.shape[1] for z in Z}) > 1:
        raise PlotError(
            "the runs have outputs of different sizes; plot them one by one"
        )
    basis, share = _residual_plane(np.vstack(Z), Z[0][0])
    target = names.pop() if len(names) == 1 else "target"
    for i, (z, lab) in enumerate(zip(Z, labels)):
        P = z @ basis
        ax.plot(P[:, 0], P[:, 1], color=_color(i), label=lab, marker=".", ms=3)
        ax.plot(*P[0], "o", color=_color(i), ms=5)
    starts = {tuple(np.round(z[0] @ basis, 12)) for z in Z}
    for k, start in enumerate(sorted(starts)):
        ax.plot(
            [start[0], 0],
            [start[1], 0],
            color=REFERENCE_COLOR,
            ls="--",
            lw=1,
            label=f"straight line x(0) → {target}" if k == 0 else None,
        )
    ax.plot(0, 0, "*", color="k", ms=11, label=target, zorder=5)
    ax.set_aspect("equal", adjustable="datalim")
    dims = Z[0].shape[1]
    if dims > 2:
        ax.set_xlabel(f"principal direction 1 of x(s) − {target} ({share[0]:.0%})")
        ax.set_ylabel(f"principal direction 2 ({share[1]:.0%})")
    else:
        ax.set_xlabel(f"$x_1 - {target}_1$")
        ax.set_ylabel(f"$x_2 - {target}_2$" if dims == 2 else "0")
    ax.set_title(f"outputs in R^{dims}" + (" (2-D projection)" if dims > 2 else ""))
    _legend(ax, heading)


def _residual_plane(Z, z0):
    """Two orthonormal directions of rows ``Z`` (shape (n, d)) and their energy shares.

    For ``d <= 2`` the coordinate axes (padded with zeros); otherwise the two
    leading right singular vectors, signed so that ``z0`` has non-negative
    coordinates.
    """
    d = Z.shape[1]
    if d <= 2:
        return np.eye(d, 2), np.ones(2)
    _, sv, Vt = np.linalg.svd(Z, full_matrices=False)
    basis = Vt[:2].T.copy()
    for k in range(2):
        if z0 @ basis[:, k] < 0:
            basis[:, k] *= -1
    energy = sv**2
    total = energy.sum()
    return basis, energy[:2] / total if total > 0 else np.zeros(2)


def _ntk_panel(ax, results, labels, heading):
    """Largest and smallest NTK eigenvalue against s; the rank where it drops."""
    drawn, deficient = False, False
    twin = None
    for i, (res, lab) in enumerate(zip(results, labels)):
        traj = _trajectory(res)
        s = np.asarray(traj["s"], dtype=float)
        lo, hi = (
            _positive(traj.get(k, np.full(s.shape, np.nan)))
            for k in ("ntk_min", "ntk_max")
        )
        if np.all(np.isnan(hi)):
            continue
        drawn = True
        ax.plot(s, hi, color=_color(i), lw=1, ls=":")
        ax.plot(s, lo, color=_color(i), label=lab)
        QN = np.shape(traj["x"])[1]
        rank = np.asarray(traj.get("ntk_rank", np.full(s.shape, QN)))
        if np.any((rank >= 0) & (rank < QN)):
            deficient = True
            twin = twin or ax.twinx()
            twin.step(
                s, rank, where="post", color=_color(i), lw=0.9, ls="-.", alpha=0.8
            )
            twin.set_ylabel(f"NTK rank (of QN = {QN})")
            twin.set_ylim(0, 1.05 * QN)
            twin.yaxis.get_major_locator().set_params(integer=True)
            twin.grid(False)
    if not drawn:
        raise PlotError("no NTK eigenvalues were recorded (flow.spectrum was off)")
    ax.plot([], [], color="0.4", label="λ_min (solid)")
    ax.plot([], [], color="0.4", ls=":", label="λ_max (dotted)")
    if deficient:
        ax.plot([], [], color="0.4", ls="-.", label="rank (right axis)")
    ax.set_yscale("log")
    ax.set_xlabel("s (flow time)")
    ax.set_ylabel("NTK eigenvalue")
    ax.set_title(
        "extreme NTK eigenvalues" + (" (λ ≤ 0 not drawn)" if deficient else "")
    )
    _legend(ax, heading)


def _flow_figure(fig, results, panels, subject):
    labels, heading = run_labels(results) if len(results) > 1 else ([None], "")
    for res in results:
        _trajectory(res)
    fig.set_size_inches(4.6 * len(panels), 4.1)
    for k, panel in enumerate(panels):
        panel(fig.add_subplot(1, len(panels), k + 1), results, labels, heading)
    title(fig, results, subject)


def draw_flow(fig, results):
    """Cost, output paths and NTK eigenvalues of one flow run or a sweep of them."""
    panels = [_cost_panel, _output_panel]
    if any(_has_spectrum(r) for r in results):
        panels.append(_ntk_panel)
    _flow_figure(fig, results, panels, _flow_subject(results))


def _has_spectrum(res):
    traj = group(res, "trajectory") or {}
    return np.any(np.isfinite(np.asarray(traj.get("ntk_max", [np.nan]), dtype=float)))


def _flow_subject(results):
    a = results[0]["attrs"]
    if len(results) == 1:
        return f"{a.get('flow_kind', '')} flow, {a.get('loss', 'l2')} loss".strip()
    return f"{len(results)} flows"


def draw_cost(fig, results):
    """Cost against flow time, one curve per run, with the exponential law."""
    _flow_figure(fig, results, [_cost_panel], _flow_subject(results))
    fig.set_size_inches(6.4, 4.4)


def draw_outputs(fig, results):
    """Output paths against the straight lines to the targets."""
    _flow_figure(fig, results, [_output_panel], _flow_subject(results))
    fig.set_size_inches(6.0, 5.2)


def draw_ntk(fig, results):
    """Extreme NTK eigenvalues (and the rank when it drops) against flow time."""
    _flow_figure(fig, results, [_ntk_panel], _flow_subject(results))
    fig.set_size_inches(6.4, 4.4)


# ------------------------------------------------------------------ trap

INTERVAL_KEYS = {  # canonical name: the names a trap file may store it under
    "eps": ("eps",),
    "s0": ("s0",),
    "s1": ("s1",),
    "length": ("length",),
    "L_U": ("L_U", "arc_length"),
    "bound": ("bound",),
    "sharp_bound": ("sharp_bound", "bound_sharp"),
    "violated": ("violated",),
}


def intervals(res):
    """The trapped intervals of a trap result as arrays by canonical name, or None.

    Reads ``trap/intervals/<key>`` or, flat, ``trap/interval_<key>``; the
    names of :data:`INTERVAL_KEYS` are accepted for each column.
    """
    trap = group(res, "trap") or {}
    nested = group(res, "trap/intervals")
    source, prefix = (nested, "") if nested is not None else (trap, "interval_")
    out = {}
    for key, names in INTERVAL_KEYS.items():
        found = next((prefix + n for n in names if prefix + n in source), None)
        if found is not None:
            out[key] = np.atleast_1d(np.asarray(source[found]))
    if np.size(out.get("s0", [])) == 0 or "s1" not in out:
        return None
    out.setdefault("eps", np.full(out["s0"].size, np.nan))
    out["violated"] = out.get("violated", np.zeros(out["s0"].size)).astype(bool)
    return out


def draw_trap(fig, results):
    """r(s) = |D^T g| / |g| with the eps levels, trapped intervals shaded, cost twinned.

    With a comparison run (``adapted_s``, ``adapted_r``, ``adapted_cost``)
    the adapted orbit's r and cost are drawn dashed.
    """
    res = results[0]
    trap = need(res, "trap", "a trap run")
    s, r = np.asarray(trap.get("s", []), dtype=float), trap.get("r")
    if s.size == 0 or r is None:
        raise PlotError(f"{run_name(res)}: trap/ holds no r(s) samples yet")
    fig.set_size_inches(7.6, 4.3)
    ax = fig.add_subplot()
    ax.plot(s, _positive(r), color="k", lw=1.1, label="r(s) = |Dᵀg| / |g|")
    adapted = "adapted_s" in trap and "adapted_r" in trap
    if adapted:
        ax.plot(
            trap["adapted_s"],
            _positive(trap["adapted_r"]),
            color="k",
            lw=1,
            ls="--",
            label="r(s), adapted flow",
        )
    eps = _eps_levels(res)
    for i, e in enumerate(eps):
        ax.axhline(e, color=_color(i), ls=":", lw=1.1, label=f"ε = {e:g}")
    _shade_intervals(ax, intervals(res), eps)
    ax.set_yscale("log")
    ax.set_xlabel("s (flow time)")
    ax.set_ylabel("r(s)")
    if "cost" in trap:
        _cost_twin(ax, s, trap, adapted)
    ax.legend(loc="best")
    title(fig, results, "trapped stretches (shaded: r < ε; red: bound violated)")


def _cost_twin(ax, s, trap, adapted):
    twin = ax.twinx()
    twin.plot(s, _positive(trap["cost"]), color="0.5", lw=1)
    ax.plot([], [], color="0.5", label="cost (right axis)")
    if adapted and "adapted_cost" in trap:
        twin.plot(
            trap["adapted_s"],
            _positive(trap["adapted_cost"]),
            color="0.5",
            lw=1,
            ls="--",
        )
        ax.plot([], [], color="0.5", ls="--", label="cost, adapted flow")
    twin.set_yscale("log")
    twin.set_ylabel("cost")
    twin.grid(False)


def _eps_levels(res):
    eps = (group(res, "trap") or {}).get("attrs", {}).get("eps")
    if eps is None:
        iv = intervals(res)
        eps = np.unique(iv["eps"]) if iv is not None else []
    return sorted(float(e) for e in np.atleast_1d(eps) if np.isfinite(e))


def _shade_intervals(ax, iv, eps):
    if iv is None:
        return
    for e, a, b, bad in zip(iv["eps"], iv["s0"], iv["s1"], iv["violated"]):
        ax.axvspan(a, b, color=_color(_eps_index(eps, e)), alpha=0.15, lw=0)
        if bad:
            ax.axvspan(a, b, fill=False, edgecolor="red", lw=1.5, hatch="xx")


def _eps_index(eps, e):
    return int(np.argmin([abs(e - x) for x in eps])) if eps and np.isfinite(e) else 0


def draw_bound(fig, results):
    """Every trapped interval's length |I| against its lower bounds."""
    res = results[0]
    need(res, "trap", "a trap run")
    iv = intervals(res)
    if iv is None or "length" not in iv or "bound" not in iv:
        raise PlotError(f"{run_name(res)}: no trapped interval with a bound was stored")
    length, eps = iv["length"].astype(float), _eps_levels(res)
    colors = [_color(_eps_index(eps, e)) for e in iv["eps"]]
    fig.set_size_inches(5.6, 5.0)
    ax = fig.add_subplot()
    for key, marker, text in (
        ("bound", "o", "N L_U / (ε |x(s₀) − y|)"),
        ("sharp_bound", "^", "same with max r on I"),
    ):
        if key in iv:
            ax.scatter(
                length,
                iv[key],
                c=colors,
                marker=marker,
                s=30,
                label=text,
                edgecolors="k",
                linewidths=0.4,
            )
    bad = iv["violated"]
    if bad.any():
        ax.scatter(
            length[bad],
            iv["bound"][bad],
            s=140,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label="violated",
        )
    top = np.nanmax(
        np.concatenate(
            [length]
            + [iv[k].astype(float) for k in ("bound", "sharp_bound") if k in iv]
        )
    )
    ax.plot(
        [0, top], [0, top], color=REFERENCE_COLOR, ls="--", lw=1, label="|I| = bound"
    )
    for i, e in enumerate(eps):
        ax.scatter([], [], color=_color(i), label=f"ε = {e:g}")
    ax.set_xlabel("interval length |I|")
    ax.set_ylabel("lower bound on |I|")
    ax.legend(loc="best")
    title(fig, results, "trapping bound: every point must lie on or below the diagonal")


# -------------------------------------------------------------- collapse

FAMILIES = (
    ("NC1: within-class variability", ("nc1", "cdnv", "d_hesu", "trace")),
    (
        "NC2: geometry of the class means",
        (
            "equinorm",
            "equiangular",
            "maxangle",
            "etf",
            "of_gap",
            "ortho",
            "rank",
            "spectrum",
        ),
    ),
    (
        "NC3: classifier alignment",
        ("self_duality", "gram_product", "cos", "bias", "nc3"),
    ),
    ("NC4: nearest class center", ("ncc", "nc4", "accuracy")),
)
COLLAPSE_AXES = ("layer", "s", "t", "epoch")


def draw_collapse(fig, results):
    """Neural-collapse metrics against layer or flow time, one panel per family."""
    res = results[0]
    col = need(res, "collapse", "a collapse run")
    axis_name = next((k for k in COLLAPSE_AXES if k in col), None)
    if axis_name is None:
        raise PlotError(
            f"{run_name(res)}: collapse/ has no axis array "
            f"({' or '.join(COLLAPSE_AXES)})"
        )
    xs = np.asarray(col[axis_name], dtype=float)
    series = {
        k: np.asarray(v, dtype=float)
        for k, v in col.items()
        if k not in COLLAPSE_AXES and k != "attrs" and _is_series(v, xs.size)
    }
    if not series:
        raise PlotError(
            f"{run_name(res)}: collapse/ holds no metric arrays along {axis_name}"
        )
    panels = _by_family(series)
    fig.set_size_inches(max(4.4 * len(panels), 6.0), 4.0)
    for k, (name, items) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for i, (key, values) in enumerate(items):
            ax.plot(
                xs,
                values,
                color=_color(i),
                label=key,
                marker="o" if axis_name == "layer" else None,
                ms=3,
            )
        _metric_scale(ax, [v for _, v in items])
        ax.set_xlabel("layer" if axis_name == "layer" else f"{axis_name} (flow time)")
        ax.set_title(name)
        ax.legend(loc="best", fontsize=7)
    title(
        fig,
        results,
        "neural collapse by " + ("layer" if axis_name == "layer" else "flow time"),
    )


def _is_series(value, n):
    return (
        isinstance(value, np.ndarray)
        and value.ndim == 1
        and value.size == n
        and value.dtype.kind in "fiu"
    )


def _by_family(series):
    panels = {name: [] for name, _ in FAMILIES}
    panels["other"] = []
    for key, values in series.items():
        name = next(
            (n for n, prefixes in FAMILIES if key.lower().startswith(prefixes)), "other"
        )
        panels[name].append((key, values))
    return [(name, items) for name, items in panels.items() if items]


def _metric_scale(ax, arrays):
    """Log axis for positive metrics; symmetric log when some are 0 or negative."""
    v = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if v.size == 0 or np.all(v == 0):
        return
    if np.all(v > 0):
        if v.max() / v.min() > LOG_SPAN:
            ax.set_yscale("log")
        return
    small = np.abs(v[v != 0]).min()
    ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(small)))


def draw_effective(fig, results):
    """Effective (beta, R) flow: truncated fractions q_i(s) and the cost, s* marked."""
    res = results[0]
    eff = need(res, "effective", "a collapse run with effective:")
    if np.size(eff.get("s", [])) == 0:
        raise PlotError(f"{run_name(res)}: effective/ holds no records yet")
    s = np.asarray(eff["s"], dtype=float)
    marks = _contraction_marks(eff.get("attrs", {}), _summary(res))
    fig.set_size_inches(9.6, 4.1)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fractions = _first(eff, "fractions", "q")
    if fractions is not None:
        q = np.asarray(fractions, dtype=float).reshape(s.size, -1)
        for i in range(q.shape[1]):
            left.plot(s, q[:, i], color=_color(i), label=f"$q_{{{i + 1}}}$")
        left.set_ylim(-0.03, 1.03)
        left.legend(loc="best")
    left.set_xlabel("s (flow time)")
    left.set_ylabel("fraction of points truncated")
    left.set_title("truncated fraction per rotated coordinate")
    if "cost" in eff:
        right.plot(s, _positive(eff["cost"]), color="k", label="cost C(β, R)")
        right.set_yscale("log")
    right.set_xlabel("s (flow time)")
    right.set_ylabel("cost")
    right.set_title("cost" + _orthogonality_note(eff))
    for ax in (left, right):
        for value, style, text in marks:
            ax.axvline(
                value, color="C3", ls=style, lw=1.1, label=text if ax is right else None
            )
    right.legend(loc="best")
    title(fig, results, "effective truncation flow")


def _contraction_marks(attrs, summary):
    """``(s, line style, label)`` of s* and its bound (group attrs, else summary)."""
    marks = []
    for key, style, text in (
        ("contraction_time", "-", "contraction time s*"),
        ("contraction_bound", "--", "bound on s*"),
    ):
        value = attrs.get(key, summary.get(key))
        if _number(value) is not None and np.isfinite(value):
            marks.append((float(value), style, f"{text} = {value:.3g}"))
    return marks


def _first(node, *names):
    """The first of ``names`` that ``node`` holds, or None."""
    return next((node[n] for n in names if n in node), None)


def _orthogonality_note(eff):
    err = _first(eff, "orthogonality_error", "orthogonality")
    if err is None or np.size(err) == 0:
        return ""
    return f" (max |RᵀR − I| = {np.nanmax(np.asarray(err, dtype=float)):.1e})"


# ----------------------------------------------------------------- sweep


def reference_levels():
    """Known limits of summary scalars, drawn as horizontal lines on sweeps."""
    from dlmin.core.construct import C0_LIMIT

    return {
        "c0": (C0_LIMIT, "assumption (ii): c0 < 1/4"),
        "theta_star": (np.pi, "assumption (iii): θ* < π"),
        "max_theta_j": (np.pi, "assumption (iii): θ*_j < π"),
    }


def sweep_keys(results):
    """Swept parameters (first-seen order) and numeric summary scalars of the runs."""
    rows = [_summary(r) for r in results]
    points = [
        row.get("point") or r["attrs"].get("point") or {}
        for row, r in zip(rows, results)
    ]
    swept = [
        k for k in _ordered_keys(points) if len({repr(p.get(k)) for p in points}) > 1
    ]
    numeric = sorted({
        k for row in rows for k, v in row.items() if _number(v) is not None
    })
    return swept, numeric


def _summary(res):
    s = res["attrs"].get("summary")
    return s if isinstance(s, dict) else {}


def _number(value):
    """``value`` as a float when it is a number or a bool, else None."""
    return float(value) if isinstance(value, (bool, int, float)) else None


def draw_sweep(fig, results, x=None, y=None):
    """A summary scalar ``y`` against a sweep parameter ``x``, one line per other value.

    Parameters
    ----------
    results : list of dict
        Results whose root ``summary`` attribute holds the run's row,
        including ``point`` (the sweep values).
    x : str, optional
        A swept key or a numeric summary key; default the first swept key.
    y : str, optional
        A numeric summary key; default ``cost``.
    """
    rows = [_summary(r) for r in results if _summary(r)]
    if not rows:
        raise PlotError(
            "no file has a summary (partial files have none until they finish)"
        )
    swept, numeric = sweep_keys(results)
    x = x or (swept[0] if swept else None)
    y = y or "cost"
    if x is None:
        raise PlotError(
            "the runs share every parameter: nothing was swept; pass --x "
            f"with one of the summary scalars: {', '.join(numeric)}"
        )
    _check_key("--x", x, swept + numeric)
    _check_key("--y", y, numeric)
    others = [k for k in swept if k != x]
    lines = _sweep_lines(rows, x, y, others)
    fig.set_size_inches(6.6, 4.4)
    ax = fig.add_subplot()
    categories = _categories(rows, x)
    failed = []
    for i, (label, pts) in enumerate(lines):
        xs = [categories.index(p[0]) if categories else p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(
            xs,
            ys,
            color=_color(i),
            marker="o",
            ms=5,
            label=label,
            ls="none" if categories else "-",
        )
        failed += [(xv, yv) for xv, yv, p in zip(xs, ys, pts) if p[2]]
    _mark_failed(ax, failed)
    if categories:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    _sweep_scale(ax, [p[1] for _, pts in lines for p in pts])
    level = reference_levels().get(y)
    if level:
        ax.axhline(level[0], color="C3", ls=":", lw=1.2, label=level[1])
    ax.set_xlabel(x)
    kinds = {r.get("cost_kind") for r in rows} if y == "cost" else set()
    unit = f" ({kinds.pop()})" if len(kinds) == 1 and None not in kinds else ""
    ax.set_ylabel(y + unit)
    _legend(ax, ", ".join(others))
    title(fig, results, f"{y} against {x}")


def _check_key(option, key, allowed):
    if key not in allowed:
        raise PlotError(
            f"{option} {key!r} is not a swept parameter or numeric summary "
            f"scalar of these runs; choose one of: {', '.join(allowed)}"
        )


def _value(row, key):
    """A run's value of ``key``; lists (a swept pattern) as their text."""
    point = row.get("point") or {}
    value = point[key] if key in point else row.get(key)
    return str(value) if isinstance(value, (list, dict)) else value


def _sweep_lines(rows, x, y, others):
    """``[(label, [(x, y, failed), ...]), ...]``, one per value of the other keys."""
    lines = {}
    for row in rows:
        xv = _value(row, x)
        if xv is None:
            continue
        key = tuple(repr(_value(row, k)) for k in others)
        label = ", ".join(f"{k}={_value(row, k)}" for k in others) or None
        yv = _number(row.get(y))
        lines.setdefault(key, (label, []))[1].append((
            xv,
            np.nan if yv is None else yv,
            row.get("status") == "failed",
        ))
    out = []
    for key in sorted(lines):
        label, pts = lines[key]
        out.append((label, sorted(pts, key=lambda p: _sort_key(p[0]))))
    return out


def _sort_key(value):
    return (0, float(value), "") if _number(value) is not None else (1, 0.0, str(value))


def _categories(rows, x):
    values = [_value(row, x) for row in rows]
    if all(_number(v) is not None for v in values if v is not None):
        return []
    return sorted({v for v in values if v is not None}, key=_sort_key)


def _mark_failed(ax, points):
    """Red crosses on failed runs: at their value, or at the bottom without one."""
    if not points:
        return
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    has = np.isfinite(ys)
    style = dict(marker="x", color="red", s=50, zorder=5, label="failed run")
    if has.any():
        ax.scatter(xs[has], ys[has], **style)
        style["label"] = None
    if not has.all():
        bottom = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(
            xs[~has],
            np.full((~has).sum(), FAILED_Y),
            transform=bottom,
            clip_on=False,
            **style,
        )
        ax.update_datalim(
            np.column_stack([xs[~has], np.zeros((~has).sum())]), updatey=False
        )
        ax.autoscale_view()


def _sweep_scale(ax, values):
    """Log axis for positive values spanning decades or all at rounding level."""
    v = np.array([x for x in values if np.isfinite(x)])
    if (
        v.size
        and np.all(v > 0)
        and (v.max() / v.min() > LOG_SPAN or v.max() < ROUNDING_LEVEL)
    ):
        ax.set_yscale("log")


# ------------------------------------------------------------- truncview

STATE_NAMES = ("collapsed", "partly", "fixed")  # truncview state codes 0, 1, 2
STATE_MARKERS = (("x", 0.95, 14), ("^", 0.7, 10), ("o", 0.35, 8))  # marker, alpha, size
STATE_LINES = ("-", "--", ":")  # collapsed, partly, fixed in the time figures
ANIMATION_FRAMES = 40  # at most this many frames in a GIF
ANIMATION_FPS = 5
ANIMATION_DPI = 80  # GIF pixels per inch: small files
VIEW_QUANTILE = (
    0.01  # animation limits: this quantile of all frames' points on each side
)
SPREAD_FLOOR = 1e-12  # spreads below this times the largest are drawn at that floor
BASE_POINT_REACH = (
    3.0  # base points farther than this times the cloud's extent: not in the limits
)


@dataclass
class TruncData:
    """The ``truncview/`` group of a result, read into arrays.

    Attributes
    ----------
    L : int
    rows : ndarray of int, shape (n,)
        Stored rows (indices into the data).
    labels : ndarray of int, shape (n,)
        Class of every stored row.
    Q : int
    base, edges, points, states : list of ndarray, one per layer
    X : ndarray, shape (n, dim), or None
        The input data of the stored rows, when the result has them.
    """

    L: int
    rows: np.ndarray
    labels: np.ndarray
    Q: int
    base: list
    edges: list
    points: list
    states: list
    X: np.ndarray | None


def truncview_data(res):
    """:class:`TruncData` of a result; :class:`PlotError` when incomplete."""
    tv = need(res, "truncview", "dlmin truncate -o")
    L = 0
    while f"base_point_{L + 1}" in tv:
        L += 1
    if not L or "labels" not in tv:
        raise PlotError(
            f"{run_name(res)}: truncview/ holds no base_point_1, ... arrays"
        )
    labels_all = np.asarray(tv["labels"], dtype=int)
    rows = np.asarray(tv.get("rows", np.arange(labels_all.size)), dtype=int)
    labels = labels_all[rows]
    X = _data_X(res, labels_all.size)
    return TruncData(
        L,
        rows,
        labels,
        int(labels_all.max(initial=0)) + 1,
        [
            np.atleast_1d(np.asarray(tv[f"base_point_{l}"], dtype=float))
            for l in range(1, L + 1)
        ],
        [
            np.atleast_2d(np.asarray(tv[f"edges_{l}"], dtype=float))
            for l in range(1, L + 1)
        ],
        [np.asarray(tv[f"truncated_{l}"], dtype=float) for l in range(1, L + 1)],
        [np.asarray(tv[f"state_{l}"], dtype=int)[rows] for l in range(1, L + 1)],
        None if X is None else X[rows],
    )


def _data_X(res, n):
    """``data/X`` as floats when it has ``n`` rows, else None."""
    X = (group(res, "data") or {}).get("X")
    if X is None:
        return None
    X = np.asarray(X, dtype=float)
    return X if X.ndim == 2 and X.shape[0] == n else None


@dataclass
class Plane:
    """An affine map R^dim -> R^2: ``(x - origin) @ basis``.

    The first two principal directions of the data when dim > 2, the native
    axes (padded with a zero second axis for dim = 1) otherwise.
    """

    origin: np.ndarray
    basis: np.ndarray
    names: tuple

    def points(self, X):
        return (np.asarray(X, dtype=float) - self.origin) @ self.basis

    def vectors(self, V):
        return np.asarray(V, dtype=float) @ self.basis


def principal_plane(X):
    """The :class:`Plane` of data ``X`` (shape (n, dim))."""
    X = np.asarray(X, dtype=float)
    dim = X.shape[1]
    if dim <= 2:
        basis = np.eye(dim, 2)
        return Plane(np.zeros(dim), basis, ("$x_1$", "$x_2$" if dim == 2 else ""))
    origin = X.mean(axis=0)
    _, _, Vt = np.linalg.svd(X - origin, full_matrices=False)
    basis = Vt[:2].T.copy()
    for k in range(2):  # deterministic signs: largest entry positive
        if basis[np.argmax(np.abs(basis[:, k])), k] < 0:
            basis[:, k] *= -1
    return Plane(origin, basis, ("PC 1", "PC 2"))


def _plane_limits(clouds, anchors=()):
    """Common equal-aspect limits of 2-D ``clouds``; ``anchors`` when near them."""
    pts = np.vstack([c for c in clouds if c.size] or [np.zeros((1, 2))])
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if not pts.size:
        pts = np.zeros((1, 2))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    center, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-12)
    near = [
        a
        for a in anchors
        if np.all(np.isfinite(a))
        and np.abs(a - center).max() <= BASE_POINT_REACH * half
    ]
    if near:
        pts = np.vstack([pts, *near])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        center, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-12)
    half *= 1.12
    return [(c - half, c + half) for c in center]


def _state_scatter(ax, P, labels, states, Q, legend=True):
    """Points colored by class, marker and alpha by state."""
    for c in range(Q):
        for code, (marker, alpha, size) in enumerate(STATE_MARKERS):
            sel = (labels == c) & (states == code)
            if sel.any():
                ax.scatter(
                    *P[sel].T,
                    s=size,
                    marker=marker,
                    color=_color(c),
                    alpha=alpha,
                    lw=0.8 if marker == "x" else 0,
                )


def _state_legend(fig, Q, extra=()):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="s", color=_color(c), label=f"class {c}")
        for c in range(Q)
    ]
    handles += [
        Line2D([], [], ls="", marker=m, color="0.3", alpha=max(a, 0.6), label=name)
        for (m, a, _), name in zip(STATE_MARKERS, STATE_NAMES)
    ]
    handles += list(extra)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 8),
        fontsize=7,
    )


def _edge_star(ax, plane, base, edges, length):
    """The base point and the projected edge directions from it."""
    p = plane.points(base[None])[0]
    V = plane.vectors(edges)
    norms = np.linalg.norm(V, axis=1)
    top = norms.max(initial=0.0)
    if top > 0:
        for v in V[norms > RANK_RTOL * top]:
            ax.annotate(
                "",
                xy=p + length * v / top,
                xytext=p,
                arrowprops=dict(
                    arrowstyle="-|>",
                    color="k",
                    lw=0.8,
                    shrinkA=0,
                    shrinkB=0,
                    mutation_scale=7,
                ),
            )
    ax.scatter(
        *p, s=90, marker="*", color="k", edgecolors="w", linewidths=0.5, zorder=5
    )


def _output_layers(res, tdata):
    """The network's (W, b) for the outputs panel, or None."""
    from dlmin.core import network, store

    net = group(res, "network")
    if net is None or tdata.X is None:
        return None
    layers = store.read_layers(net)
    if not layers:
        return None
    theta = (group(res, "trajectory") or {}).get("theta")
    time = res.get("attrs", {}).get("time")
    if time is not None and theta is not None:
        layers = network.unflatten(
            np.asarray(theta)[int(time)], network.widths_of(layers)
        )
    return layers


def relu_forward(layers, X):
    """Outputs of the ReLU network ``layers`` (list of (W, b)) on ``X``."""
    A = np.asarray(X, dtype=float)
    for k, (W, b) in enumerate(layers):
        A = A @ np.asarray(W).T + np.asarray(b)
        if k < len(layers) - 1:
            A = np.maximum(A, 0.0)
    return A


def draw_truncview(fig, results):
    """Data and every hidden layer's truncation in one plane, with outputs.

    One panel per layer (and the input, when the result has ``data/X``),
    all projected on the first two principal directions of the original
    data, so the layers compare. Points carry their class color and their
    cumulative state (collapsed, partly, fixed) as marker and alpha; the
    black star is the layer's base point, arrows its edge directions. When
    the network and data are in the file and there are at most 3 outputs,
    a last panel shows the outputs themselves.
    """
    res = results[0]
    td = truncview_data(res)
    ref = td.X if td.X is not None else td.points[0]
    plane = principal_plane(ref)
    clouds = ([plane.points(td.X)] if td.X is not None else []) + [
        plane.points(P) for P in td.points
    ]
    bases = [plane.points(b[None])[0] for b in td.base]
    limits = _plane_limits(clouds, bases)
    length = ARROW_FRACTION * (limits[0][1] - limits[0][0])
    layers = _output_layers(res, td)
    outputs = None
    if layers is not None and 1 <= layers[-1][0].shape[0] <= 3:
        outputs = relu_forward(layers, td.X)
    n = len(clouds) + (outputs is not None)
    ncols = n if n <= 5 else 4
    nrows = math.ceil(n / ncols)
    fig.set_size_inches(3.0 * ncols, 3.0 * nrows + 0.8)
    first = td.X is not None
    for k, P in enumerate(clouds):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.set_aspect("equal")
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        if k == 0:
            ax.set_xlabel(plane.names[0], labelpad=0)
            ax.set_ylabel(plane.names[1], labelpad=0)
        if first and k == 0:
            _state_scatter(ax, P, td.labels, np.full(len(P), 2), td.Q)
            ax.set_title("input", fontsize=8)
            continue
        ell = k + 1 - first
        _state_scatter(ax, P, td.labels, td.states[ell - 1], td.Q)
        _edge_star(ax, plane, td.base[ell - 1], td.edges[ell - 1], length)
        frac = np.mean(td.states[ell - 1] == 0) if len(P) else float("nan")
        ax.set_title(
            f"layer {ell} ({td.edges[ell - 1].shape[0]} units): "
            f"{100 * frac:.0f}% collapsed",
            fontsize=8,
        )
    if outputs is not None:
        _outputs_panel(fig, nrows, ncols, n, outputs, td)
    from matplotlib.lines import Line2D

    star = Line2D(
        [], [], ls="", marker="*", color="k", markersize=9, label="base point, edges"
    )
    _state_legend(fig, td.Q, [star])
    where = (
        "first two principal components of the data"
        if plane.names[0] == "PC 1"
        else "input coordinates"
    )
    if td.X is None and plane.names[0] == "PC 1":
        where = "principal components of layer 1's points (no data/X in the file)"
    title(fig, results, f"truncation view, {td.L} layers, {where}")


def _outputs_panel(fig, nrows, ncols, index, outputs, td):
    Qo = outputs.shape[1]
    states = td.states[-1]
    if Qo == 3:
        ax = fig.add_subplot(nrows, ncols, index, projection="3d")
        ax.tick_params(labelsize=6, pad=0)
        ax.locator_params(nbins=4)
        for c in range(td.Q):
            for code, (marker, alpha, size) in enumerate(STATE_MARKERS):
                sel = (td.labels == c) & (states == code)
                if sel.any():
                    ax.scatter(
                        *outputs[sel].T,
                        s=size,
                        marker=marker,
                        color=_color(c),
                        alpha=alpha,
                        lw=0.8 if marker == "x" else 0,
                    )
    else:
        ax = fig.add_subplot(nrows, ncols, index)
        P = (
            outputs
            if Qo == 2
            else np.column_stack([outputs[:, 0], np.zeros(len(outputs))])
        )
        _state_scatter(ax, P, td.labels, states, td.Q)
        if Qo == 1:
            ax.set_yticks([])
        else:
            ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"outputs in $R^{Qo}$ (state after layer {td.L})", fontsize=8)


def _truncation_series(res):
    tv = need(res, "truncview", "dlmin truncate -o")
    if "fractions_t" not in tv:
        raise PlotError(
            f"{run_name(res)}: truncview/ holds no fractions_t (run "
            "dlmin truncate on a flow with --time all)"
        )
    F = np.asarray(tv["fractions_t"], dtype=float)
    S = np.asarray(tv.get("spread_t", np.full(F.shape[:3], np.nan)), dtype=float)
    if F.ndim != 4 or F.shape[-1] != 3 or S.shape != F.shape[:3]:
        raise PlotError(
            f"{run_name(res)}: truncview/fractions_t {F.shape} and "
            f"spread_t {S.shape} are not (T, L, Q, 3) and (T, L, Q)"
        )
    s = tv.get("s")
    if s is None or np.shape(s) != (F.shape[0],):
        return np.arange(F.shape[0], dtype=float), F, S, "recorded time index"
    return np.asarray(s, dtype=float), F, S, "s"


def _floored(S, c):
    """Spreads of class ``c`` (column of ``S``), at least SPREAD_FLOOR x the largest."""
    v = _positive(S[:, c])
    top = np.nanmax(_positive(S), initial=0.0) if np.isfinite(_positive(S)).any() else 0
    return (
        np.where(np.isfinite(v), np.maximum(v, SPREAD_FLOOR * top), np.nan)
        if top > 0
        else v
    )


def draw_truncation_time(fig, results):
    """Per layer, each class's collapsed/partly/fixed fractions and spread against s."""
    res = results[0]
    s, F, S, xlabel = _truncation_series(res)
    T, L, Q, _ = F.shape
    fig.set_size_inches(max(4.5, 3.2 * L), 5.6)
    axes = fig.subplots(2, L, sharex=True, squeeze=False)
    for ell in range(L):
        top, bottom = axes[0, ell], axes[1, ell]
        for c in range(Q):
            for code, ls in enumerate(STATE_LINES):
                top.plot(
                    s,
                    F[:, ell, c, code],
                    color=_color(c),
                    ls=ls,
                    marker="o" if T < 3 else None,
                    ms=3,
                )
            bottom.plot(
                s,
                _floored(S[:, ell], c),
                color=_color(c),
                marker="o" if T < 3 else None,
                ms=3,
            )
        top.set_ylim(-0.03, 1.03)
        top.set_title(f"layer {ell + 1}", fontsize=8)
        if np.isfinite(_positive(S[:, ell])).any():
            bottom.set_yscale("log")
        bottom.set_xlabel(xlabel)
    axes[0, 0].set_ylabel("fraction of the class")
    axes[1, 0].set_ylabel(f"spread (floored at {SPREAD_FLOOR:.0e} x max)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_color(c), label=f"class {c}") for c in range(Q)]
    handles += [
        Line2D([], [], color="0.3", ls=ls, label=name)
        for ls, name in zip(STATE_LINES, STATE_NAMES)
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7
    )
    title(fig, results, "truncation over training time")


def _robust_limits(clouds):
    """Equal-aspect limits holding all but the outer VIEW_QUANTILE of the points."""
    pts = np.vstack([c for c in clouds if c.size])
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 2:
        return _plane_limits(clouds)
    lo = np.quantile(pts, VIEW_QUANTILE, axis=0)
    hi = np.quantile(pts, 1 - VIEW_QUANTILE, axis=0)
    return _plane_limits([np.vstack([lo, hi])] + [clouds[0]])


def animation_frames(T, most=ANIMATION_FRAMES):
    """At most ``most`` recorded time indices, first and last included."""
    return np.unique(np.linspace(0, T - 1, min(T, most)).round().astype(int))


def draw_animation(fig, results):
    """The data through the layers over training time, as a matplotlib animation.

    Returns a ``FuncAnimation`` (the caller saves it): per frame, the
    truncated points of every layer at one recorded time in the principal
    plane of the data, beside the collapsed fraction of each class per
    layer against s up to that time.
    """
    from dlmin.core import network, store
    from dlmin.core.truncview import truncation_view
    from matplotlib.animation import FuncAnimation

    res = results[0]
    traj = group(res, "trajectory")
    theta = None if traj is None else traj.get("theta")
    data = group(res, "data")
    if theta is None or np.ndim(theta) != 2 or not len(theta):
        raise PlotError(
            f"{run_name(res)}: no trajectory/theta (a flow run with "
            "store_theta, or its truncate file next to it)"
        )
    if data is None or "X" not in data:
        raise PlotError(f"{run_name(res)}: no data/X to send through the layers")
    layers = store.read_layers(group(res, "network") or {})
    if not layers:
        raise PlotError(f"{run_name(res)}: no network/ layers to read the widths from")
    widths = network.widths_of(layers)
    X = np.asarray(data["X"], dtype=float)
    labels = np.asarray(data.get("labels", np.zeros(len(X))), dtype=int)
    theta = np.asarray(theta, dtype=float)
    s = np.asarray(traj.get("s", np.arange(len(theta))), dtype=float)
    if s.shape != (len(theta),):
        s = np.arange(len(theta), dtype=float)
    frames = animation_frames(len(theta))
    try:
        views = [
            truncation_view(network.unflatten(theta[t], widths), X, labels)
            for t in frames
        ]
    except ValueError as exc:
        raise PlotError(f"{run_name(res)}: {exc}") from exc
    L, Q = len(views[0].layers), views[0].n_classes
    plane = principal_plane(X)
    clouds = [[plane.points(lv.truncated) for lv in v.layers] for v in views]
    limits = _robust_limits([plane.points(X)] + [c for cs in clouds for c in cs])
    collapsed = np.stack([v.fractions[:, :, 0] for v in views])  # (F, L, Q)
    ncols = L + 2
    fig.set_size_inches(2.4 * ncols, 3.0)
    axes = fig.subplots(1, ncols, squeeze=True)
    P0 = plane.points(X)
    for ax in axes[:-1]:
        ax.set_aspect("equal")
    series = axes[-1]

    def frame(i):
        for k, ax in enumerate(axes[:-1]):
            ax.cla()
            ax.set_xlim(*limits[0])
            ax.set_ylim(*limits[1])
            ax.tick_params(labelsize=6)
            if k == 0:
                _state_scatter(ax, P0, labels, np.full(len(X), 2), Q)
                ax.set_title("input", fontsize=8)
            else:
                lv = views[i].layers[k - 1]
                _state_scatter(ax, clouds[i][k - 1], labels, lv.cum_state, Q)
                ax.set_title(f"layer {k}", fontsize=8)
        series.cla()
        for ell in range(L):
            for c in range(Q):
                series.plot(
                    s[frames[: i + 1]],
                    collapsed[: i + 1, ell, c],
                    color=_color(c),
                    ls=("-", "--", ":", "-.")[ell % 4],
                    label=f"layer {ell + 1}, class {c}" if L * Q <= 6 else None,
                )
        series.set_xlim(s[0], s[-1] if s[-1] > s[0] else s[0] + 1)
        series.set_ylim(-0.03, 1.03)
        series.set_xlabel("s", fontsize=8)
        series.set_title("collapsed fraction", fontsize=8)
        series.tick_params(labelsize=6)
        if L * Q <= 6:
            series.legend(fontsize=5, loc="best")
        fig.suptitle(f"{run_name(res)} — s = {s[frames[i]]:.4g}", fontsize=9)
        return []

    frame(0)
    fig.draw_without_rendering()  # lay the axes out once, then keep them in place
    fig.set_layout_engine("none")
    return FuncAnimation(fig, frame, frames=len(frames), blit=False, repeat=False)


# -------------------------------------------------------------- registry


@dataclass(frozen=True)
class FigureKind:
    """One picture: its drawing function, what it needs and where it applies.

    Attributes
    ----------
    name : str
        The ``--what`` name.
    draw : callable
        ``draw(fig, results, **options)``.
    needs : str
        The group a result must have ("" for a summary only).
    scope : {"file", "folder", "both"}
    help : str
    also : tuple of str
        Further groups or datasets (``"truncview/fractions_t"``) it needs.
    keep : tuple of str
        Datasets the loader skips by default that this picture reads.
    suffix : str
        ``".png"``, or ``".gif"`` for an animation: ``draw`` then returns a
        ``matplotlib.animation.Animation`` for the caller to save.
    """

    name: str
    draw: object
    needs: str
    scope: str
    help: str
    also: tuple = ()
    keep: tuple = ()
    suffix: str = ".png"

    def applies(self, groups, folder):
        """Whether this picture fits a file (or folder) holding ``groups``."""
        if self.scope == ("file" if folder else "folder"):
            return False
        return (not self.needs or self.needs in groups) and all(
            a in groups for a in self.also
        )


FIGURES = {
    f.name: f
    for f in (
        FigureKind(
            "layers",
            draw_layers,
            "truncation",
            "file",
            "data before and after each truncation layer, cones and apexes",
        ),
        FigureKind(
            "patterns",
            draw_patterns,
            "patterns",
            "file",
            "costs of the collapse/keep patterns",
        ),
        FigureKind(
            "trap",
            draw_trap,
            "trap",
            "file",
            "r(s) with eps levels, trapped intervals and cost",
        ),
        FigureKind(
            "bound",
            draw_bound,
            "trap",
            "file",
            "trapped interval lengths against the trapping bound",
        ),
        FigureKind(
            "collapse",
            draw_collapse,
            "collapse",
            "file",
            "neural-collapse metrics against layer or time",
        ),
        FigureKind(
            "effective",
            draw_effective,
            "effective",
            "file",
            "truncated fractions and cost of the effective flow, s* marked",
        ),
        FigureKind(
            "flow",
            draw_flow,
            "trajectory",
            "both",
            "cost, output paths and NTK eigenvalues (one curve per run)",
        ),
        FigureKind(
            "cost",
            draw_cost,
            "trajectory",
            "both",
            "cost against s with C(0) exp(-2s/N)",
        ),
        FigureKind(
            "outputs",
            draw_outputs,
            "trajectory",
            "both",
            "output paths against the straight lines to the targets",
        ),
        FigureKind(
            "ntk", draw_ntk, "trajectory", "both", "extreme NTK eigenvalues against s"
        ),
        FigureKind(
            "sweep",
            draw_sweep,
            "",
            "folder",
            "a summary scalar (--y) against a sweep parameter (--x)",
        ),
        FigureKind(
            "truncview",
            draw_truncview,
            "truncview",
            "file",
            "each layer's truncated data, base point and edges in one plane",
        ),
        FigureKind(
            "truncation-time",
            draw_truncation_time,
            "truncview",
            "file",
            "collapsed/partly/fixed fractions and spreads per layer against s",
            also=("truncview/fractions_t",),
        ),
        FigureKind(
            "animation",
            draw_animation,
            "truncview",
            "file",
            "a GIF of the data through the layers over training time",
            keep=("trajectory/theta",),
            suffix=".gif",
        ),
        FigureKind("data", draw_data, "data", "file", "the data with class means"),
    )
}
