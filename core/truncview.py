"""See any ReLU network as a chain of truncation maps of input space.

The hidden layers of a network with cumulative parameters ``W^(l), b^(l)``
act on input space by composed truncation maps (reference/construct.md
section 2): ``x^(tau,l) = tau_{W^(l),b^(l)}(x^(tau,l-1))`` and the forward
pass is recovered as ``x^(l) = W^(l) x^(tau,l) + b^(l)``. Each map is a cone
with base point ``p = -W^+ b`` and edges ``v_i = W^+ e_i``: a point whose
pre-activations ``z = W x + b`` are all positive is fixed, one whose
pre-activations are all non-positive is collapsed to ``p``, and the rest are
partly truncated (the coordinates with ``z_i < 0`` are dropped).

The maps need each ``W^(l)`` of full row rank and nested row spaces,
``row(W^(l)) c row(W^(l-1))``, which holds for non-increasing widths of full
rank. Networks that break a condition are still viewed, with the SVD
pseudo-inverse, and the failure is reported per layer. Samples are rows:
``X`` has shape ``(n_samples, dim)``, ``W`` has shape ``(out, in)``; ``L`` is
the number of hidden layers, ``Q`` the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import truncation as tr

RANK_RTOL = 1e-10  # s_min / s_max below this counts as rank deficient
NEST_RTOL = 1e-8  # nesting residual, relative to |W^(l)|, still counted as nested
STATE_RTOL = 1e-9  # |z| below this (relative to the data scale) counts as zero
STATES = ("collapsed", "partly", "fixed")  # state codes 0, 1, 2


@dataclass
class LayerView:
    """One hidden layer seen as a truncation map of input space.

    Attributes
    ----------
    layer : int
        1-based depth ``l``.
    W, b : ndarray, shapes (d_l, dim) and (d_l,)
        Cumulative parameters ``W^(l)``, ``b^(l)``.
    base_point : ndarray, shape (dim,)
        ``p = -(W^(l))^+ b^(l)``.
    edges : ndarray, shape (d_l, dim)
        Row ``i`` is ``v_i = (W^(l))^+ e_i``.
    truncated : ndarray, shape (n_samples, dim)
        ``x^(tau,l)`` of every sample.
    state : ndarray of int, shape (n_samples,)
        What this layer does to its input: 0 collapsed, 1 partly, 2 fixed.
    cum_state : ndarray of int, shape (n_samples,)
        Collapsed at some depth ``<= l`` (0), else partly at some depth (1),
        else fixed at every depth (2).
    fractions, local_fractions : ndarray, shape (Q, 3)
        Per class, the fractions of ``cum_state`` (resp. ``state``) equal to
        0, 1, 2 (NaN for empty classes).
    spread : ndarray, shape (Q,)
        Per class, the mean squared distance of ``x^(tau,l)`` to its mean.
    sv_ratio : float
        ``s_min / s_max`` of ``W^(l)`` over its rows (0 when it has more
        rows than columns).
    nest_residual : float
        ``|W^(l) - W^(l) P| / max(1, |W^(l)|)``, ``P`` the projector on
        ``row(W^(l-1))`` (max norms).
    composition_error : float
        ``max |x^(l) - (W^(l) x^(tau,l) + b^(l))|`` against the ReLU forward pass.
    failures : list of str
        One sentence per failed condition.
    """

    layer: int
    W: np.ndarray
    b: np.ndarray
    base_point: np.ndarray
    edges: np.ndarray
    truncated: np.ndarray
    state: np.ndarray
    cum_state: np.ndarray
    fractions: np.ndarray
    local_fractions: np.ndarray
    spread: np.ndarray
    sv_ratio: float
    nest_residual: float
    composition_error: float
    failures: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.failures


@dataclass
class TruncationView:
    """A network's hidden layers as truncation maps of its input data.

    Attributes
    ----------
    layers : list of LayerView, length L
    labels : ndarray of int, shape (n_samples,)
    n_classes : int
    output_error : float
        ``max |x_out - (W^(L+1) x^(tau,L) + b^(L+1))|``.
    """

    layers: list
    labels: np.ndarray
    n_classes: int
    output_error: float

    @property
    def failures(self):
        return [msg for lv in self.layers for msg in lv.failures]

    @property
    def fractions(self):
        """Cumulative state fractions, shape (L, Q, 3)."""
        return np.stack([lv.fractions for lv in self.layers])

    @property
    def spread(self):
        """Within-class spreads, shape (L, Q)."""
        return np.stack([lv.spread for lv in self.layers])

    @property
    def composition_error(self):
        """Largest composition-identity error over all layers and the output."""
        errors = [lv.composition_error for lv in self.layers] + [self.output_error]
        return float(max(errors))


def truncation_view(layers, X, labels=None, *, rank_rtol=RANK_RTOL):
    """View every hidden layer of a ReLU network as a truncation map.

    Parameters
    ----------
    layers : sequence of (W, b)
        Layer-wise parameters, hidden layers then the linear output layer.
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,), optional
        Class of each sample (default: one class).
    rank_rtol : float
        ``s_min / s_max`` below which a cumulative weight is rank deficient.

    Returns
    -------
    TruncationView
        Conditions that fail are reported in each layer's ``failures``.
    """
    layers, X, labels = _check_inputs(layers, X, labels)
    return _view(layers, X, labels, rank_rtol)


def _check_inputs(layers, X, labels):
    layers = [
        (np.asarray(W, dtype=float), np.asarray(b, dtype=float)) for W, b in layers
    ]
    if len(layers) < 2:
        raise ValueError(
            f"need at least one hidden layer and an output layer, "
            f"got {len(layers)} layer(s)"
        )
    X = np.asarray(X, dtype=float)
    dim = layers[0][0].shape[1]
    if X.ndim != 2 or X.shape[1] != dim:
        raise ValueError(f"X: expected shape (n_samples, {dim}), got {X.shape}")
    labels = (
        np.zeros(X.shape[0], dtype=int)
        if labels is None
        else np.asarray(labels).astype(int)
    )
    if labels.shape != (X.shape[0],) or (labels < 0).any():
        raise ValueError(
            f"labels: expected {X.shape[0]} non-negative ints, got shape {labels.shape}"
        )
    return layers, X, labels


def _view(layers, X, labels, rank_rtol):
    Q = int(labels.max()) + 1 if labels.size else 1
    Wc, bc = tr.cumulative_from_layers([W for W, _ in layers], [b for _, b in layers])
    tol = STATE_RTOL * max(1.0, float(np.abs(X).max(initial=0.0)))
    views, A, X_tau = [], X, X
    cum_state = np.full(X.shape[0], 2)
    W_prev = np.eye(X.shape[1])
    for ell, ((W_l, b_l), W, b) in enumerate(zip(layers[:-1], Wc, bc), start=1):
        A = tr.relu(A @ W_l.T + b_l)
        lv = _layer_view(ell, W, b, W_prev, X_tau, A, labels, Q, tol, rank_rtol)
        lv.failures = _width_failure(ell, layers, W_prev) + lv.failures
        cum_state = np.minimum(cum_state, lv.state)
        lv.cum_state = cum_state.copy()
        lv.fractions = _fractions(cum_state, labels, Q)
        views.append(lv)
        X_tau, W_prev = lv.truncated, W

    out = A @ layers[-1][0].T + layers[-1][1]
    out_error = _max_abs(out - (X_tau @ Wc[-1].T + bc[-1]))
    return TruncationView(views, labels, Q, out_error)


def _layer_view(ell, W, b, W_prev, X_in, A, labels, Q, tol, rank_rtol):
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    sv_ratio = _sv_ratio(W, s)
    keep = s > rank_rtol * s.max(initial=0.0)
    Wp = (Vt[keep].T / s[keep]) @ U[:, keep].T
    Z = X_in @ W.T + b
    truncated = tr.relu(Z) @ Wp.T - b @ Wp.T
    state = _states(Z, tol)
    nest = _nest_residual(W, W_prev, rank_rtol)
    comp = _max_abs(A - (truncated @ W.T + b))
    failures = _failures(ell, W, sv_ratio, rank_rtol, nest)
    return LayerView(
        ell,
        W,
        b,
        -Wp @ b,
        Wp.T.copy(),
        truncated,
        state,
        state,
        None,
        _fractions(state, labels, Q),
        _spread(truncated, labels, Q),
        sv_ratio,
        nest,
        comp,
        failures,
    )


def _sv_ratio(W, s):
    if W.shape[0] > W.shape[1] or s.size == 0 or s.max() == 0.0:
        return 0.0
    return float(s.min() / s.max())


def _nest_residual(W, W_prev, rank_rtol):
    """Part of ``W``'s rows outside ``row(W_prev)``, relative to ``|W|``."""
    _, s, Vt = np.linalg.svd(W_prev, full_matrices=False)
    basis = Vt[s > rank_rtol * s.max(initial=0.0)]
    residual = W - (W @ basis.T) @ basis
    return _max_abs(residual) / max(1.0, _max_abs(W))


def _failures(ell, W, sv_ratio, rank_rtol, nest):
    m, n = W.shape
    failures = []
    if m > n:
        failures.append(
            f"layer {ell}: W^({ell}) has {m} rows but acts on R^{n}, "
            "so it cannot have full row rank"
        )
    elif sv_ratio < rank_rtol:
        failures.append(
            f"layer {ell}: W^({ell}) is rank deficient (s_min/s_max = "
            f"{sv_ratio:.3g} < {rank_rtol:.3g}); viewed with the SVD "
            "pseudo-inverse"
        )
    if nest > NEST_RTOL:
        failures.append(
            f"layer {ell}: row(W^({ell})) is not inside row(W^({ell - 1}))"
            f" (relative residual {nest:.3g} > {NEST_RTOL:.3g})"
        )
    return failures


def _width_failure(ell, layers, W_prev):
    d_in, d_out = layers[ell - 1][0].shape[1], layers[ell - 1][0].shape[0]
    if d_out <= d_in:
        return []
    return [f"layer {ell}: widens from {d_in} to {d_out}; widths must not increase"]


def _states(Z, tol):
    """0 where every ``z <= tol``, 2 where every ``z >= -tol``, else 1."""
    if Z.shape[1] == 0:
        return np.zeros(Z.shape[0], dtype=int)
    state = np.ones(Z.shape[0], dtype=int)
    state[(Z >= -tol).all(axis=1)] = 2
    state[(Z <= tol).all(axis=1)] = 0
    return state


def _fractions(state, labels, Q):
    """Per class the fractions of states 0, 1, 2, shape (Q, 3)."""
    counts = np.zeros((Q, 3))
    np.add.at(counts, (labels, state), 1.0)
    sizes = counts.sum(axis=1, keepdims=True)
    out = np.full((Q, 3), np.nan)
    np.divide(counts, sizes, out=out, where=sizes > 0)
    return out


def _spread(X, labels, Q):
    """Per class the mean squared distance to the class mean, shape (Q,)."""
    spread = np.full(Q, np.nan)
    for j in range(Q):
        rows = X[labels == j]
        if rows.shape[0]:
            spread[j] = float(((rows - rows.mean(axis=0)) ** 2).sum(axis=1).mean())
    return spread


def _max_abs(A):
    return float(np.abs(A).max(initial=0.0))


@dataclass
class TruncationOverTime:
    """Truncation fractions and spreads along a recorded orbit.

    Attributes
    ----------
    fractions : ndarray, shape (T, L, Q, 3)
        Cumulative state fractions (collapsed, partly, fixed) per time.
    local_fractions : ndarray, shape (T, L, Q, 3)
    spread : ndarray, shape (T, L, Q)
    composition_error : ndarray, shape (T,)
    n_failures : ndarray of int, shape (T,)
        Number of failed conditions at each time.
    s : ndarray, shape (T,), or None
        Recorded times.
    """

    fractions: np.ndarray
    local_fractions: np.ndarray
    spread: np.ndarray
    composition_error: np.ndarray
    n_failures: np.ndarray
    s: np.ndarray | None


def truncation_over_time(thetas, widths, X, labels, s=None, *, rank_rtol=RANK_RTOL):
    """Follow the truncation of every class through a flow's recorded orbit.

    Parameters
    ----------
    thetas : ndarray, shape (T, n_params)
        Flattened parameters at each recorded time (``network.flatten`` order).
    widths : sequence of int
        ``[M, M_1, ..., M_L, Q_out]``.
    X : ndarray, shape (n_samples, M)
    labels : ndarray of int, shape (n_samples,)
    s : ndarray, shape (T,), optional
        The recorded times.

    Returns
    -------
    TruncationOverTime
    """
    from .network import unflatten

    thetas = np.asarray(thetas, dtype=float)
    if thetas.ndim != 2 or thetas.shape[0] == 0:
        raise ValueError(
            f"thetas: expected shape (T, n_params), T >= 1, got {thetas.shape}"
        )
    if s is not None and np.shape(s) != (thetas.shape[0],):
        raise ValueError(f"s: expected shape ({thetas.shape[0]},), got {np.shape(s)}")
    views = []
    for theta in thetas:
        layers, Xc, lab = _check_inputs(unflatten(theta, widths), X, labels)
        views.append(_view(layers, Xc, lab, rank_rtol))
    return TruncationOverTime(
        fractions=np.stack([v.fractions for v in views]),
        local_fractions=np.stack([
            np.stack([lv.local_fractions for lv in v.layers]) for v in views
        ]),
        spread=np.stack([v.spread for v in views]),
        composition_error=np.array([v.composition_error for v in views]),
        n_failures=np.array([len(v.failures) for v in views]),
        s=None if s is None else np.asarray(s, dtype=float),
    )


def partial_truncation_start(construction, X, labels, layer, weight, *, nu=None):
    """A network whose cone layer ``layer`` truncates its class only in part.

    The apex of cone layer ``l`` (class ``j = order[l-1]``) is moved along its
    axis ``f_j`` between the collapse apex ``mean_j + mu f_j`` (``weight = 0``)
    and the keep apex ``mean_j - nu f_j`` (``weight = 1``,
    reference/construct.md section 6), the bias rebuilt as ``b = -W p`` and the
    cumulative parameters converted to layer-wise ones. In between, the apex
    passes through the cluster and only part of it is truncated.

    Parameters
    ----------
    construction : construct.Construction
        A built network (``build_clustered``) with cone layers.
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    layer : int
        1-based cone layer, ``1 <= layer <= len(construction.order)``.
    weight : float in [0, 1]
    nu : float, optional
        Keep distance; default ``1.5 radius sqrt(dim)`` (above the sufficient
        ``radius sqrt(dim)``).

    Returns
    -------
    list of (W, b)
        Layer-wise parameters, usable as a flow start (``network.save_npz``).
    """
    if not construction.layers:
        raise ValueError(
            f"construction has no layers (status {construction.status!r}: "
            f"{construction.message})"
        )
    n_cone = int(np.sum(~np.isnan(construction.apexes[:, 0])))
    if not 1 <= layer <= n_cone:
        raise ValueError(f"layer: expected a cone layer in 1..{n_cone}, got {layer}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight: expected a number in [0, 1], got {weight}")
    return _partial_start(
        construction,
        np.asarray(X, dtype=float),
        np.asarray(labels),
        layer,
        float(weight),
        nu,
    )


def _partial_start(cons, X, labels, layer, weight, nu):
    j = cons.order[layer - 1]
    f, radius = cons.conditions.f[j], cons.conditions.radius
    mean = X[labels == j].mean(axis=0)
    p_collapse = cons.apexes[j]
    nu = 1.5 * radius * np.sqrt(X.shape[1]) if nu is None else float(nu)
    p = (1.0 - weight) * p_collapse + weight * (mean - nu * f)

    cumulative = [(W.copy(), b.copy()) for W, b in cons.cumulative]
    W = cumulative[layer - 1][0]
    cumulative[layer - 1] = (W, -W @ p)
    Ws, bs = tr.layers_from_cumulative(
        [w for w, _ in cumulative], [b for _, b in cumulative]
    )
    return list(zip(Ws, bs))


@dataclass
class Source:
    """A network and its data, read by :func:`load_source`.

    Attributes
    ----------
    layers : list of (W, b)
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    kind : str
        ``"result"`` or ``"npz"``.
    thetas : ndarray, shape (T, n_params), or None
        A flow's recorded parameters, when they were stored.
    s : ndarray, shape (T,), or None
    widths : list of int
    time : int or None
        The recorded time index the layers come from (None: final network).
    """

    layers: list
    X: np.ndarray
    labels: np.ndarray
    kind: str
    thetas: np.ndarray | None = None
    s: np.ndarray | None = None
    widths: list | None = None
    time: int | None = None


def load_source(path, data=None, time=None):
    """Read a network and its data for :func:`truncation_view`.

    Parameters
    ----------
    path : str or Path
        A dlmin result file (``.h5``: a construction or a flow's network) or
        an ``.npz`` of weights ``W1, b1, ...`` (``W`` of shape (out, in)).
    data : str or Path, optional
        ``.npz`` with ``X`` (and ``labels``) or ``.csv`` (numbers; a last
        extra column is taken as labels). Required for ``.npz`` weights;
        replaces a result file's data when given.
    time : int, optional
        Recorded time index of a flow (negative counts from the end); needs
        ``trajectory/theta`` in the file.

    Returns
    -------
    Source

    Raises
    ------
    ValueError
        Naming the file and what is missing or malformed.
    """
    from . import network

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npz":
        if data is None:
            raise ValueError(
                f"{path}: weights alone; give DATA (.npz with X, labels "
                "or .csv) to view the network on"
            )
        if time is not None:
            raise ValueError(
                f"{path}: a weights file has no recorded times; drop --time"
            )
        layers = network.load_npz(path)
        widths = network.widths_of(layers)
        X, labels = _load_data(data, widths[0])
        return Source(layers, X, labels, "npz", widths=widths)
    return _load_result(path, data, time)


def _load_result(path, data, time):
    from . import network, store

    try:
        res = store.load(path)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 result file ({exc})") from exc
    net = res.get("network", {})
    layers = store.read_layers(net)
    if not layers:
        status = res["attrs"].get("status", "unknown")
        raise ValueError(f"{path}: holds no network (run status: {status})")
    widths = network.widths_of(layers)
    traj = res.get("trajectory", {})
    thetas = traj.get("theta")
    s = traj.get("s") if thetas is not None else None
    if time is not None:
        layers = _layers_at(path, thetas, widths, time)
        time = int(time) % thetas.shape[0]
    if data is not None:
        X, labels = _load_data(data, widths[0])
    else:
        d = res.get("data", {})
        if "X" not in d:
            raise ValueError(f"{path}: stores no data/X; give DATA")
        X = np.asarray(d["X"], dtype=float)
        labels = np.asarray(d.get("labels", np.zeros(X.shape[0])), dtype=int)
    return Source(layers, X, labels, "result", thetas, s, widths, time)


def _layers_at(path, thetas, widths, time):
    from .network import unflatten

    if thetas is None:
        raise ValueError(
            f"{path}: no trajectory/theta stored (run the flow with "
            "store_theta), so no recorded time can be viewed"
        )
    T = thetas.shape[0]
    if not -T <= int(time) < T:
        raise ValueError(
            f"time index {time} out of range: {path} records {T} times "
            f"(0..{T - 1}, or negative from the end)"
        )
    return unflatten(thetas[int(time)], widths)


def _load_data(data, dim):
    from .predict import load_inputs

    data = Path(data)
    X, labels = load_inputs(data)
    if data.suffix == ".csv" and X.ndim == 2 and X.shape[1] == dim + 1:
        X, labels = X[:, :-1], X[:, -1]
    if X.ndim != 2 or X.shape[1] != dim:
        raise ValueError(f"{data}: expected inputs of shape (n, {dim}), got {X.shape}")
    if labels is None:
        return X, np.zeros(X.shape[0], dtype=int)
    labels = np.asarray(labels)
    if (
        labels.shape != (X.shape[0],)
        or not np.all(labels == np.round(labels))
        or (labels < 0).any()
    ):
        raise ValueError(f"{data}: labels must be {X.shape[0]} non-negative integers")
    return X, labels.astype(int)


STORED_ROWS = 10000  # truncated data are stored for at most this many points


def stored_rows(n):
    """Evenly spaced row indices, at most ``STORED_ROWS`` of ``n``."""
    if n <= STORED_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, STORED_ROWS).round().astype(int)


def write_view(w, view, labels, n_samples, over=None):
    """Store a view (and its course over time) in ``truncview/`` of a result file.

    Parameters
    ----------
    w : dlmin.core.store.ResultWriter
    view : TruncationView
    labels : ndarray of int, shape (n_samples,)
    over : TruncationOverTime, optional
    """
    rows = stored_rows(n_samples)
    w.array("truncview", "labels", labels)
    w.array("truncview", "rows", rows)
    for lv in view.layers:
        w.array("truncview", f"base_point_{lv.layer}", lv.base_point)
        w.array("truncview", f"edges_{lv.layer}", lv.edges)
        w.array("truncview", f"truncated_{lv.layer}", lv.truncated[rows])
        w.array(
            "truncview",
            f"state_{lv.layer}",
            lv.cum_state,
            codes="0 collapsed, 1 partly, 2 fixed (cumulative)",
        )
        w.array("truncview", f"local_state_{lv.layer}", lv.state)
    w.array(
        "truncview",
        "fractions",
        view.fractions,
        axes="layer, class, (collapsed, partly, fixed)",
    )
    w.array("truncview", "spread", view.spread, axes="layer, class")
    if over is not None:
        w.array("truncview", "fractions_t", over.fractions)
        w.array("truncview", "spread_t", over.spread)
        if over.s is not None:
            w.array("truncview", "s", over.s)
    w.set_attrs(
        "truncview",
        layers=len(view.layers),
        failures=view.failures,
        composition_error=view.composition_error,
    )
