"""Tests for dlmin.core.flows against the closed forms of flows.md.

Reference tests: S1-S3 (standard flow), A1-A5 (adapted flow), H1-H3
(homotopy), R1/R3 (rank loss with duplicated inputs), T1/T3 (time change),
CE1-CE3 (cross-entropy); plus the convergence order of the fixed-step
integrator, blow-up and stall reports, stops, records and option checks.

Nets are small and smooth (tanh) with K well above QN, so that every run
takes a fraction of a second.
"""

import math

import numpy as np
import pytest

from dlmin.core import flows as fl
from dlmin.core import network as nw

EPS = np.finfo(float).eps
STRICT = {"all": "raise", "under": "ignore"}

# The tight solver settings of flows.md A2/A3.
TIGHT = {"solver": "DOP853", "rtol": 1e-10, "atol": 1e-12}

# Central-difference step for CE1: truncation O(h^2), rounding O(eps / h).
FD_STEP = 1e-6


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------


def smooth_problem(n_samples=6, dim=3, n_outputs=2, hidden=(12, 12), seed=0):
    """Generic inputs and targets, a tanh net with K >> N*Q."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, dim))
    Y = rng.standard_normal((n_samples, n_outputs))
    widths = [dim, *hidden, n_outputs]
    params = nw.init_params(widths, rng=seed + 1, scheme="glorot", bias_scale=0.1)
    return X, Y, params


def duplicated_problem(sizes=(2, 2, 1, 3), dim=3, n_outputs=2, seed=5):
    """Inputs in groups of identical points; returns group labels too."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    X = rng.standard_normal((len(sizes), dim))[groups]
    Y = rng.standard_normal((groups.size, n_outputs))
    params = nw.init_params(
        [dim, 12, 12, n_outputs], rng=seed + 1, scheme="glorot", bias_scale=0.1
    )
    return X, Y, params, groups


def group_projector(groups, n_outputs):
    """P onto stacked outputs constant within each group, (N*Q, N*Q)."""
    same = (groups[:, None] == groups[None, :]).astype(float)
    P_samples = same / same.sum(axis=1, keepdims=True)
    return np.kron(P_samples, np.eye(n_outputs))


def stacked(params, X):
    return nw.forward(params, X, activation="tanh").ravel()


def range_projector(D, cutoff=1e-6):
    """Orthogonal projector onto range D from a thin SVD (cut-off on sigma)."""
    U, sigma, _ = np.linalg.svd(D, full_matrices=False)
    U = U[:, sigma > cutoff * sigma[0]]
    return U @ U.T


def run(params, X, Y, **options):
    with np.errstate(**STRICT):
        return fl.integrate(params, X, Y, fl.FlowOptions(**options))


@pytest.fixture(scope="module")
def smooth():
    return smooth_problem()


@pytest.fixture(scope="module")
def adapted_run(smooth):
    """Adapted flow (as homotopy alpha = 1) to s = 5N on a t-grid."""
    X, Y, params = smooth
    return run(
        params,
        X,
        Y,
        kind="homotopy",
        alpha=1.0,
        time=5 * len(X),
        record=60,
        grid="t",
        **TIGHT,
    )


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def test_pullback_matches_vjp(smooth, rng):
    X, _, params = smooth
    c = rng.standard_normal(X.shape[0] * 2)
    cache = nw.forward_cache(params, X, activation="tanh")
    expected = nw.vjp(params, X, c, activation="tanh")
    np.testing.assert_allclose(
        fl._pullback(params, cache, c), expected, rtol=1e-13, atol=1e-15
    )


def test_hysteresis_drops_below_lo_and_readmits_above_hi():
    lo, hi = 1e-12, 1e-11
    mu = np.array([1.0, 0.3, 5e-12, 1e-16])
    assert fl._hysteresis_rank(mu, 4, lo, hi) == 3  # 1e-16 drops
    assert fl._hysteresis_rank(mu, 3, lo, hi) == 3  # 5e-12 stays, in band
    assert fl._hysteresis_rank(mu, 2, lo, hi) == 2  # 5e-12 not readmitted
    mu[2] = 2e-11
    assert fl._hysteresis_rank(mu, 2, lo, hi) == 3  # readmitted above hi
    mu[2] = 1e-12
    assert fl._hysteresis_rank(mu, 3, lo, hi) == 2  # at lo: dropped


def test_recording_grids():
    n_samples = 4
    opts = fl.FlowOptions(time=20.0, record=5, grid="t")
    s = fl.recording_times(opts, n_samples)
    t = -np.expm1(-s / n_samples)
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-12)
    assert s[0] == 0 and s[-1] == 20.0
    log = fl.recording_times(fl.FlowOptions(time=10.0, record=5, grid="log"), n_samples)
    np.testing.assert_allclose(log[1:], np.geomspace(1e-3, 10.0, 4), rtol=1e-12)
    assert log[0] == 0
    default = fl.recording_times(fl.FlowOptions(record=3), n_samples)
    assert default[-1] == fl.DEFAULT_TIME_PER_SAMPLE * n_samples


# --------------------------------------------------------------------------
# (a) standard flow: S1-S3
# --------------------------------------------------------------------------


@pytest.mark.parametrize("route", fl.ROUTES)
def test_s1_output_velocity_is_minus_G_g(smooth, route):
    X, Y, params = smooth
    v = fl.velocity(params, X, Y, fl.FlowOptions(kind="standard", route=route))
    G = nw.ntk(params, X, activation="tanh")
    g = (stacked(params, X) - Y.ravel()) / len(X)
    np.testing.assert_allclose(
        nw.jvp(params, X, v, activation="tanh"),
        -G @ g,
        rtol=1e-12,
        atol=1e-14 * np.abs(G @ g).max(),
    )


@pytest.fixture(scope="module")
def standard_run(smooth):
    X, Y, params = smooth
    return run(
        params,
        X,
        Y,
        kind="standard",
        time=5 * len(X),
        record=200,
        solver="RK45",
        rtol=1e-10,
        atol=1e-12,
    )


def test_s2_cost_non_increasing(standard_run):
    cost = standard_run.records["cost"]
    assert np.all(np.diff(cost) <= 1e-12 * cost[0])
    assert cost[-1] < 0.5 * cost[0]


def test_s3_gronwall_sandwich(standard_run, smooth):
    n_samples = len(smooth[0])
    rec = standard_run.records
    s, cost = rec["s"], rec["cost"]
    integral = {
        key: np.concatenate([
            [0.0],
            np.cumsum(0.5 * np.diff(s) * (rec[key][1:] + rec[key][:-1])),
        ])
        for key in ("ntk_min", "ntk_max")
    }
    upper = cost[0] * np.exp(-2 / n_samples * integral["ntk_min"])
    lower = cost[0] * np.exp(-2 / n_samples * integral["ntk_max"])
    assert np.all(cost <= upper * (1 + 1e-6))
    assert np.all(cost >= lower * (1 - 1e-6))


def test_standard_flow_records_and_result(standard_run, smooth):
    X, Y, params = smooth
    rec, res = standard_run.records, standard_run
    QN, K = Y.size, nw.param_count(nw.widths_of(params))
    assert (res.status, res.stop_reason) == ("ok", "time")
    assert rec["x"].shape == (200, QN) and rec["theta"].shape == (200, K)
    assert "projector_rank" not in rec and "row_sum_drift" not in rec
    assert (res.K, res.QN, res.parametrization) == (K, QN, "over")
    assert res.exp_rel_error is None and res.line_rel_error is None
    np.testing.assert_allclose(
        rec["grad_norm"] / rec["ratio"],
        np.linalg.norm(rec["x"] - Y.ravel(), axis=1) / len(X),
        rtol=1e-12,
    )
    theta_final = nw.flatten(res.params)
    np.testing.assert_array_equal(theta_final, rec["theta"][-1])
    assert res.min_ntk_eigenvalue == pytest.approx(rec["ntk_min"].min())
    assert np.all(rec["ntk_rank"] == QN)


# --------------------------------------------------------------------------
# (b) adapted flow: A1-A5, (e) T1
# --------------------------------------------------------------------------


def test_a1_pseudo_inverse_identities(smooth):
    X, Y, params = smooth
    D = nw.jacobian(params, X, activation="tanh")
    G = D @ D.T
    g = (stacked(params, X) - Y.ravel()) / len(X)
    sigma = np.linalg.svd(D, compute_uv=False)
    rtol = 1e-8 * sigma[0] / sigma[-1]
    D_plus = np.linalg.pinv(D)
    normal_plus = np.linalg.pinv(D.T @ D, rtol=1e-11, hermitian=True)
    scale = np.abs(normal_plus).max()
    np.testing.assert_allclose(
        D_plus @ np.linalg.pinv(D.T), normal_plus, rtol=rtol, atol=rtol * scale
    )  # identity 1
    v = -D_plus @ g
    np.testing.assert_allclose(-D.T @ np.linalg.solve(G, g), v, rtol=rtol)
    np.testing.assert_allclose(
        -normal_plus @ (D.T @ g), v, rtol=rtol, atol=rtol * np.abs(v).max()
    )  # identity 2
    np.testing.assert_allclose(
        D.T @ np.linalg.inv(G), D_plus, rtol=rtol, atol=rtol * np.abs(D_plus).max()
    )  # identity 3
    computed = fl.velocity(params, X, Y, fl.FlowOptions(kind="adapted"))
    np.testing.assert_allclose(computed, v, rtol=rtol)


def test_a2_a3_exponential_law_and_straight_line(adapted_run, smooth):
    X, Y, _ = smooth
    n_samples = len(X)
    rec = adapted_run.records
    s, x, cost = rec["s"], rec["x"], rec["cost"]
    assert s[-1] == pytest.approx(5 * n_samples)
    x0, y = x[0], Y.ravel()
    expected = y + np.exp(-s / n_samples)[:, None] * (x0 - y)
    line_err = np.linalg.norm(x - expected, axis=1) / np.linalg.norm(x0 - y)
    exp_err = np.abs(cost / cost[0] / np.exp(-2 * s / n_samples) - 1)
    assert line_err.max() <= 1e-6  # A2
    assert exp_err.max() <= 1e-6  # A3
    np.testing.assert_allclose(rec["line_rel_error"], line_err, atol=1e-12)
    np.testing.assert_allclose(rec["exp_rel_error"], exp_err, atol=1e-12)
    assert adapted_run.exp_rel_error == pytest.approx(exp_err.max(), abs=1e-12)
    assert adapted_run.line_rel_error == pytest.approx(line_err.max(), abs=1e-12)


def test_a4_straightness(adapted_run, smooth):
    y = smooth[1].ravel()
    w = adapted_run.records["x"] - y
    span = np.linalg.norm(w[0])
    u = w[0] / span
    orthogonal = w - np.outer(w @ u, u)
    assert np.linalg.norm(orthogonal, axis=1).max() <= 1e-8 * span


def test_t1_linear_interpolation_in_t(adapted_run, smooth):
    Y = smooth[1].ravel()
    rec = adapted_run.records
    t, x = rec["t"], rec["x"]
    inside = t <= 0.99
    assert inside.sum() >= 50
    line = (1 - t[:, None]) * x[0] + t[:, None] * Y
    err = np.linalg.norm(x - line, axis=1) / np.linalg.norm(x[0] - Y)
    assert err[inside].max() <= 1e-6
    np.testing.assert_allclose(np.diff(t[:-1]), np.diff(t)[0], rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_a5_kernel_and_jacobian_routes_agree(smooth, alpha):
    X, Y, params = smooth
    G = nw.ntk(params, X, activation="tanh")
    kappa = np.linalg.cond(G)
    routes = [
        fl.velocity(
            params, X, Y, fl.FlowOptions(kind="homotopy", alpha=alpha, route=route)
        )
        for route in fl.ROUTES
    ]
    error = np.linalg.norm(routes[0] - routes[1]) / np.linalg.norm(routes[1])
    assert error <= 1e3 * EPS * kappa


# --------------------------------------------------------------------------
# (c) homotopy: H1-H3
# --------------------------------------------------------------------------


@pytest.mark.parametrize("route", fl.ROUTES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_h1_output_velocity(smooth, alpha, route):
    X, Y, params = smooth
    opts = fl.FlowOptions(kind="homotopy", alpha=alpha, route=route)
    v = fl.velocity(params, X, Y, opts)
    D = nw.jacobian(params, X, activation="tanh")
    g = (stacked(params, X) - Y.ravel()) / len(X)
    expected = -((1 - alpha) * D @ D.T + alpha * range_projector(D)) @ g
    np.testing.assert_allclose(
        D @ v, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max()
    )


@pytest.mark.parametrize("route", fl.ROUTES)
def test_h2_same_zero_set_for_every_alpha(route):
    X, _, params, groups = duplicated_problem()
    x = stacked(params, X)
    n = np.zeros_like(x)
    n[0], n[2] = 0.7, -0.7  # samples 0 and 1 coincide: output 0 differs
    assert groups[0] == groups[1]
    D = nw.jacobian(params, X, activation="tanh")
    assert np.linalg.norm(D.T @ n) <= 1e-12 * np.linalg.norm(n)
    rng = np.random.default_rng(3)
    generic = x + rng.standard_normal(x.size)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        opts = fl.FlowOptions(kind="homotopy", alpha=alpha, route=route)
        at_zero = fl.velocity(params, X, (x + n).reshape(-1, 2), opts)
        moving = fl.velocity(params, X, generic.reshape(-1, 2), opts)
        assert np.linalg.norm(at_zero) <= 1e-10 * np.linalg.norm(n)
        assert np.linalg.norm(moving) > 1e-3 * np.linalg.norm(n)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_h3_cost_non_increasing(smooth, alpha):
    X, Y, params = smooth
    res = run(
        params,
        X,
        Y,
        kind="homotopy",
        alpha=alpha,
        time=3 * len(X),
        record=80,
        rtol=1e-9,
        atol=1e-11,
    )
    cost = res.records["cost"]
    assert res.status == "ok"
    assert np.all(np.diff(cost) <= 1e-12 * cost[0])
    assert cost[-1] < cost[0]


def test_h3_alpha_one_satisfies_a3(adapted_run):
    assert np.all(np.diff(adapted_run.records["cost"]) <= 0)
    assert adapted_run.exp_rel_error <= 1e-6


# --------------------------------------------------------------------------
# (d) rank loss and (e) time change: R1, R3, T3
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duplicated_run():
    X, Y, params, groups = duplicated_problem()
    res = run(
        params, X, Y, kind="adapted", time=5 * len(X), record=40, grid="t", **TIGHT
    )
    return res, X, Y, groups


def test_r1_duplicated_inputs_closed_form(duplicated_run):
    res, X, Y, groups = duplicated_run
    n_samples, n_outputs = Y.shape
    P = group_projector(groups, n_outputs)
    rec = res.records
    z0 = rec["x"][0] - Y.ravel()
    decay = np.exp(-rec["s"] / n_samples)[:, None]
    z_exact = decay * (z0 @ P) + (z0 - P @ z0)
    z = rec["x"] - Y.ravel()
    assert np.abs(z - z_exact).max() <= 1e-6 * np.linalg.norm(z0)
    c_inf = np.sum((z0 - P @ z0) ** 2) / (2 * n_samples)
    c_exact = c_inf + decay[:, 0] ** 2 * (rec["cost"][0] - c_inf)
    np.testing.assert_allclose(rec["cost"], c_exact, rtol=1e-6)
    assert np.all(rec["projector_rank"] == n_outputs * (groups.max() + 1))
    assert np.all(rec["ntk_rank"] == n_outputs * (groups.max() + 1))
    assert res.rank_changes == 0


def test_t3_deviation_from_line_is_t_Pperp_z0(duplicated_run):
    res, X, Y, groups = duplicated_run
    P = group_projector(groups, Y.shape[1])
    rec = res.records
    t = rec["t"][:, None]
    x0, y = rec["x"][0], Y.ravel()
    z0 = x0 - y
    delta = rec["x"] - ((1 - t) * x0 + t * y)
    assert np.abs(delta - t * (z0 - P @ z0)).max() <= 1e-8 * np.linalg.norm(z0)
    expected = rec["t"] * np.linalg.norm(z0 - P @ z0) / np.linalg.norm(z0)
    np.testing.assert_allclose(rec["line_rel_error"], expected, atol=1e-8)


def test_r3_cost_decreases_and_Pz_vanishes(duplicated_run):
    res, X, Y, groups = duplicated_run
    P = group_projector(groups, Y.shape[1])
    z = res.records["x"] - Y.ravel()
    assert np.all(np.diff(res.records["cost"]) <= 0)
    Pz = np.linalg.norm(z @ P, axis=1)
    assert Pz[-1] <= np.exp(-5) * Pz[0] * (1 + 1e-6)


def test_damped_output_flow():
    X, _, params, _ = duplicated_problem()
    Y = np.random.default_rng(1).standard_normal((len(X), 2))
    lam = 1e-3
    v = fl.velocity(params, X, Y, fl.FlowOptions(kind="adapted", damping=lam))
    G = nw.ntk(params, X, activation="tanh")
    g = (stacked(params, X) - Y.ravel()) / len(X)
    expected = -G @ np.linalg.solve(G + lam * np.eye(len(G)), g)
    np.testing.assert_allclose(
        nw.jvp(params, X, v, activation="tanh"),
        expected,
        rtol=1e-9,
        atol=1e-11 * np.abs(expected).max(),
    )


def test_underparametrized_flow_is_reported():
    X, Y, _ = smooth_problem(n_samples=20, n_outputs=2)
    params = nw.init_params([3, 3, 2], rng=2, scheme="glorot", bias_scale=0.1)
    res = run(
        params,
        X,
        Y,
        kind="adapted",
        time=20.0,
        record=5,
        solver="RK45",
        rtol=1e-8,
        atol=1e-10,
        damping=1e-4,
        wall_limit=30.0,
    )
    assert (res.K, res.QN, res.parametrization) == (20, 40, "under")
    assert (res.status, res.stop_reason) == ("ok", "time")
    assert np.all(res.records["ntk_rank"] <= 20)
    assert np.all(np.diff(res.records["cost"]) <= 0)


def test_rank_changes_only_between_accepted_steps(monkeypatch):
    """Trial evaluations never move the rank; accepted steps may."""
    X, Y, _ = smooth_problem(n_samples=20, n_outputs=2)
    params = nw.init_params([3, 3, 2], rng=2, scheme="glorot", bias_scale=0.1)
    evaluate = fl._Field.__call__

    def frozen_rank(self, s, theta):
        before = self.rank
        v = evaluate(self, s, theta)
        assert self.rank == before
        return v

    monkeypatch.setattr(fl._Field, "__call__", frozen_rank)
    res = run(
        params,
        X,
        Y,
        kind="adapted",
        time=10.0,
        record=21,
        solver="RK45",
        rank_cutoff=1e-6,
    )
    assert res.status == "ok", res.message
    assert res.rank_changes > 0
    ranks = res.records["projector_rank"]
    assert ranks[0] == 20 and ranks.min() < 20


# --------------------------------------------------------------------------
# (g) cross-entropy: CE1-CE3
# --------------------------------------------------------------------------


def positive_labels(n_samples, n_outputs, seed=7):
    rng = np.random.default_rng(seed)
    Y = rng.dirichlet(np.ones(n_outputs), size=n_samples)
    return 0.5 * Y + 0.5 / n_outputs  # probability vectors, all > 0


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_ce1_gradient_by_central_differences(rng, loss):
    x = 3 * rng.standard_normal((5, 3))
    Y = 2.0 * positive_labels(5, 3)  # |y|_1 = 2 tests the mass factor
    _, g = fl.cost_and_gradient(x, Y, loss)
    fd = np.empty_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = FD_STEP
        plus = fl.cost_and_gradient(x + step, Y, loss)[0]
        minus = fl.cost_and_gradient(x - step, Y, loss)[0]
        fd[index] = (plus - minus) / (2 * FD_STEP)
    np.testing.assert_allclose(g, fd, rtol=1e-8, atol=1e-8 * np.abs(g).max())


def test_ce_minimum_value_at_explicit_minimizer(rng):
    x0 = rng.standard_normal((4, 3))
    Y = 3.0 * positive_labels(4, 3)
    x_star = fl.ce_minimizer(x0, Y)
    cost, g = fl.cost_and_gradient(x_star, Y, "ce")
    mass = Y.sum(axis=1)
    p = Y / mass[:, None]
    entropy = -(p * np.log(p)).sum(axis=1)
    assert cost == pytest.approx(np.mean(mass * entropy), rel=1e-13)
    assert np.abs(g).max() <= 1e-15
    np.testing.assert_allclose(x_star.sum(axis=1), x0.sum(axis=1), rtol=1e-13)


def test_ce_huge_logits_do_not_overflow():
    x = np.array([[1e4, -1e4, 0.0]])
    cost, g = fl.cost_and_gradient(x, positive_labels(1, 3), "ce")
    assert np.isfinite(cost) and np.all(np.isfinite(g))


@pytest.fixture(scope="module")
def ce_run():
    X, _, params = smooth_problem(n_samples=5, n_outputs=3, seed=11)
    Y = positive_labels(5, 3)
    return run(
        params,
        X,
        Y,
        kind="adapted",
        loss="ce",
        time=30 * len(X),
        record=50,
        grid="log",
        **TIGHT,
    ), Y


def test_ce2_row_sums_conserved(ce_run):
    res, _ = ce_run
    assert res.records["row_sum_drift"].max() <= 1e-9
    assert "exp_rel_error" not in res.records
    assert res.exp_rel_error is None


def test_ce3_cost_and_distance_decrease_to_minimum(ce_run):
    res, Y = ce_run
    rec = res.records
    mass = Y.sum(axis=1)
    p = Y / mass[:, None]
    minimum = np.mean(mass * -(p * np.log(p)).sum(axis=1))
    assert np.all(np.diff(rec["cost"]) <= 1e-13)
    assert np.all(rec["cost"] >= minimum - 1e-13)
    assert np.all(np.diff(rec["minimizer_distance"]) <= 1e-10)
    assert rec["minimizer_distance"][-1] <= 1e-3 * rec["minimizer_distance"][0]
    x0 = rec["x"][0].reshape(Y.shape)
    x_star = fl.ce_minimizer(x0, Y).ravel()
    assert np.linalg.norm(rec["x"][-1] - x_star) == pytest.approx(
        rec["minimizer_distance"][-1], rel=1e-12
    )


def test_ce_rejects_non_positive_labels(smooth):
    X, _, params = smooth
    Y = positive_labels(len(X), 2)
    Y[2, 1] = 0.0
    with pytest.raises(ValueError, match="strictly positive"):
        fl.integrate(params, X, Y, fl.FlowOptions(loss="ce"))


# --------------------------------------------------------------------------
# Solvers, fixed step, stops and failures
# --------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["RK45", "DOP853", "LSODA", "BDF", "Radau"])
def test_every_solver_follows_the_exponential_law(solver):
    X, Y, params = smooth_problem(n_samples=4, n_outputs=1, hidden=(5,))
    res = run(
        params,
        X,
        Y,
        kind="adapted",
        time=2 * len(X),
        record=9,
        solver=solver,
        rtol=1e-9,
        atol=1e-11,
    )
    assert res.status == "ok", res.message
    assert res.exp_rel_error <= 1e-5
    assert res.rhs_evaluations >= res.steps > 0


@pytest.mark.parametrize("kind", ["standard", "adapted"])
def test_euler_converges_with_order_one(smooth, kind):
    X, Y, params = smooth
    horizon = float(len(X))
    reference = run(params, X, Y, kind=kind, time=horizon, record=2, **TIGHT).records[
        "x"
    ][-1]
    steps = horizon / np.array([32, 64, 128, 256])
    errors = []
    for h in steps:
        res = run(
            params, X, Y, kind=kind, time=horizon, record=2, solver="euler", step=h
        )
        assert res.s_final == pytest.approx(horizon, rel=1e-12)
        assert res.steps == round(horizon / h)
        errors.append(np.linalg.norm(res.records["x"][-1] - reference))
    order = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 0.9 <= order <= 1.1


def test_euler_records_at_nearest_step(smooth):
    X, Y, params = smooth
    res = run(
        params, X, Y, kind="standard", time=1.0, record=4, solver="euler", step=0.3
    )
    # grid 0, 1/3, 2/3, 1 -> nearest steps 0, 0.3, 0.6, 0.9; and the final
    # state after ceil(1 / 0.3) = 4 steps
    np.testing.assert_allclose(res.records["s"], [0.0, 0.3, 0.6, 0.9, 1.2])
    assert res.s_final == pytest.approx(1.2)


@pytest.mark.parametrize("kind", ["standard", "adapted"])
def test_huge_euler_step_blows_up_with_advice(smooth, kind):
    X, Y, params = smooth
    res = run(params, X, Y, kind=kind, time=1e9, solver="euler", step=1e8, record=3)
    assert (res.status, res.stop_reason) == ("failed", "blowup")
    assert "flow.step" in res.message
    assert ("flow.damping" in res.message) == (kind == "adapted")
    assert np.all(np.isfinite(nw.flatten(res.params)))
    assert res.s_final < 1e9


def near_duplicate_problem():
    """Two inputs 1e-6 apart with targets 1 apart: G nearly singular."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 3))
    X[1] = X[0] + 1e-6 * rng.standard_normal(3)
    Y = rng.standard_normal((6, 1))
    Y[1] = Y[0] + 1.0
    params = nw.init_params([3, 10, 10, 1], rng=1, scheme="glorot", bias_scale=0.1)
    return X, Y, params


def test_nearly_singular_kernel_without_cutoff_stalls_with_advice():
    X, Y, params = near_duplicate_problem()
    res = run(
        params, X, Y, kind="adapted", rank_cutoff=1e-30, time=30.0, wall_limit=30.0
    )
    assert (res.status, res.stop_reason) == ("failed", "stalled")
    assert "flow.damping: 1e-6" in res.message
    assert res.steps == fl.STALL_WINDOW


def test_nearly_singular_kernel_with_cutoff_drops_the_direction():
    X, Y, params = near_duplicate_problem()
    res = run(params, X, Y, kind="adapted", time=30.0, record=5)
    assert res.status == "ok", res.message
    assert np.all(res.records["projector_rank"] == 5)


def test_stop_cost_at_the_a_priori_time(smooth):
    X, Y, params = smooth
    n_samples = len(X)
    cost0 = fl.cost_and_gradient(stacked(params, X).reshape(Y.shape), Y)[0]
    target = 1e-3 * cost0
    res = run(
        params,
        X,
        Y,
        kind="adapted",
        time=10 * n_samples,
        stop_cost=target,
        record=11,
        **TIGHT,
    )
    assert (res.status, res.stop_reason) == ("ok", "cost")
    assert res.s_final == pytest.approx(n_samples / 2 * math.log(1e3), rel=1e-6)
    assert res.cost_final == pytest.approx(target, rel=1e-6)
    assert res.records["s"][-1] == res.s_final
    assert np.all(np.diff(res.records["s"]) > 0)


def test_stop_cost_with_euler(smooth):
    X, Y, params = smooth
    res = run(
        params,
        X,
        Y,
        kind="standard",
        time=100.0,
        solver="euler",
        step=0.05,
        stop_cost=0.5 * 0.674,
        record=3,
    )
    assert res.stop_reason == "cost"
    assert res.cost_final <= 0.5 * 0.674 < res.records["cost"][-2]


@pytest.mark.parametrize("solver", ["RK45", "euler"])
def test_wall_limit_stops_after_one_step(smooth, solver):
    X, Y, params = smooth
    res = run(
        params,
        X,
        Y,
        kind="standard",
        solver=solver,
        step=0.01,
        wall_limit=1e-9,
        record=5,
    )
    assert (res.status, res.stop_reason, res.steps) == ("ok", "wall", 1)
    assert "flow.wall_limit" in res.message
    assert res.records["s"][-1] == res.s_final > 0


def test_callbacks_see_every_record_in_order(smooth):
    X, Y, params = smooth
    seen, fractions = [], []
    res = fl.integrate(
        params,
        X,
        Y,
        fl.FlowOptions(time=6.0, record=7, store_theta=False),
        on_record=seen.append,
        progress=lambda s, s_max: fractions.append(s / s_max),
    )
    assert [rec["s"] for rec in seen] == list(res.records["s"])
    assert set(seen[0]) == {
        "s",
        "t",
        "cost",
        "x",
        "grad_norm",
        "ratio",
        "ntk_min",
        "ntk_max",
        "ntk_rank",
        "projector_rank",
        "exp_rel_error",
        "line_rel_error",
    }
    assert np.all(np.diff(fractions) > 0) and fractions[-1] == 1.0
    assert len(fractions) == res.steps


def test_keyboard_interrupt_propagates(smooth):
    X, Y, params = smooth

    def interrupt(rec):
        if rec["s"] > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fl.integrate(
            params, X, Y, fl.FlowOptions(time=6.0, record=4), on_record=interrupt
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"solver": "rk4"}, "flow.solver"),
        ({"solver": "euler"}, "flow.step"),
        ({"kind": "homotopy", "alpha": 1.5}, "flow.alpha"),
        ({"rank_cutoff": 0.5}, "flow.rank_cutoff"),
        ({"rtol": 1e-16}, "flow.rtol"),
        ({"record": 1}, "flow.record"),
        ({"damping": -1.0}, "flow.damping"),
        ({"grid": "cubic"}, "flow.grid"),
    ],
)
def test_bad_options_name_the_key(smooth, change, message):
    X, Y, params = smooth
    with pytest.raises(ValueError, match=message):
        fl.integrate(params, X, Y, fl.FlowOptions(**change))


def test_bad_targets_shape(smooth):
    X, Y, params = smooth
    with pytest.raises(ValueError, match="Y: expected"):
        fl.integrate(params, X, Y.T, fl.FlowOptions())
