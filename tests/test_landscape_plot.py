"""`dlmin plot` on landscape results: the four pictures, what they draw, exit 2."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from dlmin.cli import figures
from dlmin.cli import landscape_figures as lf
from dlmin.cli import plotcmd
from dlmin.cli.app import app

from helpers import write_spec

SPEC = """\
defaults:
  kind: landscape
  data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.1}
  network: {hidden: [3, 3, 3]}
experiments:
  - name: trained
    landscape: {lambdas: [0, 0.05, 0.3], trials: 3, train: true, points: 11,
                plane_points: 9, directions: 2}
    flow: {solver: sgd, lr: 0.05, batch: 8, momentum: 0.5, epochs: 20,
           record: {points: 6}}
  - name: evaluated
    landscape: {lambdas: [0.05, 0.3], trials: 4, points: 11, directions: 0,
                plane: false}
"""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["landscape-hist", "landscape-slices", "landscape-plane", "landscape-trials"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("landscape")
    spec = write_spec(folder, SPEC)
    result = invoke("landscape", spec, "-o", folder / "out", "-q")
    assert result.exit_code == 0, result.output
    return {name: folder / "out" / name / "run.h5" for name in ("trained", "evaluated")}


@pytest.mark.parametrize("what", FIGURES)
def test_every_landscape_figure_renders_and_is_byte_stable(files, tmp_path, what):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for target in (a, b):
        result = invoke("plot", files["trained"], "--what", what, "-o", target)
        assert result.exit_code == 0, result.output
    data = a.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data == b.read_bytes()


def test_all_draws_what_the_file_holds(files, tmp_path):
    result = invoke("plot", files["evaluated"], "--what", "all", "-o", tmp_path / "f")
    assert result.exit_code == 0, result.output
    names = sorted(p.rsplit("run-", 1)[1] for p in result.stdout.split())
    # no slices, no plane and no training: only the histogram and the data
    assert names == ["data.png", "landscape-hist.png"]


@pytest.mark.parametrize(
    "what, needle",
    [
        ("landscape-trials", "landscape/trials/costs"),
        ("landscape-plane", "landscape/plane"),
        ("landscape-slices", "landscape/slices"),
    ],
)
def test_missing_pieces_exit_2_naming_them(files, what, needle):
    result = invoke("plot", files["evaluated"], "--what", what)
    assert result.exit_code == 2
    assert "nothing to plot" in result.stderr and needle in result.stderr


def test_several_paths_are_drawn_in_one_call(files, tmp_path):
    result = invoke("plot", files["trained"], files["evaluated"], "--what", "all")
    assert result.exit_code == 0, result.output
    drawn = result.stdout.split()
    for name in ("trained", "evaluated"):
        assert str(files[name].with_name("run-landscape-hist.png")) in drawn
    assert str(files["trained"].with_name("run-landscape-plane.png")) in drawn
    both = invoke("plot", files["trained"], files["evaluated"], "-o", tmp_path / "x")
    assert both.exit_code == 2 and "--out names one output" in both.stderr


def test_histograms_count_every_trial_of_each_lambda(files):
    for name, trials in (("trained", 3), ("evaluated", 4)):
        res = plotcmd.load(files[name])
        fig = Figure()
        lf.draw_histograms(fig, [res])
        lambdas = res["landscape"]["lambdas"]
        axes = fig.axes
        assert len(axes) == len(lambdas)
        for ax in axes:
            assert sum(p.get_height() for p in ax.patches) == trials


def test_histograms_of_an_untrained_run_show_start_costs(files):
    res = plotcmd.load(files["evaluated"])
    fig = Figure()
    lf.draw_histograms(fig, [res])
    assert "cost at the perturbed start" in fig.axes[-1].get_xlabel()
    start = res["landscape"]["trials"]["start_cost"]
    for ax, row in zip(fig.axes, start):
        drawn = [p.get_x() + p.get_width() / 2 for p in ax.patches if p.get_height()]
        lo, hi = min(drawn), max(drawn)
        width = ax.patches[0].get_width()
        assert lo - width <= np.log10(row.min()) and np.log10(row.max()) <= hi + width


def test_slices_draw_the_stored_curves(files):
    res = plotcmd.load(files["trained"])
    fig = Figure()
    lf.draw_slices(fig, [res])
    left = fig.axes[0]
    curves = [ln.get_ydata() for ln in left.lines if ln.get_label().startswith("dir")]
    np.testing.assert_array_equal(np.array(curves), res["landscape"]["slices"])


PATTERNS = """\
experiments:
  - name: patterns
    kind: landscape
    data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.1}
    construct: {method: collapse-keep}
    landscape: {lambdas: [0.1], trials: 2, points: 5, directions: 1, plane: false}
    sweep:
      landscape.pattern: [[1, 1, 1], [0, 1, 1]]
"""


def test_a_sweep_over_patterns_plots_as_a_folder(tmp_path):
    spec = write_spec(tmp_path, PATTERNS)
    assert invoke("landscape", spec, "-o", tmp_path / "out", "-q").exit_code == 0
    folder = tmp_path / "out" / "patterns"
    result = invoke("plot", folder, "--what", "all", "-o", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    assert [p.rsplit("/", 1)[1] for p in result.stdout.split()] == ["sweep.png"]
    res = [plotcmd.load(p) for p in sorted(folder.glob("*.h5"))]
    fig = Figure()
    figures.draw_sweep(fig, res)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["[0, 1, 1]", "[1, 1, 1]"]
