"""One hidden layer: the O(delta_P) network and exact least-squares values.

Reference/construct.md section 7. A hidden layer of width M that stays in
its identity regime on the data makes the network an affine map of the
input, so its best cost is a weighted least-squares value with a closed
form. Samples are rows: ``X`` has shape ``(n_samples, dim)``, ``Y[j]`` is the
target ``y_j`` of class ``j``. The reference writes ``X^red = [x_1 ... x_Q]``
with means as columns; here ``means`` is its transpose, shape ``(Q, dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import construct as cs

BETA_SLACK = 0.1  # headroom in beta: nearby unseen points stay in the identity regime
RANK_RTOL = 1e-10  # singular values of the means below this (relative) count as zero
ORTHO_TOL = 1e-10  # R must satisfy |R^T R - I| below this
GAP_RTOL = 1e-12  # rounding allowance of the gap inequalities


# ------------------------------------------------------------- coordinates


def barycentric(X, labels, means=None, Q=None):
    """Deviations in coordinates of the means, ``Delta_1 = (X^red)^+ Delta X_0``.

    Deviations are taken about each class's own mean; ``means`` only sets
    the coordinate system (the raw means of other data, for instance).

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    means : ndarray, shape (Q, dim), optional
        Rows span the coordinate system; default the class means of ``X``.

    Returns
    -------
    D1 : ndarray, shape (n_samples, Q)
        Row ``k`` is ``(X^red)^+ (x_k - mean_j(k))``.
    D2 : ndarray, shape (Q, Q)
        ``Delta_2 = Delta_1 N^{-1} Delta_1^T = sum_k (1/N_j(k)) d_k d_k^T``.
    """
    stats = cs.class_stats(X, labels, Q)
    means = stats.means if means is None else np.asarray(means, dtype=float)
    _check_independent(means)
    dev = X - stats.means[labels]
    D1 = np.linalg.lstsq(means.T, dev.T, rcond=None)[0].T
    w = 1.0 / stats.sizes[labels]
    return D1, D1.T @ (w[:, None] * D1)


def _check_independent(means):
    sv = np.linalg.svd(means, compute_uv=False)
    Q = means.shape[0]
    rank = int((sv > RANK_RTOL * sv[0]).sum()) if sv[0] > 0 else 0
    if rank < Q:
        raise ValueError(
            f"the {Q} class means are linearly dependent (rank {rank}, expected {Q}); "
            "X^red has no left inverse, so delta_P and the shallow network are "
            "undefined; use data whose class means are independent"
        )


def delta_P(X, labels, Q=None):
    """Largest deviation in barycentric coordinates, ``max_k |(X^red)^+ Delta x_k|``.

    Only the part of the noise inside ``span{means}`` counts.
    """
    D1, _ = barycentric(X, labels, Q=Q)
    return float(np.sqrt(np.einsum("ij,ij->i", D1, D1).max()))


def _scatter(X, labels, stats):
    """Within-class scatter ``E = sum_k (1/N_j(k)) dx_k dx_k^T``, shape (dim, dim)."""
    dev = X - stats.means[labels]
    w = 1.0 / stats.sizes[labels]
    return dev.T @ (w[:, None] * dev)


# ------------------------------------------------------- least squares


def ls_value(X, labels, Y, intercept=False):
    """Smallest ``C_N`` of a linear (or affine) map of the inputs.

    ``min_A sum_j (1/N_j) sum_i |A x_ji (+ c) - y_j|^2``. Without intercept the
    closed form is ``Tr(YY^T) - Tr(Y X^T S_0^+ X Y^T)`` with
    ``S_0 = X^red X^red^T + E``; with it, the same with centered means
    ``X~ = X^red - x_bar u^T``, centered targets ``Y_c`` and ``S = X~ X~^T + E``.
    Both are evaluated as the residual of the normal-equation solution,
    ``sum_j |A m_j (+ c) - y_j|^2 + Tr(A E A^T)``, which is the same number
    without the cancellation of the difference of traces.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    intercept : bool

    Returns
    -------
    float
    """
    stats = cs.class_stats(X, labels, Y.shape[0])
    E = _scatter(X, labels, stats)
    means, targets = stats.means, np.asarray(Y, dtype=float)
    if intercept:
        means = means - stats.barycenter
        targets = targets - targets.mean(axis=0)
    S = means.T @ means + E
    A = np.linalg.lstsq(S, means.T @ targets, rcond=None)[0].T
    mismatch = ((means @ A.T - targets) ** 2).sum()
    return float(mismatch + np.einsum("ij,jk,ik->", A, E, A))


def trace_value(X, labels, Y, means=None):
    """The papers' value ``Tr(Y Delta_2 (I + Delta_2)^{-1} Y^T)``.

    It is the best ``C_N`` over linear maps ``x -> B (X^red)^+ x`` that see the
    input only through its coordinates in the means. For ``dim = Q`` every
    linear map has that form and this is :func:`ls_value` without intercept;
    for ``dim > Q`` it is an upper bound on it.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    means : ndarray, shape (Q, dim), optional
        Coordinate system of ``Delta_1``; default the class means of ``X``.
    """
    _, D2 = barycentric(X, labels, means, Y.shape[0])
    K = np.linalg.solve(np.eye(D2.shape[0]) + D2, Y)
    return float(((D2 @ Y) * K).sum())


@dataclass
class GapCheck:
    """Relative gap between the papers' optimum and the constructed cost.

    Attributes
    ----------
    rel_gap : float
        ``1 - Tr(Y D2 (I+D2)^{-1} Y^T) / Tr(Y D2 Y^T)`` (NaN when both are 0).
    op_bound : float
        ``|D2|_op / (1 + |D2|_op)``.
    bound : float
        ``Q delta_P^2 / (1 + Q delta_P^2)``, the constant used for [CE-D]'s C_0.
    within : bool
        ``0 <= rel_gap <= op_bound <= bound`` up to rounding.
    """

    rel_gap: float
    op_bound: float
    bound: float
    within: bool


def relative_gap(X, labels, Y):
    """Check ``0 <= 1 - trace/constructed <= |D2|/(1+|D2|) <= Q dP^2/(1+Q dP^2)``."""
    _, D2 = barycentric(X, labels, Q=Y.shape[0])
    dP = delta_P(X, labels, Y.shape[0])
    Q = Y.shape[0]
    built = float(((D2 @ Y) * Y).sum())
    best = trace_value(X, labels, Y)
    rel = 1.0 - best / built if built > 0 else np.nan
    op = float(np.linalg.norm(D2, 2))
    op_bound = op / (1.0 + op)
    bound = Q * dP**2 / (1.0 + Q * dP**2)
    within = bool(
        np.isnan(rel)
        or (
            -GAP_RTOL <= rel <= op_bound + GAP_RTOL
            and op_bound <= bound * (1 + GAP_RTOL)
        )
    )
    return GapCheck(rel, op_bound, bound, within)


# --------------------------------------------------------------- network


@dataclass
class ShallowResult:
    """The one-hidden-layer network of section 7 with its exact numbers.

    Attributes
    ----------
    status : {"ok", "failed"}
    message : str
    layers : list of (W, b)
        ``W_1 = R P`` (dim, dim), ``b_1 = beta u``; ``W_2 = Y^T (X^red)^+ R^T``
        (out_dim, dim), ``b_2 = -W_2 b_1``.
    beta : float
    delta_P : float
    cost : float
        ``C_N`` of the network on the training data, by a forward pass.
    costs : dict of float
        Every cost normalization and the split (see ``construct.all_costs``).
    cost_formula : float
        ``|Y (X^red)^+ Delta X_0|_N^2``, what the cost must equal.
    bound : float
        ``Q |Y|_op^2 delta_P^2``.
    ls_no_intercept, ls_intercept : float
        Exact least-squares values over linear and affine maps.
    ls_trace : float
        ``Tr(Y D2 (I + D2)^{-1} Y^T)``; equals ``ls_no_intercept`` when dim = Q.
    gap : GapCheck
    identity_regime : bool
        Every hidden pre-activation on the data is ``>= 0``.
    max_output_error : float
    """

    status: str
    message: str
    layers: list = field(default_factory=list)
    beta: float = np.nan
    delta_P: float = np.nan
    cost: float = np.nan
    costs: dict = field(default_factory=dict)
    cost_formula: float = np.nan
    bound: float = np.nan
    ls_no_intercept: float = np.nan
    ls_intercept: float = np.nan
    ls_trace: float = np.nan
    gap: GapCheck | None = None
    identity_regime: bool = False
    max_output_error: float = np.nan

    def predict(self, X):
        """Network outputs for inputs ``X`` of shape (n, dim)."""
        return cs.forward_relu(self.layers, X)

    def as_dict(self):
        """The scalar results, for a JSON summary."""
        return {
            "delta_p": self.delta_P,
            "cost": self.cost,
            "cost_formula": self.cost_formula,
            "bound": self.bound,
            "ls_cost_no_intercept": self.ls_no_intercept,
            "ls_cost_intercept": self.ls_intercept,
            "ls_trace": self.ls_trace,
            "rel_gap": self.gap.rel_gap if self.gap else np.nan,
            "gap_bound": self.gap.bound if self.gap else np.nan,
        }


def build_shallow(X, labels, Y, R=None, beta=None):
    """Build the shallow network ``x -> Y (X^red)^+ x`` on the data (section 7).

    ``W_1 = R P`` with ``P`` the orthogonal projector onto ``span{means}``,
    ``b_1 = beta u`` with ``beta`` large enough that ReLU is the identity on the
    data, ``W_2 = Y^T (X^red)^+ R^T`` and ``b_2 = -W_2 b_1``. Class ``j`` is sent
    to ``y_j + Y^T (X^red)^+ Delta x``, so the cost is that of the spread alone.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim), dim >= Q
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    R : ndarray, shape (dim, dim), optional
        Orthogonal; default the identity.
    beta : float, optional
        Hidden bias; default ``(1 + BETA_SLACK) max_k |W_1 x_k|_inf``.

    Returns
    -------
    ShallowResult
    """
    X, labels, Y = _check_inputs(X, labels, Y)
    Q, dim = Y.shape[0], X.shape[1]
    R = np.eye(dim) if R is None else _check_orthogonal(R, dim)
    stats = cs.class_stats(X, labels, Q)
    try:
        D1, D2 = barycentric(X, labels, Q=Q)
    except ValueError as exc:
        return ShallowResult("failed", str(exc))
    pinv = np.linalg.pinv(stats.means.T)  # (X^red)^+, shape (Q, dim)
    W1 = R @ (stats.means.T @ pinv)
    H = X @ W1.T
    beta = (1.0 + BETA_SLACK) * float(np.abs(H).max()) if beta is None else float(beta)
    b1 = np.full(dim, beta)
    W2 = Y.T @ pinv @ R.T
    layers = [(W1, b1), (W2, -W2 @ b1)]

    out = cs.forward_relu(layers, X)
    w = 1.0 / stats.sizes[labels]
    dP = float(np.sqrt(np.einsum("ij,ij->i", D1, D1).max()))
    regime = bool((H + b1).min() >= 0.0)
    gap = relative_gap(X, labels, Y)
    message = (
        ""
        if regime
        else (
            f"beta = {beta:.4g} is below max |W_1 x|_inf = {np.abs(H).max():.4g}: some "
            "hidden units are cut off, so the cost is not the formula's"
        )
    )
    costs = cs.all_costs(out, labels, Y)
    return ShallowResult(
        status="ok" if regime else "failed",
        message=message,
        layers=layers,
        beta=beta,
        delta_P=dP,
        cost=costs["C_N"],
        costs=costs,
        cost_formula=float((w * ((D1 @ Y) ** 2).sum(axis=1)).sum()),
        bound=Q * float(np.linalg.norm(Y, 2)) ** 2 * dP**2,
        ls_no_intercept=ls_value(X, labels, Y, False),
        ls_intercept=ls_value(X, labels, Y, True),
        ls_trace=trace_value(X, labels, Y),
        gap=gap,
        identity_regime=regime,
        max_output_error=cs.max_output_error(out, labels, Y),
    )


def metric_rule(X, means, Y):
    """Classify by ``argmin_j |Y^T (X^red)^+ (x - mean_j)|`` (section 7 metric rule).

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    means : ndarray, shape (Q, dim)
    Y : ndarray, shape (Q, out_dim)

    Returns
    -------
    ndarray of int, shape (n_samples,)
    """
    coords = np.linalg.lstsq(np.asarray(means, dtype=float).T, X.T, rcond=None)[0].T
    # (X^red)^+ mean_j = e_j, so the distance is |(coords - e_j) Y|.
    diff = (coords[:, None, :] - np.eye(len(means))[None]) @ Y
    return np.argmin((diff**2).sum(axis=2), axis=1)


def _check_inputs(X, labels, Y):
    X = np.asarray(X, dtype=float)
    labels = np.asarray(labels)
    Y = np.asarray(Y, dtype=float)
    if X.ndim != 2 or labels.shape != (X.shape[0],) or Y.ndim != 2:
        raise ValueError(
            f"expected X (N, M), labels (N,) and Y (Q, out), got {X.shape}, "
            f"{labels.shape} and {Y.shape}"
        )
    if Y.shape[0] > X.shape[1]:
        raise ValueError(
            f"the shallow construction needs Q <= M, got Q = {Y.shape[0]} classes "
            f"in dimension M = {X.shape[1]}"
        )
    return X, labels.astype(int), Y


def _check_orthogonal(R, dim):
    R = np.asarray(R, dtype=float)
    if R.shape != (dim, dim):
        raise ValueError(f"R must have shape ({dim}, {dim}), got {R.shape}")
    err = float(np.abs(R.T @ R - np.eye(dim)).max())
    if err > ORTHO_TOL:
        raise ValueError(
            f"R must be orthogonal: |R^T R - I| = {err:.3g}, expected <= {ORTHO_TOL}"
        )
    return R
