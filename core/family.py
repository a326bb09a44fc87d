"""The collapse/keep family: which classes a deep network merges, and what it costs.

Reference/construct.md section 6 ([CE-D] Thms. 2.4, 2.5). Layer ``l`` uses the
cone of Construction A about ``f_j`` for its class ``j``; its apex either sits
in front of the cluster, ``p_j = mean_j + mu_j f_j`` (the class collapses to
``p_j``), or behind it, ``p_j = mean_j - nu_j f_j`` (the layer is the identity on
every current point). A pattern ``s`` in ``{0, 1}^Q`` picks collapse (0) or keep
(1) per class. Samples are rows: ``X`` has shape ``(n_samples, dim)``.

What is asserted about the family is only what section 6 allows: the pattern
(by the sign certificate), a positive cost for ``s != 0``, independence of the
keep shifts and, for ``s = 1`` alone, local minimality under perturbation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from . import construct as cs
from . import shallow
from . import truncation as tr

MAX_PATTERN_CLASSES = 10  # 2^10 = 1024 builds; a longer table is not read
NU_FACTOR = 1.5  # keep distance in units of the sufficient one, strictly above it
NU_RULES = ("sin", "sqrt")  # nu >= r / sin(theta*/2), or nu > r sqrt(width)
PERTURB_SIZE = 1e-4  # Euclidean norm of each perturbation of all hidden parameters
PERTURB_TRIALS = 20  # perturbations of the all-keep pattern (reference 9 item 11)
PERTURB_SEED = 20240611  # default seed of the perturbation directions
LOCAL_MIN_TOL = 1e-12  # a cost drop below this counts as rounding (reference section 9)


@dataclass
class PatternResult:
    """One collapse/keep pattern: its layers, certificate and costs.

    Attributes
    ----------
    s : ndarray of int, shape (Q,)
        ``s[j] = 0``: class ``j`` collapses; ``1``: it is kept.
    status : {"ok", "failed"}
    message : str
    apexes : ndarray, shape (Q, dim)
        Apex of the layer of each class (collapse or keep apex).
    shifts : ndarray, shape (Q,)
        ``mu_j`` for collapsed classes, ``nu_j`` for kept ones (both > 0).
    cumulative : list of (W, b)
        Cumulative parameters of the Q hidden layers.
    layers, layers_intercept : list of (W, b)
        Layer-wise network with the papers' output layer (no bias) and with
        the best output bias.
    truncated : ndarray, shape (n_samples, dim)
        ``tau(X_0)``: collapsed classes at their apex, kept ones unchanged.
    margins : ndarray, shape (Q, 2)
        Smallest collapse and keep margin of each layer's certificate.
    certified : bool
    cost_no_intercept, cost_intercept : float
        ``C_N`` of the two networks.
    trace_own, trace_raw : float
        ``Tr(Y D2 (I + D2)^{-1} Y^T)`` with ``Delta_1`` in the coordinates of the
        truncated data's means, or of the raw means ([CE-D] (2.55), (2.81));
        NaN unless dim = Q.
    """

    s: np.ndarray
    status: str
    message: str
    apexes: np.ndarray | None = None
    shifts: np.ndarray | None = None
    cumulative: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    layers_intercept: list = field(default_factory=list)
    truncated: np.ndarray | None = None
    margins: np.ndarray | None = None
    certified: bool = False
    cost_no_intercept: float = np.nan
    cost_intercept: float = np.nan
    trace_own: float = np.nan
    trace_raw: float = np.nan

    @property
    def collapsed(self):
        """Classes sent to a single point."""
        return [int(j) for j in np.flatnonzero(self.s == 0)]

    def row(self):
        """The pattern as one row of a results table."""
        return {
            "pattern": "".join(str(int(v)) for v in self.s),
            "collapsed": self.collapsed,
            "certified": self.certified,
            "cost_no_intercept": self.cost_no_intercept,
            "cost_intercept": self.cost_intercept,
            "trace_own": self.trace_own,
            "trace_raw": self.trace_raw,
            "status": self.status,
        }


def build_collapse_keep(
    X,
    labels,
    Y,
    s,
    *,
    mu_factor=cs.MU_FACTOR,
    nu_factor=NU_FACTOR,
    nu_rule="sin",
    mu=None,
    nu=None,
    theta0=cs.THETA0,
    radius=None,
    order=None,
):
    """Build the network that collapses the classes with ``s_j = 0`` and keeps the rest.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim), dim >= Q ([CE-D] has dim = Q)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    s : sequence of {0, 1}, length Q
    mu_factor : float in (2, 3)
        Collapse distance ``mu_j = mu_factor r`` (r the build radius).
    nu_factor : float > 1
        Keep distance in units of the sufficient one of ``nu_rule``.
    nu_rule : {"sin", "sqrt"}
        ``nu >= r / sin(theta*/2)`` (own ball in the forward cone) or
        ``nu > r sqrt(width)`` (every pre-activation positive).
    mu, nu : ndarray, shape (Q,), optional
        Explicit shifts per class, overriding the factors (entries of
        classes in the other regime are ignored).
    theta0, radius, order
        As in ``construct.build_clustered``.

    Returns
    -------
    PatternResult
    """
    X, labels, Y, s, order = _check_args(
        X, labels, Y, s, order, nu_rule, mu_factor, nu_factor
    )
    Q = Y.shape[0]
    cond = cs.clustered_conditions(X, labels, radius, theta0, Q)
    if not cond.buildable:
        return PatternResult(s, "failed", "; ".join(cond.failures))
    stats = cs.class_stats(X, labels, Q)
    shifts = _shifts(s, cond, X.shape[1], mu_factor, nu_factor, nu_rule, mu, nu)
    sign = np.where(s == 0, 1.0, -1.0)
    apexes = stats.means + (sign * shifts)[:, None] * cond.f

    X_cur, cumulative, margins, failures = _hidden_layers(
        X, labels, s, order, apexes, cond
    )
    result = PatternResult(
        s,
        "ok",
        "",
        apexes,
        shifts,
        cumulative,
        truncated=X_cur,
        margins=np.array(margins),
        certified=not failures,
    )
    try:
        result.layers = _with_output(cumulative, X_cur, labels, Y, False)
        result.layers_intercept = _with_output(cumulative, X_cur, labels, Y, True)
    except ValueError as exc:
        failures.append(str(exc))
    else:
        result.cost_no_intercept = _cost(result.layers, X, labels, Y)
        result.cost_intercept = _cost(result.layers_intercept, X, labels, Y)
    if X.shape[1] == Q and result.layers:
        result.trace_own = shallow.trace_value(X_cur, labels, Y)
        result.trace_raw = shallow.trace_value(X_cur, labels, Y, means=stats.means)
    if failures:
        result.status, result.message = "failed", "; ".join(failures)
    return result


def _cost(layers, X, labels, Y):
    return cs.cost(cs.forward_relu(layers, X), labels, Y)


def _shifts(s, cond, width, mu_factor, nu_factor, nu_rule, mu, nu):
    """mu_j for collapsed classes and nu_j for kept ones, shape (Q,)."""
    r = cond.radius
    if nu_rule == "sin":
        nu_min = r / np.sin(cond.theta_star / 2.0)
    else:
        nu_min = r * np.sqrt(width)
    mus = np.full(s.size, mu_factor * r) if mu is None else np.asarray(mu, dtype=float)
    nus = (
        np.full(s.size, nu_factor * nu_min)
        if nu is None
        else np.asarray(nu, dtype=float)
    )
    return np.where(s == 0, mus, nus)


def _hidden_layers(X, labels, s, order, apexes, cond):
    """Apply the Q cone layers and certify the pattern layer by layer."""
    margin = cs.CERT_MARGIN_REL * max(1.0, float(np.abs(X).max()))
    X_cur, cumulative, margins, failures = X, [], [], []
    for step, j in enumerate(order):
        W, b = tr.cone_layer(apexes[j], cond.f[j], cond.theta_star)
        Z = X_cur @ W.T + b
        mask = (labels == j) if s[j] == 0 else np.zeros(labels.size, dtype=bool)
        ok, m_col, m_keep = tr.certify_z(Z, mask, margin)
        done = [k for k in order[:step] if s[k] == 0]  # earlier collapse apexes
        if done:
            m_keep = min(m_keep, float((apexes[done] @ W.T + b).min()))
            ok = ok and m_keep >= margin
        if not ok:
            mode = "collapse" if s[j] == 0 else "keep"
            failures.append(
                f"layer {step + 1} ({mode} class {j}) breaks the pattern: "
                f"collapse margin {m_col:.3g}, keep margin {m_keep:.3g}, both "
                f"must be >= {margin:.3g}"
            )
        margins.append((m_col, m_keep))
        X_cur = tr.truncate_z(W, b, Z)
        cumulative.append((W, b))
    return X_cur, cumulative, margins, failures


def _with_output(cumulative, X_cur, labels, Y, intercept):
    """Layer-wise network: hidden cumulative layers plus the fitted output layer."""
    fit = cs.fit_output(X_cur, labels, Y, intercept)
    Wc = [W for W, _ in cumulative] + [fit.A]
    bc = [b for _, b in cumulative] + [fit.c]
    Ws, bs = tr.layers_from_cumulative(Wc, bc)
    return list(zip(Ws, bs))


def _check_args(X, labels, Y, s, order, nu_rule, mu_factor, nu_factor):
    X = np.asarray(X, dtype=float)
    labels = np.asarray(labels).astype(int)
    Y = np.asarray(Y, dtype=float)
    Q = Y.shape[0]
    if X.ndim != 2 or labels.shape != (X.shape[0],):
        raise ValueError(
            f"expected X (N, M) and labels (N,), got {X.shape} and {labels.shape}"
        )
    s = np.asarray(s).astype(int)
    if s.shape != (Q,) or not np.isin(s, (0, 1)).all():
        raise ValueError(
            f"pattern s must be Q = {Q} entries in {{0, 1}}, got {s.tolist()}"
        )
    if nu_rule not in NU_RULES:
        raise ValueError(f"nu_rule must be one of {NU_RULES}, got {nu_rule!r}")
    if not 2.0 < mu_factor < 3.0:
        raise ValueError(f"mu_factor must lie in (2, 3), got {mu_factor}")
    if not nu_factor > 1.0:
        raise ValueError(
            f"nu_factor must exceed 1 (the sufficient keep distance), got {nu_factor}"
        )
    order = list(range(Q)) if order is None else [int(j) for j in order]
    if sorted(order) != list(range(Q)):
        raise ValueError(f"order must be a permutation of 0..{Q - 1}, got {order}")
    return X, labels, Y, s, order


# ------------------------------------------------------------ local minimum


@dataclass
class PerturbationCheck:
    """Cost changes after random perturbations of the hidden layers and an output refit.

    Attributes
    ----------
    base_cost : float
        ``C_N`` of the unperturbed hidden layers with a refitted output layer.
    changes : ndarray, shape (n_trials,)
        Perturbed minus base cost, each after its own refit.
    size : float
        Euclidean norm of every perturbation of the hidden parameters.
    intercept : bool
        Whether the refit had an output bias.
    """

    base_cost: float
    changes: np.ndarray
    size: float
    intercept: bool

    @property
    def min_change(self):
        return float(self.changes.min())

    @property
    def passed(self):
        """No perturbation lowered the cost beyond rounding."""
        return self.min_change >= -LOCAL_MIN_TOL


def perturbation_check(
    hidden,
    X,
    labels,
    Y,
    rng=None,
    *,
    n_trials=PERTURB_TRIALS,
    size=PERTURB_SIZE,
    intercept=True,
):
    """Test whether a network's hidden layers are a local minimum of the refitted cost.

    Each trial adds a random direction of Euclidean norm ``size`` to all
    hidden weights and biases at once, refits the output layer by least
    squares and records the change of ``C_N``.

    Parameters
    ----------
    hidden : list of (W, b)
        Layer-wise hidden layers, ``W`` of shape (out, in).
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    rng : numpy.random.Generator or int, optional
        Default seed ``PERTURB_SEED``.

    Returns
    -------
    PerturbationCheck
    """
    rng = np.random.default_rng(PERTURB_SEED if rng is None else rng)
    base = _refit_cost(hidden, X, labels, Y, intercept)
    changes = np.empty(n_trials)
    for k in range(n_trials):
        G = [
            (rng.standard_normal(W.shape), rng.standard_normal(b.shape))
            for W, b in hidden
        ]
        norm = np.sqrt(sum((gW**2).sum() + (gb**2).sum() for gW, gb in G))
        moved = [
            (W + size / norm * gW, b + size / norm * gb)
            for (W, b), (gW, gb) in zip(hidden, G)
        ]
        changes[k] = _refit_cost(moved, X, labels, Y, intercept) - base
    return PerturbationCheck(base, changes, size, intercept)


def _refit_cost(hidden, X, labels, Y, intercept):
    Z = X
    for W, b in hidden:
        Z = tr.relu(Z @ W.T + b)
    fit = cs.fit_output(Z, labels, Y, intercept)
    return cs.cost(Z @ fit.A.T + fit.c, labels, Y)


# -------------------------------------------------------------- the family


@dataclass
class Family:
    """All 2^Q collapse/keep patterns and the local-minimum check of the all-keep one.

    Attributes
    ----------
    patterns : list of PatternResult
        In the order of ``itertools.product((0, 1), repeat=Q)``: all-collapse
        first, all-keep last.
    local_min : PerturbationCheck or None
        For ``s = (1, ..., 1)``; None when that pattern failed.
    """

    patterns: list
    local_min: PerturbationCheck | None

    @property
    def configurations(self):
        return len(self.patterns)

    def rows(self):
        """One results-table row per pattern."""
        return [p.row() for p in self.patterns]


def all_patterns(
    X,
    labels,
    Y,
    *,
    max_classes=MAX_PATTERN_CLASSES,
    rng=None,
    n_trials=PERTURB_TRIALS,
    **kwargs,
):
    """Build every collapse/keep pattern; check the all-keep one for local minimality.

    Parameters
    ----------
    X, labels, Y
        As in :func:`build_collapse_keep`.
    max_classes : int
        Refuse more classes than this (2^Q builds).
    rng : numpy.random.Generator or int, optional
        Perturbation directions of the local-minimum check.
    **kwargs
        Passed to :func:`build_collapse_keep`.

    Returns
    -------
    Family
    """
    Q = np.asarray(Y).shape[0]
    if Q > max_classes:
        raise ValueError(
            f"all_patterns: Q = {Q} classes give 2^{Q} = {2**Q} patterns, above the "
            f"limit max_classes = {max_classes} (MAX_PATTERN_CLASSES); raise "
            "max_classes or build single patterns with build_collapse_keep"
        )
    patterns = [
        build_collapse_keep(X, labels, Y, s, **kwargs)
        for s in itertools.product((0, 1), repeat=Q)
    ]
    keep_all = patterns[-1]
    local_min = None
    if keep_all.status == "ok":
        local_min = perturbation_check(
            keep_all.layers_intercept[:-1],
            np.asarray(X, float),
            np.asarray(labels).astype(int),
            np.asarray(Y, float),
            rng,
            n_trials=n_trials,
        )
    return Family(patterns, local_min)
