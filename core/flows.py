"""Gradient flows of network parameters, watched in output space.

Integrates ``theta'(s) = V(theta)`` for an MLP (see :mod:`dlmin.core.network`
for the conventions) and records what the flow does to the stacked outputs
``x = x(theta)``, shape ``(N*Q,)``, sample-major. With ``D = dx/dtheta``,
shape ``(N*Q, K)``, the neural tangent kernel ``G = D D^T``, shape
``(N*Q, N*Q)``, and ``g = grad_x C``, the vector fields are

- ``standard``:  ``V = -D^T g``, the gradient flow of ``C`` in theta;
- ``adapted``:   ``V = -D^T psi`` with ``G psi = g``, i.e. ``V = -D^+ g``;
  at full row rank ``z = x - y`` obeys ``z' = -z / N``;
- ``homotopy``:  ``V = -D^T [(1 - alpha) g + alpha psi]``, ``alpha`` in
  ``[0, 1]``, joining the two with the same zero set.

Costs: ``l2``, ``C = |x - y|^2 / (2N)``; ``ce``, the cross-entropy
``C = -(1/N) sum_n <y_n, log softmax(x_n)>`` with strictly positive labels.

The adapted part never forms ``D`` on the default ``"kernel"`` route: ``G``
comes from :func:`dlmin.core.network.ntk`, ``psi`` from a Cholesky solve,
and ``V`` from one backward pass. When ``G`` is numerically singular the
solve switches to an eigendecomposition that keeps eigenvalues above
``rank_cutoff * lambda_max``; the kept count (the rank of the projector
``P`` onto range ``D``) follows a hysteresis rule and changes only between
accepted steps. ``damping = lambda > 0`` solves ``(G + lambda I) psi = g``
instead (Levenberg-Marquardt) and has no rank decision. The ``"jacobian"``
route forms ``D`` and uses its SVD; it is the reference for tests.

Training as practitioners do it is ``solver="sgd"``: stochastic gradient
descent on mini-batches with momentum, for the standard cost only. Its time
is ``s = lr * steps``; with the full batch and no momentum it is exactly
the fixed-step ``"euler"`` solver (gradient descent).

Time ``s`` is the flow time; ``t = 1 - exp(-s / N)`` is the time in which the
full-rank adapted flow moves along the straight segment from ``x(0)`` to
``y``. Mathematics: ``shared/reference/flows.md`` sections 4-8, 10 and 12.

Limits. The undamped adapted flow is a singular ODE near rank loss: while
an eigenvalue of ``G`` sinks toward the cut-off (typical when ``K < QN``),
``|V|`` grows like ``|g| / sigma_min`` and explicit solvers crawl; damping
(1e-6 to 1e-3) or a larger ``rank_cutoff`` keeps such runs short. Below full
rank every evaluation does a full eigendecomposition of ``G``, ``O((QN)^3)``,
as does every record with ``spectrum=True``.
"""

from __future__ import annotations

import math
import numbers
import time as _time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.integrate
import scipy.linalg
import scipy.optimize
from scipy.linalg import lapack

from . import network as nw

__all__ = [
    "KINDS",
    "LOSSES",
    "SOLVERS",
    "GRIDS",
    "ROUTES",
    "FlowOptions",
    "FlowResult",
    "integrate",
    "velocity",
    "cost_and_gradient",
    "ce_minimizer",
    "check_options",
    "recording_times",
]

KINDS = ("standard", "adapted", "homotopy")
LOSSES = ("l2", "ce")
SOLVERS = ("RK45", "DOP853", "LSODA", "BDF", "Radau", "euler", "sgd")
GRIDS = ("linear", "log", "t")
ROUTES = ("kernel", "jacobian")

# Relative eigenvalue cut-off on G: lambda_k > RANK_CUTOFF * lambda_max
# counts. Its square root, 1e-6, is the matching singular-value cut-off on D;
# the kernel route cannot resolve much less since kappa(G) = kappa(D)^2.
RANK_CUTOFF = 1e-12
# Hysteresis: a dropped direction comes back only above this multiple of the
# cut-off, so an eigenvalue hovering at the cut-off does not make P chatter.
READMIT_FACTOR = 10.0
# theta is stored at recording times by default only up to this many
# parameters (101 records of 20 000 float64 are 16 MB).
STORE_THETA_MAX_PARAMS = 20_000
# Default s_max in units of N: the full-rank adapted flow divides C by e^20.
DEFAULT_TIME_PER_SAMPLE = 10.0
# First positive time of a logarithmic recording grid, relative to s_max.
LOG_GRID_FIRST = 1e-4
# Every flow here decreases C in exact arithmetic; growth by this factor
# over max(C(0), cost of the zero output) can only be numerical divergence.
BLOWUP_GROWTH = 1e12
# The solver stalled when STALL_WINDOW accepted steps in a row were all
# shorter than STALL_STEP_REL * s_max: at that pace s_max needs 1e9 steps.
STALL_STEP_REL = 1e-9
STALL_WINDOW = 50
# Euler takes ceil(s_max / step) steps; the slack keeps a ratio that is an
# integer up to rounding (10.000000000000002) from adding a step.
STEP_COUNT_SLACK = 1e-9
# SciPy's solvers cannot honour a relative tolerance below 100 epsilons.
RTOL_MIN = 100 * np.finfo(float).eps

# Floating-point trouble inside an evaluation is a blow-up, not a warning.
_STRICT_FP = {"over": "raise", "divide": "raise", "invalid": "raise", "under": "ignore"}
_DAMPING_HINT = "add damping, e.g. 'flow.damping: 1e-6'"


# --------------------------------------------------------------------------
# Options and result
# --------------------------------------------------------------------------


@dataclass
class FlowOptions:
    """What to integrate, how, what to record and when to stop.

    Attributes
    ----------
    kind : {"standard", "adapted", "homotopy"}
    alpha : float
        Homotopy parameter in ``[0, 1]``; used only by ``kind="homotopy"``.
    loss : {"l2", "ce"}
    time : float or None
        ``s_max``; ``None`` means ``DEFAULT_TIME_PER_SAMPLE * N``.
    solver : {"auto", "RK45", "DOP853", "LSODA", "BDF", "Radau", "euler"}
        ``"auto"`` is DOP853 for flows with an adapted part, RK45 for the
        standard flow. LSODA, BDF and Radau estimate the Jacobian of ``V``
        by finite differences (``K`` evaluations each): fine for ``K`` up to
        a few hundred. ``"euler"`` is gradient descent with learning rate
        ``step`` (for the standard flow). ``"sgd"`` is stochastic gradient
        descent with ``lr``, ``batch``, ``momentum`` and ``epochs`` (standard
        flow only; ``time`` and ``step`` do not apply).
    rtol, atol : float
        Tolerances of the adaptive solvers, on theta.
    step : float or None
        Fixed step of ``"euler"`` (required there).
    max_step : float
        Largest step of the adaptive solvers.
    record : int
        Number of recording times, at least 2 (``0`` and ``s_max``).
    grid : {"linear", "log", "t"}
        Recording times uniform in ``s``, logarithmic in ``s`` (after
        ``s = 0``, from ``LOG_GRID_FIRST * s_max``), or uniform in
        ``t = 1 - exp(-s / N)``.
    damping : float
        Levenberg-Marquardt ``lambda >= 0`` (absolute, in units of ``G``).
    rank_cutoff : float
        Relative eigenvalue cut-off ``r_lo`` on ``G``, in ``(0, 0.1)``;
        directions are readmitted above ``READMIT_FACTOR * r_lo``.
    stop_cost : float or None
        Stop as soon as ``C <= stop_cost``.
    wall_limit : float or None
        Stop after this many seconds (checked between steps).
    store_theta : bool or None
        Record theta; ``None``: only when ``K <= STORE_THETA_MAX_PARAMS``.
    route : {"kernel", "jacobian"}
        How the adapted part is computed (see the module docstring).
    spectrum : bool
        Record the extreme NTK eigenvalues and numerical rank (one kernel
        and one symmetric eigenvalue problem per record). When off they are
        NaN and the rank is -1.
    lr : float or None
        Learning rate of ``"sgd"`` (required there).
    batch : int or None
        Mini-batch size of ``"sgd"``; ``None`` (or ``>= N``) is the full
        batch in the data's order. Smaller batches are drawn by a fresh
        permutation of the samples every epoch; the last batch of an epoch
        may be smaller. A batch's cost is the cost of its samples alone
        (mean over the batch), an unbiased estimate of ``C``.
    momentum : float
        Heavy-ball momentum ``mu`` in ``[0, 1)``: ``v <- mu v + grad``,
        ``theta <- theta - lr v`` (the velocity starts at 0).
    nesterov : bool
        Nesterov's form: ``theta <- theta - lr (grad + mu v)``.
    epochs : int
        Passes over the data of ``"sgd"``; ``s_max = lr * epochs *
        ceil(N / batch)``. Cost, stop and blow-up checks, and records, are
        made at the ends of epochs on the full data.
    """

    kind: str = "adapted"
    alpha: float = 0.5
    loss: str = "l2"
    time: float | None = None
    solver: str = "auto"
    rtol: float = 1e-8
    atol: float = 1e-10
    step: float | None = None
    max_step: float = math.inf
    record: int = 101
    grid: str = "linear"
    damping: float = 0.0
    rank_cutoff: float = RANK_CUTOFF
    stop_cost: float | None = None
    wall_limit: float | None = None
    store_theta: bool | None = None
    route: str = "kernel"
    spectrum: bool = True
    lr: float | None = None
    batch: int | None = None
    momentum: float = 0.0
    nesterov: bool = False
    epochs: int = 100


@dataclass
class FlowResult:
    """Outcome of :func:`integrate`: status, counters, summary and records.

    Attributes
    ----------
    status : {"ok", "failed"}
    stop_reason : {"time", "cost", "wall", "blowup", "stalled"}
    message : str
        What happened, and for failures what to change.
    s_final : float
    steps : int
        Accepted steps.
    rhs_evaluations : int
        Evaluations of the vector field requested by the solver.
    cost_initial, cost_final : float
    min_ntk_eigenvalue : float or None
        Smallest NTK eigenvalue over the records (None without spectrum).
    exp_rel_error, line_rel_error : float or None
        Largest recorded ``exp_rel_error`` and ``line_rel_error`` for the
        adapted flow (``kind="adapted"`` or homotopy with ``alpha = 1``)
        under the L2 cost; None otherwise.
    K, QN : int
        Parameter count and number of stacked outputs.
    parametrization : {"over", "under"}
        ``"over"`` when ``K >= QN`` (full row rank of ``D`` is possible).
    params : list of (W, b) pairs
        Parameters at ``s_final``.
    records : dict of str to ndarray
        One entry per record key (see :func:`integrate`), stacked over the
        ``R`` records: scalars shape ``(R,)``, ``x`` shape ``(R, N*Q)``,
        ``theta`` shape ``(R, K)``.
    rank_changes : int
        Accepted-step changes of the projector rank.
    wall_time : float
        Seconds spent in :func:`integrate`.
    options : FlowOptions
        The options with defaults resolved (solver, time, store_theta).
    """

    status: str
    stop_reason: str
    message: str
    s_final: float
    steps: int
    rhs_evaluations: int
    cost_initial: float
    cost_final: float
    min_ntk_eigenvalue: float | None
    exp_rel_error: float | None
    line_rel_error: float | None
    K: int
    QN: int
    parametrization: str
    params: list
    records: dict = field(default_factory=dict)
    rank_changes: int = 0
    wall_time: float = 0.0
    options: FlowOptions | None = None


# --------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------


def cost_and_gradient(x, Y, loss="l2"):
    """Cost ``C[x]`` and its output gradient ``g = grad_x C``.

    ``l2``: ``C = |x - y|^2 / (2N)``, ``g = (x - y) / N``. ``ce``:
    ``C = -(1/N) sum_n <y_n, log softmax(x_n)>`` and
    ``g_n = (|y_n|_1 softmax(x_n) - y_n) / N``, by log-sum-exp.

    Parameters
    ----------
    x : array_like, shape (n_samples, n_outputs)
        Network outputs (logits for ``ce``), samples as rows.
    Y : array_like, shape (n_samples, n_outputs)
        Targets; strictly positive for ``ce``.
    loss : {"l2", "ce"}

    Returns
    -------
    cost : float
    g : ndarray, shape (n_samples, n_outputs)
    """
    x = np.asarray(x, dtype=np.float64)
    Y = _check_targets(Y, x.shape, loss)
    return _loss(x, Y, loss)


def ce_minimizer(x0, Y):
    """Minimizer of the cross-entropy on the fiber through ``x0``.

    Row sums of the logits are conserved by the full-rank adapted flow, and
    on each fiber ``sum_q x_nq = const`` the unique minimizer is
    ``x_n* = log y_n + (1/Q)(sum_q x0_nq - sum_q log y_nq) u``.

    Parameters
    ----------
    x0 : array_like, shape (n_samples, n_outputs)
    Y : array_like, shape (n_samples, n_outputs)
        Strictly positive labels.

    Returns
    -------
    ndarray, shape (n_samples, n_outputs)
    """
    x0 = np.asarray(x0, dtype=np.float64)
    Y = _check_targets(Y, x0.shape, "ce")
    return _ce_minimizer(x0, Y)


def _loss(x, Y, loss):
    """Cost and gradient for trusted (N, Q) arrays."""
    n_samples = x.shape[0]
    if loss == "l2":
        z = x - Y
        return float(np.vdot(z, z)) / (2 * n_samples), z / n_samples
    shifted = x - x.max(axis=1, keepdims=True)
    expo = np.exp(shifted)
    total = expo.sum(axis=1, keepdims=True)
    log_softmax = shifted - np.log(total)
    cost = -float(np.vdot(Y, log_softmax)) / n_samples
    mass = Y.sum(axis=1, keepdims=True)
    return cost, (mass * (expo / total) - Y) / n_samples


def _ce_minimizer(x0, Y):
    log_y = np.log(Y)
    shift = (x0.sum(axis=1) - log_y.sum(axis=1)) / Y.shape[1]
    return log_y + shift[:, None]


def _check_targets(Y, shape, loss):
    """Return Y as float64 of the given shape; ce labels must be > 0."""
    Y = np.asarray(Y, dtype=np.float64)
    if Y.shape != tuple(shape):
        raise ValueError(
            f"Y: expected per-sample targets of shape {tuple(shape)} "
            f"(n_samples, n_outputs), got {Y.shape}"
        )
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y: targets must be finite")
    if loss == "ce" and not np.all(Y > 0):
        n, q = np.unravel_index(np.argmin(Y), Y.shape)
        raise ValueError(
            "Y: the cross-entropy flow needs strictly positive labels, found "
            f"{Y[n, q]!r} at sample {n}, output {q}; one-hot labels have no "
            "finite minimizer, smooth them, e.g. "
            "Y = (1 - eps) * onehot + eps / Q"
        )
    return Y


# --------------------------------------------------------------------------
# Problem set-up and option checks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """Data of one flow: inputs, targets and the network shape."""

    X: np.ndarray  # (N, M)
    Y: np.ndarray  # (N, Q)
    widths: list
    activation: str
    loss: str

    @property
    def N(self):
        return self.X.shape[0]

    @property
    def Q(self):
        return self.widths[-1]

    @property
    def QN(self):
        return self.X.shape[0] * self.widths[-1]

    @property
    def K(self):
        return nw.param_count(self.widths)


def _prepare_problem(params, X, Y, loss, activation):
    """Check the public arguments; return the problem and theta(0)."""
    if loss not in LOSSES:
        raise ValueError(f"flow.loss: expected one of {LOSSES}, got {loss!r}")
    widths = nw.widths_of(params)
    theta0 = nw.flatten(params)
    if not np.all(np.isfinite(theta0)):
        raise ValueError("params: the initial parameters are not all finite")
    cache = nw.forward_cache(params, X, activation)
    X = np.asarray(X, dtype=np.float64)
    Y = _check_targets(Y, cache.output.shape, loss)
    return _Problem(X, Y, widths, activation, loss), theta0


def recording_times(options, n_samples):
    """Recording times ``s_k`` of a flow, shape ``(options.record,)``.

    Parameters
    ----------
    options : FlowOptions
    n_samples : int
        ``N``; sets the default ``s_max`` and the ``t`` grid.

    Returns
    -------
    ndarray, shape (n_records,)
        Increasing, from 0 to ``s_max``.
    """
    s_max = _s_max(options, n_samples)
    count = options.record
    if options.grid == "linear":
        return np.linspace(0.0, s_max, count)
    if options.grid == "log":
        tail = np.geomspace(LOG_GRID_FIRST * s_max, s_max, count - 1)
        return np.concatenate([[0.0], tail])
    t_max = -math.expm1(-s_max / n_samples)
    times = -n_samples * np.log1p(-np.linspace(0.0, t_max, count))
    times[-1] = s_max
    return times


def _s_max(options, n_samples):
    if options.solver == "sgd":
        return options.lr * options.epochs * _batches_per_epoch(options, n_samples)
    if options.time is None:
        return DEFAULT_TIME_PER_SAMPLE * n_samples
    return float(options.time)


def _batch_size(options, n_samples):
    """Samples per SGD step: the batch, at most N (None: all of them)."""
    if options.batch is None:
        return n_samples
    return min(int(options.batch), n_samples)


def _batches_per_epoch(options, n_samples):
    return -(-n_samples // _batch_size(options, n_samples))


def _resolve_options(options, problem):
    """Check every option; return a copy with the defaults filled in."""
    check_options(options)
    solver = options.solver
    if solver == "auto":
        solver = "RK45" if options.kind == "standard" else "DOP853"
    store = options.store_theta
    if store is None:
        store = problem.K <= STORE_THETA_MAX_PARAMS
    return replace(
        options, solver=solver, store_theta=bool(store), time=_s_max(options, problem.N)
    )


def check_options(options):
    """Check a FlowOptions as :func:`integrate` would, before any data.

    Raises
    ------
    ValueError
        Naming the option (``flow.<name>``), what it is and what is allowed.
    """
    if not isinstance(options, FlowOptions):
        raise ValueError(
            f"options: expected a FlowOptions, got {type(options).__name__}"
        )
    _check_choices(options)
    _check_numbers(options)


def _check_choices(options):
    choices = {
        "kind": KINDS,
        "loss": LOSSES,
        "solver": SOLVERS + ("auto",),
        "grid": GRIDS,
        "route": ROUTES,
    }
    for name, allowed in choices.items():
        value = getattr(options, name)
        if value not in allowed:
            raise ValueError(f"flow.{name}: expected one of {allowed}, got {value!r}")
    if options.store_theta not in (None, True, False):
        raise ValueError(
            "flow.store_theta: expected true, false or null (auto), got "
            f"{options.store_theta!r}"
        )


def _check_numbers(options):
    """Numeric options: finite, in range, with the fix in the message."""
    _require(options.alpha, "alpha", 0.0 <= options.alpha <= 1.0, "a number in [0, 1]")
    if options.time is not None:
        _require(options.time, "time", options.time > 0, "a number > 0 (s_max)")
    _require(
        options.rtol,
        "rtol",
        RTOL_MIN <= options.rtol < 1,
        f"a number in [{RTOL_MIN:.1e}, 1)",
    )
    _require(options.atol, "atol", options.atol > 0, "a number > 0")
    if not (options.max_step > 0):
        raise ValueError(f"flow.max_step: expected > 0, got {options.max_step!r}")
    _require(options.damping, "damping", options.damping >= 0, "a number >= 0")
    _require(
        options.rank_cutoff,
        "rank_cutoff",
        0 < options.rank_cutoff < 1 / READMIT_FACTOR,
        f"a number in (0, {1 / READMIT_FACTOR:g}), e.g. {RANK_CUTOFF:g}",
    )
    record = options.record
    if (
        isinstance(record, bool)
        or not isinstance(record, numbers.Integral)
        or record < 2
    ):
        raise ValueError(f"flow.record: expected an int >= 2, got {options.record!r}")
    _check_stops(options)


def _check_sgd(options):
    """The options of ``solver="sgd"``, and the flow options it excludes."""
    if options.kind != "standard":
        raise ValueError(
            f"flow.kind: the sgd solver trains the cost's gradient, so it needs "
            f"kind 'standard', got {options.kind!r}; use an ODE solver for "
            "adapted and homotopy flows"
        )
    for name, what in (("time", "epochs"), ("step", "lr")):
        if getattr(options, name) is not None:
            raise ValueError(
                f"flow.{name}: does not apply to the sgd solver, which runs "
                f"for flow.{what}; remove flow.{name}"
            )
    if options.lr is None:
        raise ValueError(
            "flow.lr: the sgd solver needs a learning rate, e.g. 'flow.lr: 0.05'"
        )
    _require(options.lr, "lr", options.lr > 0, "a number > 0")
    _require(
        options.momentum, "momentum", 0 <= options.momentum < 1, "a number in [0, 1)"
    )
    for name, low in (("batch", 1), ("epochs", 1)):
        value = getattr(options, name)
        if name == "batch" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"flow.{name}: expected an int >= {low}, got {value!r}")
        if value < low:
            raise ValueError(f"flow.{name}: expected an int >= {low}, got {value!r}")


def _check_stops(options):
    if options.solver == "sgd":
        _check_sgd(options)
    if options.solver == "euler" and options.step is None:
        raise ValueError(
            "flow.step: the euler solver needs a fixed step (the learning "
            "rate), e.g. 'flow.step: 0.01'"
        )
    if options.step is not None:
        _require(options.step, "step", options.step > 0, "a number > 0")
    if options.stop_cost is not None:
        _require(
            options.stop_cost,
            "stop_cost",
            options.stop_cost >= 0,
            "a number >= 0 or null",
        )
    if options.wall_limit is not None:
        _require(
            options.wall_limit,
            "wall_limit",
            options.wall_limit > 0,
            "seconds > 0 or null",
        )


def _require(value, name, ok, expected):
    try:
        finite = math.isfinite(value)
    except TypeError:
        finite = False
    if not (finite and ok):
        raise ValueError(f"flow.{name}: expected {expected}, got {value!r}")


def _effective_alpha(options):
    """Weight of the adapted part: 0 standard, 1 adapted, alpha homotopy."""
    return {"standard": 0.0, "adapted": 1.0}.get(options.kind, options.alpha)


# --------------------------------------------------------------------------
# Linear algebra helpers
# --------------------------------------------------------------------------


def _pullback(params, cache, c):
    """``D^T c`` from a forward cache: one backward pass, shape (K,).

    ``c`` is the stacked output cotangent, shape (N*Q,). Same result as
    :func:`dlmin.core.network.vjp`, without a second forward pass.
    """
    n_samples = cache.inputs[0].shape[0]
    delta = c.reshape(n_samples, -1)
    pieces = []
    for layer in range(len(params) - 1, -1, -1):
        pieces.append(delta.sum(axis=0))
        pieces.append((delta.T @ cache.inputs[layer]).ravel())
        if layer > 0:
            delta = (delta @ params[layer][0]) * cache.slopes[layer - 1]
    return np.concatenate(pieces[::-1])


def _hysteresis_rank(mu, rank, lo, hi):
    """Numerical rank from relative eigenvalues with hysteresis.

    A kept direction is dropped when its relative eigenvalue falls to
    ``lo`` or below; a dropped one is readmitted above ``hi``. With the
    eigenvalues sorted, the new rank is the old one clipped to
    ``[#(mu > hi), #(mu > lo)]``.

    Parameters
    ----------
    mu : ndarray, shape (n,)
        Eigenvalues over the largest one, any order.
    rank : int
        Current rank (``n`` at the first decision: then ``#(mu > lo)``).
    lo, hi : float
        Drop and readmission thresholds, ``lo < hi``.
    """
    keep = int(np.count_nonzero(mu > lo))
    readmit = int(np.count_nonzero(mu > hi))
    return min(max(rank, readmit), keep)


def _relative(w):
    """Eigenvalues over the largest one; all zero for a zero matrix."""
    top = float(np.max(w)) if w.size else 0.0
    return w / top if top > 0 else np.zeros_like(w)


# --------------------------------------------------------------------------
# The vector field
# --------------------------------------------------------------------------


class _State:
    """Everything evaluated at one theta, filled lazily.

    ``x`` and ``g`` have shape (N*Q,). ``G`` is the kernel until a Cholesky
    factorization consumes it; ``chol`` is ``(c, lower)`` for SciPy's
    ``cho_solve``; ``eig`` is ``(w, V)`` ascending, ``eig_full`` tells
    whether it is the whole spectrum; ``svd`` is ``(U, sigma, Vt)`` of D.
    """

    def __init__(self, problem, theta):
        self.theta = theta.copy()
        self.params = nw.unflatten(theta, problem.widths)
        self.cache = nw.forward_cache(self.params, problem.X, problem.activation)
        self.cost, g = _loss(self.cache.output, problem.Y, problem.loss)
        self.x = self.cache.output.ravel()
        self.g = g.ravel()
        self.G = None
        self.chol = None
        self.chol_failed = False
        self.rcond = math.nan
        self.eig = None
        self.eig_full = False
        self.svd = None
        self.D = None


class _Field:
    """Vector field ``V(theta)`` of one flow, with its rank state.

    ``rank`` is the number of kernel directions the adapted part inverts;
    it changes only in :meth:`accept`, called between accepted steps.
    ``calls`` counts evaluations requested by the solver.
    """

    def __init__(self, problem, options):
        self.problem = problem
        self.options = options
        self.alpha = _effective_alpha(options)
        self.projects = self.alpha > 0
        self.decides_rank = self.projects and options.damping == 0
        self.lo = options.rank_cutoff
        self.hi = READMIT_FACTOR * options.rank_cutoff
        self.rank = (
            problem.QN if options.route == "kernel" else min(problem.QN, problem.K)
        )
        self.calls = 0
        self.rank_changes = 0
        self._memo = None
        self._pinned = None

    # ---- evaluation ------------------------------------------------------

    def peek(self, theta):
        """State at theta: a kept one when it matches, else a fresh one."""
        for kept in (self._memo, self._pinned):
            if kept is not None and np.array_equal(kept.theta, theta):
                return kept
        return _State(self.problem, theta)

    def pin(self, theta):
        """State at an accepted theta, kept while dense output evaluates."""
        self._pinned = self.state(theta)
        return self._pinned

    def state(self, theta):
        """State at theta, kept as the memo for the next call."""
        self._memo = self.peek(theta)
        return self._memo

    def __call__(self, s, theta):
        """``V(theta)``, shape (K,); the signature SciPy's solvers expect."""
        self.calls += 1
        if not np.all(np.isfinite(theta)):
            raise _BlowUp("the parameters became non-finite")
        return self.velocity(self.state(theta))

    def velocity(self, st):
        if self.options.route == "jacobian":
            return self._velocity_d(st)
        c = st.g
        if self.projects:
            c = (1.0 - self.alpha) * st.g + self.alpha * self._psi(st)
        return -_pullback(st.params, st.cache, c)

    def gradient(self, st):
        """``grad_theta C = D^T g``, shape (K,)."""
        if self.options.route == "jacobian":
            return self._jacobian(st).T @ st.g
        return _pullback(st.params, st.cache, st.g)

    # ---- kernel route ----------------------------------------------------

    def kernel(self, st):
        """``G`` at the state (rebuilt if a factorization consumed it)."""
        if st.G is None:
            p = self.problem
            st.G = nw.ntk(st.params, p.X, p.activation)
        return st.G

    def _psi(self, st):
        """``psi`` with ``G psi = g`` (damped, or on the kept directions)."""
        if self.options.damping > 0 or self.rank == self.problem.QN:
            self._factor(st)
            if st.chol is not None:
                return scipy.linalg.cho_solve(st.chol, st.g, check_finite=False)
        w, V = self._top_eigen(st, self.rank)
        w = w + self.options.damping
        floor = self.lo * (float(w[-1]) if w.size else 0.0)
        return V @ ((V.T @ st.g) / np.maximum(w, floor))

    def _factor(self, st):
        """Cholesky of ``G + lambda I`` in place, with a condition estimate.

        The estimate uses ``trace(G) >= lambda_max`` for the norm, so it is
        conservative (small) for the rank screen in :meth:`accept`.
        """
        if st.chol is not None or st.chol_failed:
            return
        G = self.kernel(st)
        if self.options.damping > 0:
            G[np.diag_indices_from(G)] += self.options.damping
        bound = float(np.trace(G))
        st.G = None
        try:
            c, lower = scipy.linalg.cho_factor(
                G.T, lower=True, overwrite_a=True, check_finite=False
            )
        except np.linalg.LinAlgError:
            st.chol_failed = True
            return
        st.chol = (c, lower)
        st.rcond, _ = lapack.dpocon(c, bound, uplo="L")

    def _top_eigen(self, st, count):
        """The ``count`` largest eigenpairs of G, ascending.

        The whole spectrum is computed (and kept on the state), since the
        rank decision at an accepted state needs it anyway.
        """
        w, V = self._full_eigen(st)
        first = len(w) - count
        return w[first:], V[:, first:]

    def _full_eigen(self, st):
        if not st.eig_full:
            G = self.kernel(st)
            st.G = None
            st.eig = scipy.linalg.eigh(G, overwrite_a=True, check_finite=False)
            st.eig_full = True
        return st.eig

    # ---- jacobian route --------------------------------------------------

    def _jacobian(self, st):
        if st.D is None:
            p = self.problem
            st.D = nw.jacobian(st.params, p.X, p.activation)
        return st.D

    def _svd(self, st):
        if st.svd is None:
            st.svd = scipy.linalg.svd(
                self._jacobian(st),
                full_matrices=False,
                check_finite=False,
                lapack_driver="gesvd",
            )
        return st.svd

    def _velocity_d(self, st):
        """``V`` from the explicit ``D``: ``-(1-a) D^T g - a D^+ g`` by SVD."""
        v = np.zeros(self.problem.K)
        if self.alpha < 1:
            v -= (1.0 - self.alpha) * (self._jacobian(st).T @ st.g)
        if self.projects:
            U, sigma, Vt = self._svd(st)
            if self.options.damping > 0:
                coef = sigma / (sigma**2 + self.options.damping)
            else:
                r = self.rank
                U, sigma, Vt = U[:, :r], sigma[:r], Vt[:r]
                floor = math.sqrt(self.lo) * (sigma[0] if r else 0.0)
                coef = 1.0 / np.maximum(sigma, floor)
            v -= self.alpha * (Vt.T @ (coef * (U.T @ st.g)))
        return v

    # ---- spectrum and rank -----------------------------------------------

    def spectrum(self, st):
        """All QN eigenvalues of G, ascending (zeros padded on route D)."""
        if self.options.route == "jacobian":
            sigma = self._svd(st)[1]
            w = np.zeros(self.problem.QN)
            w[self.problem.QN - sigma.size :] = np.sort(sigma**2)
            return w
        if st.eig_full:
            return st.eig[0]
        return scipy.linalg.eigh(
            self.kernel(st).copy(),
            eigvals_only=True,
            overwrite_a=True,
            check_finite=False,
        )

    def accept(self, theta):
        """Rank decision at an accepted state; True when the rank changed.

        On the kernel route a full rank is confirmed without an
        eigendecomposition when the Cholesky condition estimate exceeds the
        readmission threshold; otherwise the spectrum decides.
        """
        if not self.decides_rank:
            return False
        st = self.state(theta)
        if self.options.route == "jacobian":
            mu = _relative(self._svd(st)[1] ** 2)
        elif self._screen_full(st):
            return self._set_rank(self.problem.QN)
        else:
            mu = _relative(self._full_eigen(st)[0])
        return self._set_rank(_hysteresis_rank(mu, self.rank, self.lo, self.hi))

    def _screen_full(self, st):
        if self.rank != self.problem.QN:
            return False
        self._factor(st)
        return st.chol is not None and st.rcond > self.hi

    def _set_rank(self, rank):
        changed = rank != self.rank
        self.rank = rank
        self.rank_changes += int(changed)
        return changed

    def projector_rank(self):
        """Directions the adapted part inverts (all of them when damped)."""
        return self.problem.QN if self.options.damping > 0 else self.rank


class _BlowUp(ArithmeticError):
    """The state or the vector field became non-finite."""


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass
class _Baseline:
    """What every record compares with: the start and the target."""

    x0: np.ndarray  # (N*Q,)
    y: np.ndarray  # (N*Q,)
    cost0: float
    x_star: np.ndarray | None  # (N*Q,), cross-entropy only
    row_sums0: np.ndarray | None  # (N,), cross-entropy only
    growth_base: float = 0.0  # the cost BLOWUP_GROWTH multiplies


def _baseline(problem, st):
    x_star = row_sums0 = None
    if problem.loss == "ce":
        x0 = st.cache.output
        x_star = _ce_minimizer(x0, problem.Y).ravel()
        row_sums0 = x0.sum(axis=1)
    # At a zero-cost start (a minimizer) growth over C(0) means nothing: the
    # cost of the zero output, |y|^2 / (2N) (1 for cross-entropy), is the
    # floor of the scale a blow-up is measured against.
    if problem.loss == "ce":
        floor = 1.0
    else:
        floor = float(np.vdot(problem.Y, problem.Y)) / (2 * problem.N)
    base = _Baseline(st.x.copy(), problem.Y.ravel(), st.cost, x_star, row_sums0)
    base.growth_base = max(st.cost, floor)
    return base


def _measure(fld, s, theta, base):
    """One record at ``(s, theta)``: a dict of numpy scalars and arrays."""
    p, o = fld.problem, fld.options
    st = fld.peek(theta)
    grad_norm = float(np.linalg.norm(fld.gradient(st)))
    g_norm = float(np.linalg.norm(st.g))
    rec = {
        "s": np.float64(s),
        "t": np.float64(-math.expm1(-s / p.N)),
        "cost": np.float64(st.cost),
        "x": st.x.copy(),
    }
    if o.store_theta:
        rec["theta"] = np.array(theta, dtype=np.float64)
    rec["grad_norm"] = np.float64(grad_norm)
    rec["ratio"] = np.float64(grad_norm / g_norm if g_norm > 0 else math.nan)
    rec.update(_spectrum_record(fld, st))
    if fld.projects:
        rec["projector_rank"] = np.int64(fld.projector_rank())
    if p.loss == "l2":
        rec.update(_line_record(s, st, base, p.N))
    else:
        rec.update(_ce_record(st, base, p.N))
    return rec


def _spectrum_record(fld, st):
    if not fld.options.spectrum:
        return {
            "ntk_min": np.float64(math.nan),
            "ntk_max": np.float64(math.nan),
            "ntk_rank": np.int64(-1),
        }
    w = fld.spectrum(st)
    rank = np.count_nonzero(_relative(w) > fld.options.rank_cutoff)
    return {
        "ntk_min": np.float64(w[0]),
        "ntk_max": np.float64(w[-1]),
        "ntk_rank": np.int64(rank),
    }


def _line_record(s, st, base, n_samples):
    """Deviations from ``C0 exp(-2s/N)`` and from the segment x(0) -> y."""
    if base.cost0 > 0 and st.cost > 0:
        log_ratio = math.log(st.cost) - math.log(base.cost0)
        exponent = log_ratio + 2.0 * s / n_samples
        exp_err = abs(math.expm1(exponent)) if exponent < 700 else math.inf
    else:
        exp_err = math.nan if base.cost0 == 0 else 1.0
    span = float(np.linalg.norm(base.x0 - base.y))
    t = -math.expm1(-s / n_samples)
    line = base.x0 + t * (base.y - base.x0)
    dist = float(np.linalg.norm(st.x - line))
    line_err = dist / span if span > 0 else math.nan
    return {
        "exp_rel_error": np.float64(exp_err),
        "line_rel_error": np.float64(line_err),
    }


def _ce_record(st, base, n_samples):
    """Drift of each sample's logit sum, and the distance to ``x*``."""
    sums = st.x.reshape(n_samples, -1).sum(axis=1)
    drift = float(np.max(np.abs(sums - base.row_sums0)))
    return {
        "row_sum_drift": np.float64(drift),
        "minimizer_distance": np.float64(np.linalg.norm(st.x - base.x_star)),
    }


class _Recorder:
    """Walks the recording grid, measures, calls back and keeps the rows."""

    def __init__(self, fld, grid, base, on_record):
        self.fld = fld
        self.grid = grid
        self.base = base
        self.on_record = on_record
        self.next = 0
        self.rows = []
        self.extra = {}

    @property
    def last_s(self):
        return float(self.rows[-1]["s"]) if self.rows else None

    def due(self, limit, inclusive=True):
        """Grid times up to ``limit`` not yet recorded; marks them taken."""
        stop = np.searchsorted(self.grid, limit, side="right" if inclusive else "left")
        times = self.grid[self.next : stop]
        self.next = max(self.next, int(stop))
        return times

    def take(self, s, theta):
        with np.errstate(**_STRICT_FP):
            rec = _measure(self.fld, float(s), theta, self.base)
        rec.update(self.extra)
        self.rows.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def arrays(self):
        if not self.rows:
            return {}
        return {key: np.array([row[key] for row in self.rows]) for key in self.rows[0]}


# --------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------


@dataclass
class _Stop:
    """Why and where a run ended."""

    reason: str
    s: float
    theta: np.ndarray
    detail: str = ""


class _Run:
    """Shared state of one integration: field, recorder, clock, counters."""

    def __init__(self, fld, options, recorder, progress):
        self.fld = fld
        self.options = options
        self.recorder = recorder
        self.progress = progress
        self.start = _time.perf_counter()
        self.steps = 0
        self.s_max = float(options.time)
        self.short_steps = 0
        self.on_step = None

    def stalled(self, step_size):
        """True after STALL_WINDOW consecutive negligible steps."""
        if step_size < STALL_STEP_REL * self.s_max:
            self.short_steps += 1
        else:
            self.short_steps = 0
        return self.short_steps >= STALL_WINDOW

    def elapsed(self):
        return _time.perf_counter() - self.start

    def out_of_time(self):
        limit = self.options.wall_limit
        return limit is not None and self.elapsed() >= limit

    def reached_cost(self, cost):
        target = self.options.stop_cost
        return target is not None and cost <= target

    def diverged(self, st):
        """Non-finite or exploding cost (every flow here decreases C)."""
        base = self.recorder.base
        if not math.isfinite(st.cost) or not np.all(np.isfinite(st.x)):
            return "the outputs became non-finite"
        if base.growth_base > 0 and st.cost > BLOWUP_GROWTH * base.growth_base:
            return f"the cost grew from {base.cost0:.3e} to {st.cost:.3e}"
        return None

    def report(self, s):
        if self.progress is not None:
            self.progress(float(s), self.s_max)


def integrate(
    params,
    X,
    Y,
    options=None,
    activation="tanh",
    on_record=None,
    progress=None,
    on_step=None,
    seed=None,
):
    """Integrate a gradient flow of the parameters and record its orbit.

    Solves ``theta'(s) = V(theta)`` (kinds in the module docstring) from
    ``theta(0) = flatten(params)`` until ``s_max``, ``C <= stop_cost`` or
    ``wall_limit`` seconds, whichever comes first. Adaptive solvers are
    SciPy ``OdeSolver`` classes driven step by step; records inside a step
    come from its dense output, and a cost stop is located in the step by
    Brent's method. ``euler`` keeps the step fixed (gradient descent) and
    records each grid time at the nearest step, with that step's ``s``;
    grid times sharing a step give one record, and ``s_final`` is
    ``ceil(s_max / step) * step``. A change of the projector rank restarts
    the solver from the accepted state, so no step mixes two fields.
    ``sgd`` steps on mini-batches (``s`` grows by ``lr`` per step) and
    records the grid times at the nearest epoch end, like ``euler`` with
    one step per epoch; its records add ``epoch`` (steps over steps per
    epoch). Its cost stop and blow-up checks are made at epoch ends.

    Records (dict of numpy values, also collected in ``result.records``):
    ``s``, ``t`` (``1 - exp(-s/N)``), ``cost``, ``x`` (N*Q,), ``theta``
    (K,, only when stored), ``grad_norm`` (``|D^T g|``), ``ratio``
    (``|D^T g| / |g|``), ``ntk_min``, ``ntk_max``, ``ntk_rank`` (count of
    eigenvalues above ``rank_cutoff * ntk_max``); ``projector_rank`` when the
    flow has an adapted part; for ``l2`` ``exp_rel_error``
    (``|C(s) e^(2s/N) / C(0) - 1|``) and ``line_rel_error``
    (``|x - ((1-t) x(0) + t y)| / |x(0) - y|``), for every kind so that
    flows can be compared (the result summarizes them for the adapted
    flow only); for ``ce``
    ``row_sum_drift`` (max over samples of the change of ``sum_q x_nq``) and
    ``minimizer_distance`` (``|x - x*|``, see :func:`ce_minimizer`).

    Parameters
    ----------
    params : sequence of (W, b) pairs
        Initial parameters.
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
        Per-sample targets; strictly positive for ``loss="ce"``.
    options : FlowOptions, optional
    activation : {"tanh", "softplus", "relu"}
        ReLU makes every field discontinuous; prefer smooth activations.
    on_record : callable, optional
        ``on_record(rec)`` at every recording time, in order.
    progress : callable, optional
        ``progress(s, s_max)`` after every accepted step.
    on_step : callable, optional
        ``on_step(dense, s_old, s_new)`` once per accepted step that is part
        of the orbit, in order, with ``s_new > s_old``; ``dense(s)`` returns
        theta at ``s`` in ``[s_old, s_new]``, shape (K,). It is the solver's
        dense output (``euler``: the straight line between the two states);
        ``s_new`` is the cost-stop time inside the last step. Chaining the
        pieces gives theta(s) on ``[0, s_final]`` (dense output of a run).
    seed : int, numpy.random.Generator or None
        Stream of the ``"sgd"`` mini-batch permutations (None: seed 0).

    Returns
    -------
    FlowResult
        ``status="failed"`` (reason ``blowup`` or ``stalled``) when the state
        became non-finite, the cost exploded or the step size collapsed;
        the message says what to change. KeyboardInterrupt propagates.

    Raises
    ------
    ValueError
        If an argument or option is invalid (the message names it).
    """
    options = FlowOptions() if options is None else options
    problem, theta0 = _prepare_problem(params, X, Y, options.loss, activation)
    options = _resolve_options(options, problem)
    fld = _Field(problem, options)
    with np.errstate(**_STRICT_FP):
        fld.accept(theta0)
        fld.rank_changes = 0
        base = _baseline(problem, fld.state(theta0))
    grid = recording_times(options, problem.N)
    run = _Run(fld, options, _Recorder(fld, grid, base, on_record), progress)
    run.on_step = on_step
    run.rng = np.random.default_rng(0 if seed is None else seed)
    if options.solver == "sgd":
        run.recorder.extra["epoch"] = np.float64(0.0)
    stop = _drive(run, theta0)
    return _result(run, stop)


def velocity(params, X, Y, options=None, activation="tanh"):
    """The flow's vector field ``V(theta)`` at the given parameters.

    The rank decision is the one :func:`integrate` makes at ``s = 0``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    Y : array_like, shape (n_samples, n_outputs)
    options : FlowOptions, optional
        Uses ``kind``, ``alpha``, ``loss``, ``route``, ``damping`` and
        ``rank_cutoff``.
    activation : {"tanh", "softplus", "relu"}

    Returns
    -------
    ndarray, shape (n_params,)
        In the order of :func:`dlmin.core.network.flatten`.
    """
    options = FlowOptions() if options is None else options
    problem, theta0 = _prepare_problem(params, X, Y, options.loss, activation)
    fld = _Field(problem, _resolve_options(options, problem))
    fld.accept(theta0)
    return fld(0.0, theta0)


def _drive(run, theta0):
    """Record s = 0, then run the chosen solver to a stop."""
    base = run.recorder.base
    run.recorder.due(0.0)
    run.recorder.take(0.0, theta0)
    if run.reached_cost(base.cost0):
        return _Stop("cost", 0.0, theta0)
    if run.options.solver == "euler":
        return _drive_euler(run, theta0)
    if run.options.solver == "sgd":
        return _drive_sgd(run, theta0)
    return _drive_scipy(run, theta0)


def _drive_euler(run, theta):
    """Fixed-step explicit Euler: gradient descent with lr = step."""
    fld, h = run.fld, float(run.options.step)
    n_steps = max(1, math.ceil(run.s_max / h - STEP_COUNT_SLACK))
    run.recorder.due(0.5 * h, inclusive=False)
    s = 0.0
    for k in range(1, n_steps + 1):
        try:
            with np.errstate(**_STRICT_FP):
                theta_new = theta + h * fld(s, theta)
                st = fld.state(theta_new)
        except (ArithmeticError, np.linalg.LinAlgError) as exc:
            return _Stop("blowup", s, theta, str(exc))
        problem = run.diverged(st)
        if problem:
            return _Stop("blowup", s, theta, problem)
        if run.on_step is not None:
            run.on_step(_Segment(s, theta, k * h, theta_new), s, k * h)
        theta, s = theta_new, k * h
        run.steps = k
        limit = math.inf if k == n_steps else s + 0.5 * h
        if run.recorder.due(limit, inclusive=False).size:
            run.recorder.take(s, theta)
        _, stop = _accept(run, s, theta)
        if stop:
            return stop
        run.report(s)
        stop = _stop_now(run, st, s, theta)
        if stop:
            return stop
    return _Stop("time", s, theta)


def _drive_sgd(run, theta):
    """Mini-batch SGD with momentum; checks and records at epoch ends.

    Step ``k`` (from 1) ends at ``s = k * lr``. The full batch keeps the
    data's order and uses the same evaluation as :func:`_drive_euler`, so
    without momentum both give the same iterates bit for bit.
    """
    o, fld = run.options, run.fld
    lr, mu = float(o.lr), float(o.momentum)
    p = fld.problem
    size = _batch_size(o, p.N)
    per_epoch = _batches_per_epoch(o, p.N)
    h_epoch = lr * per_epoch
    velocity = np.zeros_like(theta) if mu > 0 else None
    run.recorder.due(0.5 * h_epoch, inclusive=False)
    s, k = 0.0, 0
    good = _Good(run, 0.0, theta)  # the last state checked on the full data
    for epoch in range(1, o.epochs + 1):
        order = run.rng.permutation(p.N) if size < p.N else None
        for j in range(per_epoch):
            try:
                with np.errstate(**_STRICT_FP):
                    grad = _batch_gradient(fld, theta, order, j * size, size)
                    if velocity is not None:
                        velocity = mu * velocity + grad
                        grad = grad + mu * velocity if o.nesterov else velocity
                    theta_new = theta - lr * grad
                    if not np.all(np.isfinite(theta_new)):
                        raise _BlowUp("the parameters became non-finite")
            except (ArithmeticError, np.linalg.LinAlgError) as exc:
                return good.stop("blowup", f"{exc} in epoch {epoch}")
            k += 1
            run.recorder.extra["epoch"] = np.float64(k / per_epoch)
            if run.on_step is not None:
                run.on_step(_Segment(s, theta, k * lr, theta_new), s, k * lr)
            theta, s = theta_new, k * lr
            run.steps = k
            run.report(s)
            if run.out_of_time() and j < per_epoch - 1:
                return _checked_stop(run, good, "wall", s, theta)
        try:
            with np.errstate(**_STRICT_FP):
                st = fld.state(theta)
        except (ArithmeticError, np.linalg.LinAlgError) as exc:
            return good.stop("blowup", f"{exc} at the end of epoch {epoch}")
        problem = run.diverged(st)
        if problem:
            return good.stop("blowup", f"{problem} by the end of epoch {epoch}")
        good = _Good(run, s, theta)
        limit = math.inf if epoch == o.epochs else s + 0.5 * h_epoch
        if run.recorder.due(limit, inclusive=False).size:
            run.recorder.take(s, theta)
        stop = _stop_now(run, st, s, theta)
        if stop:
            return stop
    return _Stop("time", s, theta)


class _Good:
    """An SGD state whose full-data cost was evaluated, to fall back to."""

    def __init__(self, run, s, theta):
        self.run, self.s, self.theta = run, s, theta
        self.epoch = run.recorder.extra.get("epoch", np.float64(0.0))

    def stop(self, reason, detail):
        """Stop here: the record's epoch goes back to this state's."""
        self.run.recorder.extra["epoch"] = self.epoch
        return _Stop(reason, self.s, self.theta, detail)


def _checked_stop(run, good, reason, s, theta):
    """Stop at a mid-epoch state if its full-data evaluation is finite."""
    try:
        with np.errstate(**_STRICT_FP):
            st = run.fld.state(theta)
    except (ArithmeticError, np.linalg.LinAlgError) as exc:
        return good.stop("blowup", str(exc))
    problem = run.diverged(st)
    return good.stop("blowup", problem) if problem else _Stop(reason, s, theta)


def _batch_gradient(fld, theta, order, first, size):
    """Gradient of the cost of one mini-batch, shape (K,).

    ``order`` is the epoch's permutation of the samples, or None for the
    full batch (the field's own evaluation at theta).
    """
    fld.calls += 1
    if order is None:
        return fld.gradient(fld.state(theta))
    p = fld.problem
    rows = order[first : first + size]
    params = nw.unflatten(theta, p.widths)
    cache = nw.forward_cache(params, p.X[rows], p.activation)
    _, g = _loss(cache.output, p.Y[rows], p.loss)
    return _pullback(params, cache, g.ravel())


class _Segment:
    """Dense output of one explicit Euler step: a straight line.

    From ``(s0, theta0)`` to ``(s1, theta1)``, theta of shape (K,).
    """

    def __init__(self, s0, theta0, s1, theta1):
        self.s0, self.s1 = s0, s1
        self.theta0, self.theta1 = theta0.copy(), theta1.copy()

    def __call__(self, s):
        w = (s - self.s0) / (self.s1 - self.s0)
        return (1.0 - w) * self.theta0 + w * self.theta1


def _accept(run, s, theta):
    """Rank decision at an accepted state: (changed, None) or a blow-up."""
    try:
        with np.errstate(**_STRICT_FP):
            return run.fld.accept(theta), None
    except (ArithmeticError, np.linalg.LinAlgError) as exc:
        return False, _Stop("blowup", s, theta, str(exc))


def _stop_now(run, st, s, theta):
    if run.reached_cost(st.cost):
        return _Stop("cost", s, theta)
    if run.out_of_time():
        return _Stop("wall", s, theta)
    return None


def _new_solver(run, s, theta, first_step):
    o = run.options
    cls = getattr(scipy.integrate, o.solver)
    return cls(
        run.fld,
        s,
        theta,
        run.s_max,
        rtol=o.rtol,
        atol=o.atol,
        max_step=o.max_step,
        first_step=first_step,
    )


def _drive_scipy(run, theta):
    """Step a SciPy OdeSolver, recording on the grid by dense output."""
    solver = _new_solver(run, 0.0, theta, None)
    s = 0.0
    while True:
        try:
            with np.errstate(**_STRICT_FP):
                message = solver.step()
        except (ArithmeticError, np.linalg.LinAlgError) as exc:
            return _Stop("blowup", s, theta, str(exc))
        if solver.status == "failed":
            return _Stop("stalled", s, theta, f"SciPy: {message}")
        stop = _after_step(run, solver, s, theta)
        if stop is not None:
            return stop
        s, theta = solver.t, solver.y.copy()
        if run.stalled(solver.step_size):
            return _Stop(
                "stalled",
                s,
                theta,
                f"{STALL_WINDOW} steps in a row were shorter than "
                f"{STALL_STEP_REL * run.s_max:.1e}, the last "
                f"{solver.step_size:.1e}",
            )
        changed, stop = _accept(run, s, theta)
        if stop:
            return stop
        if changed:
            solver = _new_solver(run, s, theta, min(solver.step_size, run.s_max - s))


def _after_step(run, solver, s_old, theta_old):
    """Checks and records after one accepted SciPy step; a _Stop or None.

    ``(s_old, theta_old)`` is the previous accepted state, where a blow-up
    leaves the run.
    """
    run.steps += 1
    s_new = solver.t
    try:
        with np.errstate(**_STRICT_FP):
            st = run.fld.pin(solver.y)
    except (ArithmeticError, np.linalg.LinAlgError) as exc:
        return _Stop("blowup", s_old, theta_old, str(exc))
    problem = run.diverged(st)
    if problem:
        return _Stop("blowup", s_old, theta_old, problem)
    reached = run.reached_cost(st.cost)
    stop_at = _cost_crossing(run, solver, s_old) if reached else s_new
    if run.on_step is not None and stop_at > s_old:
        run.on_step(solver.dense_output(), s_old, stop_at)
    _record_step(run, solver, stop_at, inclusive=not reached)
    run.report(stop_at)
    if reached:
        theta = solver.y if stop_at == s_new else solver.dense_output()(stop_at)
        return _Stop("cost", stop_at, np.array(theta))
    if solver.status == "finished":
        return _Stop("time", s_new, solver.y.copy())
    if run.out_of_time():
        return _Stop("wall", s_new, solver.y.copy())
    return None


def _record_step(run, solver, limit, inclusive):
    """Record the grid times of the last step up to ``limit``."""
    times = run.recorder.due(limit, inclusive=inclusive)
    dense = None
    for s in times:
        if s == solver.t:
            run.recorder.take(s, solver.y)
            continue
        if dense is None:
            dense = solver.dense_output()
        run.recorder.take(s, dense(s))


def _cost_crossing(run, solver, s_old):
    """First ``s`` in the last step where ``C = stop_cost`` (Brent)."""
    dense = solver.dense_output()
    target = run.options.stop_cost

    def excess(s):
        with np.errstate(**_STRICT_FP):
            return run.fld.peek(dense(s)).cost - target

    if excess(s_old) <= 0:
        return s_old
    return scipy.optimize.brentq(
        excess, s_old, solver.t, xtol=4 * np.finfo(float).eps * solver.t
    )


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------


def _result(run, stop):
    fld, recorder, o = run.fld, run.recorder, run.options
    if recorder.last_s != stop.s:
        recorder.take(stop.s, stop.theta)
    records = recorder.arrays()
    p = fld.problem
    adapted = fld.alpha == 1.0 and p.loss == "l2"
    return FlowResult(
        status="failed" if stop.reason in ("blowup", "stalled") else "ok",
        stop_reason=stop.reason,
        message=_message(run, stop, records),
        s_final=float(stop.s),
        steps=run.steps,
        rhs_evaluations=fld.calls,
        cost_initial=float(recorder.base.cost0),
        cost_final=float(records["cost"][-1]),
        min_ntk_eigenvalue=_finite_or_none(np.min(records["ntk_min"])),
        exp_rel_error=_max_or_none(records, "exp_rel_error", adapted),
        line_rel_error=_max_or_none(records, "line_rel_error", adapted),
        K=p.K,
        QN=p.QN,
        parametrization="over" if p.K >= p.QN else "under",
        params=nw.unflatten(stop.theta, p.widths),
        records=records,
        rank_changes=fld.rank_changes,
        wall_time=run.elapsed(),
        options=o,
    )


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _max_or_none(records, key, wanted):
    if not wanted or key not in records:
        return None
    values = records[key][~np.isnan(records[key])]
    return float(values.max()) if values.size else None


def _message(run, stop, records):
    """One paragraph: where the run stopped, and what to do on failure."""
    cost = records["cost"]
    where = (
        f"at s = {stop.s:.6g} of {run.s_max:.6g} after {run.steps} "
        f"steps; cost {cost[0]:.3e} -> {cost[-1]:.3e}"
    )
    end = "s_max"
    if run.options.solver == "sgd":
        end, epoch = "the last epoch", float(records["epoch"][-1])
        where = (
            f"at epoch {epoch:.6g} of {run.options.epochs} ({run.steps} steps, "
            f"s = {stop.s:.6g}); cost {cost[0]:.3e} -> {cost[-1]:.3e}"
        )
    if stop.reason == "time":
        return f"reached {end} {where}"
    if stop.reason == "cost":
        return f"cost fell to stop_cost {run.options.stop_cost:g} {where}"
    if stop.reason == "wall":
        return (
            f"wall_limit {run.options.wall_limit:g} s reached {where}; "
            "raise flow.wall_limit to go further"
        )
    if stop.reason == "blowup":
        return f"flow blew up {where}: {stop.detail}. {_blowup_hint(run)}"
    return (
        f"solver {run.options.solver} stalled {where} ({stop.detail}). "
        "The vector field is nearly singular there, which for an "
        "undamped adapted or homotopy flow means a near-singular NTK: "
        f"{_DAMPING_HINT}, raise flow.rank_cutoff (now "
        f"{run.options.rank_cutoff:g}) or lower flow.alpha."
    )


def _blowup_hint(run):
    o = run.options
    if o.solver == "sgd":
        first = f"Use a smaller flow.lr (now {o.lr:g}) or less momentum"
    elif o.solver == "euler":
        first = f"Use a smaller flow.step (now {o.step:g})"
    else:
        first = f"Tighten flow.rtol (now {o.rtol:g}) or set flow.max_step"
    if run.fld.projects and o.damping == 0:
        return f"{first}; if the NTK is near singular, {_DAMPING_HINT}."
    return f"{first}."
