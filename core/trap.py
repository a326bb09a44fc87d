"""Trapped stretches of gradient-flow orbits, and the bound on their length.

Along the standard flow ``theta' = -D^T g`` (notation of
:mod:`dlmin.core.flows`: ``D = dx/dtheta``, shape ``(N*Q, K)``; residual
``z = x - y``, shape ``(N*Q,)``; ``g = z / N``) the ratio

    r(s) = |D^T g| / |g|

measures how much of the residual the Jacobian sees. On a stretch ``I`` of
the orbit where ``r < eps`` (the orbit lies in a region ``U`` with
``|D^T g| < eps |g|``), with ``s0 = inf I`` and the arc length
``L_U = int_I |theta'| ds``, the trapping theorem ([Che23], flows.md section
9) says

    |I| >= N L_U / (eps |x(s0) - y|),

because ``|theta'| = r |z| / N`` exactly and ``|z|`` does not increase. The
bound also holds with ``eps`` replaced by ``max_I r``, and for each
connected component of ``I`` on its own. For a maximal component both of
whose ends are crossings, ``r = eps`` at the ends, so ``max_I r = eps`` and
the two bounds agree; the sharper one says more only on components that
start at ``s = 0`` or are cut at the final time or the residual floor.

:func:`trap` integrates a standard-flow orbit with dense output (or
:func:`trap_records` interpolates a recorded one), samples ``r``, the speed
``|theta'| = |D^T g|`` and ``|z|`` on a fine grid, finds the maximal
intervals with ``r < eps`` for each ``eps``, places their ends by Brent's
method on ``r(s) - eps`` through the dense output, measures each interval
and checks the bound on it. A violated bound cannot be a failure of the
theorem: it flags an orbit that was not integrated accurately enough. The
comparison mode runs the adapted flow from the same start and reports the
time each flow needs to bring the cost below a threshold. Generators of
trapping scenarios and the rank analysis of a final (critical) point
complete the module.

Limits. A dip of ``r`` below ``eps`` that starts and ends between two grid
points is missed, and two dips in one grid cell merge into one interval;
a finer grid (``grid_points``) resolves both. Only the L2 cost is covered:
the theorem uses ``g = z / N``. Gradient descent (``solver="euler"``) is a
map, not the flow the theorem is about, and is refused.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.integrate
import scipy.interpolate
import scipy.linalg
import scipy.optimize

from . import flows as fl
from . import network as nw

__all__ = [
    "SCENARIOS",
    "TABLE_KEYS",
    "BoundViolationWarning",
    "CriticalPoint",
    "Span",
    "TrapResult",
    "trap",
    "trap_records",
    "trap_options",
    "trapped_intervals",
    "critical_point",
    "apply_scenario",
    "make_scenario",
    "small_init",
    "dead_units",
    "near_duplicates",
    "underparametrized",
]

SCENARIOS = ("small_init", "dead_units", "near_duplicates", "underparametrized")

# flows.md section 9 asks for rtol <= TRAP_RTOL_MAX: the bound is checked to
# about BOUND_RTOL, far above an integration error of this size.
TRAP_RTOL = 1e-10
TRAP_ATOL = 1e-12
TRAP_RTOL_MAX = 1e-9
# Uniform part of the sampling grid of r(s); every solver step is also
# split into STEP_REFINE pieces, so fast stretches are resolved too.
GRID_POINTS = 2001
STEP_REFINE = 4
# A recorded orbit is interpolated between records; each record interval
# is split into this many pieces for the sampling grid.
RECORD_REFINE = 16
# r is not computed where |g| < RESIDUAL_FLOOR_REL * max(|x(0)|, |y|) / N:
# below that the direction of the residual is set by integration error.
RESIDUAL_FLOOR_REL = 1e-8
# Intervals covering fewer grid points get their own uniform grid of this
# many points, so that Simpson's rule still resolves them.
MIN_QUAD_POINTS = 33
# A bound counts as violated when |I| < bound * (1 - BOUND_RTOL - quadrature
# error): generous against rounding, tiny against any real violation.
BOUND_RTOL = 1e-6
# Default cost threshold of the comparison, relative to C(0): three decades,
# reached by the full-rank adapted flow at s = (N/2) ln(1e3) = 3.45 N.
THRESHOLD_REL = 1e-3
# Damping of the adapted flow in the comparison when the flow options have
# none: a start that traps the standard flow has a near-singular NTK (that
# is what traps it), and the undamped adapted flow stalls there. 1e-6 moves
# the time to the threshold by about 0.1% on the small-init scenario.
COMPARE_DAMPING = 1e-6
# With K < QN the adapted flow meets rank drops of D, where the damped field
# grows like 1/sqrt(lambda) and explicit steps shrink; 1e-4 keeps such runs
# to seconds on small nets (1e-6 crawls for minutes).
COMPARE_DAMPING_UNDER = 1e-4
# Brent's method places interval ends to this relative accuracy in s.
BRENT_XTOL_REL = 4 * np.finfo(float).eps
# Relative eigenvalue cut-off of the NTK for the rank of D (the matching
# singular-value cut-off on D is its square root, 1e-6).
RANK_CUTOFF = fl.RANK_CUTOFF


class BoundViolationWarning(RuntimeWarning):
    """A measured interval breaks the trapping bound: an integration error."""


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


class Span(NamedTuple):
    """One maximal interval ``[s0, s1]`` with ``r < eps``.

    ``from_start``: the orbit starts inside (``s0 = 0``); ``to_end``: it is
    still inside at the final time (cut there); ``at_floor``: an end where
    ``|g|`` fell below the residual floor (cut there).
    """

    s0: float
    s1: float
    from_start: bool
    to_end: bool
    at_floor: bool


@dataclass
class CriticalPoint:
    """Rank of ``D`` at one point, and what it says about criticality.

    Attributes
    ----------
    rank : int
        Numerical rank of ``D``: eigenvalues of ``G = D D^T`` above
        ``rank_cutoff * lambda_max``.
    critical_dimension : int
        ``K - rank``: the dimension of the critical submanifold through the
        point when it is critical and the rank is locally constant (the
        generic statement of flows.md section 4).
    K, QN : int
    grad_norm : float
        ``|grad_theta C| = |D^T g|``.
    cost : float
    ratio : float
        ``r = |D^T g| / |g|`` (NaN at ``g = 0``).
    residual_outside_range : float
        ``|P_perp z| / |z|``, ``P`` the projector onto the kept eigenvectors
        of ``G`` (range ``D``): 1 at a critical point with ``z`` orthogonal
        to range ``D``, 0 when ``D`` sees all of ``z``.
    rank_cutoff : float
    eigenvalues : ndarray, shape (QN,)
        Eigenvalues of ``G``, ascending.
    """

    rank: int
    critical_dimension: int
    K: int
    QN: int
    grad_norm: float
    cost: float
    ratio: float
    residual_outside_range: float
    rank_cutoff: float
    eigenvalues: np.ndarray

    def as_dict(self):
        """JSON-able scalars (``eigenvalues`` left out)."""
        return {
            "rank_D": self.rank,
            "critical_dimension": self.critical_dimension,
            "grad_norm_final": self.grad_norm,
            "ratio_final": _json_float(self.ratio),
            "residual_outside_range": _json_float(self.residual_outside_range),
            "rank_cutoff": self.rank_cutoff,
            "ntk_min_final": float(self.eigenvalues[0]),
            "ntk_max_final": float(self.eigenvalues[-1]),
        }


# Columns of the interval table, in order; the stored arrays carry the
# prefix "interval_".
TABLE_KEYS = (
    "eps",
    "s0",
    "s1",
    "length",
    "arc_length",
    "arc_error",
    "polyline",
    "chord",
    "z0",
    "r_max",
    "bound",
    "bound_sharp",
    "bound_chord",
    "slack",
    "z_rise",
    "from_start",
    "to_end",
    "at_floor",
    "violated",
)
_FLAG_KEYS = ("from_start", "to_end", "at_floor", "violated")
_PROFILE_KEYS = ("s", "r", "speed", "z_norm", "cost")


@dataclass
class TrapResult:
    """Outcome of :func:`trap` or :func:`trap_records`.

    Attributes
    ----------
    status : {"ok", "violated", "failed"}
        ``violated``: some interval breaks the bound (an integration or
        interpolation error; see ``message``); ``failed``: the flow itself
        failed, the orbit up to the failure is analysed.
    message : str
    eps : list of float
    N, K, QN : int
    source : {"integrated", "records"}
    s_final, cost_initial, cost_final : float
    residual_floor : float
        Floor on ``|g|`` below which ``r`` is not evaluated.
    table : list of dict
        One row per interval, keys :data:`TABLE_KEYS`: ``length = s1 - s0``,
        ``arc_length`` ``L_U`` (Simpson) with ``arc_error`` (its difference
        to the trapezoid rule), ``polyline`` and ``chord`` lengths of the
        orbit on the interval, ``z0 = |x(s0) - y|``, ``r_max`` on the
        interval, ``bound = N L_U / (eps z0)``, ``bound_sharp`` with
        ``r_max``, ``bound_chord`` with the chord for ``L_U``, ``slack =
        length / bound``, ``z_rise = max |z| / z0 - 1`` (0 in exact
        arithmetic), the flags of :class:`Span` and ``violated``.
    trapped_time : list of float
        Per ``eps``, the total length of its intervals.
    profile : dict of str to ndarray
        ``s``, ``r`` (NaN below the floor), ``speed`` ``|D^T g|``,
        ``z_norm`` ``|z|`` and ``cost``, each shape ``(n_grid,)``.
    critical : CriticalPoint
        At the final point of the orbit.
    interpolation_defect : float or None
        Records only: largest ``|H' - V(H)| / |V(H)|`` at record midpoints,
        ``H`` the interpolant, ``V`` the standard field; large values mean
        the records are too sparse (or not a standard-flow orbit).
    flow, flow_adapted : FlowResult or None
        The integrated runs.
    orbit : callable
        ``orbit(s)``: theta at ``s`` in ``[0, s_final]``, shape (K,), from
        the dense output (or the record interpolant).
    comparison : dict or None
        Keys ``threshold``, ``time_to_threshold_standard``,
        ``time_to_threshold_adapted`` (None when not reached), ``speedup``,
        ``trapped_share_standard`` and ``trapped_share_adapted`` (per
        ``eps``, share of ``[0, T]`` with ``r < eps``, ``T`` the time to the
        threshold or the end of the run), ``trapped_time_adapted``,
        ``adapted_damping``.
    adapted_profile : dict of str to ndarray or None
        The profile of the adapted orbit, keys as ``profile``.
    """

    status: str
    message: str
    eps: list
    N: int
    K: int
    QN: int
    source: str
    s_final: float
    cost_initial: float
    cost_final: float
    residual_floor: float
    table: list
    trapped_time: list
    profile: dict
    critical: CriticalPoint
    interpolation_defect: float | None = None
    flow: object = None
    flow_adapted: object = None
    orbit: object = None
    comparison: dict | None = None
    adapted_profile: dict | None = None

    @property
    def bound_violations(self):
        """Number of intervals whose bound check failed."""
        return sum(bool(row["violated"]) for row in self.table)

    def as_dict(self):
        """JSON-able summary: scalars, lists and the interval table.

        Keys: ``status, message, source, eps, N, K, QN, s_final,
        cost_initial, cost_final, residual_floor, grid_points, intervals``
        (count), ``intervals_per_eps, interval_table, trapped_time,
        trapped_share, bound_violations, min_slack, interpolation_defect``,
        those of :meth:`CriticalPoint.as_dict` and ``threshold,
        time_to_threshold_standard, time_to_threshold_adapted, speedup,
        trapped_share_standard, trapped_share_adapted,
        trapped_time_adapted, adapted_damping`` (None without a
        comparison). NaN is None.
        """
        slacks = [row["slack"] for row in self.table if math.isfinite(row["slack"])]
        out = {
            "status": self.status,
            "message": self.message,
            "source": self.source,
            "eps": list(self.eps),
            "N": self.N,
            "K": self.K,
            "QN": self.QN,
            "s_final": self.s_final,
            "cost_initial": self.cost_initial,
            "cost_final": self.cost_final,
            "residual_floor": self.residual_floor,
            "grid_points": int(self.profile["s"].size),
            "intervals": len(self.table),
            "intervals_per_eps": [
                sum(row["eps"] == e for row in self.table) for e in self.eps
            ],
            "interval_table": [_json_row(row) for row in self.table],
            "trapped_time": list(self.trapped_time),
            "trapped_share": [_share(t, self.s_final) for t in self.trapped_time],
            "bound_violations": self.bound_violations,
            "min_slack": min(slacks) if slacks else None,
            "interpolation_defect": self.interpolation_defect,
        }
        out.update(self.critical.as_dict())
        out.update(_comparison_dict(self.comparison))
        return out

    def arrays(self):
        """Arrays for storage, by name.

        ``s, r, speed, z_norm, cost`` (the profile, shape ``(n_grid,)``);
        ``interval_<key>`` for every key of :data:`TABLE_KEYS`, shape
        ``(n_intervals,)`` (flags as bool); ``ntk_eigenvalues``, shape
        ``(QN,)``, at the final point; with a comparison also
        ``adapted_<key>`` for the adapted profile.
        """
        out = {key: self.profile[key] for key in _PROFILE_KEYS}
        for key in TABLE_KEYS:
            dtype = bool if key in _FLAG_KEYS else np.float64
            out[f"interval_{key}"] = np.array(
                [row[key] for row in self.table], dtype=dtype
            )
        out["ntk_eigenvalues"] = self.critical.eigenvalues
        if self.adapted_profile is not None:
            for key in _PROFILE_KEYS:
                out[f"adapted_{key}"] = self.adapted_profile[key]
        return out


def _json_float(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_row(row):
    return {
        key: (bool(value) if key in _FLAG_KEYS else _json_float(value))
        for key, value in row.items()
    }


def _share(part, whole):
    return float(part / whole) if whole > 0 else None


def _comparison_dict(comparison):
    keys = (
        "threshold",
        "time_to_threshold_standard",
        "time_to_threshold_adapted",
        "speedup",
        "trapped_share_standard",
        "trapped_share_adapted",
        "trapped_time_adapted",
        "adapted_damping",
    )
    if comparison is None:
        return dict.fromkeys(keys)
    return {key: comparison[key] for key in keys}


# --------------------------------------------------------------------------
# The problem and pointwise quantities
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    """Inputs ``X`` (N, M), targets ``Y`` (N, Q), the net and the floor."""

    X: np.ndarray
    Y: np.ndarray
    widths: list
    activation: str
    floor: float = 0.0

    @property
    def N(self):
        return self.X.shape[0]


def _gradient_and_residual(data, theta):
    """``D^T g``, shape (K,), and ``z``, shape (N*Q,), at theta.

    One forward and one backward pass.
    """
    params = nw.unflatten(theta, data.widths)
    cache = nw.forward_cache(params, data.X, data.activation)
    z = (cache.output - data.Y).ravel()
    return fl._pullback(params, cache, z / data.N), z


def _speed_and_residual(data, theta):
    """``|D^T g|`` (the standard flow's speed) and ``|z|`` at theta."""
    grad, z = _gradient_and_residual(data, theta)
    return float(np.linalg.norm(grad)), float(np.linalg.norm(z))


def _ratio_of(data, speed, z_norm):
    """``r = N |D^T g| / |z|``, NaN where ``|g|`` is below the floor."""
    g_norm = z_norm / data.N
    if g_norm <= data.floor or g_norm == 0.0:
        return math.nan
    return speed / g_norm


def _standard_velocity(data, theta):
    """``-D^T g`` at theta, shape (K,)."""
    return -_gradient_and_residual(data, theta)[0]


def _default_floor(data, theta0, residual_floor):
    if residual_floor is not None:
        return float(residual_floor)
    params = nw.unflatten(theta0, data.widths)
    x0 = nw.forward(params, data.X, data.activation)
    scale = max(float(np.linalg.norm(x0)), float(np.linalg.norm(data.Y)))
    return RESIDUAL_FLOOR_REL * scale / data.N


# --------------------------------------------------------------------------
# Orbits: theta(s) as a piecewise dense output
# --------------------------------------------------------------------------


class _Orbit:
    """``theta(s)`` on ``[knots[0], knots[-1]]`` from per-piece callables.

    Piece ``i`` covers ``[knots[i], knots[i + 1]]`` and maps ``s`` to theta,
    shape (K,).
    """

    def __init__(self, theta0, knots, pieces):
        self.theta0 = np.array(theta0, dtype=np.float64)
        self.knots = np.asarray(knots, dtype=np.float64)
        self.pieces = pieces

    @property
    def s_final(self):
        return float(self.knots[-1])

    def __call__(self, s):
        if not self.pieces:
            return self.theta0.copy()
        index = int(np.searchsorted(self.knots, s, side="right")) - 1
        index = min(max(index, 0), len(self.pieces) - 1)
        return np.asarray(self.pieces[index](s), dtype=np.float64)


class _StepCollector:
    """``on_step`` hook of :func:`flows.integrate` that keeps the pieces."""

    def __init__(self):
        self.knots = [0.0]
        self.pieces = []

    def __call__(self, dense, s_old, s_new):
        self.pieces.append(dense)
        self.knots.append(float(s_new))

    def orbit(self, theta0):
        return _Orbit(theta0, self.knots, self.pieces)


def _hermite_orbit(data, s, theta):
    """Cubic Hermite interpolant of records, slopes from the standard field.

    Returns the orbit and the interpolation defect (see TrapResult).
    """
    slopes = np.array([_standard_velocity(data, t) for t in theta])
    spline = scipy.interpolate.CubicHermiteSpline(s, theta, slopes, axis=0)
    orbit = _Orbit(theta[0], [s[0], s[-1]], [spline])
    mid = 0.5 * (s[1:] + s[:-1])
    defect = 0.0
    for point, slope in zip(mid, spline.derivative()(mid)):
        v = _standard_velocity(data, spline(point))
        size = float(np.linalg.norm(v))
        if size > 0:
            defect = max(defect, float(np.linalg.norm(slope - v)) / size)
    return orbit, defect


def _grid(knots, grid_points, refine):
    """Sampling times: a uniform grid plus every knot split ``refine`` ways.

    Returns ndarray, shape (n_grid,), increasing, from knots[0] to knots[-1].
    """
    knots = np.asarray(knots, dtype=np.float64)
    if knots.size < 2 or knots[-1] <= knots[0]:
        return knots[:1].copy()
    parts = [np.linspace(knots[0], knots[-1], grid_points)]
    w = np.arange(refine) / refine
    parts.append((knots[:-1, None] + np.diff(knots)[:, None] * w).ravel())
    parts.append(knots[-1:])
    return np.unique(np.concatenate(parts))


# --------------------------------------------------------------------------
# Profile and intervals
# --------------------------------------------------------------------------


@dataclass
class _Profile:
    """Samples along an orbit, each shape (P,): times, ``r``, ``|D^T g|``,
    ``|z|`` and ``step[k] = |theta(s_k) - theta(s_(k-1))|`` (``step[0] = 0``).
    """

    s: np.ndarray
    r: np.ndarray
    speed: np.ndarray
    z_norm: np.ndarray
    step: np.ndarray

    def arrays(self, N):
        return {
            "s": self.s,
            "r": self.r,
            "speed": self.speed,
            "z_norm": self.z_norm,
            "cost": self.z_norm**2 / (2 * N),
        }


def _sample(data, orbit, times, progress=None, stage="profile"):
    """Evaluate r, |theta'|, |z| and the polyline steps at every time."""
    speed, z_norm, step = (np.zeros(times.size) for _ in range(3))
    previous = None
    for k, s in enumerate(times):
        theta = orbit(s)
        speed[k], z_norm[k] = _speed_and_residual(data, theta)
        if previous is not None:
            step[k] = np.linalg.norm(theta - previous)
        previous = theta
        if progress is not None and (k % 200 == 0 or k == times.size - 1):
            progress(stage, k + 1, times.size)
    r = np.array([_ratio_of(data, a, b) for a, b in zip(speed, z_norm)])
    return _Profile(times, r, speed, z_norm, step)


def trapped_intervals(s, r, eps, r_func=None):
    """Find the maximal intervals of ``[s[0], s[-1]]`` on which ``r < eps``.

    Runs of samples with ``r < eps`` are the candidates; each end between a
    sample inside and one outside is placed by Brent's method on
    ``r_func(s) - eps`` (by linear interpolation of the samples when
    ``r_func`` is None). An end at the first or last sample is the start or
    end of the orbit; an end next to a NaN sample (residual below the
    floor) is cut at the last valid sample.

    Parameters
    ----------
    s : array_like, shape (n_grid,)
        Increasing sample times.
    r : array_like, shape (n_grid,)
        ``r(s)`` at those times; NaN where undefined.
    eps : float
        Level, > 0.
    r_func : callable, optional
        ``r_func(s) -> float``, continuous, agreeing with ``r`` at the
        samples.

    Returns
    -------
    list of Span
        In increasing order of ``s0``.
    """
    s = np.asarray(s, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if s.ndim != 1 or s.shape != r.shape or s.size == 0:
        raise ValueError(
            f"s, r: expected two 1-d arrays of one length, got shapes "
            f"{s.shape} and {r.shape}"
        )
    if np.any(np.diff(s) <= 0):
        raise ValueError("s: sample times must be strictly increasing")
    if not eps > 0:
        raise ValueError(f"eps: expected a number > 0, got {eps!r}")
    return _spans(s, r, float(eps), r_func)


def _spans(s, r, eps, r_func):
    valid = ~np.isnan(r)
    inside = np.where(valid, r, np.inf) < eps
    edges = np.diff(inside.astype(np.int8))
    starts = list(np.flatnonzero(edges == 1) + 1)
    ends = list(np.flatnonzero(edges == -1))
    if inside[0]:
        starts.insert(0, 0)
    if inside[-1]:
        ends.append(s.size - 1)
    return [_span(s, r, valid, eps, r_func, i, j) for i, j in zip(starts, ends)]


def _span(s, r, valid, eps, r_func, i, j):
    """The span of the run of samples ``i..j`` (inclusive) inside."""
    last = s.size - 1
    floor = False
    if i == 0:
        s0 = s[0]
    elif valid[i - 1]:
        s0 = _crossing(s, r, eps, r_func, i - 1)
    else:
        s0, floor = s[i], True
    if j == last:
        s1 = s[last]
    elif valid[j + 1]:
        s1 = _crossing(s, r, eps, r_func, j)
    else:
        s1, floor = s[j], True
    return Span(float(s0), float(s1), bool(i == 0), bool(j == last), floor)


def _crossing(s, r, eps, r_func, k):
    """Where ``r = eps`` between samples ``k`` and ``k + 1``."""
    a, b = s[k], s[k + 1]
    if r_func is None:
        w = (r[k] - eps) / (r[k] - r[k + 1])
        return a + w * (b - a)
    xtol = BRENT_XTOL_REL * max(abs(a), abs(b))
    return scipy.optimize.brentq(
        lambda t: r_func(t) - eps, a, b, xtol=max(xtol, 1e-300)
    )


# --------------------------------------------------------------------------
# Measuring one interval
# --------------------------------------------------------------------------


def _interval_samples(data, orbit, prof, span):
    """Samples on ``[s0, s1]``: the profile's inside, fresh ends.

    Intervals with fewer than MIN_QUAD_POINTS profile samples are sampled
    uniformly afresh. Returns a _Profile.
    """
    inner = np.flatnonzero((prof.s > span.s0) & (prof.s < span.s1))
    if inner.size + 2 < MIN_QUAD_POINTS:
        times = np.linspace(span.s0, span.s1, MIN_QUAD_POINTS)
        return _sample(data, orbit, times)
    first, last = inner[0], inner[-1]
    ends = _sample(
        data, orbit, np.array([span.s0, prof.s[first], prof.s[last], span.s1])
    )

    def join(name):
        a, b = getattr(ends, name), getattr(prof, name)
        return np.concatenate([a[:1], b[inner], a[3:]])

    joined = _Profile(*(join(n) for n in ("s", "r", "speed", "z_norm", "step")))
    joined.step[1] = ends.step[1]
    return joined


def _measure(data, orbit, prof, span, eps, check):
    """One row of the interval table (keys TABLE_KEYS)."""
    length = span.s1 - span.s0
    row = dict.fromkeys(TABLE_KEYS, math.nan)
    row.update(
        eps=eps,
        s0=span.s0,
        s1=span.s1,
        length=length,
        from_start=span.from_start,
        to_end=span.to_end,
        at_floor=span.at_floor,
        violated=False,
    )
    if length <= 0:
        return row
    sub = _interval_samples(data, orbit, prof, span)
    arc = float(scipy.integrate.simpson(sub.speed, x=sub.s))
    coarse = float(scipy.integrate.trapezoid(sub.speed, x=sub.s))
    z0 = float(sub.z_norm[0])
    row.update(
        arc_length=arc,
        arc_error=abs(arc - coarse),
        polyline=float(sub.step[1:].sum()),
        chord=float(np.linalg.norm(orbit(span.s1) - orbit(span.s0))),
        z0=z0,
        r_max=float(np.nanmax(sub.r)) if np.any(~np.isnan(sub.r)) else eps,
        z_rise=float(sub.z_norm.max() / z0 - 1.0) if z0 > 0 else 0.0,
    )
    _bounds(row, data.N, check)
    return row


def _bounds(row, n_samples, check):
    """Fill the three bounds, the slack and the violation flag."""
    z0, arc = row["z0"], row["arc_length"]
    if not z0 > 0:
        return
    scale = n_samples / z0
    row["bound"] = scale * arc / row["eps"]
    row["bound_chord"] = scale * row["chord"] / row["eps"]
    row["bound_sharp"] = scale * arc / row["r_max"] if row["r_max"] > 0 else math.inf
    row["slack"] = row["length"] / row["bound"] if row["bound"] > 0 else math.inf
    if check:
        tol = BOUND_RTOL + (row["arc_error"] / arc if arc > 0 else 0.0)
        worst = max(row["bound"], row["bound_sharp"])
        row["violated"] = bool(row["length"] < worst * (1.0 - tol))


# --------------------------------------------------------------------------
# Analysis of one orbit
# --------------------------------------------------------------------------


@dataclass
class _Analysis:
    profile: _Profile
    table: list
    trapped_time: list


def _analyse(data, orbit, times, eps_list, check, progress=None, stage="profile"):
    """Profile, intervals and their measurements for every eps."""
    prof = _sample(data, orbit, times, progress, stage)

    def r_func(s):
        value = _ratio_of(data, *_speed_and_residual(data, orbit(s)))
        return value if not math.isnan(value) else math.inf

    table, trapped = [], []
    for eps in eps_list:
        spans = _spans(prof.s, prof.r, eps, r_func)
        rows = [_measure(data, orbit, prof, sp, eps, check) for sp in spans]
        table.extend(rows)
        trapped.append(float(sum(row["length"] for row in rows)))
    return _Analysis(prof, table, trapped)


def _trapped_before(table, eps, limit):
    """Total length of the eps intervals inside ``[0, limit]``."""
    return float(
        sum(
            max(0.0, min(row["s1"], limit) - row["s0"])
            for row in table
            if row["eps"] == eps
        )
    )


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def trap_options(**changes):
    """Flow options suited to trap analysis: the standard flow, tight.

    ``kind="standard"``, ``solver="DOP853"`` (a 7th-order dense output),
    ``rtol=TRAP_RTOL``, ``atol=TRAP_ATOL``, no spectrum records; any
    :class:`dlmin.core.flows.FlowOptions` field can be changed by keyword.

    Returns
    -------
    FlowOptions
    """
    base = fl.FlowOptions(
        kind="standard", solver="DOP853", rtol=TRAP_RTOL, atol=TRAP_ATOL, spectrum=False
    )
    return replace(base, **changes)


def trap(
    params,
    X,
    Y,
    eps,
    options=None,
    activation="tanh",
    compare=False,
    threshold=None,
    compare_damping=None,
    grid_points=GRID_POINTS,
    residual_floor=None,
    rank_cutoff=RANK_CUTOFF,
    progress=None,
):
    """Find the trapped stretches of a standard-flow orbit; check the bound.

    Integrates ``theta' = -D^T g`` from ``params`` with dense output,
    samples ``r = |D^T g| / |g|``, ``|theta'|`` and ``|z|`` on a grid
    (``grid_points`` uniform times plus ``STEP_REFINE`` per solver step),
    finds for every ``eps`` the maximal intervals with ``r < eps`` (ends by
    Brent's method through the dense output), measures them and checks
    ``|I| >= N L_U / (eps |x(s0) - y|)`` and its version with ``max_I r``.
    With ``compare=True`` the adapted flow runs from the same start until
    ``C <= threshold``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        Start of the orbit.
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
    eps : float or sequence of float
        Levels of ``r``, each > 0.
    options : FlowOptions, optional
        Default :func:`trap_options`. ``kind`` is set to ``"standard"``;
        ``time`` is the length of the orbit; ``stop_cost`` ends it early.
    activation : {"tanh", "softplus", "relu"}
        ReLU makes ``r`` jump where a unit switches; prefer smooth ones.
    compare : bool
        Also run the adapted flow (same tolerances, ``solver="DOP853"``).
    threshold : float, optional
        Cost threshold of the comparison; default ``THRESHOLD_REL * C(0)``.
    compare_damping : float, optional
        Levenberg-Marquardt damping of the adapted run; default
        ``options.damping``, or when that is 0 ``COMPARE_DAMPING``
        (``COMPARE_DAMPING_UNDER`` when ``K < QN``).
    grid_points : int
        Uniform sampling times, at least 3.
    residual_floor : float, optional
        Floor on ``|g|`` below which ``r`` is skipped; default
        ``RESIDUAL_FLOOR_REL * max(|x(0)|, |y|) / N``.
    rank_cutoff : float
        Relative NTK eigenvalue cut-off of the final rank analysis.
    progress : callable, optional
        ``progress(stage, done, total)``; ``stage`` is ``"standard"`` or
        ``"adapted"`` (flow time) or ``"profile"``/``"adapted_profile"``
        (samples).

    Returns
    -------
    TrapResult
        A violated bound also raises a :class:`BoundViolationWarning`.

    Raises
    ------
    ValueError
        If an argument is invalid (the message names it).
    NotImplementedError
        For the cross-entropy loss or the ``euler`` solver.
    """
    eps_list = _check_eps(eps)
    options = _trap_flow_options(options)
    _check_grid(grid_points)
    adapted = None
    if compare:
        under = nw.param_count(nw.widths_of(params)) < np.size(Y)
        adapted = _adapted_options(options, threshold, compare_damping, under)
    flow, orbit = _integrate(params, X, Y, options, activation, progress, "standard")
    data = _make_data(params, X, Y, activation, orbit.theta0, residual_floor)
    times = _grid(orbit.knots, grid_points, STEP_REFINE)
    ana = _analyse(data, orbit, times, eps_list, True, progress)
    result = _result(data, orbit, ana, eps_list, "integrated", rank_cutoff)
    result.flow = flow
    if flow.status == "failed":
        result.status = "failed"
        result.message = f"standard flow failed: {flow.message}. " + result.message
    if compare:
        _compare(
            result, data, params, orbit, ana, adapted, threshold, grid_points, progress
        )
    _warn_violations(result)
    return result


def trap_records(
    s,
    theta,
    X,
    Y,
    widths,
    eps,
    activation="tanh",
    refine=RECORD_REFINE,
    grid_points=GRID_POINTS,
    residual_floor=None,
    rank_cutoff=RANK_CUTOFF,
):
    """Trap analysis of a recorded standard-flow orbit (e.g. a flow file).

    Between records ``theta(s)`` is the cubic Hermite interpolant whose
    slopes are the standard field ``-D^T g`` at the records; the rest is
    :func:`trap`. Its accuracy depends on the record spacing, reported as
    ``interpolation_defect``: records of a long plateau at the default
    101 linear times are often too sparse, re-integrate with :func:`trap`.

    Parameters
    ----------
    s : array_like, shape (n_records,)
        Strictly increasing record times, at least 2.
    theta : array_like, shape (n_records, n_params)
        Parameters at those times (order of :func:`network.flatten`).
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
    widths : sequence of int
        ``[M, M_1, ..., M_L, Q]``.
    eps : float or sequence of float
    activation : {"tanh", "softplus", "relu"}
    refine : int
        Grid pieces per record interval, at least 1.
    grid_points, residual_floor, rank_cutoff
        As in :func:`trap`.

    Returns
    -------
    TrapResult
        ``source="records"``; no comparison.
    """
    eps_list = _check_eps(eps)
    _check_grid(grid_points)
    s, theta = _check_records(s, theta, widths)
    if not (_is_int(refine) and refine >= 1):
        raise ValueError(f"refine: expected an int >= 1, got {refine!r}")
    params = nw.unflatten(theta[0], widths)
    data = _make_data(params, X, Y, activation, theta[0], residual_floor)
    orbit, defect = _hermite_orbit(data, s, theta)
    times = _grid(s, grid_points, refine)
    ana = _analyse(data, orbit, times, eps_list, True)
    result = _result(data, orbit, ana, eps_list, "records", rank_cutoff)
    result.interpolation_defect = defect
    _warn_violations(result)
    return result


def critical_point(params, X, Y, activation="tanh", rank_cutoff=RANK_CUTOFF):
    """Numerical rank of ``D`` at a point and the critical set through it.

    ``rank = #{lambda_k(G) > rank_cutoff * lambda_max(G)}`` with
    ``G = D D^T`` from :func:`network.ntk` (so the singular-value cut-off on
    ``D`` is ``sqrt(rank_cutoff)``); ``K - rank`` is the dimension of the
    critical submanifold when the point is critical at locally constant
    rank (flows.md section 4); ``|grad C| = |D^T g|`` says how critical it is.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
    activation : {"tanh", "softplus", "relu"}
    rank_cutoff : float
        In ``(0, 1)``.

    Returns
    -------
    CriticalPoint
    """
    if not 0 < rank_cutoff < 1:
        raise ValueError(
            f"rank_cutoff: expected a number in (0, 1), e.g. "
            f"{RANK_CUTOFF:g}, got {rank_cutoff!r}"
        )
    data = _make_data(params, X, Y, activation, nw.flatten(params), 0.0)
    return _critical(data, nw.flatten(params), rank_cutoff)


def _critical(data, theta, rank_cutoff):
    params = nw.unflatten(theta, data.widths)
    G = nw.ntk(params, data.X, data.activation)
    w, V = scipy.linalg.eigh(G, check_finite=False)
    keep = w > rank_cutoff * max(float(w[-1]), 0.0)
    speed, z_norm = _speed_and_residual(data, theta)
    z = (nw.forward(params, data.X, data.activation) - data.Y).ravel()
    Vk = V[:, keep]
    outside = float(np.linalg.norm(z - Vk @ (Vk.T @ z)))
    K = nw.param_count(data.widths)
    rank = int(np.count_nonzero(keep))
    return CriticalPoint(
        rank=rank,
        critical_dimension=K - rank,
        K=K,
        QN=z.size,
        grad_norm=speed,
        cost=z_norm**2 / (2 * data.N),
        ratio=data.N * speed / z_norm if z_norm > 0 else math.nan,
        residual_outside_range=outside / z_norm if z_norm > 0 else math.nan,
        rank_cutoff=float(rank_cutoff),
        eigenvalues=w,
    )


# --------------------------------------------------------------------------
# Helpers of the entry points
# --------------------------------------------------------------------------


def _check_eps(eps):
    values = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if (
        values.ndim != 1
        or values.size == 0
        or not np.all(np.isfinite(values) & (values > 0))
    ):
        raise ValueError(
            f"eps: expected a number > 0 or a non-empty list of them, e.g. "
            f"[0.01, 0.1], got {eps!r}"
        )
    return [float(v) for v in values]


def _check_grid(grid_points):
    if not (_is_int(grid_points) and grid_points >= 3):
        raise ValueError(f"grid_points: expected an int >= 3, got {grid_points!r}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_records(s, theta, widths):
    s = np.asarray(s, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    K = nw.param_count(widths)
    if s.ndim != 1 or s.size < 2 or theta.shape != (s.size, K):
        raise ValueError(
            f"s, theta: expected shapes (n_records,) and (n_records, {K}) "
            f"with n_records >= 2 for widths {list(widths)}, got {s.shape} "
            f"and {theta.shape}"
        )
    if np.any(np.diff(s) <= 0):
        raise ValueError(
            "s: record times must be strictly increasing; "
            "drop repeated records (euler runs repeat them)"
        )
    return s, theta


def _trap_flow_options(options):
    options = trap_options() if options is None else options
    if not isinstance(options, fl.FlowOptions):
        raise ValueError(
            f"options: expected a FlowOptions, got {type(options).__name__}"
        )
    if options.loss != "l2":
        raise NotImplementedError(
            f"trap analysis of the {options.loss!r} loss: the trapping bound "
            "uses g = z / N and holds for the L2 cost only"
        )
    if options.solver in ("euler", "sgd"):
        raise NotImplementedError(
            f"trap analysis of the {options.solver} solver (gradient descent): "
            "the bound is about the continuous flow; use an adaptive solver, e.g. "
            "'DOP853' or 'LSODA'"
        )
    if options.rtol > TRAP_RTOL_MAX:
        warnings.warn(
            f"flow.rtol = {options.rtol:g} is loose for trap analysis; "
            f"bound checks may flag integration error, use <= "
            f"{TRAP_RTOL_MAX:g}",
            RuntimeWarning,
            stacklevel=3,
        )
    return replace(options, kind="standard")


def _adapted_options(options, threshold, compare_damping, under):
    """Options of the adapted run of the comparison (checked here, early)."""
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(
            f"threshold: expected a cost >= 0 or None (default "
            f"{THRESHOLD_REL:g} * C(0)), got {threshold!r}"
        )
    damping = compare_damping
    if damping is None:
        default = COMPARE_DAMPING_UNDER if under else COMPARE_DAMPING
        damping = options.damping or default
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(
            f"compare_damping: expected a number >= 0, e.g. "
            f"{COMPARE_DAMPING:g}, got {compare_damping!r}"
        )
    return replace(options, kind="adapted", solver="DOP853", damping=float(damping))


def _make_data(params, X, Y, activation, theta0, residual_floor):
    widths = nw.widths_of(params)
    X = np.asarray(X, dtype=np.float64)
    Y = fl._check_targets(Y, (X.shape[0], widths[-1]), "l2")
    data = _Data(X, Y, widths, activation)
    return replace(data, floor=_default_floor(data, theta0, residual_floor))


def _integrate(params, X, Y, options, activation, progress, stage):
    """Run a flow keeping its dense output; (FlowResult, _Orbit)."""
    steps = _StepCollector()
    report = None
    if progress is not None:

        def report(s, s_max):
            progress(stage, s, s_max)

    flow = fl.integrate(
        params, X, Y, options, activation, progress=report, on_step=steps
    )
    return flow, steps.orbit(nw.flatten(params))


def _result(data, orbit, ana, eps_list, source, rank_cutoff):
    prof = ana.profile
    violations = sum(bool(row["violated"]) for row in ana.table)
    result = TrapResult(
        status="violated" if violations else "ok",
        message="",
        eps=eps_list,
        N=data.N,
        K=nw.param_count(data.widths),
        QN=data.Y.size,
        source=source,
        s_final=orbit.s_final,
        cost_initial=float(prof.z_norm[0] ** 2 / (2 * data.N)),
        cost_final=float(prof.z_norm[-1] ** 2 / (2 * data.N)),
        residual_floor=data.floor,
        table=ana.table,
        trapped_time=ana.trapped_time,
        profile=prof.arrays(data.N),
        critical=_critical(data, orbit(orbit.s_final), rank_cutoff),
        orbit=orbit,
    )
    result.message = _message(result)
    return result


def _message(result):
    counts = ", ".join(
        f"{sum(row['eps'] == e for row in result.table)} at eps={e:g}"
        for e in result.eps
    )
    text = (
        f"{len(result.table)} trapped intervals ({counts}) on "
        f"[0, {result.s_final:.6g}]; final rank of D "
        f"{result.critical.rank} of {result.QN}"
    )
    bad = [row for row in result.table if row["violated"]]
    if bad:
        worst = min(bad, key=lambda row: row["slack"])
        text += (
            f". BOUND VIOLATED on {len(bad)} intervals, worst "
            f"[{worst['s0']:.6g}, {worst['s1']:.6g}] at eps="
            f"{worst['eps']:g}: |I| = {worst['length']:.6g} < bound "
            f"{max(worst['bound'], worst['bound_sharp']):.6g}. The "
            "orbit is not an accurate standard-flow orbit, which is "
            "not a failure of the theorem: " + _FIXES[result.source]
        )
    return text


_FIXES = {
    "integrated": "tighten flow.rtol/atol or raise grid_points",
    "records": "record the flow more densely (see interpolation_defect) "
    "and check that it is the standard flow",
}


def _warn_violations(result):
    if result.bound_violations:
        warnings.warn(result.message, BoundViolationWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Comparison with the adapted flow
# --------------------------------------------------------------------------


def _compare(
    result, data, params, std_orbit, ana, options, threshold, grid_points, progress
):
    """Run the adapted flow (``options``) to the threshold; fill
    result.comparison."""
    if threshold is None:
        threshold = THRESHOLD_REL * result.cost_initial
    t_std = _time_to_cost(data, std_orbit, ana.profile, threshold)
    flow, orbit = _integrate(
        params,
        data.X,
        data.Y,
        replace(options, stop_cost=threshold),
        data.activation,
        progress,
        "adapted",
    )
    t_ad = flow.s_final if flow.stop_reason == "cost" else None
    times = _grid(orbit.knots, grid_points, STEP_REFINE)
    ad = _analyse(data, orbit, times, result.eps, False, progress, "adapted_profile")
    result.flow_adapted = flow
    result.adapted_profile = ad.profile.arrays(data.N)
    end_std = t_std if t_std is not None else result.s_final
    end_ad = t_ad if t_ad is not None else orbit.s_final
    result.comparison = {
        "threshold": float(threshold),
        "time_to_threshold_standard": t_std,
        "time_to_threshold_adapted": t_ad,
        "speedup": t_std / t_ad if t_std is not None and t_ad else None,
        "trapped_share_standard": [
            _share(_trapped_before(ana.table, e, end_std), end_std) for e in result.eps
        ],
        "trapped_share_adapted": [
            _share(_trapped_before(ad.table, e, end_ad), end_ad) for e in result.eps
        ],
        "trapped_time_adapted": ad.trapped_time,
        "adapted_damping": options.damping,
    }
    result.message += _comparison_message(result.comparison, flow)


def _time_to_cost(data, orbit, prof, threshold):
    """First ``s`` with ``C(s) <= threshold`` on the standard orbit, or None.

    ``C`` does not increase along the standard flow, so the first sample
    below the threshold and the one before it bracket the crossing, placed
    by Brent's method through the dense output.
    """
    cost = prof.z_norm**2 / (2 * data.N)
    below = np.flatnonzero(cost <= threshold)
    if below.size == 0:
        return None
    k = int(below[0])
    if k == 0:
        return 0.0

    def excess(s):
        _, z_norm = _speed_and_residual(data, orbit(s))
        return z_norm**2 / (2 * data.N) - threshold

    a, b = prof.s[k - 1], prof.s[k]
    return float(scipy.optimize.brentq(excess, a, b, xtol=BRENT_XTOL_REL * b))


def _comparison_message(comp, flow):
    t_std, t_ad = comp["time_to_threshold_standard"], comp["time_to_threshold_adapted"]
    text = f"; cost {comp['threshold']:.3e} reached by the standard flow "
    text += f"at s = {t_std:.6g}" if t_std is not None else "never"
    text += ", by the adapted flow "
    text += f"at s = {t_ad:.6g}" if t_ad is not None else f"never ({flow.message})"
    return text


# --------------------------------------------------------------------------
# Scenarios that trap on purpose
# --------------------------------------------------------------------------


def small_init(params, scale=1e-2):
    """Start near the saddle at ``theta = 0``: multiply every parameter.

    Near ``theta = 0`` each hidden layer's block of ``D`` carries the
    weights of the layers above it, so ``r`` is of the order of ``scale``
    (except along the output bias) and the orbit crawls away from the
    saddle.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    scale : float
        Positive factor, typically 1e-3 to 1e-1.

    Returns
    -------
    list of (W, b) pairs
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a number > 0, got {scale!r}")
    return [
        (scale * W, scale * b)
        for W, b in nw.unflatten(nw.flatten(params), nw.widths_of(params))
    ]


def dead_units(params, X, fraction=0.75, margin=3.0, rng=None, activation="relu"):
    """Switch hidden units off on every sample with negative biases.

    In every hidden layer a share ``fraction`` of the units (chosen by
    ``rng``) gets ``b_i = -margin - max_n (W_i a_n)``, so its pre-activation
    is at most ``-margin`` on all inputs: a dead ReLU (zero slope for good),
    a nearly dead softplus (slope below ``e^-margin``), a saturated tanh.
    The Jacobian loses (nearly) all their columns and the net behaves like
    a narrower one.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    fraction : float
        In ``[0, 1]``; rounded to whole units per layer.
    margin : float
        >= 0, distance of the pre-activations below zero.
    rng : int or numpy.random.Generator, optional
    activation : {"relu", "tanh", "softplus"}
        Used to propagate the inputs to deeper layers.

    Returns
    -------
    list of (W, b) pairs
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin: expected a number >= 0, got {margin!r}")
    rng = np.random.default_rng(rng)
    params = nw.unflatten(nw.flatten(params), nw.widths_of(params))
    A = np.asarray(X, dtype=np.float64)
    for W, b in params[:-1]:
        dead = rng.permutation(b.size)[: round(fraction * b.size)]
        b[dead] = -margin - (A @ W[dead].T).max(axis=0)
        A = _activate(A @ W.T + b, activation)
    return params


def _activate(Z, activation):
    """``sigma(Z)`` elementwise."""
    if activation == "relu":
        return np.maximum(Z, 0.0)
    if activation == "tanh":
        return np.tanh(Z)
    return np.logaddexp(0.0, Z)


def near_duplicates(X, n_groups, spread=1e-3, rng=None):
    """Replace the inputs by ``n_groups`` clusters of near-copies.

    Sample ``n`` becomes ``X[n % n_groups] + spread * w_n`` with standard
    normal ``w_n``; the targets stay, so samples that nearly coincide want
    different outputs. ``G`` then has ``Q (N - n_groups)`` eigenvalues of
    order ``spread^2``, and fitting the differences inside a cluster
    crawls.

    Parameters
    ----------
    X : array_like, shape (n_samples, n_inputs)
    n_groups : int
        In ``[1, n_samples]``.
    spread : float
        >= 0; 0 gives exact duplicates (rank loss).
    rng : int or numpy.random.Generator, optional

    Returns
    -------
    ndarray, shape (n_samples, n_inputs)
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected shape (n_samples, n_inputs), got {X.shape}")
    if not (_is_int(n_groups) and 1 <= n_groups <= X.shape[0]):
        raise ValueError(
            f"n_groups: expected an int in [1, {X.shape[0]}], got {n_groups!r}"
        )
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread: expected a number >= 0, got {spread!r}")
    rng = np.random.default_rng(rng)
    groups = np.arange(X.shape[0]) % n_groups
    return X[groups] + spread * rng.standard_normal(X.shape)


def underparametrized(params, width):
    """Keep the first ``width`` units of every hidden layer.

    With ``K < QN`` the rank of ``D`` stays below ``QN``, critical points
    with non-zero cost exist ([NA]) and orbits typically end on one,
    inside every trapping region ``r < eps``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    width : int
        >= 1; at most the narrowest hidden layer.

    Returns
    -------
    list of (W, b) pairs
    """
    widths = nw.widths_of(params)
    hidden = widths[1:-1]
    if not hidden or not (_is_int(width) and 1 <= width <= min(hidden)):
        raise ValueError(
            f"width: expected an int in [1, {min(hidden, default=0)}] for "
            f"hidden widths {hidden}, got {width!r}"
        )
    out = []
    for l, (W, b) in enumerate(params):
        rows = width if l < len(params) - 1 else W.shape[0]
        cols = width if l > 0 else W.shape[1]
        out.append((
            np.array(W[:rows, :cols], dtype=np.float64),
            np.array(b[:rows], dtype=np.float64),
        ))
    return out


def apply_scenario(name, params, X, Y, rng=None, activation="tanh", **knobs):
    """Modify a problem so that its standard-flow orbit traps on purpose.

    Parameters
    ----------
    name : {"small_init", "dead_units", "near_duplicates",
            "underparametrized"}
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
    rng : int or numpy.random.Generator, optional
    activation : {"tanh", "softplus", "relu"}
        Used by ``dead_units``.
    **knobs
        ``scale`` (small_init); ``fraction``, ``margin`` (dead_units);
        ``n_groups``, ``spread`` (near_duplicates); ``width``
        (underparametrized).

    Returns
    -------
    params, X, Y
        ``X`` as float64 (new for ``near_duplicates``); ``Y`` unchanged.
    """
    X = np.asarray(X, dtype=np.float64)
    if name == "small_init":
        return small_init(params, **knobs), X, Y
    if name == "dead_units":
        return dead_units(params, X, rng=rng, activation=activation, **knobs), X, Y
    if name == "near_duplicates":
        knobs.setdefault("n_groups", max(1, X.shape[0] // 2))
        return params, near_duplicates(X, rng=rng, **knobs), Y
    if name == "underparametrized":
        return underparametrized(params, **knobs), X, Y
    raise ValueError(f"scenario: expected one of {SCENARIOS}, got {name!r}")


def make_scenario(
    name,
    rng,
    n_samples=8,
    dim=2,
    n_outputs=1,
    hidden=(8, 8),
    activation="tanh",
    **knobs,
):
    """Draw a small problem and make it trap: ``(params, X, Y)``.

    Inputs and targets are standard normal, targets centred per output (so
    the output bias alone cannot fit them); weights are Glorot normal with
    biases of standard deviation 0.1. ``underparametrized`` defaults to
    the widest hidden width with ``K < QN``.

    Parameters
    ----------
    name : str
        One of :data:`SCENARIOS`.
    rng : int or numpy.random.Generator
    n_samples, dim, n_outputs : int
    hidden : sequence of int
        Hidden widths before the scenario.
    activation : {"tanh", "softplus", "relu"}
    **knobs
        As in :func:`apply_scenario`.

    Returns
    -------
    params, X, Y
    """
    rng = np.random.default_rng(rng)
    X = rng.standard_normal((n_samples, dim))
    Y = rng.standard_normal((n_samples, n_outputs))
    Y -= Y.mean(axis=0)
    params = nw.init_params(
        [dim, *hidden, n_outputs], rng=rng, scheme="glorot", bias_scale=0.1
    )
    if name == "underparametrized" and "width" not in knobs:
        knobs["width"] = _widest_under(dim, hidden, n_outputs, n_samples)
    return apply_scenario(name, params, X, Y, rng=rng, activation=activation, **knobs)


def _widest_under(dim, hidden, n_outputs, n_samples):
    """Largest common hidden width with ``K < QN`` (at least 1)."""
    best = 1
    for w in range(1, min(hidden) + 1):
        K = nw.param_count([dim, *([w] * len(hidden)), n_outputs])
        if K < n_outputs * n_samples:
            best = w
    return best
