"""`dlmin plot`: every figure renders, PNGs are byte-stable, bad asks exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli import app as app_module
from dlmin.cli import plotcmd
from dlmin.core.store import ResultWriter

from helpers import write_spec

if "plot" not in [c.name for c in app_module.app.registered_commands]:
    plotcmd.register(app_module.app)  # until cli/app.py registers it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SPEC = """\
defaults:
  seed: 1
experiments:
  - name: q3
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: 12, radius: 0.05}
  - name: q4-m5
    kind: construct
    data: {source: clusters, classes: 4, dim: 5, points: 10, radius: 0.05}
  - name: family
    kind: construct
    data: {source: clusters, classes: 2, dim: 2, points: 10, radius: 0.05}
    construct: {method: collapse-keep}
  - name: radius
    kind: construct
    data: {source: clusters, classes: 2, dim: 3, points: 8, radius: 0.05}
    sweep:
      data.radius: [0.02, 0.1, 0.6]
      seed: [0, 1]
  - name: story
    kind: flow
    data: {source: clusters, classes: 2, dim: 3, points: 3, radius: 0.2}
    network: {hidden: [8], activation: tanh}
    flow: {time: 6, record: {points: 7}}
    sweep:
      flow.kind: [standard, adapted]
  - name: ce
    kind: flow
    data: {source: clusters, classes: 2, dim: 2, points: 2, radius: 0.2}
    network: {hidden: [6], activation: softplus}
    flow: {kind: adapted, loss: ce, label_smoothing: 0.1, time: 6, record: {points: 5}}
"""


def invoke(*args):
    return CliRunner().invoke(app_module.app, [str(a) for a in args])


def written(result):
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line]


# ------------------------------------------------------------- fixtures


def _writer(path, kind, **attrs):
    return ResultWriter(
        path,
        kind=kind,
        experiment="synthetic",
        run_id=path.stem,
        seed=0,
        point={},
        **attrs,
    )


def write_trap(path):
    """A trap result laid out as `dlmin trap` writes it: one dip of r below two eps."""
    s = np.linspace(0.0, 100.0, 401)
    r = 0.5 - 0.49 * np.exp(-(((s - 40.0) / 10.0) ** 2))
    eps = [0.05, 0.2]
    rows = []
    for e in eps:
        inside = s[r < e]
        rows.append((e, inside[0], inside[-1]))
    with _writer(path, "trap") as w:
        for name, value in {
            "s": s,
            "r": r,
            "speed": r * 0.1,
            "z_norm": np.exp(-s / 50),
            "cost": 0.5 * np.exp(-s / 25),
        }.items():
            w.array("trap", name, value)
        w.set_attrs("trap", eps=eps)
        e, s0, s1 = (np.array(c) for c in zip(*rows))
        length = s1 - s0
        for name, value in {
            "eps": e,
            "s0": s0,
            "s1": s1,
            "length": length,
            "L_U": 0.01 * length,
            "bound": 0.4 * length,
            "sharp_bound": 0.8 * length,
            "violated": np.array([False, False]),
        }.items():
            w.array("trap/intervals", name, value)
        w.finish(summary={"point": {}, "cost": 0.01, "status": "ok"})
    return path


def write_collapse(path):
    """A per-layer collapse result and an effective-flow group in one file."""
    layer = np.arange(5)
    with _writer(path, "collapse") as w:
        w.array("collapse", "layer", layer)
        for name, value in {
            "nc1": [1.0, 0.4, 0.1, 0.01, 0.0],
            "nc1_quotient": [0.8, 0.3, 0.1, 0.02, 0.0],
            "cdnv": [0.5, 0.2, 0.05, 0.01, 0.0],
            "equinorm_means": [0.3, 0.2, 0.1, 0.05, 0.01],
            "equiangular_means": [0.2, 0.2, 0.1, 0.05, 0.02],
            "maxangle_means": [0.5, 0.4, 0.3, 0.1, 0.05],
            "ncc_mismatch": [0.3, 0.1, 0.0, 0.0, 0.0],
        }.items():
            w.array("collapse", name, np.array(value))
        s = np.linspace(0.0, 5.0, 51)
        q = np.clip(np.stack([s / 2.0, s / 2.5], axis=1), 0.0, 1.0)
        w.array("effective", "s", s)
        w.array("effective", "cost", np.exp(-2 * s))
        w.array("effective", "fractions", q)
        w.array("effective", "orthogonality_error", np.full(s.size, 1e-15))
        w.set_attrs("effective", contraction_time=2.5, contraction_bound=3.0)
        w.finish(summary={"point": {}, "cost": 0.0, "status": "ok"})
    return path


def write_partial_flow(path):
    """A flow interrupted after four records, kept as ``*.h5.partial``."""
    rng = np.random.default_rng(0)
    N, Q = 4, 2
    targets = np.repeat(np.eye(Q), N // Q, axis=0)
    x0 = rng.normal(size=(N, Q))
    w = _writer(path, "flow", flow_kind="adapted", loss="l2")
    w.array("data", "X", rng.normal(size=(N, 3)))
    w.array("data", "labels", np.repeat(np.arange(Q), N // Q))
    w.array("data", "targets", targets)
    for s in (0.0, 1.0, 2.0, 3.0):
        t = -np.expm1(-s / N)
        x = (1 - t) * x0 + t * targets
        w.append("trajectory", "s", s)
        w.append("trajectory", "cost", ((x - targets) ** 2).sum() / (2 * N))
        w.append("trajectory", "x", x.ravel())
        w.append("trajectory", "ntk_min", 0.5)
        w.append("trajectory", "ntk_max", 2.0)
        w.append("trajectory", "ntk_rank", N * Q)
    w.abort(keep=True, status="interrupted")
    return w.partial


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plot")
    run = invoke("run", write_spec(tmp, SPEC), "-o", tmp / "out", "-q")
    assert run.exit_code == 1, run.output  # radius 0.6 fails on purpose
    out = tmp / "out"
    return {
        "q3": out / "q3" / "run.h5",
        "q4-m5": out / "q4-m5" / "run.h5",
        "family": out / "family" / "run.h5",
        "radius": out / "radius",
        "failed": out / "radius" / "data.radius=0.6_seed=0.h5",
        "story": out / "story",
        "adapted": out / "story" / "flow.kind=adapted.h5",
        "ce": out / "ce" / "run.h5",
        "trap": write_trap(tmp / "syn" / "trap.h5"),
        "collapse": write_collapse(tmp / "syn" / "collapse.h5"),
        "partial": write_partial_flow(tmp / "syn" / "flow.h5"),
    }


# --------------------------------------------------------------- renders

# the defaults (q3 layers, story flow, radius sweep) render in the tests below
CASES = [
    ("q3", "data"),
    ("q4-m5", "layers"),
    ("family", "patterns"),
    ("failed", "data"),
    ("adapted", "flow"),
    ("adapted", "cost"),
    ("adapted", "outputs"),
    ("adapted", "ntk"),
    ("ce", "flow"),
    ("story", "outputs"),
    ("story", "sweep"),
    ("trap", "trap"),
    ("trap", "bound"),
    ("collapse", "collapse"),
    ("collapse", "effective"),
    ("partial", "flow"),
]


@pytest.mark.parametrize("key,what", CASES)
def test_every_figure_renders_a_png(results, tmp_path, key, what):
    target = tmp_path / f"{key}-{what}.png"
    paths = written(invoke("plot", results[key], "--what", what, "-o", target))
    assert paths == [str(target)]
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) < 400_000
    assert b"Software" not in data and b"matplotlib" not in data.lower()


@pytest.mark.parametrize("key", ["q3", "story"])
def test_same_result_gives_the_same_bytes(results, tmp_path, key):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    written(invoke("plot", results[key], "-o", a))
    written(invoke("plot", results[key], "-o", b))
    assert a.read_bytes() == b.read_bytes()


def test_default_names_sit_next_to_the_input(results):
    paths = written(invoke("plot", results["q3"]))
    assert paths == [str(results["q3"].with_name("run-layers.png"))]
    paths = written(invoke("plot", results["radius"]))
    assert paths == [str(results["radius"] / "sweep.png")]
    paths = written(invoke("plot", results["story"]))
    assert paths == [str(results["story"] / "flow.png")]
    paths = written(invoke("plot", results["partial"], "--what", "cost"))
    assert paths == [str(results["partial"].parent / "flow-cost.png")]


def test_all_writes_every_figure_that_applies(results, tmp_path):
    paths = written(
        invoke("plot", results["trap"], "--what", "all", "-o", tmp_path / "f")
    )
    assert sorted(p.rsplit("-", 1)[1] for p in paths) == ["bound.png", "trap.png"]


def test_unknown_figure_lists_the_names(results):
    result = invoke("plot", results["q3"], "--what", "pictures")
    assert result.exit_code == 2
    assert "unknown figure 'pictures'" in result.stderr
    assert "layers" in result.stderr and "sweep" in result.stderr


@pytest.mark.parametrize(
    "key,what,needle",
    [
        ("q3", "trap", "no trap/ group"),
        ("adapted", "collapse", "no collapse/ group"),
        ("q3", "sweep", "compares the runs of a folder"),
        ("story", "layers", "draws one run"),
        ("failed", "layers", "no truncation/ group"),
    ],
)
def test_nothing_to_plot_exits_2_with_the_reason(results, key, what, needle):
    result = invoke("plot", results[key], "--what", what)
    assert result.exit_code == 2
    assert "nothing to plot" in result.stderr and needle in result.stderr, result.stderr
    assert "Figures that apply" in result.stderr


def test_sweep_axes_are_checked(results):
    bad = invoke("plot", results["radius"], "--y", "colour")
    assert bad.exit_code == 2 and "c0" in bad.stderr and "--y 'colour'" in bad.stderr
    wrong = invoke("plot", results["q3"], "--what", "layers", "--x", "seed")
    assert wrong.exit_code == 2 and "--what sweep only" in wrong.stderr
    assert written(invoke("plot", results["radius"], "--x", "seed", "--y", "c0"))


def test_missing_path_and_non_png_output(results, tmp_path):
    assert invoke("plot", tmp_path / "nope.h5").exit_code == 2
    result = invoke("plot", results["q3"], "-o", tmp_path / "figure.pdf")
    assert result.exit_code == 2 and ".png" in result.stderr


def test_partial_file_says_so_in_the_title(results):
    from matplotlib.figure import Figure

    from dlmin.cli import figures

    fig = Figure()
    figures.draw_flow(fig, [plotcmd.load(results["partial"])])
    assert "(partial: interrupted at s = 3)" in fig.get_suptitle()
    fig = Figure()
    figures.draw_flow(fig, [plotcmd.load(results["adapted"])])
    assert "partial" not in fig.get_suptitle()


def test_adapted_outputs_are_drawn_on_the_straight_line(results):
    from matplotlib.figure import Figure

    from dlmin.cli import figures

    fig = Figure()
    figures.draw_outputs(fig, [plotcmd.load(results["adapted"])])
    path = fig.axes[0].lines[0].get_xydata()
    start, end = path[0], np.zeros(2)
    chord = end - start
    normal = np.array([-chord[1], chord[0]]) / np.linalg.norm(chord)
    assert np.abs((path - start) @ normal).max() < 1e-5 * np.linalg.norm(chord)


def test_help_does_not_import_matplotlib():
    code = (
        "import sys; from dlmin.cli import app, plotcmd; "
        "print(json.dumps('matplotlib' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) is False


def test_trap_files_with_flat_interval_columns_plot_too(results, tmp_path):
    from dlmin.core import store

    res = store.load(results["trap"])
    flat = tmp_path / "flat.h5"
    with _writer(flat, "trap") as w:
        for name in ("s", "r", "cost"):
            w.array("trap", name, res["trap"][name])
        for name, alias in (
            ("eps", "eps"),
            ("s0", "s0"),
            ("s1", "s1"),
            ("length", "length"),
            ("bound", "bound"),
            ("sharp_bound", "bound_sharp"),
            ("violated", "violated"),
        ):
            w.array("trap", f"interval_{alias}", res["trap"]["intervals"][name])
        w.array("trap", "adapted_s", res["trap"]["s"])
        w.array("trap", "adapted_r", np.ones_like(res["trap"]["r"]))
        w.finish()
    paths = written(invoke("plot", flat, "--what", "all"))
    assert [p.rsplit("-", 1)[1] for p in paths] == ["trap.png", "bound.png"]


# ------------------------------------------------------------- truncview

TV_SPEC = """\
defaults:
  seed: 2
experiments:
  - name: q3
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.05}
  - name: q4-m5
    kind: construct
    data: {source: clusters, classes: 4, dim: 5, points: 6, radius: 0.05}
"""
GIF_SIGNATURE = b"GIF89a"


def write_relu_flow(path, T=6):
    """A flow-like result: data, final network and a drifting recorded orbit."""
    from dlmin.core import network, store

    rng = np.random.default_rng(0)
    widths = [3, 3, 2, 2]
    labels = np.repeat(np.arange(2), 10)
    X = 0.3 * rng.normal(size=(20, 3)) + np.where(labels[:, None] == 0, 1.0, -1.0)
    theta0 = network.flatten(network.init_params(widths, rng=rng))
    drift = rng.normal(size=theta0.shape)
    thetas = np.array([theta0 + 0.1 * t * drift for t in range(T)])
    with _writer(path, "flow") as w:
        w.array("data", "X", X)
        w.array("data", "labels", labels)
        store.store_layers(w, "network", network.unflatten(thetas[-1], widths))
        for theta, s in zip(thetas, np.linspace(0.0, 2.0, T)):
            w.append("trajectory", "theta", theta)
            w.append("trajectory", "s", np.float64(s))
        w.finish()
    return path


def write_fractions_only(path, T=5, L=2, Q=2):
    """A truncview/ group by hand: one layer view in R^4 and fractions over time."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(Q), 6)
    n = labels.size
    with _writer(path, "truncate") as w:
        w.array("truncview", "labels", labels)
        w.array("truncview", "rows", np.arange(n))
        for ell in range(1, L + 1):
            w.array("truncview", f"base_point_{ell}", rng.normal(size=4))
            w.array("truncview", f"edges_{ell}", rng.normal(size=(3, 4)))
            w.array("truncview", f"truncated_{ell}", rng.normal(size=(n, 4)))
            w.array("truncview", f"state_{ell}", rng.integers(0, 3, n))
            w.array("truncview", f"local_state_{ell}", rng.integers(0, 3, n))
        collapsed = np.linspace(0, 1, T)[:, None, None] * np.ones((1, L, Q))
        F = np.stack([collapsed, 0 * collapsed, 1 - collapsed], axis=-1)
        w.array("truncview", "fractions", F[-1])
        w.array("truncview", "spread", np.ones((L, Q)))
        w.array("truncview", "fractions_t", F)
        w.array(
            "truncview",
            "spread_t",
            np.exp(-np.arange(T))[:, None, None] * np.ones((1, L, Q)),
        )
        w.array("truncview", "s", np.linspace(0.0, 4.0, T))
        w.finish()
    return path


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truncview")
    built = invoke("construct", write_spec(tmp, TV_SPEC), "-o", tmp / "out", "-q")
    assert built.exit_code == 0, built.output
    out = {}
    for name in ("q3", "q4-m5"):
        out[name] = tmp / f"{name}-view.h5"
        done = invoke("truncate", tmp / "out" / name / "run.h5", "-o", out[name])
        assert done.exit_code == 0, done.output
    out["construct"] = tmp / "out" / "q3" / "run.h5"
    out["flow"] = write_relu_flow(tmp / "flow.h5")
    out["flow-view"] = tmp / "flow-view.h5"
    done = invoke("truncate", out["flow"], "--time", "all", "-o", out["flow-view"])
    assert done.exit_code == 0, done.output
    out["fractions"] = write_fractions_only(tmp / "fractions.h5")
    return out


@pytest.mark.parametrize(
    "key,what",
    [
        ("q3", "truncview"),
        ("q4-m5", "truncview"),
        ("flow-view", "truncview"),
        ("flow-view", "truncation-time"),
        ("fractions", "truncview"),
        ("fractions", "truncation-time"),
    ],
)
def test_truncview_figures_render(views, tmp_path, key, what):
    target = tmp_path / f"{key}-{what}.png"
    paths = written(invoke("plot", views[key], "--what", what, "-o", target))
    assert paths == [str(target)]
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) < 400_000
    again = tmp_path / "again.png"
    written(invoke("plot", views[key], "--what", what, "-o", again))
    assert again.read_bytes() == data


def test_truncview_is_the_default_and_uses_the_source_data(views):
    from matplotlib.figure import Figure

    from dlmin.cli import figures

    paths = written(invoke("plot", views["q3"]))
    assert paths == [str(views["q3"].with_name("q3-view-truncview.png"))]
    res = plotcmd.borrow_source(plotcmd.load(views["q3"]), views["q3"])
    assert "X" in res["data"] and "network" in res
    fig = Figure()
    figures.draw_truncview(fig, [res])
    # input + 3 layers + the outputs in R^3 (a 3-D panel)
    assert len(fig.axes) == 5 and fig.axes[-1].name == "3d"
    assert "principal components of the data" in fig.get_suptitle()
    fig = Figure()
    figures.draw_truncview(fig, [plotcmd.load(views["fractions"])])
    assert len(fig.axes) == 2 and "no data/X" in fig.get_suptitle()


def test_animation_writes_a_small_deterministic_gif(views, tmp_path):
    from PIL import Image

    paths = written(invoke("plot", views["flow-view"], "--what", "animation"))
    target = views["flow-view"].with_name("flow-view-animation.gif")
    assert paths == [str(target)]
    data = target.read_bytes()
    assert data.startswith(GIF_SIGNATURE) and 0 < len(data) < 2_000_000
    with Image.open(target) as im:
        assert 1 < im.n_frames <= 40
    again = tmp_path / "again.gif"
    written(invoke("plot", views["flow-view"], "--what", "animation", "-o", again))
    assert again.read_bytes() == data


def test_animation_frames_are_at_most_forty():
    from dlmin.cli import figures

    frames = figures.animation_frames(1000)
    assert len(frames) == 40 and frames[0] == 0 and frames[-1] == 999
    assert list(figures.animation_frames(3)) == [0, 1, 2]


@pytest.mark.parametrize(
    "key,what,needle",
    [
        ("construct", "truncview", "no truncview/ group"),
        ("flow", "animation", "no truncview/ group"),
        ("q3", "truncation-time", "no truncview/fractions_t"),
        ("q3", "animation", "no trajectory/theta"),
    ],
)
def test_truncview_figures_not_applicable_exit_2(views, key, what, needle):
    result = invoke("plot", views[key], "--what", what)
    assert result.exit_code == 2
    assert "nothing to plot" in result.stderr and needle in result.stderr, result.stderr


def test_animation_wants_a_gif_and_all_skips_what_is_missing(views, tmp_path):
    result = invoke(
        "plot", views["flow-view"], "--what", "animation", "-o", tmp_path / "a.png"
    )
    assert result.exit_code == 2 and ".gif" in result.stderr
    paths = written(invoke("plot", views["q3"], "--what", "all", "-o", tmp_path / "f"))
    assert [p.rsplit("-", 1)[1] for p in paths] == ["truncview.png"]
