"""Datasets: clustered generators and loaders for user files.

Every dataset stores samples as rows: ``X`` has shape ``(n_samples, dim)``,
``labels`` holds class indices ``0..Q-1`` and ``Y`` holds one target per class
as a row, ``Y[j] = y_j``, shape ``(Q, out_dim)``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_MEAN_DRAWS = 1000  # rejection sampling of random means gives up after this


class DataError(ValueError):
    """A dataset cannot be made or read as asked."""


@dataclass
class Dataset:
    """Labelled points with one target per class.

    Attributes
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
        Class of every sample, ``0..Q-1``, every class non-empty.
    Y : ndarray, shape (Q, out_dim)
        Row ``j`` is the target ``y_j`` of class ``j``.
    centers : ndarray, shape (Q, dim), or None
        Generator centers when the points were drawn, else None.
    radius : float or None
        Generator radius (ball radius, or the Gaussian's RMS distance).
    distribution : str or None
        ``"ball"`` or ``"gaussian"`` for generated data.
    source : str
        Short description of where the data came from.
    """

    X: np.ndarray
    labels: np.ndarray
    Y: np.ndarray
    centers: np.ndarray | None = None
    radius: float | None = None
    distribution: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)
    targets: np.ndarray | None = None

    def sample_targets(self):
        """Per-sample targets, shape (n_samples, out_dim): given, or ``Y[labels]``."""
        return self.Y[self.labels] if self.targets is None else self.targets

    @property
    def n_classes(self):
        return self.Y.shape[0]

    @property
    def sizes(self):
        return np.bincount(self.labels, minlength=self.n_classes)

    def resample(self, sizes, rng):
        """Fresh points from the same generator, or None for loaded data."""
        if self.centers is None:
            return None
        X, labels = draw_clusters(
            self.centers, sizes, self.radius, self.distribution, rng
        )
        return X, labels


def one_hot(Q):
    """Targets ``y_j = e_j``: the identity, shape (Q, Q)."""
    return np.eye(Q)


def uniform_ball(n, dim, radius, rng):
    """``n`` points uniform in the ball of the given radius about 0, shape (n, dim)."""
    G = rng.standard_normal((n, dim))
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    norms[norms == 0.0] = 1.0
    r = radius * rng.random((n, 1)) ** (1.0 / dim)
    return G / norms * r


def draw_clusters(centers, sizes, radius, distribution, rng):
    """Draw ``sizes[j]`` points about each center.

    Parameters
    ----------
    centers : ndarray, shape (Q, dim)
    sizes : sequence of int, length Q
    radius : float
        Ball radius, or for ``"gaussian"`` the RMS distance to the center
        (per-coordinate standard deviation ``radius / sqrt(dim)``).
    distribution : {"ball", "gaussian"}

    Returns
    -------
    X : ndarray, shape (sum(sizes), dim)
    labels : ndarray of int, shape (sum(sizes),)
    """
    Q, dim = centers.shape
    blocks = []
    for j in range(Q):
        if distribution == "ball":
            D = uniform_ball(int(sizes[j]), dim, radius, rng)
        elif distribution == "gaussian":
            D = rng.standard_normal((int(sizes[j]), dim)) * (radius / np.sqrt(dim))
        else:
            raise DataError(
                f"distribution must be 'ball' or 'gaussian', got {distribution!r}"
            )
        blocks.append(centers[j] + D)
    labels = np.repeat(np.arange(Q), np.asarray(sizes, dtype=int))
    return np.vstack(blocks), labels


def simplex_means(Q, dim, scale):
    """Scaled simplex corners ``scale * e_j`` in the first Q coordinates, (Q, dim)."""
    means = np.zeros((Q, dim))
    means[np.arange(Q), np.arange(Q)] = scale
    return means


def random_means(Q, dim, scale, separation, rng):
    """Gaussian means of the given scale, pairwise at least ``separation`` apart.

    The means are also required to be linearly independent (condition number
    below 1e8), as the constructions need.
    """
    for _ in range(MAX_MEAN_DRAWS):
        means = rng.standard_normal((Q, dim)) * scale
        gaps = np.linalg.norm(means[:, None, :] - means[None, :, :], axis=2)
        gaps[np.diag_indices(Q)] = np.inf
        if gaps.min() >= separation and np.linalg.cond(means) < 1e8:
            return means
    raise DataError(
        f"no {Q} random means in R^{dim} with scale {scale} are {separation} apart "
        f"after {MAX_MEAN_DRAWS} draws; lower layout separation or raise scale"
    )


def clusters(
    Q,
    dim,
    sizes,
    radius,
    rng,
    *,
    distribution="ball",
    layout="simplex",
    scale=1.0,
    separation=None,
    means=None,
    targets=None,
):
    """Q clusters in R^dim, uniform in balls or Gaussian about chosen means.

    Parameters
    ----------
    Q, dim : int
        Number of classes and input dimension.
    sizes : int or sequence of int
        Points per class (one number for equal classes).
    radius : float
        Ball radius (or Gaussian RMS distance) of every cluster.
    rng : numpy.random.Generator
    layout : {"simplex", "random", "given"}
        Scaled simplex corners, random means with a minimum separation,
        or the rows of ``means``.
    targets : ndarray, shape (Q, out_dim), optional
        Default one-hot.

    Returns
    -------
    Dataset
    """
    sizes = (
        np.full(Q, sizes, dtype=int)
        if np.isscalar(sizes)
        else np.asarray(sizes, dtype=int)
    )
    if layout == "simplex":
        centers = simplex_means(Q, dim, scale)
    elif layout == "random":
        sep = 4.0 * radius if separation is None else separation
        centers = random_means(Q, dim, scale, sep, rng)
    elif layout == "given":
        centers = np.asarray(means, dtype=float)
    else:
        raise DataError(f"layout must be simplex, random or given, got {layout!r}")
    X, labels = draw_clusters(centers, sizes, radius, distribution, rng)
    Y = one_hot(Q) if targets is None else np.asarray(targets, dtype=float)
    return Dataset(
        X,
        labels,
        Y,
        centers=centers,
        radius=float(radius),
        distribution=distribution,
        source=f"clusters ({layout}, {distribution})",
    )


def _encode_labels(raw, where):
    """Map arbitrary labels to ``0..Q-1`` in sorted order of their values."""
    classes, labels = np.unique(np.asarray(raw), return_inverse=True)
    if classes.size < 1:
        raise DataError(f"{where}: no labels found")
    return labels.astype(int), classes


def load_npz(path, targets=None):
    """Read labelled points from ``.npz``.

    Arrays: ``X`` (N, M); ``labels`` (N,) and optional ``Y`` (Q, out_dim), or
    per-sample ``targets`` (N, out_dim) (then ``labels`` is optional).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        names = set(f.files)
        missing = [
            k
            for k in ("X", "labels")
            if k not in names and not (k == "labels" and "targets" in names)
        ]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(missing)}; found "
                f"{', '.join(sorted(names)) or 'none'}; expected X (N, M), "
                "labels (N,), optional Y (Q, Q) or targets (N, Q)"
            )
        X = np.asarray(f["X"], dtype=float)
        raw = f["labels"] if "labels" in names else np.zeros(X.shape[0], dtype=int)
        Y = np.asarray(f["Y"], dtype=float) if "Y" in names else None
        T = np.asarray(f["targets"], dtype=float) if "targets" in names else None
        extra = {k: np.asarray(f[k]) for k in names - {"X", "labels", "Y", "targets"}}
    ds = _finish_loaded(path, X, raw, Y if targets is None else targets, extra)
    if T is not None:
        if T.ndim != 2 or T.shape[0] != X.shape[0] or not np.all(np.isfinite(T)):
            raise DataError(
                f"{path}: targets must be finite, shape (N, out_dim) with "
                f"N = {X.shape[0]}, got shape {T.shape}"
            )
        ds.targets = T
    return ds


def load_csv(path, targets=None):
    """Read a CSV of coordinates with the class in a ``label`` column.

    With a header row, the column named ``label`` (or ``class``) holds the
    classes and all others are coordinates; without one, the last column is
    the class.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise DataError(f"{path}: empty file")
    header = rows[0]
    if _is_header(header):
        names = [h.strip().lower() for h in header]
        col = next((i for i, h in enumerate(names) if h in ("label", "class")), None)
        if col is None:
            raise DataError(
                f"{path}: header has no 'label' column; found {', '.join(header)}"
            )
        rows = rows[1:]
    else:
        col = len(header) - 1
    try:
        X = np.array([[float(v) for i, v in enumerate(r) if i != col] for r in rows])
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric coordinate ({exc})") from exc
    raw = [r[col].strip() for r in rows]
    try:
        raw = np.array([float(v) for v in raw])
    except ValueError:
        raw = np.array(raw)
    return _finish_loaded(path, X, raw, targets, {})


def _is_header(row):
    try:
        [float(v) for v in row]
    except ValueError:
        return True
    return False


def _finish_loaded(path, X, raw, Y, extra):
    if X.ndim != 2:
        raise DataError(f"{path}: X must be 2-D (N, M), got shape {X.shape}")
    if len(raw) != X.shape[0]:
        raise DataError(f"{path}: {X.shape[0]} rows of X but {len(raw)} labels")
    if not np.all(np.isfinite(X)):
        raise DataError(f"{path}: X contains NaN or infinite values")
    labels, classes = _encode_labels(raw, str(path))
    Q = classes.size
    Y = one_hot(Q) if Y is None else np.asarray(Y, dtype=float)
    if Y.ndim != 2 or Y.shape[0] != Q:
        raise DataError(
            f"{path}: Y must have one row per class ({Q}), got shape {Y.shape}"
        )
    extra = dict(extra, class_values=classes)
    return Dataset(X, labels, Y, source=f"file {path.name}", extra=extra)


def load_file(path, targets=None):
    """Load ``.npz`` or ``.csv`` data by file extension."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npz":
        return load_npz(path, targets)
    if path.suffix == ".csv":
        return load_csv(path, targets)
    raise DataError(
        f"{path}: unknown data file type {path.suffix!r}; allowed: .npz, .csv"
    )


SKLEARN_SETS = ("iris", "wine", "breast_cancer", "digits")


def load_sklearn(name, standardize=True, dim=None):
    """A dataset bundled with scikit-learn (no download), optionally reduced.

    Parameters
    ----------
    name : {"iris", "wine", "breast_cancer", "digits"}
    standardize : bool
        Centre every feature and scale it to unit variance (constant
        features are only centred).
    dim : int, optional
        Project onto the leading ``dim`` principal components.

    Returns
    -------
    Dataset
        One-hot targets; ``extra["feature_names"]`` when known.
    """
    if name not in SKLEARN_SETS:
        raise DataError(
            f"unknown scikit-learn dataset {name!r}; allowed: "
            + ", ".join(SKLEARN_SETS)
        )
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise DataError(
            "source: sklearn needs scikit-learn: pip install 'dlmin[sklearn]'"
        ) from exc
    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=float)
    if standardize:
        X = X - X.mean(axis=0)
        std = X.std(axis=0)
        X = X / np.where(std > 0, std, 1.0)
    if dim is not None:
        X = pca(X, dim)
    labels, classes = _encode_labels(bunch.target, name)
    return Dataset(
        X,
        labels,
        one_hot(classes.size),
        source=f"sklearn {name}",
        extra={"class_values": classes},
    )


def pca(X, dim):
    """Coordinates of the centred rows of ``X`` on ``dim`` leading principal axes."""
    if not 1 <= dim <= min(X.shape):
        raise DataError(
            f"PCA dimension must be between 1 and {min(X.shape)}, got {dim}"
        )
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:dim].T
