"""Effective gradient flow of one ReLU layer's cumulative bias and rotation.

A square ReLU layer whose weight is adapted to the activation, ``W = Lambda R``
(``Lambda`` positive diagonal, ``R`` in ``O(Q)``), acts on input space as the
truncation map

    tau(xi) = R^T relu(R (xi + beta)) - beta = xi - R^T Jperp(v) v,
    v = R (xi + beta),

with ``beta = W^{-1} b``, ``J(v) = diag(1[v_i > 0])`` and ``Jperp = I - J``
(``v_i = 0`` counts as truncated). For clusters ``c`` of points ``xi`` (rows
of ``X_c``, shape ``(n_c, Q)``) with targets ``y_c`` (``y_tilde``) the cost is

    C(beta, R) = sum_c 1/2 mean_{xi in X_c} |tau(xi) - y_c|^2.

In the rotated frame, ``w_c = R (beta + y_c)``, ``u = R (xi - y_c)`` and
``v = u + w_c``, so ``R (tau(xi) - y_c) = J v - w_c``. With
``q_c = diag(mean Jperp)`` (the truncated fraction per rotated coordinate)

    dC/dbeta = sum_c R^T q_c w_c,
    Omega    = sum_c skew(mean[J (v - w_c) v^T - (J v - w_c) w_c^T])
             = sum_c 1/2 mean[J, u u^T] + 1/2 [q_c, w_c w_c^T],

where ``skew(M) = (M - M^T) / 2`` and ``Omega`` is the gradient for the left
action ``R -> exp(eps A) R`` under the Frobenius pairing:
``d/deps C = <A, Omega> = tr(A^T Omega)`` for skew ``A``. The flow is
``beta' = -dC/dbeta``, ``R' = -Omega R``. Mathematics and tests E1-E6:
``shared/reference/flows.md`` section 11 (h).

Integrators. ``"cayley"`` and ``"lie-euler"`` take fixed steps ``h``; ``R``
moves by the Cayley transform ``(I + h Omega/2)^{-1} (I - h Omega/2)`` or by
``expm(-h Omega)`` (both exactly orthogonal up to rounding), ``beta`` by
explicit Euler or Heun (Heun averages the two ``Omega`` as well, which keeps
second order on the group). ``"events"`` holds ``R`` fixed and is exact: the
rotated coordinates ``b = R beta`` then decouple,
``b_i' = -sum_c q_ci (b_i + (R y_c)_i)``, and move exponentially towards a
fixed point until a point crosses ``v_i = 0``; the scheme jumps from crossing
to crossing and flips the crossing point's state explicitly.

Limits. The vector field jumps whenever a point crosses a coordinate
hyperplane of the rotated frame, so the fixed-step schemes are first order in
``h`` across every crossing (Heun's crossing errors have zero mean and largely
cancel); the event scheme exists for frozen ``R`` only. The a-priori
contraction bound is established only for one cluster with ``Omega = 0``
(``Q = 1`` or ``R`` held fixed).
"""

from __future__ import annotations

import math
import numbers
import time as _time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .data import uniform_ball

__all__ = [
    "METHODS",
    "STEPPERS",
    "Gradients",
    "EffectiveResult",
    "EffectiveScenario",
    "effective_cost",
    "effective_gradients",
    "contraction_bound",
    "integrate_effective",
    "effective_scenario",
]

METHODS = ("cayley", "lie-euler", "events")
STEPPERS = ("heun", "euler")
OMEGA_FORMS = ("commutator", "skew")

# flows.md section 11 asks for h <= 1e-2 where the truncation rates are <= 1;
# the default step divides it by the largest rate the field can reach.
DEFAULT_STEP = 1e-2
# |R^T R - I| above this rejects R0: the flow only keeps orthogonality.
ORTHOGONALITY_TOL = 1e-10
# Record times closer than this (relative to the horizon) are one time, so a
# step never shrinks to rounding noise when it lands on a record.
TIME_SNAP = 1e-12
# The event scheme flips one state per event; more than this many events per
# point and coordinate means the bookkeeping is cycling, not integrating.
MAX_FLIPS_PER_ENTRY = 100


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _as_clusters(points, y_tilde):
    """Normalise one cluster or a list of clusters and their targets.

    Returns
    -------
    clusters : list of ndarray, shapes (n_c, Q)
    Y : ndarray, shape (n_clusters, Q)
    """
    if isinstance(points, np.ndarray) and points.ndim == 2:
        points = [points]
    try:
        clusters = [np.asarray(X, dtype=float) for X in points]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "points must be an (n, Q) array or a list of (n_c, Q) arrays"
        ) from exc
    if not clusters:
        raise ValueError("points is empty; pass at least one (n, Q) cluster")
    Q = clusters[0].shape[-1] if clusters[0].ndim == 2 else -1
    for c, X in enumerate(clusters):
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != Q:
            raise ValueError(
                f"cluster {c} has shape {X.shape}; expected (n_c, {Q}) with "
                "n_c >= 1 (samples as rows, all clusters of one dimension)"
            )
        _check_finite(X, f"cluster {c}")
    Y = np.asarray(y_tilde, dtype=float).reshape(-1, Q) if Q > 0 else None
    if Y is None or Y.shape[0] != len(clusters):
        raise ValueError(
            f"y_tilde has shape {np.shape(y_tilde)}; expected ({Q},) for one "
            f"cluster or ({len(clusters)}, {Q}), one target row per cluster"
        )
    _check_finite(Y, "y_tilde")
    return clusters, Y


def _check_finite(a, name):
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; pass finite values")


def _check_beta_R(beta, R, Q):
    """Validate ``beta``, shape (Q,), and an orthogonal ``R``, shape (Q, Q)."""
    beta = np.asarray(beta, dtype=float)
    R = np.asarray(R, dtype=float)
    if beta.shape != (Q,):
        raise ValueError(f"beta has shape {beta.shape}; expected ({Q},)")
    if R.shape != (Q, Q):
        raise ValueError(f"R has shape {R.shape}; expected ({Q}, {Q})")
    _check_finite(beta, "beta")
    _check_finite(R, "R")
    err = _orthogonality_error(R)
    if err > ORTHOGONALITY_TOL:
        raise ValueError(
            f"R is not orthogonal: |R^T R - I|_max = {err:.3g} > "
            f"{ORTHOGONALITY_TOL:g}; orthonormalise it first (for example the "
            "Q factor of a QR decomposition, or the polar factor of W)"
        )
    return beta, R


def _orthogonality_error(R):
    """Largest entry of ``|R^T R - I|``."""
    return float(np.max(np.abs(R.T @ R - np.eye(R.shape[0]))))


# --------------------------------------------------------------------------
# Cost and gradients in the rotated frame
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Data in the rotated frame of one ``R``.

    ``U[c]``, shape (n_c, Q): rows ``u = R (xi - y_c)``; ``W``, shape
    (n_clusters, Q): rows ``w_c = R (beta + y_c)``; ``active[c]``, shape
    (n_c, Q): ``v = u + w_c > 0``; ``q``, shape (n_clusters, Q): truncated
    fractions.
    """

    U: list
    W: np.ndarray
    active: list
    q: np.ndarray


def _rotate(clusters, Y, R):
    """Rows ``u = R (xi - y_c)`` of every cluster, shapes (n_c, Q)."""
    return [(X - y) @ R.T for X, y in zip(clusters, Y)]


def _frame(U, Y, beta, R):
    """Activation pattern and truncated fractions for ``beta`` at fixed ``U``."""
    W = (beta + Y) @ R.T
    active = [Uc + wc > 0.0 for Uc, wc in zip(U, W)]
    q = np.array([
        (a.shape[0] - np.count_nonzero(a, axis=0)) / a.shape[0] for a in active
    ])
    return _Frame(U, W, active, q)


def _cost(F):
    """``sum_c 1/2 mean (sum_{i active} u_i^2 + sum_{i truncated} w_ci^2)``."""
    total = 0.0
    for Uc, wc, ac, qc in zip(F.U, F.W, F.active, F.q):
        kept = np.where(ac, Uc, 0.0)
        total += 0.5 * (np.sum(kept * kept) / Uc.shape[0] + qc @ (wc * wc))
    return float(total)


def _grad_beta(F, R):
    """``dC/dbeta = R^T sum_c q_c w_c``, shape (Q,)."""
    return R.T @ np.sum(F.q * F.W, axis=0)


def _omega_commutator(F):
    """``Omega = sum_c 1/2 mean[J, u u^T] + 1/2 [q_c, w_c w_c^T]``, shape (Q, Q).

    ``mean[J, u u^T] = K - K^T`` with ``K = mean (J u)(Jperp u)^T``, and
    ``[q, w w^T]_ik = (q_i - q_k) w_i w_k``: both vanish exactly, not only to
    rounding, when a cluster is wholly active or wholly truncated.
    """
    Q = F.W.shape[1]
    Omega = np.zeros((Q, Q))
    for Uc, wc, ac, qc in zip(F.U, F.W, F.active, F.q):
        K = np.where(ac, Uc, 0.0).T @ np.where(ac, 0.0, Uc) / Uc.shape[0]
        Omega += 0.5 * (K - K.T)
        Omega += 0.5 * (qc[:, None] - qc[None, :]) * np.outer(wc, wc)
    return Omega


def _omega_skew(F):
    """``Omega = sum_c skew(mean[J (v - w) v^T - (J v - w) w^T])``, shape (Q, Q)."""
    Q = F.W.shape[1]
    M = np.zeros((Q, Q))
    for Uc, wc, ac in zip(F.U, F.W, F.active):
        V = Uc + wc
        M += np.where(ac, Uc, 0.0).T @ V / Uc.shape[0]
        M -= np.outer(np.where(ac, V, 0.0).mean(axis=0) - wc, wc)
    return 0.5 * (M - M.T)


class Gradients(NamedTuple):
    """The flow's gradients and truncated fractions at one ``(beta, R)``.

    Attributes
    ----------
    grad_beta : ndarray, shape (Q,)
        ``dC/dbeta``.
    Omega : ndarray, shape (Q, Q)
        Skew rotation gradient (flow ``R' = -Omega R``).
    q : ndarray, shape (n_clusters, Q)
        Fraction of each cluster's points truncated in each rotated
        coordinate (the diagonal of ``J_0^perp``).
    """

    grad_beta: np.ndarray
    Omega: np.ndarray
    q: np.ndarray


def effective_cost(points, y_tilde, beta, R):
    """Cost ``C = sum_c 1/2 mean |tau(xi) - y_c|^2`` of the truncation map.

    Parameters
    ----------
    points : ndarray, shape (n, Q), or list of ndarray, shapes (n_c, Q)
        One cluster, or several, of input points ``xi`` (rows).
    y_tilde : ndarray, shape (Q,) or (n_clusters, Q)
        Target ``y_c`` of each cluster in input coordinates.
    beta : ndarray, shape (Q,)
        Cumulative bias in input coordinates, ``beta = W^{-1} b``.
    R : ndarray, shape (Q, Q)
        Orthogonal rotation, the polar factor of the cumulative weight.

    Returns
    -------
    float
    """
    clusters, Y = _as_clusters(points, y_tilde)
    beta, R = _check_beta_R(beta, R, Y.shape[1])
    return _cost(_frame(_rotate(clusters, Y, R), Y, beta, R))


def effective_gradients(points, y_tilde, beta, R, *, form="commutator"):
    """Gradients ``dC/dbeta`` and ``Omega`` that drive the effective flow.

    ``Omega`` is skew with ``d/deps C(exp(eps A) R) = tr(A^T Omega)`` for skew
    ``A`` at ``eps = 0``; the flow is ``beta' = -dC/dbeta``,
    ``R' = -Omega R``. Off the kinks (every ``v_i != 0``) these are the exact
    derivatives; on a kink ``v_i = 0`` the point counts as truncated.

    Parameters
    ----------
    points, y_tilde, beta, R
        As in :func:`effective_cost`.
    form : {"commutator", "skew"}
        ``"commutator"``: ``sum_c 1/2 mean[J, u u^T] + 1/2 [q_c, w_c w_c^T]``,
        exactly zero at both equilibrium families (the integrators use it).
        ``"skew"``: the skew part of the direct gradient
        ``mean[J (v - w) v^T - (J v - w) w^T]``. They agree to rounding.

    Returns
    -------
    Gradients
        ``(grad_beta, Omega, q)`` with shapes (Q,), (Q, Q), (n_clusters, Q).
    """
    if form not in OMEGA_FORMS:
        raise ValueError(f"form={form!r}; expected one of {OMEGA_FORMS}")
    clusters, Y = _as_clusters(points, y_tilde)
    beta, R = _check_beta_R(beta, R, Y.shape[1])
    F = _frame(_rotate(clusters, Y, R), Y, beta, R)
    Omega = _omega_commutator(F) if form == "commutator" else _omega_skew(F)
    return Gradients(_grad_beta(F, R), Omega, F.q)


# --------------------------------------------------------------------------
# A-priori contraction time
# --------------------------------------------------------------------------


def contraction_bound(points, y_tilde, beta, R):
    """A-priori time by which a cluster becomes a single point when R is fixed.

    With ``Omega = 0`` (``Q = 1`` or ``R`` held fixed), margins
    ``m_i = min_xi (-u_i) > 0`` (the cluster strictly inside the negative
    orthant with apex ``y`` in the rotated frame) and ``q_i(0) > 0`` wherever
    ``w_i(0) > m_i``, every point is truncated in coordinate ``i`` by
    ``s_i = ln(w_i(0) / m_i) / q_i(0)`` (0 when ``w_i(0) <= m_i``), and the
    cluster is the point ``-beta`` from ``s* = max_i s_i`` on.

    Parameters
    ----------
    points, y_tilde, beta, R
        As in :func:`effective_cost`; the bound needs exactly one cluster.

    Returns
    -------
    bound : float or None
        ``s*``, or None when the assumptions fail.
    reason : str
        Which assumption failed, or the assumptions that hold.
    """
    clusters, Y = _as_clusters(points, y_tilde)
    beta, R = _check_beta_R(beta, R, Y.shape[1])
    if len(clusters) != 1:
        return None, (
            f"{len(clusters)} clusters share beta and R; the bound "
            "is established for one cluster only"
        )
    F = _frame(_rotate(clusters, Y, R), Y, beta, R)
    return _bound_from_frame(F)


def _bound_from_frame(F):
    """The bound of :func:`contraction_bound` from a one-cluster frame."""
    m = -np.max(F.U[0], axis=0)
    w, q = F.W[0], F.q[0]
    if np.any(m <= 0.0):
        i = int(np.argmin(m))
        return None, (
            f"margin m_{i} = {m[i]:.3g} <= 0: the cluster is not "
            "strictly inside the negative orthant with apex y_tilde "
            "in the rotated frame"
        )
    slow = (w > m) & (q == 0.0)
    if np.any(slow):
        i = int(np.flatnonzero(slow)[0])
        return None, (
            f"q_{i}(0) = 0 while w_{i}(0) > m_{i}: coordinate {i} "
            "never truncates (a trapped state)"
        )
    moving = w > m
    s = np.zeros_like(w)
    s[moving] = np.log(w[moving] / m[moving]) / q[moving]
    return float(np.max(s)), (
        "one cluster, Omega = 0, margins > 0 and q_i(0) > 0 where w_i(0) > m_i"
    )


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------


@dataclass
class EffectiveResult:
    """Outcome of :func:`integrate_effective`: summary, final state and records.

    Attributes
    ----------
    method : {"cayley", "lie-euler", "events"}
    stepper : {"heun", "euler"} or None
        None for ``"events"``.
    step : float or None
        Fixed step ``h`` (None for ``"events"``).
    time : float
        Horizon ``s_max``.
    freeze_R : bool
    steps : int
        Fixed steps taken, or events processed.
    flips : int or None
        State flips of the event scheme (None for the fixed-step schemes).
    n_clusters, Q : int
    beta : ndarray, shape (Q,)
        ``beta(s_max)``.
    R : ndarray, shape (Q, Q)
        ``R(s_max)``.
    contraction_time : float or None
        First time at which every point of every cluster is truncated in
        every coordinate (each cluster a single point); None if not reached.
        Exact for ``"events"``; the end of the first step with full
        truncation for the fixed-step schemes (resolution ``h``).
    contraction_times : list of float or None, length n_clusters
        The same per cluster.
    contraction_bound : float or None
        A-priori ``s*`` (:func:`contraction_bound`) when ``Omega = 0``.
    contraction_bound_reason : str
    initial_cost, final_cost : float
    orthogonality_error : float
        Largest ``|R^T R - I|_max`` over the records.
    stuck_coordinates : list of int
        Coordinates the event scheme held at a kink where the flow points into
        the kink from both sides (several clusters only).
    message : str
    records : dict of str to ndarray
        Stacked over ``n_rec`` records: ``s`` (n_rec,), ``beta`` (n_rec, Q),
        ``R`` (n_rec, Q, Q), ``q`` (n_rec, Q) truncated fraction of all points,
        ``q_clusters`` (n_rec, n_clusters, Q), ``cost`` (n_rec,),
        ``distance`` (n_rec, n_clusters) ``|beta + y_c|``, ``omega_norm``
        (n_rec,) ``|Omega|_F`` (also when ``R`` is held fixed and ``Omega``
        is not applied), ``orthogonality`` (n_rec,) ``|R^T R - I|_max``.
    wall_time : float
    """

    method: str
    stepper: str | None
    step: float | None
    time: float
    freeze_R: bool
    steps: int
    flips: int | None
    n_clusters: int
    Q: int
    beta: np.ndarray
    R: np.ndarray
    contraction_time: float | None
    contraction_times: list
    contraction_bound: float | None
    contraction_bound_reason: str
    initial_cost: float
    final_cost: float
    orthogonality_error: float
    stuck_coordinates: list = field(default_factory=list)
    message: str = ""
    records: dict = field(default_factory=dict)
    wall_time: float = 0.0

    def as_dict(self):
        """JSON-able scalars of the run (no arrays)."""
        return {
            "method": self.method,
            "stepper": self.stepper,
            "step": self.step,
            "time": self.time,
            "freeze_R": self.freeze_R,
            "steps": self.steps,
            "flips": self.flips,
            "n_clusters": self.n_clusters,
            "Q": self.Q,
            "contraction_time": self.contraction_time,
            "contraction_bound": self.contraction_bound,
            "contraction_bound_reason": self.contraction_bound_reason,
            "initial_cost": self.initial_cost,
            "final_cost": self.final_cost,
            "orthogonality_error": self.orthogonality_error,
            "stuck_coordinates": len(self.stuck_coordinates),
            "message": self.message,
            "wall_time": self.wall_time,
        }


class _Recorder:
    """Collects the record rows and the first full-truncation times."""

    def __init__(self, clusters, Y):
        self.clusters, self.Y = clusters, Y
        self.sizes = np.array([X.shape[0] for X in clusters], dtype=float)
        self.rows = {
            k: []
            for k in (
                "s",
                "beta",
                "R",
                "q",
                "q_clusters",
                "cost",
                "distance",
                "omega_norm",
                "orthogonality",
            )
        }
        self.first_all = None
        self.first = [None] * len(clusters)

    def collapsed(self, s, q):
        """Note the first times ``q == 1`` per cluster and for all at once."""
        if q.max() < 1.0:
            return
        full = np.all(q == 1.0, axis=1)
        for c in np.flatnonzero(full):
            if self.first[c] is None:
                self.first[c] = float(s)
        if self.first_all is None and np.all(full):
            self.first_all = float(s)

    def add(self, s, beta, R, q=None):
        """Record the state at ``s``; ``q`` overrides the sign-based fractions."""
        F = _frame(_rotate(self.clusters, self.Y, R), self.Y, beta, R)
        q = F.q if q is None else q
        row = self.rows
        row["s"].append(float(s))
        row["beta"].append(beta.copy())
        row["R"].append(R.copy())
        row["q"].append(self.sizes @ q / self.sizes.sum())
        row["q_clusters"].append(q.copy())
        row["cost"].append(_cost(F))
        row["distance"].append(np.linalg.norm(beta + self.Y, axis=1))
        row["omega_norm"].append(np.linalg.norm(_omega_commutator(F)))
        row["orthogonality"].append(_orthogonality_error(R))

    def arrays(self):
        return {k: np.array(v) for k, v in self.rows.items()}


# --------------------------------------------------------------------------
# Fixed-step schemes
# --------------------------------------------------------------------------


def _cayley(hOmega, R):
    """``(I + hOmega/2)^{-1} (I - hOmega/2) R``, orthogonal for skew ``hOmega``."""
    I = np.eye(R.shape[0])
    return np.linalg.solve(I + 0.5 * hOmega, (I - 0.5 * hOmega) @ R)


def _lie_euler(hOmega, R):
    """``expm(-hOmega) R``."""
    return _expm_skew(-hOmega) @ R


def _expm_skew(A):
    """``expm(A)`` for skew ``A``, shape (Q, Q), from the eigensystem of ``iA``.

    ``iA`` is Hermitian, ``iA = V diag(lam) V^H``, so
    ``expm(A) = V diag(exp(-i lam)) V^H``: orthogonal to rounding, and far
    cheaper than a general Pade ``expm`` for the small ``Q`` used here.
    """
    lam, V = np.linalg.eigh(1j * A)
    return ((V * np.exp(-1j * lam)) @ V.conj().T).real


class _Field:
    """Gradients at ``(beta, R)``, reusing the rotated data when ``R`` is fixed."""

    def __init__(self, clusters, Y, freeze_R):
        self.clusters, self.Y, self.freeze_R = clusters, Y, freeze_R
        self._U = None

    def __call__(self, beta, R):
        """Return ``(dC/dbeta, Omega, q)``; ``Omega`` is None when frozen."""
        if self._U is None or not self.freeze_R:
            self._U = _rotate(self.clusters, self.Y, R)
        F = _frame(self._U, self.Y, beta, R)
        Omega = None if self.freeze_R else _omega_commutator(F)
        return _grad_beta(F, R), Omega, F.q


def _fixed_step(fld, beta, R, h, stepper, rotate, start):
    """One Euler or Heun step of ``beta' = -g``, ``R' = -Omega R``.

    ``start`` is ``fld(beta, R)``. Returns the new ``(beta, R)`` and
    ``fld`` there, which starts the next step.
    """
    g, Omega, _ = start
    beta1 = beta - h * g
    R1 = R if Omega is None else rotate(h * Omega, R)
    if stepper == "heun":
        g1, Omega1, _ = fld(beta1, R1)
        beta1 = beta - 0.5 * h * (g + g1)
        if Omega is not None:
            R1 = rotate(0.5 * h * (Omega + Omega1), R)
    return beta1, R1, fld(beta1, R1)


def _run_fixed(clusters, Y, beta, R, opts, rec, progress):
    """Fixed-step integration from 0 to ``opts.time``, landing on records."""
    rotate = _cayley if opts.method == "cayley" else _lie_euler
    fld = _Field(clusters, Y, opts.freeze_R)
    s, steps, snap = 0.0, 0, TIME_SNAP * opts.time
    here = fld(beta, R)
    rec.collapsed(0.0, here[2])
    rec.add(0.0, beta, R)
    for target in opts.targets:
        while s < target - snap:
            h = min(opts.step, target - s)
            beta, R, here = _fixed_step(fld, beta, R, h, opts.stepper, rotate, here)
            s = target if target - (s + h) <= snap else s + h
            steps += 1
            rec.collapsed(s, here[2])
            if opts.every_step and s < target:
                rec.add(s, beta, R)
            if progress is not None:
                progress(s, opts.time)
        rec.add(s, beta, R)
    return beta, R, steps, None, []


# --------------------------------------------------------------------------
# Event-driven scheme (R fixed)
# --------------------------------------------------------------------------


class _Events:
    """Exact piecewise-exponential flow of ``b = R beta`` with ``R`` fixed.

    Per rotated coordinate ``i`` the thresholds ``theta = -(R xi)_i`` of all
    points are sorted ascending; a point is truncated iff ``b_i <= theta``,
    so the truncated points are the suffix ``ptr[i]:`` of the sorted order.
    Between flips ``b_i' = -(rate_i b_i + S_i)``, ``rate_i = sum_c q_ci``,
    ``S_i = sum_c q_ci (R y_c)_i``, which moves ``b_i`` exponentially towards
    ``target_i = -S_i / rate_i``.
    """

    def __init__(self, clusters, Y, beta, R):
        P = np.vstack(clusters) @ R.T
        labels = np.repeat(np.arange(len(clusters)), [X.shape[0] for X in clusters])
        order = np.argsort(-P, axis=0, kind="stable")
        self.theta = np.take_along_axis(-P, order, axis=0)
        self.label = labels[order]
        self.sizes = np.bincount(labels).astype(float)
        self.Yr = np.array([R @ y for y in Y])  # same rounding as R @ beta
        self.beta0, self.b0 = beta, R @ beta
        self.b = self.b0.copy()
        Q = P.shape[1]
        self.ptr = np.array([
            np.searchsorted(self.theta[:, i], self.b[i]) for i in range(Q)
        ])
        self.count = np.zeros((len(clusters), Q))
        for i in range(Q):
            self.count[:, i] = np.bincount(
                self.label[self.ptr[i] :, i], minlength=len(clusters)
            )
        self.frozen = np.zeros(Q, dtype=bool)
        self.last = [None] * Q
        self.rate, self.target = np.zeros(Q), np.zeros(Q)
        for i in range(Q):
            self._refresh(i)

    def beta(self, R):
        """``beta = beta0 + R^T (b - b0)``: exact where ``b`` has not moved."""
        return self.beta0 + R.T @ (self.b - self.b0)

    @property
    def q(self):
        """Truncated fractions, shape (n_clusters, Q)."""
        return self.count / self.sizes[:, None]

    def _refresh(self, i):
        """Recompute ``rate_i`` and ``target_i`` from the counts."""
        qi = self.count[:, i] / self.sizes
        rate = 0.0 if self.frozen[i] else float(qi.sum())
        self.rate[i] = rate
        self.target[i] = -(qi @ self.Yr[:, i]) / rate if rate > 0 else self.b[i]

    def advance(self, ds):
        """Move every coordinate along its exponential by ``ds``."""
        moving = self.rate > 0.0
        decay = np.exp(-self.rate[moving] * ds)
        t = self.target[moving]
        self.b[moving] = t + (self.b[moving] - t) * decay

    def next_event(self, i):
        """Time until coordinate ``i``'s next crossing (inf if none)."""
        b, t, rate = self.b[i], self.target[i], self.rate[i]
        if rate == 0.0 or b == t:
            return math.inf
        slot = self.ptr[i] - 1 if t < b else self.ptr[i]
        if not 0 <= slot < self.theta.shape[0]:
            return math.inf
        theta = self.theta[slot, i]
        if (theta - t) * (b - t) <= 0.0:
            return math.inf
        return max(0.0, math.log((b - t) / (theta - t)) / rate)

    def flip(self, i, s):
        """Cross the next threshold of coordinate ``i`` at time ``s``.

        A zero-length reversal (the point that just flipped would flip back
        at once) means the flow points into the kink from both sides: the
        coordinate is held there. Returns False in that case.
        """
        down = self.target[i] < self.b[i]
        slot = self.ptr[i] - 1 if down else self.ptr[i]
        last = self.last[i]
        if last is not None and last == (s, slot, not down):
            self.frozen[i] = True
            self._refresh(i)
            return False
        self.b[i] = self.theta[slot, i]
        self.ptr[i] += -1 if down else 1
        self.count[self.label[slot, i], i] += 1 if down else -1
        self.last[i] = (s, slot, down)
        self._refresh(i)
        return True


def _run_events(clusters, Y, beta, R, opts, rec, progress):
    """Exact event-driven integration with ``R`` fixed."""
    ev = _Events(clusters, Y, beta, R)
    Q = R.shape[0]
    s, events, flips = 0.0, 0, 0
    max_events = MAX_FLIPS_PER_ENTRY * ev.theta.size + 10
    due = np.array([ev.next_event(i) for i in range(Q)])
    rec.collapsed(0.0, ev.q)
    rec.add(0.0, ev.beta(R), R, ev.q)
    for target in opts.targets:
        while due.min() <= target:
            i = int(np.argmin(due))
            ev.advance(due[i] - s)
            s = float(due[i])
            flips += ev.flip(i, s)
            events += 1
            if events > max_events:
                raise RuntimeError(
                    f"event scheme exceeded {max_events} events by s = {s:.6g};"
                    " the states are cycling, report this data set"
                )
            due[i] = s + ev.next_event(i)
            rec.collapsed(s, ev.q)
            if opts.every_step:
                rec.add(s, ev.beta(R), R, ev.q)
            if progress is not None:
                progress(s, opts.time)
        ev.advance(target - s)
        s = target
        if not (opts.every_step and rec.rows["s"][-1] == s):
            rec.add(s, ev.beta(R), R, ev.q)
    stuck = [int(i) for i in np.flatnonzero(ev.frozen)]
    return ev.beta(R), R, events, flips, stuck


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    method: str
    stepper: str | None
    step: float | None
    time: float
    freeze_R: bool
    targets: tuple
    every_step: bool


def _resolve_freeze(method, freeze_R):
    if freeze_R is None:
        return method == "events"
    if method == "events" and not freeze_R:
        raise ValueError(
            "method='events' is exact only with R held fixed; pass "
            "freeze_R=True (or None), or use method='cayley' to move R"
        )
    return bool(freeze_R)


def _record_targets(record, time):
    """Record times, sorted, ending at ``time``; and whether every step records."""
    if isinstance(record, str):
        if record != "steps":
            raise ValueError(
                f"record={record!r}; expected an int >= 2, an array of times or 'steps'"
            )
        return (float(time),), True
    if isinstance(record, numbers.Integral):
        if record < 2:
            raise ValueError(f"record={record}; expected at least 2 records")
        return tuple(np.linspace(0.0, time, int(record))[1:]), False
    times = np.unique(np.asarray(record, dtype=float).ravel())
    if times.size == 0 or times[0] < 0 or times[-1] > time:
        raise ValueError(
            f"record times must lie in [0, time={time}]; got "
            f"{times.min() if times.size else 'none'} .. "
            f"{times.max() if times.size else ''}"
        )
    times = times[times > 0]
    if times.size == 0 or times[-1] < time:
        times = np.append(times, time)
    return tuple(float(t) for t in times), False


def _default_step(clusters, Y, beta, R):
    """``DEFAULT_STEP`` divided by the largest rate the field can reach."""
    F = _frame(_rotate(clusters, Y, R), Y, beta, R)
    omega = np.linalg.norm(_omega_commutator(F), 2)
    return DEFAULT_STEP / max(1.0, float(len(clusters)), omega)


def _check_options(method, stepper, time, step):
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    if stepper not in STEPPERS:
        raise ValueError(f"stepper={stepper!r}; expected one of {STEPPERS}")
    if not (isinstance(time, numbers.Real) and math.isfinite(time) and time > 0):
        raise ValueError(f"time={time!r}; expected a finite number > 0")
    if step is not None and not (
        isinstance(step, numbers.Real) and math.isfinite(step) and step > 0
    ):
        raise ValueError(f"step={step!r}; expected a finite number > 0 or None")


def integrate_effective(
    clusters,
    y_tilde,
    beta0,
    R0,
    *,
    time,
    step=None,
    method="cayley",
    stepper="heun",
    freeze_R=None,
    record=101,
    progress=None,
):
    """Integrate the effective flow ``beta' = -dC/dbeta``, ``R' = -Omega R``.

    Parameters
    ----------
    clusters : ndarray, shape (n, Q), or list of ndarray, shapes (n_c, Q)
        Input points of one cluster or several (rows).
    y_tilde : ndarray, shape (Q,) or (n_clusters, Q)
        Target of each cluster in input coordinates.
    beta0 : ndarray, shape (Q,)
    R0 : ndarray, shape (Q, Q)
        Orthogonal to ``1e-10``.
    time : float
        Horizon ``s_max > 0``.
    step : float, optional
        Fixed step ``h`` of ``"cayley"`` and ``"lie-euler"``; default
        ``1e-2 / max(1, n_clusters, |Omega(0)|_2)``. Ignored by ``"events"``.
    method : {"cayley", "lie-euler", "events"}
        How ``R`` moves (Cayley transform or matrix exponential), or the exact
        event-driven scheme, which holds ``R`` fixed.
    stepper : {"heun", "euler"}
        Explicit scheme of the fixed-step methods.
    freeze_R : bool, optional
        Hold ``R = R0`` (then ``Omega`` is not applied). Default: True for
        ``"events"`` (which requires it), False otherwise.
    record : int, array_like or "steps"
        Number of equally spaced records on ``[0, time]``, explicit record
        times (0 and ``time`` are always recorded), or ``"steps"`` for a
        record after every step or event.
    progress : callable, optional
        ``progress(s, time)`` after every step or event.

    Returns
    -------
    EffectiveResult
    """
    _check_options(method, stepper, time, step)
    clusters, Y = _as_clusters(clusters, y_tilde)
    beta, R = _check_beta_R(beta0, R0, Y.shape[1])
    freeze = _resolve_freeze(method, freeze_R)
    if method != "events" and step is None:
        step = _default_step(clusters, Y, beta, R)
    targets, every = _record_targets(record, float(time))
    opts = _Options(
        method,
        None if method == "events" else stepper,
        None if method == "events" else float(step),
        float(time),
        freeze,
        targets,
        every,
    )
    return _integrate(clusters, Y, beta.copy(), R.copy(), opts, progress)


def _integrate(clusters, Y, beta, R, opts, progress):
    """Run the chosen scheme and assemble the result."""
    start = _time.perf_counter()
    bound, reason = _bound_for_run(clusters, Y, beta, R, opts.freeze_R)
    rec = _Recorder(clusters, Y)
    run = _run_events if opts.method == "events" else _run_fixed
    beta1, R1, steps, flips, stuck = run(clusters, Y, beta, R, opts, rec, progress)
    records = rec.arrays()
    message = _message(rec, stuck)
    return EffectiveResult(
        method=opts.method,
        stepper=opts.stepper,
        step=opts.step,
        time=opts.time,
        freeze_R=opts.freeze_R,
        steps=steps,
        flips=flips,
        n_clusters=len(clusters),
        Q=Y.shape[1],
        beta=beta1,
        R=R1,
        contraction_time=rec.first_all,
        contraction_times=list(rec.first),
        contraction_bound=bound,
        contraction_bound_reason=reason,
        initial_cost=float(records["cost"][0]),
        final_cost=float(records["cost"][-1]),
        orthogonality_error=float(records["orthogonality"].max()),
        stuck_coordinates=stuck,
        message=message,
        records=records,
        wall_time=_time.perf_counter() - start,
    )


def _bound_for_run(clusters, Y, beta, R, freeze_R):
    if not (freeze_R or Y.shape[1] == 1):
        return None, (
            "R moves (Omega != 0): finite-time contraction is not "
            "established, no a-priori bound"
        )
    if len(clusters) != 1:
        return None, (
            f"{len(clusters)} clusters share beta and R; the bound "
            "is established for one cluster only"
        )
    return _bound_from_frame(_frame(_rotate(clusters, Y, R), Y, beta, R))


def _message(rec, stuck):
    parts = []
    if rec.first_all is not None:
        parts.append(f"every cluster a single point from s = {rec.first_all:.6g}")
    else:
        parts.append("contraction not reached")
    if stuck:
        parts.append(
            f"coordinates {stuck} held at a kink the flow points into from both sides"
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


@dataclass
class EffectiveScenario:
    """Data and initial state of an effective-flow experiment.

    Attributes
    ----------
    clusters : list of ndarray, shapes (n, Q)
    y_tilde : ndarray, shape (n_clusters, Q)
    beta0 : ndarray, shape (Q,)
    R0 : ndarray, shape (Q, Q)
    """

    clusters: list
    y_tilde: np.ndarray
    beta0: np.ndarray
    R0: np.ndarray


def _near_identity(Q, angle, rng):
    """``expm(angle A)`` for a random skew ``A`` with ``|A|_F = 1``."""
    if angle == 0.0 or Q == 1:
        return np.eye(Q)
    G = rng.standard_normal((Q, Q))
    A = G - G.T
    return _expm_skew(angle * A / np.linalg.norm(A))


def _split_threshold(values, fraction):
    """A value between order statistics leaving ``fraction`` of ``values`` above it."""
    s = np.sort(values)
    k = min(max(int(round((1.0 - fraction) * s.size)), 1), s.size - 1)
    return 0.5 * (s[k - 1] + s[k])


def effective_scenario(
    Q,
    n,
    radius,
    rng,
    *,
    distance=None,
    rotation=0.0,
    truncated=0.3,
    n_clusters=1,
    spread=1.0,
    trapped=False,
):
    """Build clusters and a start ``(beta0, R0)`` for the effective flow.

    Contracting case (``trapped=False``): cluster ``c`` is a uniform ball of
    ``radius`` about ``y_c + R0^T (-distance, ..., -distance)``, so
    ``u = R0 (xi - y_c)`` has every entry ``<= radius - distance < 0``: the
    cluster lies strictly inside the negative orthant with apex ``y_c`` in
    the frame of ``R0``, margins ``m_i >= distance - radius``. ``beta0`` puts
    ``w = R0 (beta0 + y_0)`` between order statistics of ``-u`` of cluster 0
    so that about ``truncated`` of its points start truncated in every
    coordinate (``q_i(0) > 0``) and no point lies on a kink. With ``R``
    frozen this satisfies the assumptions of :func:`contraction_bound`.

    Trapped case: ``beta0 = -y_0 + R0^T (distance, ..., distance)`` and cluster
    ``c`` is a ball about ``-beta0 + R0^T (distance + o_c)`` with ``o_c >= 0``,
    so ``v = R0 (xi + beta0) > 0``: every point is active, ``q = 0``,
    ``dC/dbeta = 0``, ``Omega = 0`` and the cost stays positive.

    Parameters
    ----------
    Q : int
        Dimension (input = width = output).
    n : int
        Points per cluster, at least 2.
    radius : float
        Cluster radius, > 0.
    rng : numpy.random.Generator
    distance : float, optional
        Distance of each centre from the apex along every rotated axis;
        default ``2 * radius``; must exceed ``radius``.
    rotation : float
        Angle scale of ``R0 = expm(rotation A)``, ``A`` random skew with unit
        Frobenius norm; 0 gives the identity.
    truncated : float in (0, 1)
        Target fraction of cluster 0 initially truncated per coordinate.
    n_clusters : int
        Several clusters share ``beta`` and ``R``; targets
        ``y_c = y_0 + spread * N(0, I)``, ``y_0 ~ N(0, I)``.
    spread : float
        Scale of the target (or, trapped, the centre) offsets between clusters.
    trapped : bool

    Returns
    -------
    EffectiveScenario
    """
    distance = 2.0 * radius if distance is None else float(distance)
    if not (
        radius > 0
        and distance > radius
        and n >= 2
        and Q >= 1
        and 0.0 < truncated < 1.0
        and n_clusters >= 1
    ):
        raise ValueError(
            f"effective_scenario needs Q >= 1, n >= 2, radius > 0, distance > "
            f"radius, 0 < truncated < 1, n_clusters >= 1; got Q={Q}, n={n}, "
            f"radius={radius}, distance={distance}, truncated={truncated}, "
            f"n_clusters={n_clusters}"
        )
    R0 = _near_identity(Q, float(rotation), rng)
    Y = rng.standard_normal(Q) + np.vstack(
        [np.zeros(Q)] + [spread * rng.standard_normal(Q) for _ in range(n_clusters - 1)]
    )
    if trapped:
        return _trapped(Q, n, radius, distance, spread, R0, Y, rng)
    corner = -distance * np.ones(Q) @ R0
    clusters = [y + corner + uniform_ball(n, Q, radius, rng) for y in Y]
    U = (clusters[0] - Y[0]) @ R0.T
    w = np.array([_split_threshold(-U[:, i], truncated) for i in range(Q)])
    return EffectiveScenario(clusters, Y, w @ R0 - Y[0], R0)


def _trapped(Q, n, radius, distance, spread, R0, Y, rng):
    """Clusters in the open positive orthant of ``v = R0 (xi + beta0)``."""
    beta0 = distance * np.ones(Q) @ R0 - Y[0]
    clusters = []
    for _ in range(Y.shape[0]):
        offset = distance + spread * np.abs(rng.standard_normal(Q))
        centre = offset @ R0 - beta0
        clusters.append(centre + uniform_ball(n, Q, radius, rng))
    return EffectiveScenario(clusters, Y, beta0, R0)
