"""`flow.solver: sgd`: mini-batch SGD with momentum, checked against hand loops."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import flows, network as nw, store

from helpers import write_spec


@pytest.fixture
def problem():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 3))
    Y = np.eye(3)[rng.integers(0, 3, 30)]
    params = nw.init_params([3, 8, 8, 3], rng=rng, scheme="glorot", bias_scale=0.1)
    return X, Y, params


def sgd(**changes):
    base = dict(kind="standard", solver="sgd", lr=0.05, epochs=20, record=6)
    base.update(spectrum=False)
    base.update(changes)
    return flows.FlowOptions(**base)


def orbit(params, X, Y, options, seed=None, loss_activation="tanh"):
    """Every iterate of a run, shape (steps + 1, K), from the on_step hook."""
    thetas = [nw.flatten(params)]

    def on_step(dense, s_old, s_new):
        thetas.append(dense(s_new))

    result = flows.integrate(
        params, X, Y, options, loss_activation, on_step=on_step, seed=seed
    )
    return result, np.array(thetas)


def hand_sgd(params, X, Y, lr, epochs, batch, momentum, seed, nesterov=False):
    """SGD written out with the network's own VJP: the independent reference."""
    rng = np.random.default_rng(seed)
    widths = nw.widths_of(params)
    theta = nw.flatten(params)
    v = np.zeros_like(theta)
    n = len(X)
    for _ in range(epochs):
        order = rng.permutation(n)
        for first in range(0, n, batch):
            rows = order[first : first + batch]
            p = nw.unflatten(theta, widths)
            out = nw.forward(p, X[rows], "tanh")
            grad = nw.vjp(p, X[rows], (out - Y[rows]) / len(rows), "tanh")
            v = momentum * v + grad
            theta = theta - lr * (grad + momentum * v if nesterov else v)
    return theta


def test_full_batch_equals_euler_step_for_step(problem):
    X, Y, params = problem
    euler = flows.FlowOptions(
        kind="standard", solver="euler", step=0.05, time=0.05 * 20, record=6
    )
    euler.spectrum = False
    res_e, path_e = orbit(params, X, Y, euler)
    res_s, path_s = orbit(params, X, Y, sgd())
    assert path_s.shape == (21, nw.param_count(nw.widths_of(params)))
    np.testing.assert_array_equal(path_s, path_e)
    for key in ("s", "cost", "x", "grad_norm"):
        np.testing.assert_array_equal(res_s.records[key], res_e.records[key])
    np.testing.assert_array_equal(res_s.records["epoch"], [0, 4, 8, 12, 16, 20])
    assert res_s.steps == res_e.steps == 20
    assert res_s.stop_reason == "time" and res_s.s_final == pytest.approx(1.0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_mini_batches_with_momentum_match_a_hand_loop(problem, nesterov):
    X, Y, params = problem
    opts = sgd(batch=7, momentum=0.9, nesterov=nesterov, epochs=5, lr=0.02)
    res = flows.integrate(params, X, Y, opts, "tanh", seed=11)
    want = hand_sgd(params, X, Y, 0.02, 5, 7, 0.9, 11, nesterov)
    np.testing.assert_allclose(nw.flatten(res.params), want, rtol=1e-12, atol=1e-14)
    # 30 samples in batches of 7: 5 steps per epoch, the last of 2 samples
    assert res.steps == 25 and res.rhs_evaluations == 25
    assert res.s_final == pytest.approx(25 * 0.02)
    np.testing.assert_allclose(res.records["epoch"], [0, 1, 2, 3, 4, 5])


def test_momentum_zero_full_batch_is_plain_gradient_descent(problem):
    X, Y, params = problem
    res = flows.integrate(params, X, Y, sgd(epochs=3, lr=0.1), "tanh")
    theta = nw.flatten(params)
    widths = nw.widths_of(params)
    for _ in range(3):
        p = nw.unflatten(theta, widths)
        theta = theta - 0.1 * nw.vjp(p, X, (nw.forward(p, X, "tanh") - Y) / 30, "tanh")
    np.testing.assert_allclose(nw.flatten(res.params), theta, rtol=1e-12, atol=1e-15)


def test_shuffles_are_reproducible_by_seed_and_differ_between_seeds(problem):
    X, Y, params = problem
    opts = sgd(batch=5, epochs=3)
    a = nw.flatten(flows.integrate(params, X, Y, opts, "tanh", seed=4).params)
    b = nw.flatten(flows.integrate(params, X, Y, opts, "tanh", seed=4).params)
    c = nw.flatten(flows.integrate(params, X, Y, opts, "tanh", seed=5).params)
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a - c) > 1e-6


def test_batch_of_n_or_more_is_the_full_batch(problem):
    X, Y, params = problem
    full = flows.integrate(params, X, Y, sgd(epochs=4), "tanh")
    big = flows.integrate(params, X, Y, sgd(epochs=4, batch=500), "tanh", seed=9)
    np.testing.assert_array_equal(nw.flatten(full.params), nw.flatten(big.params))


def test_batch_gradients_average_to_the_full_gradient(problem):
    """The batch cost is its samples' mean: equal batches average to grad C."""
    X, Y, params = problem
    opts = flows.FlowOptions(kind="standard", solver="sgd", lr=1.0, batch=6)
    prob, theta = flows._prepare_problem(params, X, Y, "l2", "tanh")
    fld = flows._Field(prob, flows._resolve_options(opts, prob))
    order = np.random.default_rng(0).permutation(30)
    parts = [flows._batch_gradient(fld, theta, order, j, 6) for j in range(0, 30, 6)]
    full = flows._batch_gradient(fld, theta, None, 0, 30)
    np.testing.assert_allclose(np.mean(parts, axis=0), full, rtol=1e-12, atol=1e-15)


def test_cost_stop_is_checked_at_epoch_ends(problem):
    X, Y, params = problem
    first = flows.integrate(params, X, Y, sgd(epochs=30, batch=10, lr=0.1), "tanh")
    target = float(first.records["cost"][2])  # the cost at a recorded epoch end
    res = flows.integrate(
        params, X, Y, sgd(epochs=30, batch=10, lr=0.1, stop_cost=target), "tanh"
    )
    assert res.stop_reason == "cost" and res.cost_final <= target
    assert res.records["epoch"][-1] == int(res.records["epoch"][-1])
    assert res.steps % 3 == 0 and "epoch" in res.message


def test_cross_entropy_sgd_lowers_the_cost(problem):
    X, Y, params = problem
    Y = 0.8 * Y + 0.2 / 3
    res = flows.integrate(params, X, Y, sgd(loss="ce", epochs=30, batch=8), "tanh")
    assert res.status == "ok" and res.cost_final < res.cost_initial


def test_huge_learning_rate_fails_with_advice(problem):
    X, Y, params = problem
    res = flows.integrate(params, X, Y, sgd(lr=1e9, epochs=50), "tanh")
    assert (res.status, res.stop_reason) == ("failed", "blowup")
    assert "flow.lr" in res.message
    assert np.all(np.isfinite(nw.flatten(res.params)))


def test_wall_limit_stops_inside_an_epoch(problem):
    X, Y, params = problem
    res = flows.integrate(
        params, X, Y, sgd(batch=1, epochs=10**6, wall_limit=0.2), "tanh"
    )
    assert res.stop_reason == "wall" and res.status == "ok"
    assert res.records["epoch"][-1] == pytest.approx(res.steps / 30)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(lr=None), "flow.lr"),
        (dict(kind="adapted"), "flow.kind"),
        (dict(time=3.0), "flow.time"),
        (dict(step=0.1), "flow.step"),
        (dict(batch=0), "flow.batch"),
        (dict(epochs=0), "flow.epochs"),
        (dict(momentum=1.0), "flow.momentum"),
        (dict(lr=-1.0), "flow.lr"),
    ],
)
def test_bad_sgd_options_name_the_key(problem, changes, key):
    X, Y, params = problem
    with pytest.raises(ValueError, match=key):
        flows.integrate(params, X, Y, sgd(**changes), "tanh")


SPEC = """\
experiments:
  - name: sgd
    kind: flow
    data: {source: clusters, classes: 3, dim: 3, points: 8, radius: 0.1}
    network: {hidden: [6], activation: tanh}
    flow:
      solver: sgd
      lr: 0.1
      batch: 5
      momentum: 0.5
      epochs: 12
      record: {points: 5}
    sweep:
      seed: [0, 1]
"""


def test_sgd_runs_from_a_spec_and_streams_epochs(tmp_path):
    path = write_spec(tmp_path, SPEC)
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["run_id"]: r for r in map(json.loads, res.stdout.splitlines())}
    first, second = rows["seed=0"], rows["seed=1"]
    assert first["solver"] == "sgd" and first["epochs"] == 12
    assert first["steps"] == 12 * 5  # 24 samples in batches of 5
    assert first["cost_final"] != second["cost_final"]  # other seed, other run
    f = store.load(tmp_path / "sgd" / "seed=0.h5")
    np.testing.assert_allclose(f["trajectory"]["epoch"], [0, 3, 6, 9, 12])
    assert f["trajectory"]["cost"][-1] == first["cost_final"]


@pytest.mark.parametrize(
    "flow, key",
    [
        ("{solver: sgd}", "flow.lr"),
        ("{solver: sgd, lr: 0.1, kind: adapted}", "flow.kind"),
        ("{solver: sgd, lr: 0.1, time: 4}", "flow.time"),
        ("{solver: sgd, lr: 0.1, batch: 0}", "flow.batch"),
        ("{solver: sgd, lr: 0.1, nesterov: true}", "flow.nesterov"),
        ("{solver: sgd, lr: .inf}", "flow.lr"),
        # the sgd keys belong to sgd: refused with the other solvers
        ("{solver: euler, step: 0.1, lr: 0.1}", "flow.lr"),
        ("{solver: RK45, momentum: 0.9}", "flow.momentum"),
        ("{batch: 4}", "flow.batch"),
    ],
)
def test_bad_sgd_spec_is_refused_with_the_key(tmp_path, flow, key):
    text = SPEC.replace(
        "    flow:\n      solver: sgd\n      lr: 0.1\n      batch: 5\n"
        "      momentum: 0.5\n      epochs: 12\n      record: {points: 5}\n",
        f"    flow: {flow}\n",
    )
    res = CliRunner().invoke(app, ["validate", str(write_spec(tmp_path, text))])
    assert res.exit_code == 2, res.output
    assert key in res.output and "Traceback" not in res.output


def test_mini_batch_overflow_stops_at_the_last_checked_epoch(problem):
    X, Y, params = problem
    res = flows.integrate(params, X, Y, sgd(lr=1e4, batch=1, epochs=3), "tanh")
    assert (res.status, res.stop_reason) == ("failed", "blowup")
    assert "flow.lr" in res.message and "epoch 1" in res.message
    # the state reported is the start, the last one checked on the full data
    np.testing.assert_array_equal(nw.flatten(res.params), nw.flatten(params))
    assert res.records["epoch"][-1] == 0.0 and np.isfinite(res.cost_final)


def test_a_zero_cost_start_does_not_count_as_a_blow_up():
    """At a minimizer C(0) ~ 1e-32: growth by 1e12 over it is still rounding.

    A linear layer with X = I: the residual's mode (1, 1) has NTK eigenvalue
    3, so gradient descent with step 8/3 multiplies it by 1 - 3 h / N = -3
    per step: from 1e-16 to 3.5e-7 in 20 steps, C from 1e-32 to ~1e-13.
    """
    X, Y = np.eye(2), np.eye(2)
    params = [(np.eye(2), np.full(2, 1e-16))]
    opts = flows.FlowOptions(
        kind="standard", solver="euler", step=8 / 3, time=20 * 8 / 3, record=3
    )
    res = flows.integrate(params, X, Y, opts, "relu")
    assert res.status == "ok" and res.stop_reason == "time", res.message
    assert 1e-15 < res.cost_final < 1e-10  # grew 1e17-fold, far below |y|^2/(2N)


def test_trap_refuses_gradient_descent_orbits(tmp_path):
    text = SPEC + (
        "  - name: trap-sgd\n    kind: trap\n"
        "    data: {source: clusters, classes: 2, dim: 2, points: 4, radius: 0.1}\n"
        "    network: {hidden: [4], activation: tanh}\n"
        "    flow: {solver: sgd, lr: 0.1}\n"
    )
    res = CliRunner().invoke(app, ["validate", str(write_spec(tmp_path, text))])
    assert res.exit_code == 2 and "flow.solver" in res.output
    stored = SPEC.replace(
        "      epochs: 12\n", "      epochs: 12\n      store_theta: true\n"
    )
    stored += (
        "  - name: trap-file\n    kind: trap\n    trap: {path: out/sgd/seed=0.h5}\n"
    )
    path = write_spec(tmp_path, stored)
    first = CliRunner().invoke(app, ["flow", str(path), "-o", str(tmp_path / "out")])
    assert first.exit_code == 0, first.output
    res = CliRunner().invoke(
        app, ["trap", str(path), "-o", str(tmp_path / "out"), "--json"]
    )
    assert res.exit_code == 1
    row = json.loads(res.stdout.splitlines()[0])
    assert row["status"] == "failed" and "solver sgd" in row["message"]
