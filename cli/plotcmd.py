"""`dlmin plot`: PNG figures of a result file or a sweep folder.

The pictures themselves live in :mod:`dlmin.cli.figures`; this module finds
the files, picks the figure, loads what it needs, renders it with the Agg
backend under a fixed style and writes a PNG whose bytes depend only on the
result (no timestamp or software version in its metadata). Matplotlib is
imported inside the command only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer

from .common import err_console
from .common import fail_usage as _fail_usage

DPI = 100  # fixed: the pixel size of every figure is its size in inches times this
BLAS_THREADS = 1  # the figures' matrices are tiny: more threads only add start-up time
SKIP_DATASETS = ("trajectory/theta",)  # parameter orbits: large, and never drawn
PARTIAL = ".partial"

PathArg = typer.Argument(
    ...,
    help="A result file (.h5 or .h5.partial) or a folder of result files (a "
    "sweep); several are drawn one after another (without --out).",
    show_default=False,
)
OutOpt = typer.Option(
    None,
    "--out",
    "-o",
    help="PNG to write (.gif for --what animation; with --what all: a "
    "folder). Default: next to the input, FILE-<what>.png "
    "(.gif), or FOLDER/<what>.png.",
)
WhatOpt = typer.Option(
    None,
    "--what",
    "-w",
    help="Figure to draw, or 'all' for every figure that applies. Files: layers, "
    "patterns, data (construct); flow, cost, outputs, ntk (flow); trap, bound "
    "(trap); collapse, effective (collapse); truncview, truncation-time, animation "
    "(a GIF) (dlmin truncate -o files and truncate results); landscape-hist, "
    "landscape-slices, landscape-plane, landscape-trials (landscape). Folders: sweep, "
    "and flow, cost, outputs, ntk with one curve per run. Default: the first that "
    "applies.",
)
XOpt = typer.Option(
    None,
    "--x",
    help="Sweep figure: horizontal axis, a swept parameter (default "
    "the first) or a summary scalar.",
)
YOpt = typer.Option(
    None,
    "--y",
    help="Sweep figure: summary scalar on the vertical axis (default cost).",
)


@dataclass
class Entry:
    """One result file: its path, root attributes and the paths of its groups."""

    path: Path
    attrs: dict
    groups: set = field(default_factory=set)
    datasets: set = field(default_factory=set)


@dataclass
class Source:
    """What was asked to plot: one file, or the result files of one folder."""

    path: Path
    entries: list

    @property
    def is_folder(self):
        return self.path.is_dir()

    @property
    def several(self):
        return len(self.entries) > 1


def register(app):
    @app.command()
    def plot(
        paths: List[Path] = PathArg,
        out: Optional[Path] = OutOpt,
        what: Optional[str] = WhatOpt,
        x: Optional[str] = XOpt,
        y: Optional[str] = YOpt,
    ):
        """Draw PNG figures of result files or sweep folders; print their paths."""
        if len(paths) > 1 and out is not None:
            fail_usage(
                "--out names one output; with several paths the figures go next "
                "to each of them"
            )
        for path in paths:
            plot_one(path, out, what, x, y)


def plot_one(path, out, what, x, y):
    """The figures of one file or folder (exit 2 when it has nothing to draw)."""
    from . import figures

    catalog = figure_catalog()
    source = open_source(path)
    names = choose(catalog, source, what, x, y)
    suffixes = [catalog[n].suffix for n in names]
    targets = output_paths(source, names, out, many=what == "all", suffixes=suffixes)
    written = 0
    for name, target in zip(names, targets):
        kind = catalog[name]
        options = {"x": x, "y": y} if name == "sweep" else {}
        try:
            render(kind, load_for(kind, source), target, options)
        except figures.PlotError as exc:
            if what != "all":
                fail_usage(f"{path}: nothing to plot for --what {name}: {exc}")
            err_console.print(f"skipped {name}: {exc}", soft_wrap=True, markup=False)
            continue
        print(target)
        written += 1
    if not written:
        fail_usage(
            f"{path}: none of the figures {', '.join(names)} had anything to plot"
        )


def figure_catalog():
    """Every figure by its ``--what`` name."""
    from . import figures, landscape_figures

    return {**figures.FIGURES, **landscape_figures.FIGURES}


def fail_usage(message):
    """Exit 2 with ``message`` on stderr, its brackets shown literally."""
    from rich.markup import escape

    _fail_usage(escape(message))


# ----------------------------------------------------------------- files


def open_source(path):
    """The file, or the folder's result files, with attributes and group names."""
    if not path.exists():
        fail_usage(f"{path}: no such file or folder")
    if not path.is_dir():
        return Source(path, [inventory(path)])
    files = result_files(path)
    if not files:
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and result_files(p))
        hint = f"; its subfolders with results: {', '.join(inner)}" if inner else ""
        fail_usage(f"{path}: no result files (*.h5, *.h5.partial) in this folder{hint}")
    return Source(path, [inventory(p) for p in files])


def result_files(folder):
    """Result files of a folder in name order; a partial file only when no final one."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    return sorted(
        folder / n
        for n in names
        if n.endswith(".h5")
        or (n.endswith(".h5" + PARTIAL) and n[: -len(PARTIAL)] not in names)
    )


def inventory(path):
    """Root attributes and group paths of one file, reading no arrays."""
    import h5py
    from dlmin.core.store import _decode

    groups, datasets = set(), set()
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            f.visititems(
                lambda name, node: (
                    groups if isinstance(node, h5py.Group) else datasets
                ).add(name)
            )
    except OSError as exc:
        fail_usage(
            f"{path}: not a readable HDF5 result file ({exc}); a file still "
            "being written may be locked until its run ends"
        )
    return Entry(path, attrs, groups, datasets)


def load_for(kind, source):
    """Results the figure draws: whole files holding its group, or root attributes."""
    if not kind.needs:
        return [{"attrs": e.attrs} for e in source.entries]
    chosen = [e for e in source.entries if kind.needs in e.groups]
    left = len(source.entries) - len(chosen)
    if left and source.several:
        err_console.print(
            f"note: {left} file(s) without {kind.needs}/ left out",
            soft_wrap=True,
            markup=False,
        )
    keep = getattr(kind, "keep", ())
    results = [load(e.path, keep) for e in chosen]
    if kind.needs == "truncview":
        results = [borrow_source(r, e.path, keep) for r, e in zip(results, chosen)]
    return results


def load(path, keep=()):
    """Like :func:`dlmin.core.store.load`, without the datasets in SKIP_DATASETS
    (those named in ``keep`` excepted)."""
    import h5py

    skip = tuple(d for d in SKIP_DATASETS if d not in keep)
    with h5py.File(path, "r") as f:
        return _read_group(f, h5py, skip)


BORROWED = (
    "data",
    "network",
    "trajectory",
)  # what a truncate file may take from its source


def borrow_source(res, path, keep=()):
    """A ``dlmin truncate -o`` file completed by the groups of the result it viewed.

    Such a file holds ``truncview/`` only; its ``source`` attribute names the
    result file (absolute, or relative to the working folder or to the file).
    When that file exists, holds ``data/X`` with as many rows as the view has
    labels, and the labels agree, its ``data/``, ``network/`` and
    ``trajectory/`` groups fill in the ones this file lacks. Otherwise the
    result is returned as it is.
    """
    import numpy as np

    if all(g in res for g in BORROWED):
        return res
    name = res.get("attrs", {}).get("source")
    if not isinstance(name, str) or not name.endswith((".h5", ".h5" + PARTIAL)):
        return res
    candidates = [Path(name)] + (
        [path.parent / name] if not Path(name).is_absolute() else []
    )
    found = next((p for p in candidates if p.is_file()), None)
    if found is None or found.resolve() == path.resolve():
        return res
    try:
        other = load(found, keep)
    except OSError:
        return res
    X = other.get("data", {}).get("X")
    labels = np.asarray(res.get("truncview", {}).get("labels", []))
    if (
        X is None
        or np.shape(X)[0] != labels.size
        or not np.array_equal(
            np.asarray(other["data"].get("labels", labels)).astype(int),
            labels.astype(int),
        )
    ):
        return res
    merged = dict(res)
    for g in BORROWED:
        if g not in merged and g in other:
            merged[g] = other[g]
    return merged


def _read_group(node, h5py, skip=SKIP_DATASETS):
    from dlmin.core.store import _decode

    out = {"attrs": {k: _decode(v) for k, v in node.attrs.items()}}
    for name, child in node.items():
        if child.name.lstrip("/") in skip:
            continue
        if isinstance(child, h5py.Group):
            out[name] = _read_group(child, h5py, skip)
        elif h5py.check_string_dtype(child.dtype) or child.dtype.kind in "OS":
            out[name] = child.asstr()[()]
        else:
            out[name] = child[()]
    return out


# ------------------------------------------------------------ choosing


def choose(catalog, source, what, x, y):
    """The figure names to draw; exit 2 naming the valid ones on a bad ``--what``."""
    fits = [k.name for k in catalog.values() if _fits(k, source)]
    if what is None:
        sweep = (x or y) and source.several
        what = "sweep" if sweep else _default(source, fits)
    if what == "all":
        if not fits:
            fail_usage(f"{source.path}: no figure applies to it")
        return fits
    if what not in catalog:
        fail_usage(
            f"unknown figure {what!r} for --what; figures: "
            f"{', '.join(catalog)}, all. For {source.path}: "
            f"{', '.join(fits) or 'none'}"
        )
    if what not in fits:
        fail_usage(
            f"{source.path}: nothing to plot for --what {what}: "
            f"{_why_not(catalog[what], source)}. Figures that apply to it: "
            f"{', '.join(fits) or 'none'}"
        )
    if (x or y) and what != "sweep":
        fail_usage("--x and --y choose the axes of --what sweep only")
    return [what]


def _fits(kind, source):
    groups = set().union(*(e.groups | e.datasets for e in source.entries))
    if not kind.applies(groups, source.several):
        return False
    return bool(kind.needs) or any(
        isinstance(e.attrs.get("summary"), dict) for e in source.entries
    )


def _default(source, fits):
    if not fits:
        fail_usage(
            f"{source.path}: no figure applies to it (groups found: "
            f"{', '.join(sorted(source.entries[0].groups)) or 'none'})"
        )
    if (
        not source.several
        and source.entries[0].attrs.get("kind") == "truncate"
        and "truncview" in fits
    ):
        return "truncview"
    if source.several:
        everyone = all("trajectory" in e.groups for e in source.entries)
        return (
            "flow"
            if everyone and "flow" in fits
            else ("sweep" if "sweep" in fits else fits[0])
        )
    return fits[0]


def _why_not(kind, source):
    if kind.scope == "folder":
        return (
            f"'{kind.name}' compares the runs of a folder; give a folder of "
            "several result files"
        )
    if kind.scope == "file" and source.several:
        return f"'{kind.name}' draws one run; give one of the folder's files"
    if not kind.needs:
        return "no file has a summary (partial files get theirs when they finish)"
    where = "any file" if source.several else "the file"
    groups = set().union(*(e.groups | e.datasets for e in source.entries))
    if kind.needs in groups:
        missing = ", ".join(a for a in kind.also if a not in groups)
        return f"no {missing} in {where} (that figure shows {kind.help})"
    return f"no {kind.needs}/ group in {where} (that figure shows {kind.help})"


def output_paths(source, names, out, many, suffixes=None):
    """Where each figure goes: ``-o`` (a folder with ``--what all``) or by the input."""
    suffixes = suffixes or [".png"] * len(names)
    if out is not None and not many and out.suffix.lower() != suffixes[0]:
        fail_usage(f"--out {out}: expected a path ending in {suffixes[0]}")
    if out is not None and many and out.suffix:
        fail_usage(f"--out {out}: with --what all, --out is a folder for the figures")
    if out is not None and not many:
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out]
    if source.is_folder:
        folder, stem = out or source.path, ""
    else:
        folder, stem = out or source.path.parent, _stem(source.path) + "-"
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / f"{stem}{name}{suffix}" for name, suffix in zip(names, suffixes)]


def _stem(path):
    name = path.name
    name = name[: -len(PARTIAL)] if name.endswith(PARTIAL) else name
    return name[:-3] if name.endswith(".h5") else Path(name).stem


# ------------------------------------------------------------ rendering


def render(kind, results, target, options):
    """Draw ``kind`` on a fresh figure and write it as a byte-stable PNG.

    The style starts from matplotlib's defaults (a user's matplotlibrc does
    not change the bytes) and the PNG carries no software or time stamp.
    """
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from threadpoolctl import threadpool_limits

    from .figures import ANIMATION_DPI, ANIMATION_FPS, STYLE

    with (
        matplotlib.style.context(STYLE, after_reset=True),
        threadpool_limits(limits=BLAS_THREADS, user_api="blas"),
    ):
        fig = Figure(dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        drawn = kind.draw(fig, results, **options)
        if getattr(kind, "suffix", ".png") == ".gif":
            save_gif(drawn, target, ANIMATION_FPS, ANIMATION_DPI)
        else:
            fig.savefig(target, format="png", dpi=DPI, metadata={"Software": None})


def save_gif(animation, target, fps, dpi):
    """Write ``animation`` as a looping GIF (Pillow: no time stamp in the file)."""
    from matplotlib.animation import PillowWriter

    animation.save(target, writer=PillowWriter(fps=fps), dpi=dpi)
