"""Explicit zero-cost minimizers of deep ReLU networks on clustered data.

Construction A of reference/construct.md section 4: one cone layer per class
sends that class to a single apex and leaves every other point where it is;
an output layer then maps each apex to its target. Samples are rows:
``X`` has shape ``(n_samples, dim)``, ``Y[j]`` is the target of class ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import truncation as tr

THETA0 = 0.05  # angle margin (rad) added to max theta*_j (reference A6)
MU_FACTOR = 2.5  # apex distance in units of delta, inside (2, 3)
CERT_MARGIN_REL = 1e-9  # certificate margin, relative to the data scale
DELTA_FLOOR_REL = 1e-6  # smallest build radius, relative to min |mean - barycenter|
RANK_RTOL = 1e-10  # singular values below this times the largest count as zero
LAMBDA_WARN = 1e-6  # squeeze factors below this make W badly conditioned
C0_LIMIT = 0.25  # assumption (ii): delta < c0 * min |mean - barycenter|, c0 < 1/4


# --------------------------------------------------------------------- costs


@dataclass
class ClassStats:
    """Per-class means and the spread of the data about them.

    Attributes
    ----------
    means : ndarray, shape (Q, dim)
    sizes : ndarray of int, shape (Q,)
    barycenter : ndarray, shape (dim,)
        Mean of the class means (not the grand mean unless sizes agree).
    delta : float
        Largest distance of a point to its class mean.
    """

    means: np.ndarray
    sizes: np.ndarray
    barycenter: np.ndarray
    delta: float


def class_stats(X, labels, Q=None):
    """Class means, sizes, barycenter of the means and the radius delta."""
    labels = np.asarray(labels)
    Q = int(labels.max()) + 1 if Q is None else Q
    sizes = np.bincount(labels, minlength=Q)
    if np.any(sizes == 0):
        empty = np.flatnonzero(sizes == 0).tolist()
        raise ValueError(
            f"classes {empty} have no points; every class needs at least one"
        )
    means = np.stack(
        [np.bincount(labels, weights=col, minlength=Q) for col in X.T], axis=1
    )
    means /= sizes[:, None]
    dev = X - means[labels]
    delta = float(np.sqrt(np.einsum("ij,ij->i", dev, dev).max()))
    return ClassStats(means, sizes, means.mean(axis=0), delta)


def cost(out, labels, Y, kind="C_N"):
    """Cost of outputs against class targets.

    Parameters
    ----------
    out : ndarray, shape (n_samples, out_dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    kind : {"C_N", "flow", "half_sum"}
        ``C_N = sum_j (1/N_j) sum_i |x_ji - y_j|^2`` (construction papers),
        ``|x - y|^2 / (2N)`` (flow papers) or ``(1/2) sum |x - y|^2``.
    """
    sq = ((out - Y[labels]) ** 2).sum(axis=1)
    if kind == "C_N":
        sizes = np.bincount(labels, minlength=Y.shape[0])
        return float((sq / sizes[labels]).sum())
    if kind == "flow":
        return float(sq.sum() / (2 * out.shape[0]))
    if kind == "half_sum":
        return float(sq.sum() / 2)
    raise ValueError(f"cost kind must be C_N, flow or half_sum, got {kind!r}")


def cost_split(out, labels, Y):
    """Split ``C_N`` into within-class spread and mean mismatch.

    Returns
    -------
    spread : float
        ``sum_j (1/N_j) sum_i |x_ji - mean_j(x)|^2``.
    mismatch : float
        ``sum_j |mean_j(x) - y_j|^2``.
    """
    stats = class_stats(out, labels, Y.shape[0])
    spread = cost(out, labels, stats.means, "C_N")
    return spread, float(((stats.means - Y) ** 2).sum())


def all_costs(out, labels, Y):
    """Every cost normalization and the C_N split, as a dict of floats."""
    spread, mismatch = cost_split(out, labels, Y)
    return {
        "C_N": cost(out, labels, Y, "C_N"),
        "C_N_spread": spread,
        "C_N_mismatch": mismatch,
        "flow": cost(out, labels, Y, "flow"),
        "half_sum": cost(out, labels, Y, "half_sum"),
    }


def max_output_error(out, labels, Y):
    """Largest ``|x_out - y_j|`` over the samples."""
    return float(np.sqrt(((out - Y[labels]) ** 2).sum(axis=1).max()))


def forward_relu(layers, X):
    """Outputs of a ReLU network with a linear last layer, shape (n_samples, out)."""
    A = X
    for W, b in layers[:-1]:
        A = tr.relu(A @ W.T + b)
    W, b = layers[-1]
    return A @ W.T + b


# ----------------------------------------------------------- output layer


@dataclass
class OutputFit:
    """Weighted least-squares output layer ``z -> A z + c`` (reference section 8).

    Attributes
    ----------
    A : ndarray, shape (out_dim, dim)
    c : ndarray, shape (out_dim,)
    rank : int
        Rank of the weighted design matrix.
    cond : float
        Its condition number.
    """

    A: np.ndarray
    c: np.ndarray
    rank: int
    cond: float


def fit_output(Z, labels, Y, intercept=False):
    """Minimize ``sum_k (1/N_j(k)) |A z_k + c - y_j(k)|^2`` over ``A`` (and ``c``).

    Without ``intercept`` ``c = 0``, as in the papers; with it the fit is the
    true optimum of the network's last layer. The minimum-norm solution is
    taken when the design has more columns than rank (points in a subspace);
    fails loudly when its rank is below the number of classes, since the
    classes can then not all reach their own targets.

    Parameters
    ----------
    Z : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    """
    sizes = np.bincount(labels, minlength=Y.shape[0])
    sw = 1.0 / np.sqrt(sizes[labels])
    design = Z * sw[:, None]
    if intercept:
        design = np.hstack([design, sw[:, None]])
    sol, _, rank, sv = np.linalg.lstsq(design, Y[labels] * sw[:, None], rcond=None)
    cond = float(sv[0] / sv[rank - 1]) if rank else np.inf
    if rank < Y.shape[0]:
        kind = "affinely" if intercept else "linearly"
        raise ValueError(
            f"output layer cannot separate the classes: the last hidden "
            f"representation is {kind} dependent (rank {rank}, needs {Y.shape[0]})"
        )
    A = sol[: Z.shape[1]].T
    c = sol[Z.shape[1]] if intercept else np.zeros(Y.shape[1])
    return OutputFit(A, c, int(rank), cond)


# ------------------------------------------------------------- assumptions


@dataclass
class Conditions:
    """Assumptions (i)-(iii) of Construction A, as numbers.

    Attributes
    ----------
    delta : float
        Empirical radius: largest distance of a point to its class mean.
    radius : float
        Radius the network is built for (``>= delta``).
    c0 : float
        ``radius / min_j |mean_j - barycenter|``; assumption (ii) wants < 1/4.
    theta_j : ndarray, shape (Q,)
        Smallest cone angle per class (``inf`` where infeasible).
    theta_star : float
        Common cone angle ``max(max theta_j + theta0, pi/2)``.
    f : ndarray, shape (Q, dim)
        Unit vectors from each mean towards the barycenter.
    rank, mean_cond : int, float
        Rank and condition number of the matrix of means.
    failures : list of str
        One sentence per failed assumption, saying by how much it fails.
    """

    delta: float
    radius: float
    c0: float
    theta_j: np.ndarray
    theta_star: float
    f: np.ndarray
    rank: int
    mean_cond: float
    failures: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.failures

    @property
    def buildable(self):
        """Cone layers exist: independent means and every angle finite, below pi."""
        return (
            self.rank == len(self.theta_j)
            and bool(np.isfinite(self.theta_j).all())
            and self.theta_star < np.pi
        )

    def as_dict(self):
        return {
            "delta": self.delta,
            "radius": self.radius,
            "c0": self.c0,
            "theta_star": self.theta_star,
            "max_theta_j": float(np.max(self.theta_j)),
            "mean_rank": self.rank,
            "mean_cond": self.mean_cond,
        }


def clustered_conditions(X, labels, radius=None, theta0=THETA0, Q=None):
    """Measure the assumptions of Construction A on labelled data.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    radius : float, optional
        Build radius; the empirical delta is used when it is larger.
    theta0 : float
        Margin added to the largest per-class angle.

    Returns
    -------
    Conditions
    """
    stats = class_stats(X, labels, Q)
    means, bary = stats.means, stats.barycenter
    Q = means.shape[0]
    to_bary = bary - means
    dist_bary = np.linalg.norm(to_bary, axis=1)
    floor = DELTA_FLOOR_REL * max(dist_bary.min(), np.finfo(float).tiny)
    r = max(stats.delta, radius or 0.0, floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = to_bary / dist_bary[:, None]
    sv = np.linalg.svd(means, compute_uv=False)
    rank = int((sv > RANK_RTOL * sv[0]).sum()) if sv[0] > 0 else 0
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 and len(sv) >= Q else np.inf
    failures = []
    if rank < Q:
        failures.append(
            f"assumption (i) fails: the {Q} class means are linearly dependent "
            f"(rank {rank}, smallest singular value "
            f"{sv[-1] if len(sv) >= Q else 0:.3g}); "
            "the input dimension must be at least the number of classes"
        )
    c0 = float(r / dist_bary.min()) if dist_bary.min() > 0 else np.inf
    if not c0 < C0_LIMIT:
        failures.append(
            f"assumption (ii) fails: c0 = radius / min|mean - barycenter| = {c0:.4g} "
            f"is not below 1/4 (over by {c0 / C0_LIMIT - 1:.1%}); "
            "use a smaller data.radius or means further apart"
        )
    theta_j = _class_angles(means, f, r, failures) if rank == Q else np.full(Q, np.inf)
    max_theta = float(theta_j.max())
    if np.isfinite(max_theta) and max_theta >= np.pi:
        j = int(theta_j.argmax())
        failures.append(
            f"assumption (iii) fails: theta*_{j} = {np.degrees(max_theta):.2f} deg "
            f"is not below 180 deg (over by {np.degrees(max_theta - np.pi):.2f} deg); "
            "the other clusters do not fit in one cone seen from class "
            f"{j}; use a smaller data.radius"
        )
    theta_star = max(max_theta + theta0, np.pi / 2)
    if np.isfinite(max_theta) and max_theta < np.pi <= theta_star:
        failures.append(
            f"the cone angle max theta*_j + theta0 = {np.degrees(theta_star):.2f} deg "
            f"reaches 180 deg; lower construct.theta0 below "
            f"{np.degrees(np.pi - max_theta):.3g} deg"
        )
    return Conditions(stats.delta, r, c0, theta_j, theta_star, f, rank, cond, failures)


def _class_angles(means, f, r, failures):
    """theta*_j = 2 max_k [angle(m_k - m_j, f_j) + arcsin(4r / |m_k - m_j|)]."""
    Q = means.shape[0]
    theta = np.zeros(Q)
    for j in range(Q):
        worst = 0.0
        for k in range(Q):
            if k == j:
                continue
            d = means[k] - means[j]
            dist = np.linalg.norm(d)
            if 4 * r >= dist:
                if j < k:  # report each pair once
                    failures.append(
                        f"assumption (iii) fails: 4 * radius = {4 * r:.4g} is not "
                        f"below the distance {dist:.4g} of the means of classes {j} "
                        f"and {k} (over by {4 * r / dist - 1:.1%}); use a smaller "
                        "data.radius"
                    )
                worst = np.inf
                break
            worst = max(worst, tr.angle(d, f[j]) + np.arcsin(4 * r / dist))
        theta[j] = 2 * worst
    return theta


# ------------------------------------------------------------ construction


@dataclass
class Construction:
    """A constructed network with its certificates and costs.

    Attributes
    ----------
    status : {"ok", "failed"}
    message : str
        Why it failed, or notes on a successful build.
    layers : list of (W, b)
        Layer-wise parameters, hidden layers then the linear output layer;
        ``W`` has shape (out, in).
    cumulative : list of (W, b)
        Cumulative parameters ``W^(l) = W_l ... W_1`` of the same layers.
    apexes : ndarray, shape (Q, dim)
        ``p_j``, NaN for classes that were not collapsed.
    order : list of int
        Classes in the order their layers collapse them.
    margins : ndarray, shape (n_cone_layers, 2)
        Smallest collapse and keep margins of each cone layer's certificate.
    certified : bool
        Every cone layer passed its sign certificate.
    conditions : Conditions
    costs : dict of float
        Every normalization of the training cost of the layer-wise network.
    max_output_error : float
        Largest ``|x_out - y_j|`` over the training points.
    truncated : list of ndarray
        The data (rows ``keep_rows``) after each truncation layer, starting
        with the input.
    composition_error : float
        Largest difference between the network's outputs and the affine map
        of the composed truncations (the composition identity).
    output_fit : OutputFit or None
    """

    status: str
    message: str
    conditions: Conditions
    layers: list = field(default_factory=list)
    cumulative: list = field(default_factory=list)
    apexes: np.ndarray | None = None
    order: list = field(default_factory=list)
    margins: np.ndarray | None = None
    certified: bool = False
    costs: dict = field(default_factory=dict)
    max_output_error: float = np.nan
    truncated: list = field(default_factory=list)
    composition_error: float = np.nan
    output_fit: OutputFit | None = None
    lam: float = np.nan

    def predict(self, X):
        """Network outputs for inputs ``X`` of shape (n, dim)."""
        return forward_relu(self.layers, X)


def build_clustered(
    X,
    labels,
    Y,
    *,
    mu_factor=MU_FACTOR,
    theta0=THETA0,
    radius=None,
    order=None,
    hidden_layers=None,
    strict=True,
    intercept=False,
    keep_rows=None,
    progress=None,
):
    """Build a zero-cost ReLU network for clustered data (Construction A).

    Layer ``l`` sends class ``order[l]`` to its apex
    ``p = mean + mu_factor * radius * f`` and keeps every other point; the
    output layer maps apex ``p_j`` to ``y_j``. With ``hidden_layers`` below
    Q only that many classes are collapsed and the cost is positive; above Q
    identity layers are appended.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    mu_factor : float in (2, 3)
    theta0 : float
        Angle margin over the largest per-class angle (rad).
    radius : float, optional
        Radius of the balls the network must cover; at least the data's.
    order : sequence of int, optional
        Collapse order, a permutation of ``0..Q-1``.
    hidden_layers : int, optional
        Number of hidden layers L, default Q.
    strict : bool
        Refuse to build when an assumption fails; otherwise build and let the
        certificate decide.
    intercept : bool
        Fit an output bias (true optimum) instead of ``b^(L+1) = 0``.
    keep_rows : ndarray of int, optional
        Rows whose truncated images are returned (default all).
    progress : callable, optional
        Called as ``progress(done, total)`` after each layer.

    Returns
    -------
    Construction
    """
    X = np.asarray(X, dtype=float)
    Q = Y.shape[0]
    check_build_args(X, labels, Y, mu_factor, order, hidden_layers)
    cond = clustered_conditions(X, labels, radius, theta0, Q)
    if cond.failures and (strict or not cond.buildable):
        return Construction("failed", "; ".join(cond.failures), cond)
    return build_cones(
        X,
        labels,
        Y,
        cond,
        order=order,
        hidden_layers=hidden_layers,
        mu_factor=mu_factor,
        intercept=intercept,
        keep_rows=keep_rows,
        progress=progress,
    )


def build_cones(
    X,
    labels,
    Y,
    cond,
    *,
    order=None,
    hidden_layers=None,
    mu_factor=MU_FACTOR,
    intercept=False,
    keep_rows=None,
    progress=None,
    basis=None,
    result=None,
):
    """Collapse each class by its cone layer, certify, fit the output layer.

    The shared body of :func:`build_clustered` and of the reduced-width
    construction: with ``basis`` ``U`` of shape (dim, k) every layer acts in
    the span of ``U`` (``k`` rows). ``result`` is the Construction class to
    return (default :class:`Construction`). Arguments as in
    :func:`build_clustered`; ``cond`` from :func:`clustered_conditions`.
    """
    result = Construction if result is None else result
    Q = Y.shape[0]
    order = list(range(Q)) if order is None else [int(j) for j in order]
    L = Q if hidden_layers is None else int(hidden_layers)
    stats = class_stats(X, labels, Q)
    rows = np.arange(X.shape[0]) if keep_rows is None else np.asarray(keep_rows)
    margin = CERT_MARGIN_REL * max(1.0, float(np.abs(X).max()))
    width = X.shape[1] if basis is None else basis.shape[1]

    X_cur, truncated = X, [X[rows]]
    apexes = np.full((Q, X.shape[1]), np.nan)
    cumulative, margins, failures = [], [], []
    n_cone = min(L, Q)
    for step, j in enumerate(order[:n_cone]):
        p = stats.means[j] + mu_factor * cond.radius * cond.f[j]
        W, b = tr.cone_layer(p, cond.f[j], cond.theta_star, basis=basis)
        Z = X_cur @ W.T + b
        ok, m_col, m_keep = tr.certify_z(Z, labels == j, margin)
        if step:
            m_keep = min(m_keep, float((apexes[order[:step]] @ W.T + b).min()))
            ok = ok and m_keep >= margin
        if not ok:
            failures.append(certificate_failure(step, j, m_col, m_keep, margin))
        margins.append((m_col, m_keep))
        X_cur = tr.truncate_z(W, b, Z)
        truncated.append(X_cur[rows])
        apexes[j] = p
        cumulative.append((W, b))
        if progress is not None:
            progress(step + 1, n_cone + 1)

    try:
        fit = fit_output(X_cur, labels, Y, intercept)
    except ValueError as exc:  # keep any certificate failure that caused it
        return result(
            "failed",
            "; ".join(failures + [str(exc)]),
            cond,
            apexes=apexes,
            order=order,
            certified=not failures,
            margins=np.array(margins).reshape(-1, 2),
            truncated=truncated,
        )
    cumulative.append((fit.A, fit.c))
    Ws, bs = tr.layers_from_cumulative(
        [w for w, _ in cumulative], [b for _, b in cumulative]
    )
    layers = list(zip(Ws, bs))
    cumulative, layers = pad_identity(cumulative, layers, L - n_cone)

    out = forward_relu(layers, X)
    via_truncation = X_cur @ fit.A.T + fit.c
    notes = failures or list(cond.failures)
    if n_cone < Q:
        notes = notes + [
            f"only {n_cone} of {Q} classes collapsed with {L} hidden layers"
        ]
    if progress is not None:
        progress(n_cone + 1, n_cone + 1)
    return result(
        status="failed" if failures else "ok",
        message="; ".join(notes),
        conditions=cond,
        layers=layers,
        cumulative=cumulative,
        apexes=apexes,
        order=order,
        margins=np.array(margins).reshape(-1, 2),
        certified=not failures,
        costs=all_costs(out, labels, Y),
        max_output_error=max_output_error(out, labels, Y),
        truncated=truncated,
        composition_error=float(np.abs(out - via_truncation).max()),
        output_fit=fit,
        lam=tr.squeeze_factor(cond.theta_star, width),
    )


def check_build_args(X, labels, Y, mu_factor, order, hidden_layers):
    Q = Y.shape[0]
    if X.ndim != 2 or labels.shape != (X.shape[0],):
        raise ValueError(
            f"expected X (N, M) and labels (N,), got {X.shape} and {labels.shape}"
        )
    if not 2.0 < mu_factor < 3.0:
        raise ValueError(f"mu_factor must lie in (2, 3), got {mu_factor}")
    if order is not None and sorted(int(j) for j in order) != list(range(Q)):
        raise ValueError(
            f"order must be a permutation of 0..{Q - 1}, got {list(order)}"
        )
    if hidden_layers is not None and hidden_layers < 1:
        raise ValueError(f"hidden_layers must be at least 1, got {hidden_layers}")


def certificate_failure(step, j, m_col, m_keep, margin):
    return (
        f"certificate fails at layer {step + 1} (class {j}): collapse margin "
        f"{m_col:.3g}, keep margin {m_keep:.3g}, both must be >= {margin:.3g}"
    )


def pad_identity(cumulative, layers, extra):
    """Insert ``extra`` identity layers before the output layer."""
    if extra <= 0:
        return cumulative, layers
    W_last, b_last = cumulative[-2]
    d = W_last.shape[0]
    ident = [(np.eye(d), np.zeros(d))] * extra
    repeats = [(W_last.copy(), b_last.copy())] * extra
    return (
        cumulative[:-1] + repeats + cumulative[-1:],
        layers[:-1] + ident + layers[-1:],
    )


def weight_count(layers):
    """Number of weights (not biases) of a network."""
    return int(sum(W.size for W, _ in layers))
