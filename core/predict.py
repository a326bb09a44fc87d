"""Apply a stored network to new inputs, by its outputs and by truncation.

Two classification rules (reference/construct.md section 4.4): the nearest
target to the network output, ``argmin_j |x_out(x) - y_j|``, and, for
constructed networks, the nearest apex in the metric of the output layer,
``argmin_j |A (tau(x) - p_j)|`` with ``tau`` the composed truncation maps and
``A`` the cumulative output weight. They agree whenever ``A p_j + c = y_j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import network, store
from . import truncation as tr


@dataclass
class StoredNetwork:
    """A network read back from a result file.

    Attributes
    ----------
    layers : list of (W, b)
        Layer-wise parameters, ``W`` of shape (out, in).
    activation : str
    Y : ndarray, shape (Q, out_dim), or None
        Class targets, row ``j`` is ``y_j``.
    cumulative : list of (W, b) or None
        Cumulative parameters, present for constructed networks.
    apexes : ndarray, shape (Q, dim), or None
        Points ``p_j`` each class is collapsed to (NaN rows: not collapsed).
    """

    layers: list
    activation: str
    Y: np.ndarray | None
    cumulative: list | None = None
    apexes: np.ndarray | None = None

    @property
    def input_dim(self):
        return self.layers[0][0].shape[1]


def load_network(path, res=None):
    """Read the network (and what the truncation rule needs) from a result file.

    ``res`` is the file as :func:`dlmin.core.store.load` returned it, when
    the caller has read it already.
    """
    res = store.load(path) if res is None else res
    if "network" not in res or not store.read_layers(res["network"]):
        status = res["attrs"].get("status", "unknown")
        raise ValueError(f"{path}: holds no network (run status: {status})")
    net = res["network"]
    cumulative = store.read_layers(net["cumulative"]) if "cumulative" in net else None
    trunc = res.get("truncation", {})
    return StoredNetwork(
        layers=store.read_layers(net),
        activation=_activation(res),
        Y=res.get("data", {}).get("Y"),
        cumulative=cumulative,
        apexes=trunc.get("apexes"),
    )


def _activation(res):
    """The stored network's activation: its attribute, else the run's spec.

    Files written before every kind stored the attribute (trap and collapse
    results) still say it in their resolved spec; constructions are ReLU.
    """
    stored = res["network"]["attrs"].get("activation")
    if stored:
        return str(stored)
    import yaml

    try:
        spec = yaml.safe_load(res.get("spec", {}).get("run", "")) or {}
    except yaml.YAMLError:
        spec = {}
    network = spec.get("network") if isinstance(spec, dict) else None
    if res["attrs"].get("kind") in ("flow", "trap", "collapse", "truncate") and (
        isinstance(network, dict) and network.get("activation")
    ):
        return str(network["activation"])
    return "relu"


@dataclass
class Prediction:
    """Outputs and predicted classes for new inputs.

    Attributes
    ----------
    outputs : ndarray, shape (n_samples, out_dim)
    classes : ndarray of int, shape (n_samples,)
        Nearest target to the output (None without targets).
    metric_classes : ndarray of int, shape (n_samples,), or None
        Nearest apex in the output-layer metric after truncation.
    agreement : float or None
        Fraction of inputs on which the two rules agree.
    """

    outputs: np.ndarray
    classes: np.ndarray | None
    metric_classes: np.ndarray | None
    agreement: float | None


def nearest(points, centers):
    """Index of the nearest row of ``centers`` for each row of ``points``."""
    d2 = (
        (points**2).sum(1)[:, None] - 2 * points @ centers.T + (centers**2).sum(1)[None]
    )
    return d2.argmin(axis=1)


def predict(net, X):
    """Apply a stored network to inputs ``X`` of shape (n_samples, dim)."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] != net.input_dim:
        raise ValueError(f"inputs must have shape (n, {net.input_dim}), got {X.shape}")
    out = network.forward(net.layers, X, activation=net.activation)
    classes = (
        nearest(out, net.Y)
        if net.Y is not None and net.Y.shape[1] == out.shape[1]
        else None
    )
    metric = _metric_classes(net, X)
    agreement = (
        float(np.mean(metric == classes))
        if metric is not None and classes is not None
        else None
    )
    return Prediction(out, classes, metric, agreement)


def _metric_classes(net, X):
    if net.cumulative is None or net.apexes is None or net.activation != "relu":
        return None
    if np.isnan(net.apexes).any():
        return None
    hidden = net.cumulative[:-1]
    Z = tr.truncation_chain([W for W, _ in hidden], [b for _, b in hidden], X)[-1]
    A = net.cumulative[-1][0]
    return nearest(Z @ A.T, net.apexes @ A.T)


def load_inputs(path):
    """Inputs from ``.npz`` (array ``X``) or ``.csv`` (numbers, optional header)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "X" not in f.files:
                raise ValueError(
                    f"{path}: no array X; found {', '.join(f.files) or 'none'}"
                )
            return np.asarray(f["X"], dtype=float), (
                np.asarray(f["labels"]) if "labels" in f.files else None
            )
    if path.suffix == ".csv":
        text = path.read_text().strip().splitlines()
        rows = [r.split(",") for r in text if r.strip()]
        try:
            float(rows[0][0])
        except ValueError:
            rows = rows[1:]
        try:
            return np.array([[float(v) for v in r] for r in rows]), None
        except ValueError as exc:
            raise ValueError(f"{path}: non-numeric value ({exc})") from exc
    raise ValueError(f"{path}: unknown input type {path.suffix!r}; allowed: .npz, .csv")
