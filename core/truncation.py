"""Truncation maps, cumulative parameters and cone geometry.

A full-row-rank affine layer followed by ReLU acts on input space as the
truncation map ``tau_{W,b}(x) = W^+ (relu(W x + b) - b)``. Composing the maps of
the cumulative parameters of a network reproduces its hidden layers
(reference/construct.md section 2). Everything here stores samples as rows:
``X`` has shape ``(n_samples, dim)`` and ``W`` has shape ``(out, in)``.
"""

from __future__ import annotations

import numpy as np

MATRIX_RTOL = 1e-10  # relative tolerance of the matrix identities (reference section 9)
ALIGN_NEAR = 1e-4  # below this |h/|h| - u/sqrt(n)|^2 the Householder vector cancels


def relu(Z):
    """Entrywise positive part, ``max(Z, 0)``."""
    return np.maximum(Z, 0.0)


def pinv_rows(W):
    """Pseudo-inverse of a full-row-rank matrix, ``W^+ = W^T (W W^T)^{-1}``.

    Parameters
    ----------
    W : ndarray, shape (m, n), m <= n, rank m

    Returns
    -------
    ndarray, shape (n, m)
        A plain inverse when ``W`` is square; a solve, never an explicit
        inverse, otherwise.
    """
    W = np.asarray(W, dtype=float)
    m, n = W.shape
    if m > n:
        raise ValueError(f"W must have no more rows than columns, got shape {W.shape}")
    if m == n:
        return np.linalg.inv(W)
    return np.linalg.solve(W @ W.T, W).T


def truncate(W, b, X):
    """Apply the truncation map ``tau_{W,b}`` to every row of ``X``.

    Parameters
    ----------
    W : ndarray, shape (m, dim), full row rank
    b : ndarray, shape (m,)
    X : ndarray, shape (n_samples, dim)

    Returns
    -------
    ndarray, shape (n_samples, dim)
        ``W^+ (relu(W x + b) - b)`` for each row ``x``.
    """
    return truncate_z(W, b, X @ W.T + b)


def truncate_z(W, b, Z):
    """:func:`truncate` from precomputed pre-activations ``Z = X W^T + b``.

    ``Z`` (shape (n_samples, m)) is overwritten.
    """
    np.maximum(Z, 0.0, out=Z)
    Z -= b
    return Z @ pinv_rows(W).T


def truncate_beta(W, beta, X):
    """Truncation map in beta-form, ``W^+ relu(W (x + beta)) - beta``.

    With ``beta = W^+ b`` this equals :func:`truncate` with ``b = W beta``.
    """
    return relu((X + beta) @ W.T) @ pinv_rows(W).T - beta


def polyhedral_parts(W, b, X):
    """Base point, edge vectors and cone coordinates of ``tau_{W,b}``.

    ``tau(x) = p + sum_i max(z_i, 0) v_i`` with ``p = -W^+ b``, ``v_i = W^+ e_i``
    and ``z = W x + b``.

    Returns
    -------
    p : ndarray, shape (dim,)
    V : ndarray, shape (m, dim)
        Row ``i`` is the edge vector ``v_i``.
    Z : ndarray, shape (n_samples, m)
        Pre-activations of every sample.
    """
    Wp = pinv_rows(W)
    return -Wp @ b, Wp.T.copy(), X @ W.T + b


def cumulative_from_layers(Ws, bs):
    """Cumulative parameters ``W^(l) = W_l ... W_1`` and ``b^(l) = W_l b^(l-1) + b_l``.

    Parameters
    ----------
    Ws : sequence of ndarray, shapes (d_l, d_{l-1})
    bs : sequence of ndarray, shapes (d_l,)

    Returns
    -------
    Wc, bc : lists of ndarray, shapes (d_l, d_0) and (d_l,)
    """
    Wc, bc = [], []
    W_acc, b_acc = None, None
    for W, b in zip(Ws, bs):
        W_acc = W if W_acc is None else W @ W_acc
        b_acc = b if b_acc is None else W @ b_acc + b
        Wc.append(np.array(W_acc, dtype=float))
        bc.append(np.array(b_acc, dtype=float))
    return Wc, bc


def layers_from_cumulative(Wc, bc, check_nested=True):
    """Layer-wise weights from cumulative ones, ``W_l = W^(l) (W^(l-1))^+``.

    Biases follow as ``b_l = b^(l) - W_l b^(l-1)``. The product ``W_l W^(l-1)``
    reproduces ``W^(l)`` only when ``row(W^(l))`` lies in ``row(W^(l-1))``;
    with ``check_nested`` this is verified and a ``ValueError`` names the
    first layer where it fails.

    Returns
    -------
    Ws, bs : lists of ndarray, shapes (d_l, d_{l-1}) and (d_l,)
    """
    Ws, bs = [], []
    W_prev, b_prev = None, None
    for ell, (W, b) in enumerate(zip(Wc, bc), start=1):
        if W_prev is None:
            W_l, b_l = np.array(W, dtype=float), np.array(b, dtype=float)
        else:
            W_l = W @ pinv_rows(W_prev)
            b_l = b - W_l @ b_prev
            if check_nested:
                _check_nested(ell, W_l @ W_prev, W)
        Ws.append(W_l)
        bs.append(b_l)
        W_prev, b_prev = W, b
    return Ws, bs


def _check_nested(ell, W_rebuilt, W):
    error = np.abs(W_rebuilt - W).max()
    scale = max(1.0, np.abs(W).max())
    if error > MATRIX_RTOL * scale * 1e3:
        raise ValueError(
            f"layer {ell}: row space of W^({ell}) is not inside that of "
            f"W^({ell - 1}) (W_l W^(l-1) misses W^(l) by {error:.3g}); "
            "cumulative parameters need nested row spaces"
        )


def truncation_chain(Wc, bc, X):
    """Compose the truncation maps of cumulative parameters.

    Parameters
    ----------
    Wc, bc : sequences of cumulative parameters of the hidden layers
    X : ndarray, shape (n_samples, dim)

    Returns
    -------
    list of ndarray, each of shape (n_samples, dim)
        ``[X, tau_1(X), tau_2(tau_1(X)), ...]``, one more entry than layers.
    """
    chain = [np.asarray(X, dtype=float)]
    for W, b in zip(Wc, bc):
        chain.append(truncate(W, b, chain[-1]))
    return chain


def theta_n(n):
    """Full opening angle ``2 arccos sqrt((n-1)/n)`` of the widest cone in R^n_+."""
    return 2.0 * np.arccos(np.sqrt((n - 1) / n))


def squeeze_factor(theta, n):
    """``lambda = tan(theta_n / 2) / tan(theta / 2)`` if ``theta > theta_n``, else 1."""
    if not 0.0 < theta < np.pi:
        raise ValueError(f"cone angle must lie in (0, pi), got {theta!r}")
    tn = theta_n(n)
    if theta <= tn:
        return 1.0
    return float(np.tan(tn / 2.0) / np.tan(theta / 2.0))


def squeeze_matrix(theta, n):
    """Squeezing matrix ``W_theta = lambda I + (1 - lambda) u u^T / n``.

    It fixes ``u = (1, ..., 1)`` and maps the cone of full angle ``theta``
    about ``u`` into the positive orthant.

    Returns
    -------
    ndarray, shape (n, n)
    """
    lam = squeeze_factor(theta, n)
    return lam * np.eye(n) + (1.0 - lam) * np.full((n, n), 1.0 / n)


def align_reflection(h):
    """Householder reflection ``R`` with ``R h / |h| = u / sqrt(n)``.

    When ``h`` is within about 0.01 rad of ``u`` the reflection across
    ``h/|h| + u/sqrt(n)``, negated, is used instead: still orthogonal and
    symmetric, and free of the cancellation in ``h/|h| - u/sqrt(n)``.

    Parameters
    ----------
    h : ndarray, shape (n,), nonzero

    Returns
    -------
    ndarray, shape (n, n), orthogonal and symmetric
    """
    h = np.asarray(h, dtype=float)
    norm = np.linalg.norm(h)
    if norm == 0.0:
        raise ValueError("cannot align the zero vector")
    n = h.size
    a, e = h / norm, np.full(n, 1.0 / np.sqrt(n))
    v = a - e
    vv = v @ v
    if vv < 1e-30:
        return np.eye(n)
    if vv < ALIGN_NEAR:
        # a = e up to rounding: |a| - |e| ~ eps spoils I - 2vv^T/|v|^2 by
        # eps/|v|. Reflecting across w = a + e and negating also maps a to e.
        w = a + e
        return 2.0 * np.outer(w, w) / (w @ w) - np.eye(n)
    return np.eye(n) - 2.0 * np.outer(v, v) / vv


def cone_layer(p, h, theta, basis=None):
    """Cumulative parameters of a cone layer with apex ``p`` and axis ``h``.

    ``W = W_theta R_h`` and ``b = -W p``: the map is the identity on the
    forward cone ``p + C_theta[h]`` and sends the backward cone to ``p``.
    With ``basis`` ``U`` of shape (dim, k) the layer acts inside the span
    of ``U``: ``W = W_theta R_{U^T h} U^T`` of shape (k, dim).

    Returns
    -------
    W : ndarray, shape (dim, dim) or (k, dim)
    b : ndarray, shape (dim,) or (k,)
    """
    h = np.asarray(h, dtype=float)
    if basis is None:
        W = squeeze_matrix(theta, h.size) @ align_reflection(h)
    else:
        k = basis.shape[1]
        W = squeeze_matrix(theta, k) @ align_reflection(basis.T @ h) @ basis.T
    return W, -W @ np.asarray(p, dtype=float)


def angle(a, b):
    """Angle between vectors, ``arccos`` of the cosine clipped to [-1, 1]."""
    c = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


def ball_in_cone(c, r, p, h, theta):
    """Whether the ball ``B_r(c)`` lies in the cone ``p + C_theta[h]``."""
    d = np.asarray(c, dtype=float) - p
    dist = np.linalg.norm(d)
    if dist <= r:
        return False
    return angle(d, h) + np.arcsin(r / dist) <= theta / 2.0


def certify(W, b, X, collapse_mask, margin):
    """Check the sign certificate of one truncation layer.

    Rows of ``X`` flagged by ``collapse_mask`` must have every pre-activation
    ``<= -margin`` (they are sent to the base point); all others ``>= margin``
    (they are kept).

    Parameters
    ----------
    W : ndarray, shape (m, dim)
    b : ndarray, shape (m,)
    X : ndarray, shape (n_samples, dim)
    collapse_mask : ndarray of bool, shape (n_samples,)
    margin : float

    Returns
    -------
    ok : bool
    collapse_margin : float
        ``min(-z)`` over the collapsed rows (``inf`` when there are none).
    keep_margin : float
        ``min(z)`` over the kept rows (``inf`` when there are none).
    """
    return certify_z(X @ W.T + b, collapse_mask, margin)


def certify_z(Z, collapse_mask, margin):
    """:func:`certify` from precomputed pre-activations ``Z``, shape (n_samples, m)."""
    mask = np.asarray(collapse_mask, dtype=bool)
    collapse_margin = float(-Z[mask].max()) if mask.any() else np.inf
    keep_margin = float(Z[~mask].min()) if (~mask).any() else np.inf
    ok = collapse_margin >= margin and keep_margin >= margin
    return ok, collapse_margin, keep_margin
