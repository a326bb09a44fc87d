"""HDF5 result files: written under a temporary name, renamed when complete.

One file per run. Root attributes carry the provenance (schema version,
kind, run id, status, spec hash, seed, package versions, git commit, wall
time); the run's resolved spec and the spec file's text are string datasets
under ``spec/``; arrays live in groups by content (``data/``, ``network/``,
``truncation/``, ``metrics/``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .spec import SCHEMA_VERSION

PARTIAL_SUFFIX = ".partial"


def partial_path(path):
    """The temporary name a result file has while it is written."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


@functools.lru_cache(maxsize=1)
def provenance():
    """Package versions and the git commit of the dlmin source, when known."""
    from importlib.metadata import PackageNotFoundError, version

    import scipy

    try:
        dlmin_version = version("dlmin")
    except PackageNotFoundError:
        dlmin_version = "unknown"
    versions = {
        "dlmin": dlmin_version,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "h5py": h5py.__version__,
    }
    return {"versions": json.dumps(versions), "git_commit": _git_commit()}


def _git_commit():
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _attr_value(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=_json_default)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return value


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


class ResultWriter:
    """Write one run's result file safely.

    The file is created as ``<name>.h5.partial`` with ``complete = False``;
    :meth:`finish` marks it complete and renames it into place, so a file
    under the final name is always whole. :meth:`abort` removes the partial
    file, or keeps it marked incomplete for runs that stream trajectories.
    """

    def __init__(self, path, **attrs):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.partial, "w")
        self.set_attrs(
            schema_version=SCHEMA_VERSION,
            status="running",
            complete=False,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **provenance(),
            **attrs,
        )

    def set_attrs(self, group="/", **attrs):
        node = self.file.require_group(group)
        for key, value in attrs.items():
            if value is not None:
                node.attrs[key] = _attr_value(value)

    def array(self, group, name, value, **attrs):
        """Store an array (or a string) as ``group/name``."""
        node = self.file.require_group(group)
        if name in node:
            del node[name]
        if isinstance(value, str):
            ds = node.create_dataset(name, data=value, dtype=h5py.string_dtype())
        elif isinstance(value, np.ndarray) and value.dtype.kind == "U":
            ds = node.create_dataset(
                name, data=value.astype(object), dtype=h5py.string_dtype()
            )
        else:
            ds = node.create_dataset(name, data=np.asarray(value))
        for key, v in attrs.items():
            if v is not None:
                ds.attrs[key] = _attr_value(v)
        return ds

    def append(self, group, name, value):
        """Append one row (a scalar or an array) to a dataset growing along axis 0.

        The dataset is created on the first call, chunked along its first
        axis, and flushed after every row so a killed run leaves a readable
        file.
        """
        value = np.asarray(value)
        node = self.file.require_group(group)
        if name not in node:
            chunk = (max(1, min(64, 2**20 // max(1, value.nbytes))),) + value.shape
            node.create_dataset(
                name,
                shape=(0,) + value.shape,
                maxshape=(None,) + value.shape,
                dtype=value.dtype if value.dtype.kind != "b" else bool,
                chunks=chunk,
            )
        ds = node[name]
        ds.resize(ds.shape[0] + 1, axis=0)
        ds[-1] = value
        return ds

    def flush(self):
        self.file.flush()

    def finish(self, status="ok", message="", **attrs):
        """Mark the file complete with its final status and move it into place."""
        self.set_attrs(status=status, message=message, complete=True, **attrs)
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self, keep=False, status="interrupted", message=""):
        """Close after a failure: delete the partial file, or keep it marked."""
        if self.file.id.valid:
            if keep:
                self.set_attrs(status=status, message=message, complete=False)
            self.file.close()
        if not keep:
            self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def root_attrs(path):
    """Root attributes of a result file as a dict (JSON strings decoded)."""
    with h5py.File(path, "r") as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def root_attr(path, name, default=None):
    """One root attribute of a result file (JSON decoded), without reading the rest."""
    with h5py.File(path, "r") as f:
        return _decode(f.attrs[name]) if name in f.attrs else default


def is_done(path, spec_hash):
    """Whether ``path`` is a complete, successful result of the same spec."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            return (
                bool(attrs.get("complete", False))
                and _decode(attrs.get("status")) == "ok"
                and _decode(attrs.get("spec_hash")) == spec_hash
            )
    except OSError:
        return False


def load(path):
    """Read a whole result file into nested dicts of arrays and attributes.

    Returns
    -------
    dict
        ``{"attrs": {...}, "<group>": {"attrs": {...}, "<name>": array, ...}}``;
        string datasets come back as ``str``.
    """
    with h5py.File(path, "r") as f:
        return _read_group(f)


def _read_group(group):
    out = {"attrs": {k: _decode(v) for k, v in group.attrs.items()}}
    for name, node in group.items():
        if isinstance(node, h5py.Group):
            out[name] = _read_group(node)
        elif node.dtype.kind in "OS" or h5py.check_string_dtype(node.dtype):
            out[name] = node.asstr()[()]
        else:
            out[name] = node[()]
    return out


def store_layers(writer, group, layers, prefix=""):
    """Store ``[(W, b), ...]`` as ``W1, b1, W2, b2, ...`` (the npz naming)."""
    for i, (W, b) in enumerate(layers, start=1):
        writer.array(group, f"{prefix}W{i}", W)
        writer.array(group, f"{prefix}b{i}", b)


def read_layers(group, prefix=""):
    """Inverse of :func:`store_layers` on a dict from :func:`load`."""
    layers, i = [], 1
    while f"{prefix}W{i}" in group:
        layers.append((group[f"{prefix}W{i}"], group[f"{prefix}b{i}"]))
        i += 1
    return layers
