"""Construction A with narrow layers: widths Q x M, then Q x Q.

Reference/construct.md section 4.5. All cone layers act inside
``V = span{means}`` through one orthonormal basis ``U`` (dim, Q):
``W^(l) = W_theta R_{U^T f_l} U^T``. Every cumulative matrix then has row space
``V``, so the layer-wise weights reproduce them exactly (the row spaces nest),
which [CE-SLS] Prop. 4.1 with different rotations per layer does not
guarantee. The network has ``Q (M + Q^2)`` weights for Q x Q targets.
Samples are rows: ``X`` has shape ``(n_samples, dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import construct as cs


@dataclass
class ReducedConstruction(cs.Construction):
    """A ``construct.Construction`` of narrow layers, with the basis it acts in.

    Attributes
    ----------
    basis : ndarray, shape (dim, Q)
        Orthonormal basis ``U`` of the span of the class means.
    widths : list of int
        ``[dim, Q, ..., Q, out_dim]``: input, hidden and output widths.
    round_trip_error : float
        Largest entry of ``W_l ... W_1 - W^(l)`` over the hidden and output
        layers (the cumulative to layer-wise conversion, checked).
    """

    basis: np.ndarray | None = None
    widths: list | None = None
    round_trip_error: float = np.nan


def build_clustered_reduced(
    X,
    labels,
    Y,
    *,
    mu_factor=cs.MU_FACTOR,
    theta0=cs.THETA0,
    radius=None,
    order=None,
    hidden_layers=None,
    strict=True,
    intercept=False,
    keep_rows=None,
    progress=None,
):
    """Build a zero-cost network for clustered data with hidden width Q.

    Layer ``l`` sends class ``order[l]`` to ``p = mean + mu_factor r f`` and
    replaces every other point ``x`` by its projection ``U U^T x`` onto the
    span of the means, which leaves all ball-in-cone conditions intact.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim), dim >= Q
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    mu_factor, theta0, radius, order, hidden_layers, strict, intercept,
    keep_rows, progress
        As in ``construct.build_clustered``.

    Returns
    -------
    ReducedConstruction
    """
    X = np.asarray(X, dtype=float)
    labels = np.asarray(labels).astype(int)
    Y = np.asarray(Y, dtype=float)
    Q = Y.shape[0]
    cs.check_build_args(X, labels, Y, mu_factor, order, hidden_layers)
    cond = cs.clustered_conditions(X, labels, radius, theta0, Q)
    if cond.failures and (strict or not cond.buildable):
        return ReducedConstruction("failed", "; ".join(cond.failures), cond)
    U = mean_basis(cs.class_stats(X, labels, Q).means)
    res = cs.build_cones(
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
        basis=U,
        result=ReducedConstruction,
    )
    res.basis = U
    if res.layers:
        res.widths = [X.shape[1]] + [W.shape[0] for W, _ in res.layers]
        res.round_trip_error = _round_trip_error(
            res.layers, [W for W, _ in res.cumulative]
        )
    return res


def mean_basis(means):
    """Orthonormal basis of the span of the class means, shape (dim, Q).

    Parameters
    ----------
    means : ndarray, shape (Q, dim), linearly independent rows
    """
    U, _ = np.linalg.qr(np.asarray(means, dtype=float).T)
    return U


def _round_trip_error(layers, Wc):
    """Largest entry of ``W_l ... W_1 - W^(l)`` over the layers."""
    err, acc = 0.0, None
    for (W, _), target in zip(layers, Wc):
        acc = W if acc is None else W @ acc
        err = max(err, float(np.abs(acc - target).max()))
    return err


def build_sls_reduced(*args, **kwargs):
    """Narrow layers for sequentially separable data: not available.

    [CE-SLS] covers only width-M layers for SLS data; a nested-row-space
    extension is untested (reference section 5), so none is built.
    """
    raise NotImplementedError(
        "reduced_width for method 'sls' is not covered by [CE-SLS] (reference "
        "section 5: 'Narrower layers are not covered'); use reduced_width=False, "
        "or method 'clustered' with reduced_width=True when the data are "
        "clustered"
    )
