"""`kind: landscape`: perturbations, slices, planes and trials around a minimizer.

Closed forms where there are some (a one-layer network is linear, so its cost
along any line through the least-squares minimizer is an exact parabola), a
forward pass written out here for the rest, and the CLI end to end.
"""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import flows, landscape as ls, network as nw, store

from helpers import write_spec


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(result):
    return {r["experiment"]: r for r in map(json.loads, result.stdout.splitlines())}


def tensors(params):
    """Every tensor of a parameter list, in the order W1, b1, W2, ..."""
    return [np.asarray(T) for pair in params for T in pair]


def hand_cost(layers, X, Y, activation):
    """``|f(X) - Y|^2 / (2N)``, the forward pass written out independently."""
    act = np.tanh if activation == "tanh" else (lambda Z: np.maximum(Z, 0.0))
    A = X
    for W, b in layers[:-1]:
        A = act(A @ W.T + b)
    W, b = layers[-1]
    return float(np.sum((A @ W.T + b - Y) ** 2) / (2 * len(X)))


@pytest.fixture
def net():
    """A small tanh network, its data and a root for the random streams."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((12, 3))
    Y = rng.standard_normal((12, 2))
    params = nw.init_params([3, 5, 4, 2], rng=rng, scheme="glorot", bias_scale=0.3)
    return params, X, Y, [11, 3]


@pytest.fixture
def linear():
    """A one-layer (linear) network at the least-squares minimizer of its data.

    With ``A = [X, 1]`` and ``B = argmin |A B - Y|``, the residual
    ``R = A B - Y`` is orthogonal to every column of ``A``, so along any
    direction ``d`` with output change ``u = X dW^T + db`` the cost is
    exactly ``C(a) = C* + a^2 |u|^2 / (2N)``.
    """
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 3))
    Y = rng.standard_normal((20, 2))
    A = np.hstack([X, np.ones((20, 1))])
    B = np.linalg.lstsq(A, Y, rcond=None)[0]
    params = [(B[:3].T.copy(), B[3].copy())]
    c_star = float(np.sum((A @ B - Y) ** 2) / 40)
    return params, X, Y, c_star


# ----------------------------------------------------------- perturbations


@pytest.mark.parametrize("lam", [1e-3, 0.3, 2.0])
def test_every_tensor_moves_by_exactly_lambda(net, lam):
    params, X, Y, root = net
    d = ls.random_direction(params, np.random.default_rng(1))
    np.testing.assert_allclose(ls.direction_norms(d), 1.0, rtol=1e-12)
    moved = ls.perturb(params, (lam, d))
    steps = [np.linalg.norm(T1 - T0) for T1, T0 in zip(tensors(moved), tensors(params))]
    np.testing.assert_allclose(steps, lam, rtol=1e-12)
    # one unit piece per tensor: |theta - theta*| = lam sqrt(2 L)
    trial = ls.run_trials(params, X, Y, [lam], 1, root)[0][0]
    assert trial.start_distance == pytest.approx(lam * math.sqrt(6), rel=1e-12)


@pytest.mark.parametrize("lam", [1e-3, 0.3, 2.0])
def test_relative_directions_move_every_tensor_by_lambda_times_its_norm(net, lam):
    params, X, Y, root = net
    params = [params[0], (params[1][0], np.zeros(4)), params[2]]  # a zero bias
    norms = np.array([np.linalg.norm(T) for T in tensors(params)])
    d = ls.random_direction(params, np.random.default_rng(1), relative=True)
    np.testing.assert_allclose(ls.direction_norms(d), norms, rtol=1e-12)
    assert ls.direction_norms(d)[3] == 0.0  # a zero tensor is not moved
    moved = ls.perturb(params, (lam, d))
    steps = [np.linalg.norm(T1 - T0) for T1, T0 in zip(tensors(moved), tensors(params))]
    np.testing.assert_allclose(steps, lam * norms, rtol=1e-12)
    trial = ls.run_trials(params, X, Y, [lam], 1, root, relative=True)[0][0]
    whole = np.linalg.norm(nw.flatten(params))
    assert trial.start_distance == pytest.approx(lam * whole, rel=1e-12)


def test_perturb_by_zero_is_the_point_bit_for_bit_and_a_copy(net):
    params, X, Y, _ = net
    d = ls.random_direction(params, np.random.default_rng(2))
    same = ls.perturb(params, (0.0, d), (0.0, d))
    for T1, T0 in zip(tensors(same), tensors(params)):
        np.testing.assert_array_equal(T1, T0)
        assert T1 is not T0
    before = [T.copy() for T in tensors(params)]
    ls.perturb(params, (0.5, d))
    for T, T0 in zip(tensors(params), before):
        np.testing.assert_array_equal(T, T0)  # params are not moved in place


def test_lambda_zero_starts_at_the_minimizer_cost_exactly(net):
    params, X, Y, root = net
    options = flows.FlowOptions(kind="standard", solver="sgd", lr=0.01, epochs=2)
    options.spectrum = False
    grid = ls.run_trials(
        params, X, Y, [0.0, 0.1], 3, root, activation="tanh", options=options
    )
    c_star = ls.cost(params, X, Y, "tanh")
    assert [t.start_cost for t in grid[0]] == [c_star] * 3
    assert [t.start_distance for t in grid[0]] == [0.0] * 3
    assert all(t.start_cost != c_star for t in grid[1])
    assert all(t.status == "ok" and t.steps == 2 for row in grid for t in row)


# ------------------------------------------------------ random streams


def test_trials_are_reproducible_and_follow_their_documented_stream(net):
    params, X, Y, root = net
    lambdas = [0.05, 0.4]
    first = ls.run_trials(params, X, Y, lambdas, 3, root, activation="tanh")
    again = ls.run_trials(params, X, Y, lambdas, 3, root, activation="tanh")
    costs = [[t.start_cost for t in row] for row in first]
    assert costs == [[t.start_cost for t in row] for row in again]
    for i, lam in enumerate(lambdas):
        for t in range(3):
            d = ls.random_direction(params, ls.stream(root, "trial", lam, t))
            want = ls.cost(ls.perturb(params, (lam, d)), X, Y, "tanh")
            assert costs[i][t] == want


def test_trials_of_other_sizes_and_indices_draw_other_directions(net):
    params, _, _, root = net
    keys = [(lam, t) for lam in (0.05, 0.4) for t in range(3)]
    dirs = [ls.random_direction(params, ls.stream(root, "trial", *k)) for k in keys]
    for i in range(len(dirs)):
        for j in range(i):
            assert abs(ls.cosine(dirs[i], dirs[j])) < 0.9, (keys[i], keys[j])
    other_root = ls.random_direction(params, ls.stream([11, 4], "trial", 0.05, 0))
    assert abs(ls.cosine(dirs[0], other_root)) < 0.9


def test_adding_sizes_leaves_the_other_trials_unchanged(net):
    params, X, Y, root = net
    options = flows.FlowOptions(
        kind="standard", solver="sgd", lr=0.05, batch=5, epochs=3
    )
    options.spectrum = False
    few = ls.run_trials(
        params, X, Y, [0.1, 0.5], 2, root, activation="tanh", options=options
    )
    many = ls.run_trials(
        params, X, Y, [0.01, 0.1, 0.3, 0.5], 3, root, activation="tanh", options=options
    )
    for row_few, row_many in ((few[0], many[1]), (few[1], many[3])):
        for a, b in zip(row_few, row_many):
            assert (a.start_cost, a.final_cost) == (b.start_cost, b.final_cost)
            np.testing.assert_array_equal(a.costs, b.costs)


def test_another_root_gives_other_trials(net):
    params, X, Y, _ = net
    a = ls.run_trials(params, X, Y, [0.2], 2, [11, 3], activation="tanh")
    b = ls.run_trials(params, X, Y, [0.2], 2, [11, 4], activation="tanh")
    assert all(s.start_cost != t.start_cost for s, t in zip(a[0], b[0]))


# ---------------------------------------------------- grids, slices, planes


@pytest.mark.parametrize("span, points", [(1.0, 3), (0.3, 21), (2.5, 41)])
def test_slice_grid_is_symmetric_with_zero_in_the_middle(span, points):
    a = ls.slice_grid(span, points)
    assert a.shape == (points,)
    assert a[points // 2] == 0.0 and (a[0], a[-1]) == (-span, span)
    np.testing.assert_array_equal(a, -a[::-1])
    assert np.all(np.diff(a) > 0)


@pytest.mark.parametrize(
    "span, points, key",
    [(1.0, 20, "points"), (1.0, 1, "points"), (0.0, 5, "span"), (math.inf, 5, "span")],
)
def test_slice_grid_refuses_even_points_and_bad_spans(span, points, key):
    with pytest.raises(ValueError, match=key):
        ls.slice_grid(span, points)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_slice_costs_match_a_forward_pass_written_out(net, activation):
    params, X, Y, _ = net
    coords = ls.slice_grid(0.7, 9)
    dirs = [ls.random_direction(params, np.random.default_rng(s)) for s in (1, 2)]
    got = ls.slice_costs(params, dirs, coords, X, Y, activation)
    assert got.shape == (2, 9)
    for row, d in zip(got, dirs):
        for value, a in zip(row, coords):
            moved = [(W + a * dW, b + a * db) for (W, b), (dW, db) in zip(params, d)]
            assert value == pytest.approx(hand_cost(moved, X, Y, activation), rel=1e-12)


def test_linear_network_slice_is_the_exact_parabola(linear):
    params, X, Y, c_star = linear
    d = ls.random_direction(params, np.random.default_rng(3))
    u = X @ d[0][0].T + d[0][1]
    coords = ls.slice_grid(1.5, 11)
    got = ls.slice_costs(params, [d], coords, X, Y)[0]
    np.testing.assert_allclose(got, c_star + coords**2 * np.sum(u**2) / 40, rtol=1e-12)
    assert got[5] == ls.cost(params, X, Y)
    assert np.all(got[:-2] - 2 * got[1:-1] + got[2:] > 0)  # convex
    assert ls.gradient_norm(params, X, Y) < 1e-12
    assert ls.gradient_norm(ls.perturb(params, (0.1, d)), X, Y) > 1e-3


def test_linear_network_plane_is_the_exact_quadratic_form_rows_b(linear):
    params, X, Y, c_star = linear
    d1 = ls.random_direction(params, np.random.default_rng(5))
    d2 = ls.orthogonalize(ls.random_direction(params, np.random.default_rng(6)), d1)
    u = X @ d1[0][0].T + d1[0][1]
    v = X @ d2[0][0].T + d2[0][1]
    coords = ls.slice_grid(1.0, 7)
    got = ls.plane_costs(params, d1, d2, coords, X, Y)
    a, b = coords[None, :], coords[:, None]  # entry (i, j) at a_j, b_i
    want = (
        c_star
        + (a**2 * np.sum(u**2) + 2 * a * b * np.sum(u * v) + b**2 * np.sum(v**2)) / 40
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, got.T, rtol=1e-6)  # the orientation is tested
    assert got[3, 3] == ls.cost(params, X, Y)


# ----------------------------------------------------------- orthogonalize


def test_orthogonalize_works_tensor_by_tensor_and_keeps_the_norms(net):
    params = net[0]
    d1 = ls.random_direction(params, np.random.default_rng(1))
    d2 = ls.random_direction(params, np.random.default_rng(2))
    d1_before = [T.copy() for T in tensors(d1)]
    o = ls.orthogonalize(d2, d1)
    for T1, T2 in zip(tensors(d1), tensors(o)):
        assert abs(np.vdot(T1, T2)) < 1e-14
    np.testing.assert_allclose(
        ls.direction_norms(o), ls.direction_norms(d2), rtol=1e-12
    )
    assert abs(ls.cosine(d1, o)) < 1e-14
    for T, T0 in zip(tensors(d1), d1_before):
        np.testing.assert_array_equal(T, T0)


def test_orthogonalize_leaves_single_entries_and_parallel_pieces_alone():
    d1 = [(np.array([[1.0, 0.0]]), np.array([2.0]))]
    d2 = [(np.array([[-3.0, 0.0]]), np.array([5.0]))]  # W parallel, b one entry
    o = ls.orthogonalize(d2, d1)
    np.testing.assert_array_equal(o[0][0], d2[0][0])
    np.testing.assert_array_equal(o[0][1], d2[0][1])


def test_cosine_of_a_direction_with_itself_and_its_negative(net):
    d = ls.random_direction(net[0], np.random.default_rng(1))
    minus = [(-W, -b) for W, b in d]
    assert ls.cosine(d, d) == pytest.approx(1.0, abs=1e-15)
    assert ls.cosine(d, minus) == pytest.approx(-1.0, abs=1e-15)


# -------------------------------------------------------------- statistics


def trial(start, final=math.nan, distance=math.nan, status=None):
    """A hand-made trial; trained (status "ok") when it has a final cost."""
    if status is None:
        status = "ok" if math.isfinite(final) else ""
    return ls.Trial(
        lam=0.0,
        start_cost=start,
        start_distance=0.0,
        final_cost=final,
        distance=distance,
        status=status,
    )


def test_statistics_of_hand_made_trials():
    c_star, threshold = 0.2, 0.25
    grid = [
        [
            trial(1.0, 0.2, 0.1),  # back at C*: returned
            trial(2.0, 0.24, 0.3),  # inside the threshold
            trial(3.0, 5.0, 2.0, status="failed"),
            trial(4.0, 0.1, 1.0),  # below C*
        ],
        [
            trial(10.0, 0.2 - 1e-13, 0.5),  # rounding below C* is not below
            trial(20.0, 0.3, 0.7),
            trial(30.0, 0.26, 0.9),
            trial(70.0, 0.25, 1.1),  # exactly the threshold: returned
        ],
    ]
    q = (0.1, 0.5, 0.9)
    s = ls.statistics(grid, c_star, threshold, q)
    np.testing.assert_array_equal(s["fraction_returned"], [0.75, 0.5])
    np.testing.assert_array_equal(s["fraction_below_minimum"], [0.25, 0.0])
    np.testing.assert_array_equal(s["fraction_failed"], [0.25, 0.0])
    np.testing.assert_allclose(s["start_mean"], [2.5, 32.5], rtol=1e-15)
    np.testing.assert_allclose(s["distance_median"], [0.65, 0.8], rtol=1e-15)
    start = np.array([[1, 2, 3, 4], [10, 20, 30, 70]], dtype=float)
    final = np.array([[0.2, 0.24, 5.0, 0.1], [0.2 - 1e-13, 0.3, 0.26, 0.25]])
    for i in range(2):
        np.testing.assert_array_equal(s["start_quantiles"][i], np.quantile(start[i], q))
        np.testing.assert_array_equal(s["final_quantiles"][i], np.quantile(final[i], q))
        assert s["final_mean"][i] == pytest.approx(final[i].mean(), rel=1e-15)
    assert s["start_quantiles"][0, 1] == 2.5


def test_statistics_without_training_are_nan_except_the_starts():
    grid = [[trial(1.0), trial(3.0)], [trial(5.0), trial(9.0)]]
    s = ls.statistics(grid, 0.5, 0.6, (0.5,))
    np.testing.assert_array_equal(s["start_quantiles"], [[2.0], [7.0]])
    np.testing.assert_array_equal(s["start_mean"], [2.0, 7.0])
    assert s["final_quantiles"].shape == (2, 1)
    for key in (
        "final_quantiles",
        "final_mean",
        "fraction_returned",
        "fraction_below_minimum",
        "fraction_failed",
        "distance_median",
    ):
        assert np.all(np.isnan(s[key])), key


# ------------------------------------------------------------ the CLI

SPEC = """\
defaults:
  seed: 5
  data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.1}
  network: {hidden: [3, 3, 3]}
experiments:
  - name: land
    kind: landscape
    landscape:
      lambdas: [0, 0.01, 0.3]
      trials: 3
      train: true
      directions: 2
      points: 11
      plane_points: 7
    flow: {solver: sgd, lr: 0.05, batch: 9, momentum: 0.9, epochs: 30,
           record: {points: 5}}
  - name: keep
    kind: landscape
    landscape: {pattern: [1, 1, 1], lambdas: [0, 0.01], trials: 2, points: 5,
                plane_points: 5}
  - name: mixed
    kind: landscape
    landscape: {pattern: [0, 1, 1], lambdas: [0], trials: 1, points: 5,
                plane: false}
"""


@pytest.fixture(scope="module")
def landscapes(tmp_path_factory):
    """Rows and loaded files of the three runs of SPEC."""
    tmp = tmp_path_factory.mktemp("landscape")
    spec = write_spec(tmp, SPEC)
    result = invoke("landscape", spec, "-o", tmp / "out", "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    found = rows(result)
    files = {name: store.load(row["path"]) for name, row in found.items()}
    return dict(spec=spec, out=tmp / "out", rows=found, files=files)


def test_rows_carry_the_landscape_keys(landscapes):
    keys = {
        "minimizer",
        "minimizer_cost",
        "minimizer_grad_norm",
        "threshold",
        "lambdas",
        "trials",
        "trained",
        "quantiles",
        "start_cost_quantiles",
        "final_cost_quantiles",
        "slice_max",
        "slice_min",
        "plane_max",
        "fraction_returned",
        "fraction_below_minimum",
        "fraction_failed",
        "final_mean",
        "start_mean",
        "distance_median",
    }
    for row in landscapes["rows"].values():
        assert keys <= set(row) and row["status"] == "ok"
    land = landscapes["rows"]["land"]
    assert land["minimizer"] == "clustered construction"
    assert land["lambdas"] == [0.0, 0.01, 0.3] and land["trials"] == 3
    assert land["trained"] is True
    mixed = landscapes["rows"]["mixed"]
    assert mixed["plane_max"] is None and mixed["fraction_returned"] == [None]


def test_cli_lambda_zero_starts_at_the_minimizer_cost_exactly(landscapes):
    for name, f in landscapes["files"].items():
        c_star = f["landscape"]["attrs"]["minimizer_cost"]
        assert c_star == landscapes["rows"][name]["minimizer_cost"]
        start = f["landscape"]["trials"]["start_cost"]
        assert np.all(start[0] == c_star), name
        assert np.all(f["landscape"]["trials"]["start_distance"][0] == 0.0)


def test_cli_trials_are_stored_per_size_and_trial(landscapes):
    trials = landscapes["files"]["land"]["landscape"]["trials"]
    for key in ("start_cost", "start_distance", "final_cost", "distance", "steps"):
        assert trials[key].shape == (3, 3), key
    assert trials["costs"].shape == trials["times"].shape == (3, 3, 5)
    # one unit piece per tensor of the 4 layers: |theta - theta*| = lam sqrt(8)
    lam = np.array([[0.01], [0.3]])
    np.testing.assert_allclose(
        trials["start_distance"][1:],
        np.repeat(lam * math.sqrt(8), 3, axis=1),
        rtol=1e-12,
    )
    np.testing.assert_array_equal(trials["costs"][:, :, 0], trials["start_cost"])
    assert landscapes["rows"]["land"]["fraction_returned"][0] == 1.0


def test_slices_through_the_zero_cost_minimizer(landscapes):
    f = landscapes["files"]["land"]["landscape"]
    c_star = f["attrs"]["minimizer_cost"]
    assert 0.0 <= c_star < 1e-20
    coords, slices, plane = f["coords"], f["slices"], f["plane"]
    assert slices.shape == (2, 11) and plane.shape == (7, 7)
    assert coords[5] == 0.0 and coords[-1] == pytest.approx(0.3)  # span = max lambda
    np.testing.assert_array_equal(slices[:, 5], c_star)
    assert plane[3, 3] == c_star
    assert np.all(slices >= 0.0) and np.all(plane >= 0.0)
    assert np.all(np.delete(slices, 5, axis=1) > c_star)
    assert abs(f["attrs"]["plane_cosine"]) < 1e-12


def test_file_is_reproduced_from_its_network_data_and_root(landscapes):
    f = landscapes["files"]["land"]
    land, layers = f["landscape"], store.read_layers(f["network"])
    X, Y = f["data"]["X"], f["data"]["targets"]
    root = [int(f["attrs"]["run_key"]), f["attrs"]["seed"]]
    dirs = [ls.random_direction(layers, ls.stream(root, "slice", i)) for i in range(2)]
    np.testing.assert_array_equal(
        ls.slice_costs(layers, dirs, land["coords"], X, Y), land["slices"]
    )
    d1, d2 = (
        ls.random_direction(layers, ls.stream(root, "plane", i)) for i in range(2)
    )
    d2 = ls.orthogonalize(d2, d1)
    np.testing.assert_array_equal(
        ls.plane_costs(layers, d1, d2, land["plane_coords"], X, Y), land["plane"]
    )
    grid = ls.run_trials(layers, X, Y, land["lambdas"], 3, root)
    np.testing.assert_array_equal(
        [[t.start_cost for t in row] for row in grid], land["trials"]["start_cost"]
    )


def test_gradient_vanishes_at_the_constructions_but_not_at_mixed_patterns(landscapes):
    found = landscapes["rows"]
    assert found["land"]["minimizer_grad_norm"] < 1e-10
    assert found["keep"]["minimizer"] == "collapse/keep 111"
    assert found["keep"]["minimizer_grad_norm"] < 1e-10
    assert found["keep"]["minimizer_cost"] > 1e-4  # a critical point above zero
    assert found["mixed"]["minimizer"] == "collapse/keep 011"
    assert found["mixed"]["minimizer_grad_norm"] > 1e-6


def test_rerun_with_force_gives_identical_arrays(landscapes):
    result = invoke(
        "landscape",
        landscapes["spec"],
        "-o",
        landscapes["out"],
        "-e",
        "land",
        "--force",
        "--json",
        "-j",
        "1",
    )
    assert result.exit_code == 0, result.output
    again = store.load(rows(result)["land"]["path"])["landscape"]
    first = landscapes["files"]["land"]["landscape"]
    for key in ("coords", "slices", "plane"):
        np.testing.assert_array_equal(again[key], first[key])
    for key in ("start_cost", "final_cost", "distance", "costs", "steps"):
        np.testing.assert_array_equal(again["trials"][key], first["trials"][key])


SMALL = """\
experiments:
  - name: land
    kind: landscape
    seed: {seed}
    data: {{source: clusters, classes: 3, dim: 3, points: 6, radius: 0.1}}
    network: {{hidden: [3, 3, 3]}}
    landscape: {{lambdas: {lambdas}, trials: 2, train: true, span: 0.5,
                 directions: 1, points: 5, plane: false}}
    flow: {{solver: sgd, lr: 0.05, batch: 4, epochs: 4}}
"""


def small_run(tmp_path, name, seed=0, lambdas="[0.1, 0.5]"):
    text = SMALL.format(seed=seed, lambdas=lambdas)
    spec = write_spec(tmp_path, text, name + ".yaml")
    result = invoke("landscape", spec, "-o", tmp_path / name, "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    return store.load(rows(result)["land"]["path"])["landscape"]


def test_cli_adding_a_size_or_changing_the_seed(tmp_path):
    base = small_run(tmp_path, "base")
    more = small_run(tmp_path, "more", lambdas="[0.01, 0.1, 0.3, 0.5]")
    other = small_run(tmp_path, "other", seed=1)
    for key in ("start_cost", "final_cost"):
        np.testing.assert_array_equal(more["trials"][key][[1, 3]], base["trials"][key])
        assert np.all(other["trials"][key] != base["trials"][key]), key
    np.testing.assert_array_equal(more["slices"], base["slices"])
    assert np.all(np.delete(other["slices"] != base["slices"], 2))


BAD = """\
experiments:
  - name: land
    kind: landscape
    data: {{source: clusters, classes: 3, dim: 3, points: 6, radius: 0.1}}
    landscape: {landscape}
    flow: {flow}
"""


@pytest.mark.parametrize(
    "landscape, flow, key",
    [
        ("{points: 20}", "{}", "landscape.points"),
        ("{plane_points: 8}", "{}", "landscape.plane_points"),
        ("{of: result}", "{}", "landscape.path"),
        ("{pattern: [1, 0]}", "{}", "landscape.pattern"),
        ("{train: true}", "{solver: sgd}", "flow.lr"),
        ("{lambdas: [-0.1]}", "{}", "landscape.lambdas"),
        ("{lambdas: [0.1, 0.1]}", "{}", "landscape.lambdas"),
        ("{lambdas: [.inf]}", "{}", "landscape.lambdas"),
        ("{span: .inf}", "{}", "landscape.span"),
        ("{train: true}", "{solver: sgd, lr: .nan}", "flow.lr"),
    ],
)
def test_bad_landscape_spec_is_refused_with_the_key(tmp_path, landscape, flow, key):
    spec = write_spec(tmp_path, BAD.format(landscape=landscape, flow=flow))
    result = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert result.exit_code == 2
    assert key in result.output and "Traceback" not in result.output
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_missing_result_file_fails_the_run_and_names_it(tmp_path):
    text = """\
    experiments:
      - name: land
        kind: landscape
        landscape: {of: result, path: nope.h5}
    """
    result = invoke(
        "landscape",
        write_spec(tmp_path, text),
        "-o",
        tmp_path / "out",
        "--json",
        "-j",
        "1",
    )
    assert result.exit_code == 1
    row = rows(result)["land"]
    assert row["status"] == "failed" and "nope.h5" in row["message"]
    assert "Traceback" not in result.output


FROM_FILE = """\
defaults:
  data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.1}
  network: {hidden: [3, 3, 3]}
experiments:
  - name: built
    kind: construct
  - name: from-file
    kind: landscape
    landscape: {of: result, path: out/built/run.h5, lambdas: [0, 0.1], trials: 1,
                points: 5, plane: false}
  - name: keep-from-file
    kind: landscape
    landscape: {of: result, path: out/built/run.h5, pattern: [1, 1, 1],
                lambdas: [0], trials: 1, points: 5, plane: false}
  - name: keep-from-data
    kind: landscape
    landscape: {pattern: [1, 1, 1], lambdas: [0], trials: 1, points: 5, plane: false}
"""


def test_of_result_looks_around_the_stored_network(tmp_path):
    spec = write_spec(tmp_path, FROM_FILE)
    built = invoke("run", spec, "-o", tmp_path / "out", "-e", "built", "-j", "1")
    assert built.exit_code == 0, built.output
    result = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    found = rows(result)
    f = store.load(tmp_path / "out" / "built" / "run.h5")
    layers, data = store.read_layers(f["network"]), f["data"]
    Y = data["Y"][data["labels"]]
    want = hand_cost(layers, data["X"], Y, "relu")
    assert found["from-file"]["minimizer"] == "network of run.h5"
    assert found["from-file"]["minimizer_cost"] == pytest.approx(want, rel=1e-12, abs=0)
    assert want == pytest.approx(f["metrics"]["attrs"]["flow"], rel=1e-9, abs=0)
    keep = found["keep-from-file"]["minimizer_cost"]
    assert keep > 1e-4
    assert keep == pytest.approx(found["keep-from-data"]["minimizer_cost"], rel=1e-12)


# ------------------------------------------------ results of other runs

SMOOTHED = """\
experiments:
  - name: trained
    kind: flow
    data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
    network: {hidden: [4], activation: tanh}
    flow: {loss: ce, label_smoothing: 0.2, time: 1, record: {points: 3}}
  - name: around
    kind: landscape
    landscape: {of: result, path: out/trained/run.h5, lambdas: [0], trials: 1,
                points: 3, plane: false}
    flow: {loss: ce, label_smoothing: 0.2}
"""


def test_of_result_on_a_smoothed_flow_keeps_its_cost(tmp_path):
    spec = write_spec(tmp_path, SMOOTHED)
    first = invoke("flow", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert first.exit_code == 0, first.output
    then = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert then.exit_code == 0, then.output
    want = rows(first)["trained"]["cost_final"]
    assert rows(then)["around"]["minimizer_cost"] == pytest.approx(want, rel=1e-12)


WRONG_PATTERN = """\
experiments:
  - name: built
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.1}
  - name: keep-from-file
    kind: landscape
    landscape: {of: result, path: out/built/run.h5, pattern: [1, 1], lambdas: [0],
                trials: 1, points: 3, plane: false}
"""


def test_of_result_pattern_of_wrong_length_names_the_landscape_key(tmp_path):
    spec = write_spec(tmp_path, WRONG_PATTERN)
    built = invoke("run", spec, "-o", tmp_path / "out", "-e", "built", "-j", "1")
    assert built.exit_code == 0, built.output
    result = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert result.exit_code == 1
    row = rows(result)["keep-from-file"]
    assert row["status"] == "failed" and "found 2 entries" in row["message"]
    assert "landscape.pattern" in row["message"]


HUGE = """\
experiments:
  - name: huge
    kind: landscape
    data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.1}
    landscape: {lambdas: [0, 1.0e200], trials: 2, train: true, points: 5,
                plane_points: 5}
    flow: {solver: sgd, lr: 0.05, batch: 1, epochs: 3}
  - name: diverging
    kind: landscape
    data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.1}
    landscape: {lambdas: [0, 1000], trials: 2, train: true, directions: 0,
                plane: false}
    flow: {solver: sgd, lr: 0.5, batch: 1, epochs: 5}
"""


def test_trials_that_overflow_fail_alone_and_are_counted(tmp_path):
    spec = write_spec(tmp_path, HUGE)
    result = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr  # core lets no overflow warning out
    found = rows(result)
    huge, diverging = found["huge"], found["diverging"]
    assert huge["status"] == "ok" and huge["fraction_failed"] == [0.0, 1.0]
    assert huge["start_cost_quantiles"][1] == [None] * 3  # inf starts: no quantile
    assert huge["slice_min"] == huge["minimizer_cost"]  # only the origin is finite
    f = store.load(tmp_path / "out" / "huge" / "run.h5")
    assert list(f["landscape"]["trials"]["stop_reason"][1]) == ["start", "start"]
    assert np.all(np.isinf(f["landscape"]["trials"]["start_cost"][1]))
    assert diverging["status"] == "ok" and diverging["fraction_failed"][1] > 0
    for name in ("huge", "diverging"):
        drawn = invoke("plot", tmp_path / "out" / name / "run.h5", "--what", "all")
        assert drawn.exit_code == 0, drawn.output


TANH_TRAP = """\
experiments:
  - name: orbit
    kind: trap
    data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
    network: {hidden: [6], activation: tanh}
    flow: {time: 20}
  - name: around
    kind: landscape
    landscape: {of: result, path: out/orbit/run.h5, lambdas: [0], trials: 1,
                points: 3, plane: false}
"""


def test_of_result_keeps_the_activation_of_a_trap_result(tmp_path):
    spec = write_spec(tmp_path, TANH_TRAP)
    first = invoke("trap", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert first.exit_code == 0, first.output
    then = invoke("landscape", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert then.exit_code == 0, then.output
    f = store.load(tmp_path / "out" / "orbit" / "run.h5")
    layers = store.read_layers(f["network"])
    want = hand_cost(layers, f["data"]["X"], f["data"]["targets"], "tanh")
    got = rows(then)["around"]["minimizer_cost"]
    assert got == pytest.approx(want, rel=1e-12)


def test_a_union_key_gets_one_error_naming_both_forms(tmp_path):
    text = BAD.format(landscape="{threshold: -1, lambdas: []}", flow="{}")
    result = invoke("validate", write_spec(tmp_path, text))
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error")]
    assert len(lines) == 2, result.output
    assert "landscape.threshold: found -1; allowed: 'auto' or a number >= 0" in (
        result.output
    )
    assert "constrained" not in result.output
    assert "landscape.lambdas: found []; allowed: a list of at least 1" in (
        result.output
    )


def test_a_constructed_minimizer_is_relu_only(tmp_path):
    text = BAD.format(landscape="{}", flow="{}").replace(
        "    landscape:", "    network: {activation: tanh}\n    landscape:"
    )
    result = invoke("validate", write_spec(tmp_path, text))
    assert result.exit_code == 2 and "network.activation" in result.output
