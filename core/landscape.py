"""The cost landscape around a minimizer: slices, planes and perturbed trials.

A random direction ``d`` in parameter space has one independent Gaussian
piece per weight matrix and bias vector, each scaled to norm 1 (or, with
``relative=True``, to the norm of the tensor it perturbs, which makes the
picture invariant to the rescalings ReLU networks allow). Moving a
minimizer ``theta*`` by ``lam * d`` therefore moves every tensor by exactly
``lam`` (or ``lam`` times its own norm): the coordinate of a slice and the
size of a perturbation are the same number.

- 1-D slices: ``a -> C(theta* + a d)`` on a symmetric grid through 0;
- 2-D planes: ``(a, b) -> C(theta* + a d1 + b d2)``, with ``d2`` made
  orthogonal to ``d1`` tensor by tensor;
- trials: for each perturbation size ``lam``, starts ``theta* + lam d``
  with fresh directions, the start cost and, when a flow is given, where
  training from there ends; :func:`statistics` summarizes them per ``lam``.

Costs are those of :func:`dlmin.core.flows.cost_and_gradient` (``l2``:
``|x - y|^2 / (2N)``, or the cross-entropy). Random streams are keyed by
content (the perturbation size and trial index), so adding sizes or trials
leaves the others unchanged and one seed reproduces everything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from . import flows
from . import network as nw

__all__ = [
    "random_direction",
    "perturb",
    "orthogonalize",
    "cosine",
    "cost",
    "direction_norms",
    "gradient_norm",
    "slice_grid",
    "slice_costs",
    "plane_costs",
    "Trial",
    "run_trials",
    "statistics",
    "stream",
]

# Default quantiles of the per-lambda cost distributions.
QUANTILES = (0.1, 0.5, 0.9)
# A trial "escaped below" the minimizer when it ends below C* by more than
# this margin times max(|C*|, 1) (rounding at a zero-cost minimizer is not
# an escape).
BELOW_MARGIN = 1e-9
# A direction piece whose part orthogonal to another is below this fraction
# of its norm counts as parallel (its residual is rounding, not direction).
PARALLEL_TOL = 1e-12


def random_direction(params, rng, relative=False):
    """A direction with one Gaussian piece per tensor, each of norm 1.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        The point the direction is for; only shapes (and norms when
        ``relative``) are used.
    rng : numpy.random.Generator
        Draws ``W`` then ``b`` of each layer in order.
    relative : bool
        Scale each piece to the norm of its tensor instead of 1 (a zero
        tensor gets a zero piece).

    Returns
    -------
    list of (dW, db) pairs, shaped like ``params``
    """
    out = []
    for W, b in params:
        pieces = []
        for T in (np.asarray(W, dtype=float), np.asarray(b, dtype=float)):
            G = rng.standard_normal(T.shape)
            norm = float(np.linalg.norm(G))
            scale = float(np.linalg.norm(T)) if relative else 1.0
            pieces.append(G * (scale / norm) if norm > 0 else np.zeros_like(T))
        out.append(tuple(pieces))
    return out


def perturb(params, *steps):
    """``params + sum_i a_i d_i`` for ``steps = ((a_1, d_1), (a_2, d_2), ...)``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    *steps : (float, direction) pairs
        Directions as :func:`random_direction` returns them.

    Returns
    -------
    list of (W, b) pairs
        New arrays; ``a = 0`` gives copies equal to ``params`` bit for bit.
    """
    out = []
    for layer, (W, b) in enumerate(params):
        W = np.array(W, dtype=float)
        b = np.array(b, dtype=float)
        for a, d in steps:
            if a != 0:
                W = W + a * d[layer][0]
                b = b + a * d[layer][1]
        out.append((W, b))
    return out


def direction_norms(direction):
    """Norm of every piece of a direction, shape (2 * n_layers,): W1, b1, W2, ..."""
    return np.array([float(np.linalg.norm(T)) for pair in direction for T in pair])


def orthogonalize(d2, d1):
    """``d2`` made orthogonal to ``d1`` tensor by tensor, keeping its piece norms.

    Parameters
    ----------
    d2, d1 : directions (lists of (dW, db) pairs of equal shapes)

    Returns
    -------
    list of (dW, db) pairs
        Each piece of ``d2`` minus its projection on ``d1``'s piece, scaled
        back to its norm. A piece with a single entry, or parallel to
        ``d1``'s (residual below ``PARALLEL_TOL`` of its norm), is left as
        it is: there is no orthogonal direction to turn it to.
    """
    out = []
    for pair2, pair1 in zip(d2, d1):
        pieces = []
        for T2, T1 in zip(pair2, pair1):
            n1, n2 = float(np.vdot(T1, T1)), float(np.linalg.norm(T2))
            R = T2 - (float(np.vdot(T1, T2)) / n1) * T1 if n1 > 0 else T2
            nr = float(np.linalg.norm(R))
            ok = T2.size > 1 and nr > PARALLEL_TOL * n2 and nr > 0
            pieces.append(R * (n2 / nr) if ok else T2.copy())
        out.append(tuple(pieces))
    return out


def cosine(d1, d2):
    """Cosine of the angle between two directions as flat vectors (NaN if zero).

    ``d1``, ``d2``: lists of (dW, db) pairs of equal shapes.
    """
    a = np.concatenate([T.ravel() for pair in d1 for T in pair])
    b = np.concatenate([T.ravel() for pair in d2 for T in pair])
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else math.nan


def slice_grid(span, points):
    """Symmetric grid on ``[-span, span]`` with 0 exactly, shape (points,).

    ``points`` must be odd (the minimizer is the middle point).
    """
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points: expected an odd number >= 3, got {points}")
    if not (span > 0 and math.isfinite(span)):
        raise ValueError(f"span: expected a number > 0, got {span!r}")
    half = np.linspace(0.0, span, points // 2 + 1)
    return np.concatenate([-half[:0:-1], half])


def cost(params, X, Y, activation="relu", loss="l2"):
    """The cost ``C(theta)`` of :mod:`dlmin.core.flows` at ``params``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : ndarray, shape (n_samples, n_inputs)
    Y : ndarray, shape (n_samples, n_outputs)
        Per-sample targets.
    activation, loss : str

    Returns
    -------
    float
        ``inf`` where the outputs overflow (a huge perturbation), with no
        floating-point warning.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = nw.forward(params, X, activation)
        if not np.all(np.isfinite(x)):
            return math.inf
        value, _ = flows.cost_and_gradient(x, Y, loss)
    return value if math.isfinite(value) else math.inf


def gradient_norm(params, X, Y, activation="relu", loss="l2"):
    """``|grad_theta C|`` at ``params``: zero (to rounding) at a critical point.

    ReLU's derivative at 0 is taken as 0, so for a ReLU network this is the
    norm of one element of the Clarke subdifferential. ``X`` has shape
    (n_samples, n_inputs), ``Y`` (n_samples, n_outputs).
    """
    x = nw.forward(params, X, activation)
    _, g = flows.cost_and_gradient(x, Y, loss)
    return float(np.linalg.norm(nw.vjp(params, X, g, activation)))


def slice_costs(
    params, directions, coords, X, Y, activation="relu", loss="l2", progress=None
):
    """``C(theta* + a d)`` along each direction.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        ``theta*``.
    directions : list of directions (see :func:`random_direction`)
    coords : ndarray, shape (n_points,)
    X : ndarray, shape (n_samples, n_inputs)
    Y : ndarray, shape (n_samples, n_outputs)
    progress : callable, optional
        ``progress()`` after each direction.

    Returns
    -------
    ndarray, shape (n_directions, n_points)
    """
    rows = ([((a, d),) for a in coords] for d in directions)
    costs = _grid(params, rows, X, Y, activation, loss, progress)
    return costs if len(directions) else np.zeros((0, len(coords)))


def _grid(params, rows, X, Y, activation, loss, progress):
    """Costs at ``perturb(params, *steps)`` for each steps of each row."""
    out = []
    for row in rows:
        out.append(
            [cost(perturb(params, *steps), X, Y, activation, loss) for steps in row]
        )
        if progress is not None:
            progress()
    return np.array(out)


def plane_costs(
    params, d1, d2, coords, X, Y, activation="relu", loss="l2", progress=None
):
    """``C(theta* + a d1 + b d2)`` on a square grid.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        ``theta*``.
    d1, d2 : directions (see :func:`random_direction`)
    coords : ndarray, shape (n_points,)
        Grid of ``a`` and of ``b``.
    X : ndarray, shape (n_samples, n_inputs)
    Y : ndarray, shape (n_samples, n_outputs)
    progress : callable, optional
        ``progress()`` after each row.

    Returns
    -------
    ndarray, shape (n_points, n_points)
        Entry ``(i, j)`` is at ``a = coords[j]``, ``b = coords[i]`` (rows are
        ``b``, as a contour plot expects).
    """
    rows = ([((a, d1), (b, d2)) for a in coords] for b in coords)
    return _grid(params, rows, X, Y, activation, loss, progress)


def stream(root, *parts):
    """A random generator keyed by ``root`` and ``parts``.

    Parameters
    ----------
    root : sequence of int
        E.g. a run's key and seed.
    *parts : values
        Hashed by their text (floats by ``repr``), so the stream of one
        perturbation size does not depend on the others.

    Returns
    -------
    numpy.random.Generator
    """
    text = "|".join(repr(float(p)) if isinstance(p, float) else repr(p) for p in parts)
    key = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)
    return np.random.default_rng([*root, key])


@dataclass
class Trial:
    """One perturbed start and, when trained, where it ended.

    Attributes
    ----------
    lam : float
    start_cost : float
    start_distance : float
        ``|theta(0) - theta*|`` as a flat vector.
    final_cost, distance, s_final : float
        After training (NaN when not trained); ``distance`` is
        ``|theta_end - theta*|``.
    steps : int
    stop_reason, status, message : str
        Of the training run ("" when not trained).
    costs : ndarray, shape (n_records,)
        Recorded costs of the training run (empty when not trained).
    times : ndarray, shape (n_records,)
        Their times ``s``.
    """

    lam: float
    start_cost: float
    start_distance: float
    final_cost: float = math.nan
    distance: float = math.nan
    s_final: float = math.nan
    steps: int = 0
    stop_reason: str = ""
    status: str = ""
    message: str = ""
    costs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))


def run_trials(
    params,
    X,
    Y,
    lambdas,
    trials,
    root,
    *,
    activation="relu",
    loss="l2",
    relative=False,
    options=None,
    progress=None,
):
    """Perturb ``theta*`` ``trials`` times per size; train each start if asked.

    Trial ``t`` of size ``lam`` draws its direction, then its SGD shuffles,
    from ``stream(root, "trial", lam, t)``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        The minimizer ``theta*``.
    X : ndarray, shape (n_samples, n_inputs)
    Y : ndarray, shape (n_samples, n_outputs)
    lambdas : sequence of float >= 0
    trials : int >= 1
    root : sequence of int
        Root of the random streams (a run's key and seed).
    activation, loss : str
    relative : bool
        Perturbation sizes relative to each tensor's norm.
    options : FlowOptions or None
        Train every start with :func:`dlmin.core.flows.integrate` and these
        options; None evaluates the starts only.
    progress : callable, optional
        ``progress(done, total)`` after every trial.

    Returns
    -------
    list of list of Trial
        ``[i][t]`` is trial ``t`` of ``lambdas[i]``.
    """
    theta_star = nw.flatten(params)
    total, done = len(lambdas) * trials, 0
    out = []
    for lam in lambdas:
        row = []
        for t in range(trials):
            rng = stream(root, "trial", float(lam), t)
            start = perturb(
                params, (float(lam), random_direction(params, rng, relative))
            )
            trial = Trial(
                lam=float(lam),
                start_cost=cost(start, X, Y, activation, loss),
                start_distance=_distance(start, theta_star),
            )
            if options is not None:
                _train(trial, start, X, Y, activation, options, rng, theta_star)
            row.append(trial)
            done += 1
            if progress is not None:
                progress(done, total)
        out.append(row)
    return out


def _distance(params, theta_star):
    """``|theta - theta*|``; inf (and no warning) when it overflows."""
    with np.errstate(over="ignore"):
        return float(np.linalg.norm(nw.flatten(params) - theta_star))


def _train(trial, start, X, Y, activation, options, rng, theta_star):
    """Train one start; a start or run the flow cannot handle fails the trial."""
    if not math.isfinite(trial.start_cost):
        trial.status, trial.stop_reason = "failed", "start"
        trial.message = "the perturbed start's cost is not finite"
        return
    try:
        result = flows.integrate(start, X, Y, options, activation, seed=rng)
    except (ArithmeticError, np.linalg.LinAlgError, ValueError) as exc:
        trial.status, trial.stop_reason = "failed", "error"
        trial.message = f"{type(exc).__name__}: {exc}"
        return
    trial.final_cost = result.cost_final
    trial.distance = _distance(result.params, theta_star)
    trial.s_final = result.s_final
    trial.steps = result.steps
    trial.stop_reason = result.stop_reason
    trial.status = result.status
    trial.message = result.message
    trial.costs = np.asarray(result.records["cost"], dtype=float)
    trial.times = np.asarray(result.records["s"], dtype=float)


def statistics(grid, minimizer_cost, threshold, quantiles=QUANTILES):
    """Per-size summary of a grid of trials.

    Parameters
    ----------
    grid : list of list of Trial
        As :func:`run_trials` returns it.
    minimizer_cost : float
        ``C(theta*)``.
    threshold : float
        A trained trial "returned" when its final cost is ``<= threshold``.
    quantiles : sequence of float in [0, 1]

    Returns
    -------
    dict of str to ndarray
        ``start_quantiles``, ``final_quantiles`` (n_lambdas, n_quantiles);
        ``start_mean``, ``final_mean``, ``fraction_returned``,
        ``fraction_below_minimum`` (ended below ``C*`` by more than
        ``BELOW_MARGIN * max(|C*|, 1)``), ``fraction_failed`` (training blew
        up or stalled, or the start or run could not be evaluated),
        ``fraction_cut_short`` (stopped by ``wall_limit``),
        ``distance_median`` (n_lambdas,). Quantiles, means and medians are
        over the trials with a finite value (NaN when there is none); the
        fractions are over all trials. The trained entries are NaN when
        nothing was trained.
    """
    q = np.asarray(quantiles, dtype=float)
    start = np.array([[t.start_cost for t in row] for row in grid], dtype=float)
    final = np.array([[t.final_cost for t in row] for row in grid], dtype=float)
    dist = np.array([[t.distance for t in row] for row in grid], dtype=float)
    failed = np.array([[t.status == "failed" for t in row] for row in grid])
    cut = np.array([[t.stop_reason == "wall" for t in row] for row in grid])
    trained = any(t.status for row in grid for t in row)
    below = minimizer_cost - BELOW_MARGIN * max(abs(minimizer_cost), 1.0)
    with np.errstate(invalid="ignore"):
        returned, escaped = final <= threshold, final < below
    out = {
        "start_quantiles": _finite_quantiles(start, q),
        "start_mean": _finite_reduce(start, np.mean),
        "final_quantiles": _finite_quantiles(final, q),
        "final_mean": _finite_reduce(final, np.mean),
        "fraction_returned": returned.mean(axis=1),
        "fraction_below_minimum": escaped.mean(axis=1),
        "fraction_failed": failed.mean(axis=1),
        "fraction_cut_short": cut.mean(axis=1),
        "distance_median": _finite_reduce(dist, np.median),
    }
    if not trained:
        for key in out:
            if not key.startswith("start"):
                out[key] = np.full_like(out[key], math.nan, dtype=float)
    return out


def _finite_quantiles(values, q):
    """Quantiles of each row's finite entries, shape (n_rows, n_quantiles)."""
    return np.array(
        [
            np.quantile(row[np.isfinite(row)], q)
            if np.isfinite(row).any()
            else np.full(q.size, math.nan)
            for row in values
        ]
    )


def _finite_reduce(values, reduce):
    """``reduce`` of each row's finite entries, shape (n_rows,), NaN if none."""
    return np.array(
        [
            float(reduce(row[np.isfinite(row)])) if np.isfinite(row).any() else math.nan
            for row in values
        ]
    )
