"""How far features have collapsed: the neural-collapse metrics NC1 to NC4.

Implements reference/collapse.md. Samples are rows: features ``H`` have shape
``(N, D)``, class means ``M`` shape ``(C, D)``, a classifier ``W`` shape
``(K, D)`` with bias ``b`` of shape ``(K,)``; ``K = C`` whenever ``W`` has one
row per class (one-hot targets or cross-entropy).

Definitions (section 1 of the reference), with class weights ``pi_c``
(``balanced``: ``1/C``; ``sample``: ``n_c/N``)::

    mu_c = mean of class c,   mu_G = sum_c pi_c mu_c,   m_c = mu_c - mu_G,
    V_c = (1/n_c) sum_{y_n = c} |h_n - mu_c|^2               (never Bessel),
    Sigma_W = sum_c pi_c (1/n_c) sum_{y_n = c} (h_n - mu_c)(h_n - mu_c)^T,
    B = diag(sqrt(pi)) M~,   Sigma_B = B^T B,   B = V S U^T (thin SVD).

Every number comes from two passes over the samples: pass 1 collects class
counts and sums (hence the means, ``B`` and its SVD), pass 2 the deviations
from the means, their projections on the top singular directions of ``B``,
and the nearest-class-centre decisions. In memory the array is cut into
blocks and fed through the same two passes, so the streamed and in-memory
numbers differ only by summation order.

Memory: ``O(C D + C^2)`` floats of state (means, the top singular
directions of ``B``, the ``C x C`` pairwise tables) plus one block of rows.
No ``D x D`` array is formed, except the within-class scatter ``Sigma_W``
for the L2 loss decomposition, computed only when ``l2_lam`` is given:
``O(D^2)`` then. Files are streamed with ordinary sequential reads, not
memory maps (mapped pages would count as resident memory): ``.npy`` files
directly, ``.npz`` archives member by member through :mod:`zipfile`, which
also works for compressed archives (:func:`npy_chunks`, :func:`npz_chunks`).

Degenerate inputs (coinciding means, empty or singleton classes, ``C = 2``,
``C > D + 1``) never raise and never give NaN in a reported scalar: they
set a flag, add a message to ``CollapseResult.warnings`` and emit a
:class:`CollapseWarning`. A ratio whose denominator is exactly zero is
``+inf`` on the result object and ``None`` in :meth:`CollapseResult.as_dict`.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CollapseWarning",
    "CollapseResult",
    "L2Decomposition",
    "collapse_metrics",
    "collapse_metrics_streaming",
    "npy_chunks",
    "npz_chunks",
    "network_decisions",
    "layer_features",
    "truncation_features",
    "metrics_per_layer",
    "network_collapse",
]

WEIGHTINGS = ("balanced", "sample")
LOSSES = ("ce", "l2")
EMPTY_POLICIES = ("drop", "raise")

# Floats in one block of pass work (rows x widest row). 2**21 float64 is 16 MB:
# large enough for efficient matrix products, small next to the 2 GiB budget.
BLOCK_FLOATS = 2**21
# Floats in one tile of pairwise mean differences (rows x C x D), same reason.
TILE_FLOATS = 2**21
# Up to this many classes, per-class sums use one boolean mask per class
# (measured 5-10x faster than a one-hot product or np.add.reduceat at
# C = 10); beyond, rows are sorted by class once and summed by reduceat.
MASK_CLASSES = 32
# Rows per chunk read from .npy/.npz files: 32768 x 512 float64 is 128 MB.
CHUNK_ROWS = 32768
# Largest feature magnitude accepted: squares, Gram entries and sums of
# squares over many samples stay far below the float64 overflow (1.8e308).
FEATURE_LIMIT = 1e150
# Columns summed into the pass-1/pass-2 digest (first and last feature).
DIGEST_COLUMNS = [0, -1]
# Relative gap below which streamed pass-2 data counts as "the same data"
# as pass 1; the sums differ only by summation order, about N eps.
DIGEST_RTOL = 1e-8


class CollapseWarning(UserWarning):
    """A degenerate case (coinciding means, empty class, C = 2, ...) was met."""


# --------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------


@dataclass
class L2Decomposition:
    """The L2 loss split into collapse terms (reference section 8).

    ``loss = nc1 + nc23 + perp`` exactly (up to rounding), where ``loss`` is
    evaluated directly on the samples at the given ``(W, b)``.

    Attributes
    ----------
    lam : float
        Ridge coefficient ``lambda`` of the loss as defined in section 8.
    loss, nc1, nc23, perp : float
        Direct loss, ``L_NC1``, ``L_NC2/3`` and ``L_perp``.
    W_ls : ndarray, shape (K, D)
    b_ls : ndarray, shape (K,)
        Least-squares classifier for the same features (minimum norm when
        the normal matrix is singular).
    """

    lam: float
    loss: float
    nc1: float
    nc23: float
    perp: float
    W_ls: np.ndarray
    b_ls: np.ndarray


@dataclass
class CollapseResult:
    """Every collapse metric of one set of features, with its conventions.

    Scalars that need a classifier, predictions or held-out data are None
    when those were not given. Arrays are indexed by the kept (non-empty)
    classes, in the order of ``classes``.

    Attributes
    ----------
    n_samples, dim, n_classes, n_classes_eff : int
        ``N``, ``D``, classes named and classes kept (non-empty).
    input_dtype : str
        Dtype of the features as given; they are upcast to float64.
    options : dict
        Conventions: weighting, ddof, rank_tol (the tolerance used),
        center_classifier, empty_classes, loss, l2_lam, source.
    metrics : dict
        Scalar metrics (also readable as attributes, ``res.nc1``); floats
        may be inf here, never NaN. NC1: ``nc1`` (projected, with 1/C),
        ``nc1_quotient``, ``nc1_norm``, ``cdnv`` and ``cdnv_max`` (over
        pairs with distinct means), ``d_hesu``, ``log10_d_hesu``,
        ``trace_within``, ``trace_between``, ``rank``, ``sigma_ratio``
        (``s_1/s_r``). NC2 of the centred means: ``equinorm_means``,
        ``equiangular_means``, ``maxangle_means``, ``mean_cos_means``,
        ``etf_gap_means``, ``of_gap_means``; of the classifier: the same
        with ``_classifier`` and ``rank_classifier``. NC3: ``self_duality``
        (squared), ``duality_gram_gap``, ``duality_cos``,
        ``duality_cos_cov``, ``bias_gap``. NC4: ``ncc_acc``,
        ``ncc_mismatch``, ``ncc_mismatch_against`` ("predictions" or
        "classifier"), ``ncc_acc_heldout``, ``ncc_mismatch_heldout``,
        ``n_heldout``. L2 split (None without ``l2_lam``): ``l2_loss``,
        ``l2_nc1``, ``l2_nc23``, ``l2_perp``.
    flags : dict
        Degenerate cases met: booleans and counts.
    warnings : list of str
    classes : ndarray, shape (C_eff,)
        Label values of the kept classes.
    class_sizes : ndarray of int, shape (C_eff,)
    class_variances : ndarray, shape (C_eff,)
        ``V_c`` (population).
    means : ndarray, shape (C_eff, D)
        Uncentred class means ``mu_c``.
    global_mean : ndarray, shape (D,)
    spectrum_means : ndarray, shape (min(C_eff, D),)
        Singular values of the centred means ``M~``.
    spectrum_classifier : ndarray or None
        Singular values of the (optionally centred) classifier rows.
    cdnv_pairs : ndarray, shape (C_eff, C_eff)
        ``CDNV(c, c')``; ``+inf`` for coinciding means, 0 on the diagonal.
    cos_means : ndarray, shape (C_eff, C_eff)
        Cosines of the centred means; NaN where a centred mean is zero.
    l2 : L2Decomposition or None
    """

    n_samples: int
    dim: int
    n_classes: int
    n_classes_eff: int
    input_dtype: str
    options: dict
    metrics: dict
    flags: dict
    warnings: list
    classes: np.ndarray
    class_sizes: np.ndarray
    class_variances: np.ndarray
    means: np.ndarray
    global_mean: np.ndarray
    spectrum_means: np.ndarray
    spectrum_classifier: np.ndarray | None = None
    cdnv_pairs: np.ndarray | None = None
    cos_means: np.ndarray | None = None
    l2: L2Decomposition | None = None

    @property
    def source(self):
        """Which representation was measured (free text from the caller)."""
        return self.options.get("source")

    def __getattr__(self, name):
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"CollapseResult has no attribute {name!r}")

    def as_dict(self, arrays=False):
        """JSON-able record: sizes, conventions, metrics, ``flag_*`` keys.

        Non-finite floats become None (the flags say why). With ``arrays``
        the per-class sizes and variances, the spectra and the class labels
        are added as lists.
        """
        row = {
            "n_samples": self.n_samples,
            "dim": self.dim,
            "n_classes": self.n_classes,
            "n_classes_eff": self.n_classes_eff,
            "min_class_size": int(self.class_sizes.min()),
            "max_class_size": int(self.class_sizes.max()),
            "input_dtype": self.input_dtype,
        }
        row.update(self.options)
        row.update({k: _json_scalar(v) for k, v in self.metrics.items()})
        row.update({f"flag_{k}": v for k, v in self.flags.items()})
        row["warnings"] = "; ".join(self.warnings)
        if arrays:
            row.update(_array_fields(self))
        return row


def _json_scalar(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _array_fields(res):
    def listed(a):
        return None if a is None else [_json_scalar(v) for v in np.ravel(a)]

    return {
        "classes": [c.item() if hasattr(c, "item") else c for c in res.classes],
        "class_sizes": [int(n) for n in res.class_sizes],
        "class_variances": listed(res.class_variances),
        "spectrum_means": listed(res.spectrum_means),
        "spectrum_classifier": listed(res.spectrum_classifier),
    }


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def collapse_metrics(
    features,
    labels,
    *,
    W=None,
    b=None,
    predictions=None,
    heldout=None,
    classes=None,
    targets=None,
    weighting="balanced",
    ddof=0,
    rank_tol=None,
    center_classifier=False,
    empty="drop",
    loss="ce",
    l2_lam=None,
    source="features",
    progress=None,
):
    """Measure neural collapse of features held in memory.

    Parameters
    ----------
    features : array_like, shape (N, D)
        One row per sample; any real dtype (float32 is upcast to float64,
        but the rank tolerance uses its epsilon).
    labels : array_like, shape (N,)
        Class labels, any sortable values (not assumed to be ``0..C-1``).
    W : array_like, shape (K, D), optional
        Classifier acting on the features; row ``c`` belongs to class
        ``classes[c]`` when ``K = C``.
    b : array_like, shape (K,), optional
        Classifier bias (zero when ``W`` is given without it).
    predictions : array_like, shape (N,), optional
        The network's decisions, in the same label values as ``labels``.
    heldout : tuple, optional
        ``(features, labels)`` or ``(features, labels, predictions)`` of
        held-out samples; NCC uses the training means.
    classes : sequence, optional
        All class labels, in classifier-row order. Default: the sorted
        distinct labels. Needed to detect empty classes.
    targets : array_like, shape (C, K), optional
        Class targets ``y_c`` for the L2 bias relation and decomposition
        (default one-hot, ``K = C``).
    weighting : {"balanced", "sample"}
        Class weights ``pi_c = 1/C`` or ``n_c/N``, used for ``mu_G``,
        ``Sigma_W`` and ``Sigma_B`` alike.
    ddof : {0, 1}
        Delta degrees of freedom of the standard deviations in NC2/NC3.
    rank_tol : float, optional
        Relative singular-value cut-off ``tau``; default
        ``max(C, D) * eps(input dtype)``.
    center_classifier : bool
        Subtract the mean classifier row before NC2 and NC3 [Zhou].
    empty : {"drop", "raise"}
        What to do with a class in ``classes`` that has no sample.
    loss : {"ce", "l2"}
        Target of the bias relation: 0 for cross-entropy, ``y_bar`` for L2.
    l2_lam : float, optional
        When given (and ``W`` is), compute the L2 loss decomposition with
        this ridge coefficient; needs an ``O(D^2)`` scatter matrix.
    source : str
        Free text recorded with the result (which representation this is).
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each block.

    Returns
    -------
    CollapseResult
    """
    H = _check_features(features, "features")
    y = _check_labels(labels, H.shape[0], "labels")
    pred = (
        None
        if predictions is None
        else _check_labels(predictions, H.shape[0], "predictions")
    )
    chunks = _memory_factory(H, y, pred)
    held = None
    if heldout is not None:
        held = _memory_factory(*_check_heldout(heldout, H.shape[1]))
    return _warned(
        _measure(
            chunks,
            heldout_factory=held,
            W=W,
            b=b,
            classes=classes,
            targets=targets,
            weighting=weighting,
            ddof=ddof,
            rank_tol=rank_tol,
            center_classifier=center_classifier,
            empty=empty,
            loss=loss,
            l2_lam=l2_lam,
            source=source,
            progress=progress,
        )
    )


def collapse_metrics_streaming(
    chunks_factory,
    *,
    heldout_factory=None,
    W=None,
    b=None,
    classes=None,
    targets=None,
    weighting="balanced",
    ddof=0,
    rank_tol=None,
    center_classifier=False,
    empty="drop",
    loss="ce",
    l2_lam=None,
    source="features",
    progress=None,
):
    """Measure neural collapse of features too large for memory, in two passes.

    Parameters
    ----------
    chunks_factory : callable
        ``chunks_factory()`` returns a fresh iterable of tuples
        ``(features, labels)`` or ``(features, labels, predictions)`` with
        shapes ``(n_i, D)``, ``(n_i,)``, ``(n_i,)``. It is called twice and
        must yield the same samples both times (any chunking and order;
        a chunk may miss classes). A checksum of the two passes is compared.
    heldout_factory : callable, optional
        Same for held-out samples; read once, in pass 2.
    W, b, classes, targets, weighting, ddof, rank_tol, center_classifier, \
empty, loss, l2_lam, source, progress
        As in :func:`collapse_metrics`.

    Returns
    -------
    CollapseResult
        Equal to :func:`collapse_metrics` on the concatenated chunks up to
        summation order.

    Notes
    -----
    Memory is ``O(C D + C r)`` plus one block of rows; ``O(D^2)`` more only
    with ``l2_lam``.
    """
    return _warned(
        _measure(
            chunks_factory,
            heldout_factory=heldout_factory,
            W=W,
            b=b,
            classes=classes,
            targets=targets,
            weighting=weighting,
            ddof=ddof,
            rank_tol=rank_tol,
            center_classifier=center_classifier,
            empty=empty,
            loss=loss,
            l2_lam=l2_lam,
            source=source,
            progress=progress,
        )
    )


def _warned(result):
    """Emit each degenerate-case message as a CollapseWarning at the caller."""
    for message in result.warnings:
        warnings.warn(message, CollapseWarning, stacklevel=3)
    return result


def _measure(
    chunks_factory,
    *,
    heldout_factory,
    W,
    b,
    classes,
    targets,
    weighting,
    ddof,
    rank_tol,
    center_classifier,
    empty,
    loss,
    l2_lam,
    source,
    progress,
):
    """Both passes and the final metrics; arguments already described."""
    opts = _check_options(weighting, ddof, rank_tol, empty, loss, l2_lam)
    opts.update(center_classifier=bool(center_classifier), source=str(source))
    index = _ClassIndex(classes)
    first = _pass_one(chunks_factory, index, progress)
    stats = _between_passes(first, index, opts)
    clf = _check_classifier(W, b, targets, opts["loss"], stats)
    with_l2 = clf is not None and opts["l2_lam"] is not None
    second = _pass_two(chunks_factory, stats, clf, with_l2, first, progress)
    held = None
    if heldout_factory is not None:
        held = _heldout_pass(heldout_factory, stats, clf)
    return _finish(stats, clf, second, held, opts)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_features(features, name):
    H = np.asarray(features)
    if H.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (N, D), one sample per row; got shape "
            f"{H.shape}. Reshape with .reshape(N, -1)."
        )
    if not (np.issubdtype(H.dtype, np.floating) or np.issubdtype(H.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {H.dtype}")
    return H


def _check_labels(labels, n_rows, name):
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(
            f"{name} must have shape ({n_rows},), one entry per feature row; "
            f"got shape {y.shape}"
        )
    return y


def _check_heldout(heldout, dim):
    if not isinstance(heldout, (tuple, list)) or len(heldout) not in (2, 3):
        raise ValueError(
            "heldout must be (features, labels) or (features, labels, "
            f"predictions); got {type(heldout).__name__} of length "
            f"{len(heldout) if hasattr(heldout, '__len__') else '?'}"
        )
    H = _check_features(heldout[0], "heldout features")
    if H.shape[1] != dim:
        raise ValueError(
            f"heldout features have {H.shape[1]} columns, the training features {dim}"
        )
    y = _check_labels(heldout[1], H.shape[0], "heldout labels")
    pred = (
        None
        if len(heldout) == 2 or heldout[2] is None
        else _check_labels(heldout[2], H.shape[0], "heldout predictions")
    )
    return H, y, pred


def _check_options(weighting, ddof, rank_tol, empty, loss, l2_lam):
    for name, value, allowed in (
        ("weighting", weighting, WEIGHTINGS),
        ("empty", empty, EMPTY_POLICIES),
        ("loss", loss, LOSSES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if rank_tol is not None and not 0 <= float(rank_tol) < 1:
        raise ValueError(f"rank_tol must lie in [0, 1), got {rank_tol!r}")
    if l2_lam is not None and not float(l2_lam) >= 0:
        raise ValueError(f"l2_lam must be >= 0, got {l2_lam!r}")
    return {
        "weighting": weighting,
        "ddof": int(ddof),
        "rank_tol": None if rank_tol is None else float(rank_tol),
        "empty_classes": empty,
        "loss": loss,
        "l2_lam": None if l2_lam is None else float(l2_lam),
    }


def _memory_factory(H, y, pred):
    """Blocks of rows of in-memory arrays, as a re-iterable chunk source."""
    rows = max(1, BLOCK_FLOATS // max(1, H.shape[1]))

    def chunks():
        for start in range(0, max(H.shape[0], 1), rows):
            stop = start + rows
            yield (
                H[start:stop],
                y[start:stop],
                None if pred is None else pred[start:stop],
            )

    return chunks


def _unpack(chunk, where):
    if not isinstance(chunk, (tuple, list)) or len(chunk) not in (2, 3):
        raise ValueError(
            f"{where}: each chunk must be (features, labels) or (features, "
            f"labels, predictions); got {type(chunk).__name__}"
        )
    H = _check_features(chunk[0], f"{where} features")
    y = _check_labels(chunk[1], H.shape[0], f"{where} labels")
    pred = None
    if len(chunk) == 3 and chunk[2] is not None:
        pred = _check_labels(chunk[2], H.shape[0], f"{where} predictions")
    return H, y, pred


def _blocks(chunk, width):
    """Cut one chunk into blocks of at most BLOCK_FLOATS floats."""
    H, y, pred = chunk
    rows = max(1, BLOCK_FLOATS // max(1, width))
    for start in range(0, H.shape[0], rows):
        stop = start + rows
        yield (H[start:stop], y[start:stop], None if pred is None else pred[start:stop])


def _shifted(H, point):
    """``H - point`` in float64, one pass over a block of any real dtype."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.subtract(H, point, dtype=np.float64)


def _require_finite(total, H, where):
    """Refuse a block whose sums ``total`` are not finite or exceed the limit.

    Checking a reduction costs nothing in the normal case; only when it
    fails is the block searched for the offending row.
    """
    with np.errstate(invalid="ignore"):
        if np.isfinite(total).all() and np.abs(total).max() <= FEATURE_LIMIT:
            return
    with np.errstate(invalid="ignore", over="ignore"):
        sq = np.einsum("ij,ij->i", H, H, dtype=np.float64)
        bad = ~(sq <= FEATURE_LIMIT**2)
    row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
    raise ValueError(
        f"{where}: features are not finite or overflow when "
        f"squared (first bad row {row} of its block); remove or "
        "rescale such rows"
    )


# --------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------


class _ClassIndex:
    """Map label values to class indices; grows unless classes are given."""

    def __init__(self, classes):
        self.fixed = classes is not None
        self.values = [] if classes is None else list(np.asarray(classes))
        if self.fixed and len(set(self.values)) != len(self.values):
            raise ValueError(f"classes must be distinct, got {classes!r}")
        self.lookup = {v: i for i, v in enumerate(self.values)}

    def index(self, y, where, grow=False, unknown=None):
        """Class index of every label; ``unknown`` for absent labels if set."""
        uniq, inverse = np.unique(y, return_inverse=True)
        idx = np.empty(uniq.shape[0], dtype=np.int64)
        for k, value in enumerate(uniq.tolist()):
            if value not in self.lookup:
                if grow and not self.fixed:
                    self.lookup[value] = len(self.values)
                    self.values.append(value)
                elif unknown is not None:
                    idx[k] = unknown
                    continue
                else:
                    raise ValueError(
                        f"{where}: label {value!r} is not among the classes "
                        f"{_shorten(self.values)}; pass classes= listing "
                        "every label"
                    )
            idx[k] = self.lookup[value]
        return idx[inverse.ravel()]

    def sort(self):
        """Put discovered classes in sorted order; return the permutation."""
        if self.fixed:
            return np.arange(len(self.values))
        order = np.argsort(np.asarray(self.values), kind="stable")
        self.values = [self.values[i] for i in order]
        self.lookup = {v: i for i, v in enumerate(self.values)}
        return order


def _shorten(values, most=10):
    """The first few of a list of labels, for messages."""
    return str(values[:most])[:-1] + (", ...]" if len(values) > most else "]")


def _class_sums(idx, X, n_classes):
    """Per-class sums of the rows of X, shape (n_classes, X.shape[1])."""
    out = np.zeros((n_classes, X.shape[1]))
    if X.shape[0] == 0:
        return out
    if n_classes <= MASK_CLASSES:
        for c in np.unique(idx):
            out[c] = X[idx == c].sum(axis=0)
        return out
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    out[sorted_idx[starts]] = np.add.reduceat(X[order], starts, axis=0)
    return out


# --------------------------------------------------------------------------
# Pass 1: counts and sums
# --------------------------------------------------------------------------


@dataclass
class _First:
    """Pass-1 statistics: counts, sums about a reference row, a checksum."""

    dim: int
    dtype: np.dtype
    ref: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    checksum: float = 0.0
    magnitude: float = 0.0


def _pass_one(factory, index, progress):
    first, rows = None, 0
    for chunk in factory():
        chunk = _unpack(chunk, "pass 1")
        if first is None and chunk[0].shape[0] == 0:
            continue
        if first is None:
            first = _start_first(chunk[0], len(index.values))
        _check_dim(chunk[0], first.dim)
        for H, y, _ in _blocks(chunk, first.dim):
            _first_update(first, index, H, y)
            rows += H.shape[0]
            if progress is not None:
                progress(rows, None)
    if first is None or first.counts.sum() == 0:
        raise ValueError("no samples: the chunk source yielded no rows")
    order = index.sort()
    first.counts, first.sums = first.counts[order], first.sums[order]
    return first


def _start_first(H, n_classes):
    """Empty pass-1 state; sums are taken about the first row ``ref``.

    Summing ``h - ref`` instead of ``h`` keeps the digits that a large
    common offset would otherwise cancel.
    """
    dim = H.shape[1]
    ref = np.asarray(H[0], dtype=np.float64).copy()
    dtype = H.dtype if np.issubdtype(H.dtype, np.floating) else np.float64
    return _First(
        dim,
        np.dtype(dtype),
        ref,
        np.zeros(n_classes, np.int64),
        np.zeros((n_classes, dim)),
    )


def _check_dim(H, dim):
    if H.shape[1] != dim:
        raise ValueError(
            f"chunks disagree on the feature dimension: {dim} and {H.shape[1]}"
        )


def _first_update(first, index, H, y):
    idx = index.index(y, "pass 1", grow=True)
    grow = len(index.values) - first.counts.shape[0]
    if grow > 0:
        first.counts = np.r_[first.counts, np.zeros(grow, np.int64)]
        first.sums = np.vstack([first.sums, np.zeros((grow, first.dim))])
    C = first.counts.shape[0]
    first.counts += np.bincount(idx, minlength=C)
    Hr = _shifted(H, first.ref)
    with np.errstate(invalid="ignore", over="ignore"):
        block = _class_sums(idx, Hr, C)
    _require_finite(block, H, "pass 1")
    first.sums += block
    total, size = _digest(H)
    first.checksum += total
    first.magnitude += size


def _digest(H):
    """Sum and absolute sum of a few columns: does pass 2 see pass 1's data?"""
    cols = np.asarray(H[:, DIGEST_COLUMNS], dtype=np.float64)
    return float(cols.sum()), float(np.abs(cols).sum())


# --------------------------------------------------------------------------
# Between the passes: means, weights, B and its SVD
# --------------------------------------------------------------------------


@dataclass
class _Stats:
    """Everything pass 2 and the final metrics need from pass 1."""

    index: _ClassIndex
    kept: np.ndarray  # indices of non-empty classes, (C_eff,)
    counts: np.ndarray  # (C_eff,)
    means_ref: np.ndarray  # mu_c - ref, (C_eff, D)
    ref: np.ndarray  # (D,)
    pi: np.ndarray  # class weights, (C_eff,)
    mug_ref: np.ndarray  # mu_G - ref, (D,)
    centred: np.ndarray  # M~, (C_eff, D)
    s: np.ndarray  # singular values of B
    r: int
    basis: np.ndarray  # (D, r + r_sample): top directions of B, B_sample
    r_sample: int
    s_sample: np.ndarray
    same_basis: bool  # sample-weighted B has B's directions
    tau: float
    scale: float  # max |mu_c|, sets "coinciding" and "zero"
    dtype: np.dtype
    to_kept: np.ndarray  # class index -> row among kept, -1 if empty
    messages: list = field(default_factory=list)
    flags: dict = field(default_factory=dict)


def _between_passes(first, index, opts):
    counts_all = first.counts
    kept = np.flatnonzero(counts_all > 0)
    flags, messages = {}, []
    _note_empty(index, counts_all, kept, opts, flags, messages)
    counts = counts_all[kept]
    means_ref = first.sums[kept] / counts[:, None]
    pi = _weights(counts, opts["weighting"])
    mug_ref = pi @ means_ref
    centred = means_ref - mug_ref
    if opts["rank_tol"] is None:
        eps = float(np.finfo(first.dtype).eps)
        opts["rank_tol"] = max(kept.shape[0], first.dim) * eps
    tau = opts["rank_tol"]
    s, U, r = _top_directions(np.sqrt(pi)[:, None] * centred, tau)
    same_basis = opts["weighting"] == "sample" or bool(np.all(counts == counts[0]))
    s_s, U_s, r_s = s, U[:, :0], r
    if not same_basis:
        pi_s = counts / counts.sum()
        c_s = means_ref - pi_s @ means_ref
        s_s, U_s, r_s = _top_directions(np.sqrt(pi_s)[:, None] * c_s, tau)
    to_kept = np.full(counts_all.shape[0], -1, dtype=np.int64)
    to_kept[kept] = np.arange(kept.shape[0])
    scale = float(np.sqrt(((means_ref + first.ref) ** 2).sum(axis=1)).max())
    return _Stats(
        index,
        kept,
        counts,
        means_ref,
        first.ref,
        pi,
        mug_ref,
        centred,
        s,
        r,
        np.hstack([U, U_s]),
        r_s,
        s_s,
        same_basis,
        tau,
        scale,
        first.dtype,
        to_kept,
        messages,
        flags,
    )


def _note_empty(index, counts, kept, opts, flags, messages):
    empty = np.flatnonzero(counts == 0)
    flags["empty_classes"] = int(empty.shape[0])
    if empty.shape[0] and opts["empty_classes"] == "raise":
        raise ValueError(
            f"classes {[index.values[i] for i in empty]} have no samples; "
            "pass empty='drop' to drop them, or fix classes="
        )
    if empty.shape[0]:
        messages.append(
            f"{empty.shape[0]} empty class(es) dropped: "
            f"{[index.values[i] for i in empty][:10]}"
        )
    if kept.shape[0] < 2:
        raise ValueError(
            f"collapse needs at least two non-empty classes; got "
            f"{kept.shape[0]} (labels seen: {index.values[:10]})"
        )


def _weights(counts, weighting):
    if weighting == "balanced":
        return np.full(counts.shape[0], 1.0 / counts.shape[0])
    return counts / counts.sum()


def _top_directions(B, tau):
    """Singular values of B, its top right singular vectors and rank r.

    ``r = min(C - 1, #{s_i > tau s_1})``; the basis has shape (D, r).
    """
    _, s, Vt = np.linalg.svd(B, full_matrices=False)
    if s.shape[0] == 0 or s[0] == 0:
        return s, np.zeros((B.shape[1], 0)), 0
    r = min(B.shape[0] - 1, int(np.count_nonzero(s > tau * s[0])))
    return s, Vt[:r].T.copy(), r


# --------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------


@dataclass
class _Classifier:
    W: np.ndarray  # (K, D), as given
    b: np.ndarray  # (K,)
    targets: np.ndarray  # (C_eff, K), kept classes
    per_class: bool  # rows of W are the classes (K == C)
    loss: str  # "ce" (argmax) or "l2" (nearest target)


def _check_classifier(W, b, targets, loss, stats):
    C_all, D = len(stats.index.values), stats.ref.shape[0]
    if W is None:
        if b is not None:
            raise ValueError("b was given without W; pass W as well")
        return None
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != D:
        raise ValueError(
            f"W must have shape (K, {D}) to act on the features; got {W.shape}"
        )
    b = np.zeros(W.shape[0]) if b is None else np.asarray(b, np.float64)
    if b.shape != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},), got {b.shape}")
    if targets is None:
        if W.shape[0] != C_all:
            raise ValueError(
                f"W has {W.shape[0]} rows but there are {C_all} classes; "
                "pass classes= naming one class per row, or targets="
            )
        Y = np.eye(C_all)
    else:
        Y = np.asarray(targets, dtype=np.float64)
        if Y.shape != (C_all, W.shape[0]):
            raise ValueError(
                f"targets must have shape ({C_all}, {W.shape[0]})"
                f" (classes, outputs); got {Y.shape}"
            )
    return _Classifier(W, b, Y[stats.kept], W.shape[0] == C_all, loss)


# --------------------------------------------------------------------------
# Pass 2: deviations, projections, NCC, L2 residuals
# --------------------------------------------------------------------------


@dataclass
class _Second:
    dev_sq: np.ndarray  # per class sum |h - mu_c|^2, (C_eff,)
    proj_sq: np.ndarray  # per class sum (u_i . (h - mu_c))^2, (C_eff, k)
    ncc_correct: int = 0
    ncc_agree: int = 0
    n_pred: int = 0
    resid_sq: np.ndarray | None = None  # per class sum |W h + b - y_c|^2
    scatter: np.ndarray | None = None  # Sigma_W, (D, D), L2 only
    counts: np.ndarray | None = None
    checksum: float = 0.0
    decided_by: set = field(default_factory=set)


def _pass_two(factory, stats, clf, with_l2, first, progress):
    C, k = stats.kept.shape[0], stats.basis.shape[1]
    D = stats.ref.shape[0]
    sec = _Second(np.zeros(C), np.zeros((C, k)), counts=np.zeros(C, np.int64))
    if clf is not None:
        sec.resid_sq = np.zeros(C)
    if with_l2:
        sec.scatter = np.zeros((D, D))
    total = 2 * int(first.counts.sum())
    rows = total // 2
    width = max(D, C, k)
    for chunk in factory():
        chunk = _unpack(chunk, "pass 2")
        _check_dim(chunk[0], D)
        for H, y, pred in _blocks(chunk, width):
            _second_update(sec, stats, clf, H, y, pred)
            rows += H.shape[0]
            if progress is not None:
                progress(rows, total)
    _check_digest(first, sec, stats)
    return sec


def _second_update(sec, stats, clf, H, y, pred):
    """Deviations, projections, NCC and L2 residuals of one block."""
    idx = stats.to_kept[stats.index.index(y, "pass 2")]
    if (idx < 0).any():
        raise ValueError(
            "pass 2 met a class that pass 1 saw empty; the chunk "
            "source must yield the same samples both times"
        )
    C = stats.kept.shape[0]
    sec.checksum += _digest(H)[0]
    sec.counts += np.bincount(idx, minlength=C)
    Z = _shifted(H, stats.ref + stats.mug_ref)  # h - mu_G
    decided = _decisions(stats, clf, Z, pred)
    if decided is not None:
        sec.decided_by.add("predictions" if pred is not None else "classifier")
    _ncc_update(sec, stats, Z, idx, decided)
    if clf is not None:
        _l2_residuals(sec, stats, clf, Z, idx)
    Z -= stats.centred[idx]  # now h - mu_c
    with np.errstate(over="ignore"):
        dev_sq = np.einsum("ij,ij->i", Z, Z)
    _require_finite(dev_sq, H, "pass 2")
    sec.dev_sq += np.bincount(idx, dev_sq, C)
    if stats.basis.shape[1]:
        sec.proj_sq += _class_sums(idx, (Z @ stats.basis) ** 2, C)
    if sec.scatter is not None:
        w = (stats.pi / stats.counts)[idx]
        sec.scatter += Z.T @ (Z * w[:, None])


def _ncc_update(sec, stats, Z, idx, decided):
    """Count NCC decisions equal to the labels and to the network's."""
    nearest = _ncc(stats, Z)
    sec.ncc_correct += int(np.count_nonzero(nearest == idx))
    if decided is not None:
        sec.ncc_agree += int(np.count_nonzero(nearest == decided))
        sec.n_pred += Z.shape[0]


def _decisions(stats, clf, Z, pred):
    """The network's decision as a kept-class row (-1: no kept class).

    Given predictions win; otherwise a classifier acting on the features
    decides (argmax for ``ce``, nearest target for ``l2``); else None.
    """
    if pred is not None:
        return _kept_rows(stats, pred, "predictions")
    if clf is None or (clf.loss == "ce" and not clf.per_class):
        return None
    mu_g = stats.ref + stats.mug_ref
    with np.errstate(invalid="ignore", over="ignore"):
        out = Z @ clf.W.T + (clf.W @ mu_g + clf.b)
    if clf.loss == "ce":
        return stats.to_kept[out.argmax(axis=1)]
    return network_decisions(out, clf.targets, "l2")


def _kept_rows(stats, values, where):
    """Row among the kept classes of each label value; -1 if none."""
    full = stats.index.index(values, where, unknown=-1)
    return np.where(full >= 0, stats.to_kept[np.maximum(full, 0)], -1)


def _ncc(stats, Z):
    """Nearest class centre: argmin_c |h - mu_c|^2, ties to the lower index.

    Takes ``Z = H - mu_G`` and scores ``|m_c|^2 - 2 <h - mu_G, m_c>``, so a
    large common offset does not cancel digits.
    """
    M = stats.centred
    with np.errstate(invalid="ignore", over="ignore"):
        scores = (M * M).sum(axis=1) - 2.0 * (Z @ M.T)
    return scores.argmin(axis=1)


def _l2_residuals(sec, stats, clf, Z, idx):
    """Per-class sums of |W h + b - y_c|^2, from ``Z = H - mu_G``."""
    mu_g = stats.ref + stats.mug_ref
    with np.errstate(invalid="ignore", over="ignore"):
        out = Z @ clf.W.T + (clf.W @ mu_g + clf.b) - clf.targets[idx]
        sq = np.einsum("ij,ij->i", out, out)
    sec.resid_sq += np.bincount(idx, sq, stats.kept.shape[0])


def _check_digest(first, sec, stats):
    if not np.array_equal(sec.counts, stats.counts):
        raise ValueError(
            "pass 2 saw different class counts than pass 1 "
            f"({sec.counts.tolist()[:10]} vs {stats.counts.tolist()[:10]}); "
            "chunks_factory() must yield the same samples each time it is "
            "called (re-seed generators, reopen files)"
        )
    gap = abs(sec.checksum - first.checksum)
    if gap > DIGEST_RTOL * max(first.magnitude, 1e-300):
        raise ValueError(
            f"pass 2 data differ from pass 1 (feature sums {first.checksum!r}"
            f" vs {sec.checksum!r}); chunks_factory() must yield the same "
            "samples each time it is called"
        )


def _heldout_pass(factory, stats, clf):
    """NCC on held-out samples with the training means: counts only."""
    counts = {"n": 0, "correct": 0, "agree": 0, "n_pred": 0}
    width = max(stats.ref.shape[0], stats.kept.shape[0])
    for chunk in factory():
        chunk = _unpack(chunk, "heldout")
        _check_dim(chunk[0], stats.ref.shape[0])
        for H, y, pred in _blocks(chunk, width):
            Z = _shifted(H, stats.ref + stats.mug_ref)
            with np.errstate(invalid="ignore", over="ignore"):
                total = Z.sum(axis=1)
            _require_finite(total, H, "heldout")
            nearest = _ncc(stats, Z)
            labels = _kept_rows(stats, y, "heldout")
            counts["correct"] += int(np.count_nonzero(nearest == labels))
            counts["n"] += H.shape[0]
            decided = _decisions(stats, clf, Z, pred)
            if decided is not None:
                counts["agree"] += int(np.count_nonzero(nearest == decided))
                counts["n_pred"] += H.shape[0]
    return counts


# --------------------------------------------------------------------------
# Final metrics
# --------------------------------------------------------------------------


def _finish(stats, clf, sec, held, opts):
    metrics, flags, messages = {}, dict(stats.flags), list(stats.messages)
    single = stats.counts == 1  # V_c = 0 exactly, not rounding noise
    sec.dev_sq[single], sec.proj_sq[single] = 0.0, 0.0
    V = sec.dev_sq / stats.counts
    metrics.update(_nc1(stats, sec, V, flags))
    cdnv_pairs = _cdnv_pairs(stats, V)
    metrics.update(_cdnv_summary(cdnv_pairs, flags))
    cos = _means_frame(stats, opts, metrics, flags)
    metrics.update(_empty_classifier_metrics())
    flags["zero_classifier_rows"] = 0
    spec_W = None
    if clf is not None:
        spec_W = _classifier_metrics(stats, clf, opts, metrics, flags)
    metrics.update(_ncc_metrics(stats, sec, held))
    l2 = None
    metrics.update(dict.fromkeys(("l2_loss", "l2_nc1", "l2_nc23", "l2_perp")))
    if clf is not None and opts["l2_lam"] is not None:
        l2 = _l2_decomposition(stats, clf, sec, opts["l2_lam"])
        metrics.update(l2_loss=l2.loss, l2_nc1=l2.nc1, l2_nc23=l2.nc23, l2_perp=l2.perp)
    _degenerate_notes(stats, flags, messages)
    C = stats.kept.shape[0]
    return CollapseResult(
        n_samples=int(stats.counts.sum()),
        dim=int(stats.ref.shape[0]),
        n_classes=len(stats.index.values),
        n_classes_eff=int(C),
        input_dtype=str(stats.dtype),
        options=dict(opts),
        metrics=metrics,
        flags=flags,
        warnings=messages,
        classes=np.asarray(stats.index.values, dtype=object)[stats.kept],
        class_sizes=stats.counts.copy(),
        class_variances=V,
        means=stats.means_ref + stats.ref,
        global_mean=stats.mug_ref + stats.ref,
        spectrum_means=np.linalg.svd(stats.centred, compute_uv=False),
        spectrum_classifier=spec_W,
        cdnv_pairs=cdnv_pairs,
        cos_means=cos,
        l2=l2,
    )


def _means_frame(stats, opts, metrics, flags):
    """NC2 of the centred means and the orthogonal-frame gap, into metrics."""
    frame, cos = _frame_stats(stats.centred, opts["ddof"], stats.tau * stats.scale)
    flags["zero_centred_means"] = frame.pop("n_zero_rows")
    metrics.update({f"{k}_means": v for k, v in frame.items()})
    metrics["of_gap_means"] = _of_gap(stats.means_ref + stats.ref)
    return cos


def _ratio(num, den):
    """num / den for num, den >= 0; +inf for x/0 and 0 for 0/0."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _nc1(stats, sec, V, flags):
    """Projected NC1, trace quotients and He-Su's D (reference section 4)."""
    C, r = stats.kept.shape[0], stats.r
    tr_w = float(stats.pi @ V)
    tr_b = float((stats.s**2).sum())
    q = (stats.pi / stats.counts) @ sec.proj_sq[:, :r]
    nc1 = float((q / stats.s[:r] ** 2).sum()) / C
    d_hesu = _d_hesu(stats, sec)
    flags["rank_deficient"] = bool(r < C - 1)
    return {
        "nc1": nc1,
        "nc1_quotient": _ratio(tr_w, tr_b),
        "nc1_norm": _ratio(tr_w, tr_w + tr_b),
        "d_hesu": d_hesu,
        "log10_d_hesu": math.log10(d_hesu) if d_hesu > 0 else -math.inf,
        "trace_within": tr_w,
        "trace_between": tr_b,
        "rank": int(r),
        "sigma_ratio": float(stats.s[0] / stats.s[r - 1]) if r else math.inf,
    }


def _d_hesu(stats, sec):
    """He-Su's D = tr(Sigma_W Sigma_B^{+,r}) with sample weights, no 1/C."""
    r, r_s = stats.r, stats.r_sample
    cols = slice(0, r) if stats.same_basis else slice(r, r + r_s)
    q_s = sec.proj_sq[:, cols].sum(axis=0) / stats.counts.sum()
    return float((q_s / stats.s_sample[:r_s] ** 2).sum())


def _cdnv_pairs(stats, V):
    """CDNV(c, c') = (V_c + V_c') / (2 |mu_c - mu_c'|^2); +inf if coinciding."""
    M = stats.centred
    C, D = M.shape
    d2 = np.empty((C, C))
    rows = max(1, TILE_FLOATS // max(1, C * D))
    for start in range(0, C, rows):
        diff = M[start : start + rows, None, :] - M[None, :, :]
        d2[start : start + rows] = np.einsum("ijk,ijk->ij", diff, diff)
    close = d2 <= (stats.tau * stats.scale) ** 2
    num = V[:, None] + V[None, :]
    out = np.full((C, C), math.inf)
    np.divide(num, 2.0 * d2, out=out, where=~close)
    np.fill_diagonal(out, 0.0)
    return out


def _cdnv_summary(pairs, flags):
    upper = pairs[np.triu_indices(pairs.shape[0], k=1)]
    finite = upper[np.isfinite(upper)]
    flags["coinciding_means"] = int(upper.shape[0] - finite.shape[0])
    if finite.shape[0] == 0:
        return {"cdnv": math.inf, "cdnv_max": math.inf}
    return {"cdnv": float(finite.mean()), "cdnv_max": float(finite.max())}


def _cov(values, ddof):
    """Coefficient of variation std / |mean|; ddof 0 when only one value."""
    if values.shape[0] == 0:
        return 0.0
    std = float(values.std(ddof=ddof if values.shape[0] > ddof else 0))
    return _ratio(std, abs(float(values.mean())))


def _frame_stats(X, ddof, zero_tol):
    """NC2 statistics of the rows of X (reference section 5).

    Returns
    -------
    stats : dict
        equinorm, equiangular, maxangle, mean_cos, etf_gap, n_zero_rows.
    cos : ndarray, shape (C, C)
        Pairwise cosines, NaN for a zero row, 1 on the diagonal otherwise.
    """
    C = X.shape[0]
    norms = np.sqrt((X * X).sum(axis=1))
    good = norms > zero_tol
    G = X @ X.T
    cos = np.full((C, C), np.nan)
    ng = norms[good]
    cos[np.ix_(good, good)] = np.clip(
        G[np.ix_(good, good)] / np.outer(ng, ng), -1.0, 1.0
    )
    iu = np.triu_indices(C, k=1)
    pair = cos[iu]
    pair = pair[~np.isnan(pair)]
    ideal = -1.0 / (C - 1)
    std_cos = (
        float(pair.std(ddof=ddof if pair.shape[0] > ddof else 0))
        if pair.shape[0]
        else 0.0
    )
    return {
        "equinorm": _cov(norms, ddof),
        "equiangular": std_cos,
        "maxangle": float(np.abs(pair + 1.0 / (C - 1)).mean())
        if pair.shape[0]
        else abs(ideal),
        "mean_cos": float(pair.mean()) if pair.shape[0] else 0.0,
        "etf_gap": _etf_gap(G),
        "n_zero_rows": int(C - np.count_nonzero(good)),
    }, cos


def _etf_gap(G):
    """| G/|G|_F - (I - 11^T/C)/sqrt(C-1) |_F for a C x C Gram matrix."""
    C = G.shape[0]
    target = (np.eye(C) - 1.0 / C) / math.sqrt(C - 1)
    norm = float(np.linalg.norm(G))
    return float(np.linalg.norm(G / norm - target)) if norm > 0 else 1.0


def _of_gap(means):
    """| G_u/|G_u|_F - I/sqrt(C) |_F on the uncentred means."""
    G = means @ means.T
    norm = float(np.linalg.norm(G))
    target = np.eye(G.shape[0]) / math.sqrt(G.shape[0])
    return float(np.linalg.norm(G / norm - target)) if norm > 0 else 1.0


def _empty_classifier_metrics():
    names = (
        "equinorm_classifier",
        "equiangular_classifier",
        "maxangle_classifier",
        "mean_cos_classifier",
        "etf_gap_classifier",
        "rank_classifier",
        "self_duality",
        "duality_gram_gap",
        "duality_cos",
        "duality_cos_cov",
        "bias_gap",
    )
    return dict.fromkeys(names)


def _classifier_metrics(stats, clf, opts, metrics, flags):
    """NC2 of the classifier rows, NC3 and the bias relation, into metrics."""
    metrics["bias_gap"] = _bias_gap(stats, clf, opts["loss"])
    if not clf.per_class:
        return np.linalg.svd(clf.W, compute_uv=False)
    Wk = clf.W[stats.kept]
    if opts["center_classifier"]:
        Wk = Wk - Wk.mean(axis=0)
    w_tol = stats.tau * float(np.sqrt((clf.W**2).sum(axis=1)).max())
    frame, _ = _frame_stats(Wk, opts["ddof"], w_tol)
    flags["zero_classifier_rows"] = frame.pop("n_zero_rows")
    metrics.update({f"{k}_classifier": v for k, v in frame.items()})
    spectrum = np.linalg.svd(Wk, compute_uv=False)
    metrics["rank_classifier"] = _numerical_rank(spectrum, stats.tau)
    metrics.update(
        _duality(Wk, stats.centred, opts["ddof"], w_tol, stats.tau * stats.scale)
    )
    return spectrum


def _numerical_rank(s, tau):
    return int(np.count_nonzero(s > tau * s[0])) if s.shape[0] and s[0] else 0


def _unit(X):
    norm = float(np.linalg.norm(X))
    return X / norm if norm > 0 else np.zeros_like(X)


def _duality(W, M, ddof, w_tol, m_tol):
    """NC3: squared self-duality, Gram-product gap, per-class cosines."""
    C = W.shape[0]
    target = (np.eye(C) - 1.0 / C) / math.sqrt(C - 1)
    Pn = _unit(W @ M.T)
    wn = np.sqrt((W * W).sum(axis=1))
    mn = np.sqrt((M * M).sum(axis=1))
    good = (wn > w_tol) & (mn > m_tol)
    cosines = (W[good] * M[good]).sum(axis=1) / (wn[good] * mn[good])
    return {
        "self_duality": float(((_unit(W) - _unit(M)) ** 2).sum()),
        "duality_gram_gap": float(np.linalg.norm(Pn - target)),
        "duality_cos": float(cosines.mean()) if cosines.shape[0] else 0.0,
        "duality_cos_cov": _cov(cosines, ddof),
    }


def _bias_gap(stats, clf, loss):
    """| W mu_G + b - t |, t = 0 (ce) or t = sum_c pi_c y_c (l2)."""
    out = clf.W @ (stats.mug_ref + stats.ref) + clf.b
    if loss == "l2":
        out = out - stats.pi @ clf.targets
    return float(np.linalg.norm(out))


def _ncc_metrics(stats, sec, held):
    """NCC accuracy and mismatch, on training and held-out samples."""
    n = int(stats.counts.sum())
    out = {
        "ncc_acc": sec.ncc_correct / n,
        "ncc_mismatch": (sec.n_pred - sec.ncc_agree) / sec.n_pred
        if sec.n_pred
        else None,
        "ncc_mismatch_against": "+".join(sorted(sec.decided_by)) or None,
        "ncc_acc_heldout": None,
        "ncc_mismatch_heldout": None,
        "n_heldout": 0,
    }
    if held is not None and held["n"]:
        out["ncc_acc_heldout"] = held["correct"] / held["n"]
        out["n_heldout"] = held["n"]
        if held["n_pred"]:
            out["ncc_mismatch_heldout"] = (held["n_pred"] - held["agree"]) / held[
                "n_pred"
            ]
    return out


def _degenerate_notes(stats, flags, messages):
    C, D = stats.kept.shape[0], stats.ref.shape[0]
    flags["two_classes"] = bool(C == 2)
    flags["no_simplex_etf"] = bool(C > D + 1)
    flags["singleton_classes"] = int(np.count_nonzero(stats.counts == 1))
    if C == 2:
        messages.append(
            "C = 2: centred means are always antipodal, NC2 is "
            "vacuous; rely on NC1, NC3 and the rank"
        )
    if C > D + 1:
        messages.append(
            f"C = {C} > D + 1 = {D + 1}: no simplex ETF exists; "
            "ETF gaps are bounded away from 0 by geometry"
        )
    if flags["coinciding_means"]:
        messages.append(
            f"{flags['coinciding_means']} pair(s) of class means "
            "coincide: their CDNV is +inf and left out of the mean"
        )
    if flags["zero_centred_means"]:
        messages.append(
            f"{flags['zero_centred_means']} centred mean(s) are "
            "zero: their cosines are undefined and left out"
        )
    if flags["singleton_classes"]:
        messages.append(
            f"{flags['singleton_classes']} class(es) hold one sample: V_c = 0 there"
        )
    if stats.r == 0:
        messages.append(
            "all class means coincide: Sigma_B = 0, NC1 is an "
            "empty sum and the quotients are infinite"
        )


# --------------------------------------------------------------------------
# L2 loss decomposition (reference section 8)
# --------------------------------------------------------------------------


def _l2_decomposition(stats, clf, sec, lam):
    """Split the L2 loss at (W, b) into L_NC1 + L_NC2/3 + L_perp.

    With weights ``pi`` (balanced in the reference; any ``pi`` works the
    same way) the loss is quadratic in ``W~ = [W b]`` with normal matrix
    ``A = [[sum_c pi_c mu_c mu_c^T + Sigma_W + lam I, mu_G], [mu_G^T, 1 +
    lam]]`` and right-hand side ``R = sum_c pi_c y_c [mu_c^T, 1]``; ``A`` is
    pseudo-inverted with a float64 relative cut-off, since ``R`` lies in
    the range of ``A`` even when ``A`` is singular.
    """
    D = stats.ref.shape[0]
    mu = stats.means_ref + stats.ref
    mu_g = stats.mug_ref + stats.ref
    Sw = sec.scatter
    A = np.empty((D + 1, D + 1))
    A[:D, :D] = (mu.T * stats.pi) @ mu + Sw + lam * np.eye(D)
    A[:D, D] = A[D, :D] = mu_g
    A[D, D] = 1.0 + lam
    R = (clf.targets.T * stats.pi) @ np.hstack([mu, np.ones((mu.shape[0], 1))])
    Wt_ls = _solve_psd(A, R)
    W_ls, b_ls = Wt_ls[:, :D], Wt_ls[:, D]
    delta = np.hstack([clf.W, clf.b[:, None]]) - Wt_ls
    loss = 0.5 * float(stats.pi @ (sec.resid_sq / stats.counts)) + 0.5 * lam * float(
        (clf.W**2).sum() + (clf.b**2).sum()
    )
    fit = W_ls @ stats.centred.T + (W_ls @ mu_g + b_ls)[:, None] - clf.targets.T
    return L2Decomposition(
        lam=float(lam),
        loss=loss,
        nc1=0.5 * float(np.einsum("ij,jk,ik->", W_ls, Sw + lam * np.eye(D), W_ls))
        + 0.5 * lam * float(b_ls @ b_ls),
        nc23=0.5 * float(((fit**2) @ stats.pi).sum()),
        perp=0.5 * float(np.einsum("ij,jk,ik->", delta, A, delta)),
        W_ls=W_ls,
        b_ls=b_ls,
    )


def _solve_psd(A, R):
    """Minimum-norm X with X A = R for symmetric PSD A, R in range(A)."""
    w, V = np.linalg.eigh(A)
    keep = w > A.shape[0] * np.finfo(np.float64).eps * max(w[-1], 0.0)
    Vk = V[:, keep]
    return ((R @ Vk) / w[keep]) @ Vk.T


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def npy_chunks(features, labels, predictions=None, *, chunk_rows=CHUNK_ROWS):
    """Stream features and labels from ``.npy`` files, for the two passes.

    The files are read sequentially in blocks of ``chunk_rows`` rows with
    ordinary reads, not memory-mapped, so the resident memory stays at one
    chunk however large the files are.

    Parameters
    ----------
    features : str or os.PathLike
        ``.npy`` file of shape (N, D), C order, any real dtype.
    labels : str or os.PathLike
        ``.npy`` file of shape (N,).
    predictions : str or os.PathLike, optional
        ``.npy`` file of shape (N,).
    chunk_rows : int

    Returns
    -------
    callable
        A ``chunks_factory`` for :func:`collapse_metrics_streaming`.
    """
    paths = [p for p in (features, labels, predictions) if p is not None]

    def chunks():
        handles = [open(p, "rb") for p in paths]
        try:
            yield from _read_rows(handles, [str(p) for p in paths], chunk_rows)
        finally:
            for fh in handles:
                fh.close()

    return chunks


def npz_chunks(
    path,
    *,
    features="features",
    labels="labels",
    predictions="predictions",
    chunk_rows=CHUNK_ROWS,
):
    """Stream arrays of an ``.npz`` archive without loading them whole.

    ``np.load`` cannot memory-map an ``.npz`` member, so each member is
    opened as a stream inside the zip archive (stored or deflated alike)
    and its ``.npy`` payload read ``chunk_rows`` rows at a time.

    Parameters
    ----------
    path : str or os.PathLike
    features, labels : str
        Member names, shapes (N, D) and (N,).
    predictions : str or None
        Member name of the network decisions; used only when present.
    chunk_rows : int

    Returns
    -------
    callable
        A ``chunks_factory`` for :func:`collapse_metrics_streaming`.
    """
    with zipfile.ZipFile(path) as archive:
        present = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
    for name in (features, labels):
        if name not in present:
            raise ValueError(
                f"{path}: no array {name!r}; found {sorted(present) or 'none'}"
            )
    names = [features, labels]
    if predictions is not None and predictions in present:
        names.append(predictions)

    def chunks():
        with zipfile.ZipFile(path) as archive:
            handles = [archive.open(n + ".npy") for n in names]
            try:
                yield from _read_rows(
                    handles, [f"{path}:{n}" for n in names], chunk_rows
                )
            finally:
                for fh in handles:
                    fh.close()

    return chunks


def _npy_header(fh, where):
    """Shape and dtype of an ``.npy`` stream positioned at its start."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise ValueError(f"{where}: not a readable .npy array ({exc})") from exc
    if dtype.hasobject:
        raise ValueError(
            f"{where}: object arrays cannot be streamed; save a numeric array"
        )
    if fortran and len(shape) > 1 and min(shape) > 1:
        raise ValueError(
            f"{where}: Fortran-ordered; save "
            "np.ascontiguousarray(a) to stream it by rows"
        )
    return shape, dtype


def _read_rows(handles, names, chunk_rows):
    """Yield tuples of row blocks, one per stream, checking equal lengths."""
    headers = [_npy_header(fh, n) for fh, n in zip(handles, names)]
    n_rows = headers[0][0][0] if headers[0][0] else 0
    for (shape, _), name in zip(headers, names):
        if not shape or shape[0] != n_rows:
            raise ValueError(
                f"{name}: shape {shape}, expected {n_rows} rows like {names[0]}"
            )
    for start in range(0, n_rows, int(chunk_rows)):
        rows = min(int(chunk_rows), n_rows - start)
        yield tuple(
            _read_block(fh, shape, dtype, rows, name)
            for fh, name, (shape, dtype) in zip(handles, names, headers)
        )


def _read_block(fh, shape, dtype, rows, name):
    width = int(np.prod(shape[1:], dtype=np.int64))
    nbytes = rows * width * dtype.itemsize
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(
            f"{name}: file ends early ({len(data)} of {nbytes} bytes in the last chunk)"
        )
    return np.frombuffer(data, dtype=dtype).reshape((rows,) + tuple(shape[1:]))


# --------------------------------------------------------------------------
# Sources of features: network layers, truncation maps
# --------------------------------------------------------------------------


def network_decisions(outputs, targets=None, loss="l2"):
    """Class index the network picks for each sample (reference section 7).

    Parameters
    ----------
    outputs : array_like, shape (N, K)
    targets : array_like, shape (C, K), optional
        Class targets ``y_c``; default one-hot (``C = K``).
    loss : {"l2", "ce"}
        ``l2``: nearest target ``argmin_c |f - y_c|``; ``ce``: ``argmax_c f_c``.

    Returns
    -------
    ndarray of int, shape (N,)
        Row index into ``targets`` (class index); ties to the lower index.
    """
    F = np.asarray(outputs, dtype=np.float64)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "ce" or targets is None:
        return F.argmax(axis=1)
    Y = np.asarray(targets, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[1] != F.shape[1]:
        raise ValueError(f"targets must have shape (C, {F.shape[1]}), got {Y.shape}")
    d2 = (Y * Y).sum(axis=1) - 2.0 * F @ Y.T
    return d2.argmin(axis=1)


def layer_features(params, X, activation="relu", include_output=True):
    """Features of every layer of an MLP: ``[X, a^1, ..., a^L, f(X)]``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        Layers ``l = 1..L+1``, ``W`` of shape (out, in).
    X : array_like, shape (N, M)
    activation : {"relu", "tanh", "softplus"}
    include_output : bool
        Append the network output ``f(X)``, shape (N, Q).

    Returns
    -------
    list of ndarray
        Entry ``l`` has shape ``(N, M_l)``: the input of layer ``l + 1``.
    """
    from .network import forward_cache

    cache = forward_cache(params, X, activation)
    features = list(cache.inputs)
    if include_output:
        features.append(cache.preactivations[-1])
    return features


def truncation_features(cumulative, X):
    """Input-space images of the data under the truncation maps, layer by layer.

    Parameters
    ----------
    cumulative : sequence of (W, b) pairs
        Cumulative parameters ``(W^(l), b^(l))`` of the hidden layers only
        (for a stored network whose list ends with the output layer, pass
        ``cumulative[:-1]``).
    X : array_like, shape (N, dim)

    Returns
    -------
    list of ndarray, each of shape (N, dim)
        ``[X, tau_1(X), tau_2(tau_1(X)), ...]``.
    """
    from .truncation import truncation_chain

    return truncation_chain([W for W, _ in cumulative], [b for _, b in cumulative], X)


def metrics_per_layer(
    features,
    labels,
    *,
    classifiers=None,
    predictions=None,
    heldout=None,
    names=None,
    progress=None,
    **options,
):
    """Collapse metrics of every layer's features, with training means.

    Parameters
    ----------
    features : sequence of array_like
        Entry ``l`` has shape ``(N, D_l)``, one row per sample.
    labels : array_like, shape (N,)
    classifiers : dict, optional
        ``{l: (W, b)}``: a classifier acting on layer ``l`` (for NC2 of
        ``W``, NC3 and, with ``l2_lam``, the loss decomposition).
    predictions : array_like, shape (N,), optional
        The network's decisions, for NC4 at every layer.
    heldout : tuple, optional
        ``(features_per_layer, labels)`` or ``(features_per_layer, labels,
        predictions)``.
    names : sequence of str, optional
        Recorded as ``source``; default ``"layer l"``.
    progress : callable, optional
        Called as ``progress(layers_done, n_layers)``.
    **options
        Keywords of :func:`collapse_metrics` (weighting, ddof, ...).

    Returns
    -------
    list of CollapseResult, one per layer
    """
    classifiers = {} if classifiers is None else dict(classifiers)
    names = (
        [f"layer {l}" for l in range(len(features))] if names is None else list(names)
    )
    if len(names) != len(features):
        raise ValueError(f"names has {len(names)} entries for {len(features)} layers")
    results = []
    for l, H in enumerate(features):
        W, b = classifiers.get(l, (None, None))
        held = None
        if heldout is not None:
            held = (heldout[0][l],) + tuple(heldout[1:])
        results.append(
            collapse_metrics(
                H,
                labels,
                W=W,
                b=b,
                predictions=predictions,
                heldout=held,
                source=names[l],
                **options,
            )
        )
        if progress is not None:
            progress(l + 1, len(features))
    return results


def network_collapse(
    params,
    X,
    labels,
    *,
    activation="relu",
    targets=None,
    heldout=None,
    progress=None,
    **options,
):
    """Collapse metrics of every layer of an MLP on its own data.

    Features are ``[X, a^1, ..., a^L, f(X)]``; the output layer is the
    classifier of the last hidden layer; the network's decision (nearest
    target for ``loss="l2"``, argmax for ``"ce"``) drives NC4.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (N, M)
    labels : array_like of int, shape (N,)
        Class indices ``0..C-1`` (rows of ``targets``).
    activation : {"relu", "tanh", "softplus"}
    targets : array_like, shape (C, Q), optional
        Default one-hot with ``C = Q``.
    heldout : tuple, optional
        ``(X_heldout, labels_heldout)``.
    progress : callable, optional
        ``progress(layers_done, n_layers)``.
    **options
        Keywords of :func:`collapse_metrics`.

    Returns
    -------
    list of CollapseResult, one per layer (input first, output last)
    """
    loss = options.get("loss", "l2")
    options["loss"] = loss
    n_out = params[-1][0].shape[0]
    Y = np.eye(n_out) if targets is None else np.asarray(targets, float)
    options.setdefault("classes", np.arange(Y.shape[0]))
    features = layer_features(params, X, activation)
    pred = network_decisions(features[-1], Y, loss)
    held = None
    if heldout is not None:
        held_feats = layer_features(params, heldout[0], activation)
        held = (held_feats, heldout[1], network_decisions(held_feats[-1], Y, loss))
    L = len(params) - 1
    names = ["input"] + [f"hidden {l}" for l in range(1, L + 1)] + ["output"]
    return metrics_per_layer(
        features,
        labels,
        classifiers={L: params[-1]},
        predictions=pred,
        heldout=held,
        names=names,
        progress=progress,
        targets=None if targets is None else Y,
        **options,
    )
