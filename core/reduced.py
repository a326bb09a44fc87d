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
from . import truncation as tr


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
    hard = (
        cond.rank < Q or not np.isfinite(cond.theta_j).all() or cond.theta_star >= np.pi
    )
    if cond.failures and (strict or hard):
        return ReducedConstruction("failed", "; ".join(cond.failures), cond)

    order = list(range(Q)) if order is None else [int(j) for j in order]
    L = Q if hidden_layers is None else int(hidden_layers)
    stats = cs.class_stats(X, labels, Q)
    U = mean_basis(stats.means)
    rows = np.arange(X.shape[0]) if keep_rows is None else np.asarray(keep_rows)
    n_cone = min(L, Q)
    X_cur, cumulative, apexes, margins, failures, truncated = _cone_layers(
        X, labels, order[:n_cone], stats, cond, U, mu_factor, rows, progress
    )

    try:
        fit = cs.fit_output(X_cur, labels, Y, intercept)
    except ValueError as exc:
        return ReducedConstruction(
            "failed",
            "; ".join(failures + [str(exc)]),
            cond,
            apexes=apexes,
            order=order,
            margins=np.array(margins).reshape(-1, 2),
            certified=not failures,
            truncated=truncated,
            basis=U,
        )
    cumulative.append((fit.A, fit.c))
    Wc = [W for W, _ in cumulative]
    Ws, bs = tr.layers_from_cumulative(
        Wc, [b for _, b in cumulative], check_nested=True
    )
    layers = list(zip(Ws, bs))
    round_trip = _round_trip_error(layers, Wc)
    cumulative, layers = cs.pad_identity(cumulative, layers, L - n_cone)

    out = cs.forward_relu(layers, X)
    notes = failures or list(cond.failures)
    if n_cone < Q:
        notes = notes + [
            f"only {n_cone} of {Q} classes collapsed with {L} hidden layers"
        ]
    if progress is not None:
        progress(n_cone + 1, n_cone + 1)
    return ReducedConstruction(
        status="failed" if failures else "ok",
        message="; ".join(notes),
        conditions=cond,
        layers=layers,
        cumulative=cumulative,
        apexes=apexes,
        order=order,
        margins=np.array(margins).reshape(-1, 2),
        certified=not failures,
        costs=cs.all_costs(out, labels, Y),
        max_output_error=cs.max_output_error(out, labels, Y),
        truncated=truncated,
        composition_error=float(np.abs(out - (X_cur @ fit.A.T + fit.c)).max()),
        output_fit=fit,
        lam=tr.squeeze_factor(cond.theta_star, Q),
        basis=U,
        widths=[X.shape[1]] + [W.shape[0] for W, _ in layers],
        round_trip_error=round_trip,
    )


def mean_basis(means):
    """Orthonormal basis of the span of the class means, shape (dim, Q).

    Parameters
    ----------
    means : ndarray, shape (Q, dim), linearly independent rows
    """
    U, _ = np.linalg.qr(np.asarray(means, dtype=float).T)
    return U


def _cone_layers(X, labels, order, stats, cond, U, mu_factor, rows, progress):
    """Apply the narrow cone layers of ``order`` and certify each."""
    margin = cs.CERT_MARGIN_REL * max(1.0, float(np.abs(X).max()))
    apexes = np.full(stats.means.shape, np.nan)
    X_cur, truncated = X, [X[rows]]
    cumulative, margins, failures = [], [], []
    for step, j in enumerate(order):
        p = stats.means[j] + mu_factor * cond.radius * cond.f[j]
        W, b = tr.cone_layer(p, cond.f[j], cond.theta_star, basis=U)
        Z = X_cur @ W.T + b
        ok, m_col, m_keep = tr.certify_z(Z, labels == j, margin)
        if step:
            m_keep = min(m_keep, float((apexes[order[:step]] @ W.T + b).min()))
            ok = ok and m_keep >= margin
        if not ok:
            failures.append(cs.certificate_failure(step, j, m_col, m_keep, margin))
        margins.append((m_col, m_keep))
        X_cur = tr.truncate_z(W, b, Z)
        truncated.append(X_cur[rows])
        apexes[j] = p
        cumulative.append((W, b))
        if progress is not None:
            progress(step + 1, len(order) + 1)
    return X_cur, cumulative, apexes, margins, failures, truncated


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
