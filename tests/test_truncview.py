"""Networks seen through their truncation maps (core.truncview, `dlmin truncate`)."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli import app as app_module
from dlmin.cli import truncatecmd
from dlmin.core import construct as cs
from dlmin.core import network, store
from dlmin.core import truncview as tv
from dlmin.core.data import clusters

if "truncate" not in [c.name for c in app_module.app.registered_commands]:
    truncatecmd.register(app_module.app)

COLLAPSED, PARTLY, FIXED = 0, 1, 2


def invoke(*args):
    return CliRunner().invoke(app_module.app, [str(a) for a in args])


def clustered(Q=3, M=3, seed=5):
    means = np.zeros((Q, M))
    means[:, :Q] = 2.0 * np.eye(Q) + 0.3
    return clusters(
        Q, M, 40, 0.05, np.random.default_rng(seed), layout="given", means=means
    )


@pytest.fixture(scope="module")
def built():
    ds = clustered()
    res = cs.build_clustered(ds.X, ds.labels, ds.Y)
    assert res.status == "ok"
    return ds, res


def write_result(path, layers, X, labels, thetas=None, s=None):
    """A minimal result file in the layout construct and flow runs write."""
    with store.ResultWriter(path, kind="flow") as w:
        w.array("data", "X", X)
        w.array("data", "labels", labels)
        store.store_layers(w, "network", layers)
        if thetas is not None:
            for theta, t in zip(thetas, s):
                w.append("trajectory", "theta", theta)
                w.append("trajectory", "s", np.float64(t))
        w.finish()


# ------------------------------------------------------------ the construction


def test_view_reproduces_the_construction(built):
    ds, res = built
    view = tv.truncation_view(res.layers, ds.X, ds.labels)
    assert view.failures == [] and view.composition_error < 1e-12
    for ell, lv in enumerate(view.layers, start=1):
        j = res.order[ell - 1]
        np.testing.assert_allclose(lv.base_point, res.apexes[j], atol=1e-12)
        assert np.all(lv.local_fractions[j] == [1.0, 0.0, 0.0])  # collapsed here
        others = np.arange(3) != j
        assert np.all(lv.local_fractions[others, FIXED] == 1.0)
        for k in range(3):  # cumulative: collapsed exactly from its own layer on
            collapsed_by_now = res.order.index(k) < ell
            assert lv.fractions[k, COLLAPSED] == float(collapsed_by_now)
            assert lv.fractions[k, FIXED] == float(not collapsed_by_now)
        assert lv.spread[j] < 1e-24
        np.testing.assert_allclose(lv.truncated, res.truncated[ell], atol=1e-12)
    assert view.fractions.shape == (3, 3, 3) and view.spread.shape == (3, 3)


def test_edges_give_the_polyhedral_form(built):
    ds, res = built
    lv = tv.truncation_view(res.layers, ds.X, ds.labels).layers[0]
    Z = ds.X @ lv.W.T + lv.b
    np.testing.assert_allclose(
        lv.base_point + np.maximum(Z, 0) @ lv.edges, lv.truncated, atol=1e-12
    )


# ------------------------------------------------------------ random networks


def test_composition_identity_on_a_random_square_network(rng):
    layers = network.init_params([4, 4, 4, 4, 2], rng=rng, bias_scale=0.5)
    X = rng.standard_normal((200, 4))
    view = tv.truncation_view(layers, X)
    assert view.failures == []
    A = X
    for (W, b), lv in zip(layers[:-1], view.layers):
        A = np.maximum(A @ W.T + b, 0.0)
        np.testing.assert_allclose(lv.truncated @ lv.W.T + lv.b, A, atol=1e-10)
        assert lv.composition_error < 1e-10 and lv.nest_residual < 1e-12
    assert view.output_error < 1e-10
    states = np.stack([lv.cum_state for lv in view.layers])
    assert np.all(np.diff(states, axis=0) <= 0)  # once collapsed, always collapsed


def test_rank_deficient_layer_is_reported_not_crashed(rng):
    layers = network.init_params([3, 3, 3, 1], rng=rng, bias_scale=0.3)
    W, b = layers[1]
    W[2] = W[0] + W[1]
    X = rng.standard_normal((50, 3))
    view = tv.truncation_view(layers, X)
    assert view.layers[0].ok
    [msg] = view.layers[1].failures
    assert "layer 2" in msg and "rank deficient" in msg
    assert view.layers[1].sv_ratio < 1e-12
    assert np.isfinite(view.layers[1].truncated).all()


def test_widening_layer_is_reported_not_crashed(rng):
    layers = network.init_params([3, 2, 4, 1], rng=rng, bias_scale=0.3)
    view = tv.truncation_view(layers, rng.standard_normal((30, 3)))
    msgs = view.layers[1].failures
    assert any("widens from 2 to 4" in m for m in msgs)
    assert any("4 rows but acts on R^3" in m for m in msgs)
    assert view.layers[0].ok and np.isfinite(view.layers[1].truncated).all()


def test_non_nested_row_spaces_are_measured(rng):
    layers = network.init_params([3, 2, 2, 1], rng=rng)
    residual = tv._nest_residual(np.eye(3)[[2]], np.eye(3)[:2], tv.RANK_RTOL)
    assert residual == 1.0  # e_3 lies outside span(e_1, e_2) entirely
    view = tv.truncation_view(layers, rng.standard_normal((10, 3)))
    assert all(lv.nest_residual < 1e-12 for lv in view.layers)  # products nest


def test_bad_inputs_raise_value_errors(rng):
    layers = network.init_params([3, 2, 1], rng=rng)
    with pytest.raises(ValueError, match="expected shape"):
        tv.truncation_view(layers, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="hidden layer"):
        tv.truncation_view(layers[:1], np.zeros((5, 3)))


# ------------------------------------------------------------ over time


def toy_orbit(T=6):
    """1-D inputs, one hidden unit whose bias falls: more points collapse."""
    X = np.linspace(-1.0, 1.0, 21)[:, None]
    labels = (X[:, 0] > 0).astype(int)
    widths = [1, 1, 1]
    biases = np.linspace(0.9, -0.95, T)
    thetas = np.array([[1.0, c, 1.0, 0.0] for c in biases])
    return thetas, widths, X, labels, np.linspace(0.0, 1.0, T)


def test_truncation_over_time_shapes_and_monotone_toy():
    thetas, widths, X, labels, s = toy_orbit()
    over = tv.truncation_over_time(thetas, widths, X, labels, s)
    assert over.fractions.shape == (6, 1, 2, 3) and over.spread.shape == (6, 1, 2)
    collapsed = over.fractions[:, 0, :, COLLAPSED].sum(axis=1)
    assert np.all(np.diff(collapsed) >= 0) and collapsed[-1] > collapsed[0]
    assert np.all(np.diff(over.spread[:, 0, 0]) <= 1e-15)
    np.testing.assert_allclose(over.fractions.sum(axis=-1), 1.0)
    assert np.all(over.composition_error < 1e-12) and np.array_equal(over.s, s)


# ------------------------------------------------------------ partial starts


def test_partial_start_truncates_part_of_a_cluster(built):
    ds, res = built
    j = res.order[0]
    start = tv.partial_truncation_start(res, ds.X, ds.labels, layer=1, weight=0.45)
    frac = tv.truncation_view(start, ds.X, ds.labels).layers[0].local_fractions[j]
    assert 0.0 < frac[COLLAPSED] < 1.0 and frac[COLLAPSED] + frac[PARTLY] < 1.0 + 1e-12
    ends = [tv.partial_truncation_start(res, ds.X, ds.labels, 1, w) for w in (0.0, 1.0)]
    fr = [
        tv.truncation_view(p, ds.X, ds.labels).layers[0].local_fractions[j]
        for p in ends
    ]
    assert fr[0][COLLAPSED] == 1.0 and fr[1][FIXED] == 1.0
    with pytest.raises(ValueError, match="weight"):
        tv.partial_truncation_start(res, ds.X, ds.labels, 1, 1.5)


# ------------------------------------------------------------ files and the CLI


def test_imported_weights_round_trip(built, tmp_path):
    ds, res = built
    result_file, weights = tmp_path / "c.h5", tmp_path / "w.npz"
    data = tmp_path / "d.npz"
    write_result(result_file, res.layers, ds.X, ds.labels)
    network.save_npz(weights, res.layers)
    np.savez(data, X=ds.X, labels=ds.labels)
    a = json.loads(invoke("truncate", result_file, "--json").stdout)
    b = json.loads(invoke("truncate", weights, data, "--json").stdout)
    for la, lb in zip(a["layers"], b["layers"]):
        for key in ("collapsed", "partly", "fixed", "spread", "base_point_norm"):
            np.testing.assert_allclose(la[key], lb[key], atol=1e-14)
    assert a["conditions_ok"] and a["layers"][0]["collapsed"][res.order[0]] == 1.0


def test_cli_writes_the_view(built, tmp_path):
    ds, res = built
    src, out = tmp_path / "c.h5", tmp_path / "view.h5"
    write_result(src, res.layers, ds.X, ds.labels)
    result = invoke("truncate", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert "layer 1" in result.stdout and "100.0%" in result.stdout
    with h5py.File(out, "r") as f:
        g = f["truncview"]
        assert g["fractions"].shape == (3, 3, 3) and g["spread"].shape == (3, 3)
        assert g["truncated_2"].shape == ds.X.shape and g["edges_1"].shape == (3, 3)
        np.testing.assert_allclose(g["base_point_1"][()], res.apexes[res.order[0]])


def test_cli_flow_over_time(tmp_path):
    thetas, widths, X, labels, s = toy_orbit()
    src, out = tmp_path / "flow.h5", tmp_path / "view.h5"
    write_result(src, network.unflatten(thetas[-1], widths), X, labels, thetas, s)
    result = invoke("truncate", src, "--time", "all", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["times"] == 6 and row["s_last"] == 1.0
    with h5py.File(out, "r") as f:
        assert f["truncview/fractions_t"].shape == (6, 1, 2, 3)
        assert f["truncview/spread_t"].shape == (6, 1, 2)
    first = json.loads(invoke("truncate", src, "--time", "0", "--json").stdout)
    collapsed = first["layers"][0]["collapsed"]
    assert first["time"] == 0 and collapsed == pytest.approx([2 / 11, 0.0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.h5"], "no such file"),
        (["{w}"], "give DATA"),
        (["{r}", "--time", "soon"], "--time"),
        (["{r}", "--time", "all"], "trajectory/theta"),
        (["{r}", "--time", "3"], "trajectory/theta"),
    ],
)
def test_cli_bad_inputs_exit_2(built, tmp_path, args, message):
    ds, res = built
    weights, result_file = tmp_path / "w.npz", tmp_path / "r.h5"
    network.save_npz(weights, res.layers)
    write_result(result_file, res.layers, ds.X, ds.labels)
    args = [a.format(w=weights, r=result_file) for a in args]
    result = invoke("truncate", *args)
    assert result.exit_code == 2 and message in result.output
