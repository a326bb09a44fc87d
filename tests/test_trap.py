"""Tests for dlmin.core.trap: trapped intervals and the trapping bound.

flows.md section 9: P1 (the bound and its sharper version on every
measured component), P2 (``L_U = (1/N) int r |z| ds`` to quadrature
accuracy), P3 (the polyline length approaches ``L_U`` from below). Known
answers come from linear models (no hidden layer), whose standard flow is
linear in theta and solvable in closed form: one with ``G = 4 I`` (``r = 2``
everywhere, a straight orbit) and an underparametrized one whose orbit ends
inside every trapping region. The nonlinear orbit is a tanh net started
near the saddle at ``theta = 0``.
"""

import json
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize

from dlmin.core import flows as fl
from dlmin.core import network as nw
from dlmin.core import trap as tp

# Agreement of a DOP853 orbit at rtol 1e-10 with a closed form, relative.
CLOSED_FORM_RTOL = 1e-7
# flows.md P2/P3: quadrature accuracy on a fine grid.
QUAD_RTOL = 1e-4


# --------------------------------------------------------------------------
# Problems with known answers
# --------------------------------------------------------------------------


def orthogonal_linear():
    """Linear net f = W xi + b with D D^T = 4 I (N = 3, K = 4).

    Rows ``[xi_n, 1]`` of D are three rows of a Hadamard matrix, so
    ``z(s) = exp(-4 s / 3) z(0)``, ``r = 2`` and theta moves on a line.
    """
    X = np.array([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    Y = np.array([[1.0], [-2.0], [0.5]])
    params = [(np.array([[0.3, -0.2, 0.1]]), np.array([0.05]))]
    return params, X, Y


def under_linear():
    """Linear net with one input, N = 4 (K = 2 < QN = 4)."""
    X = np.array([[-1.0], [-0.2], [0.5], [1.3]])
    Y = np.array([[0.4], [-0.8], [1.1], [-0.3]])
    params = [(np.array([[0.7]]), np.array([-0.5]))]
    return params, X, Y


def linear_closed_form(params, X, Y):
    """Functions of s: r(s), |z(s)| and the speed |D^T g| = |theta'|."""
    N = X.shape[0]
    D = np.hstack([X, np.ones((N, 1))])
    lam, U = np.linalg.eigh(D @ D.T)
    lam = np.where(lam > 1e-12 * lam[-1], lam, 0.0)
    c = U.T @ (nw.forward(params, X).ravel() - Y.ravel())

    def z_norm(s):
        return math.sqrt(np.sum(c**2 * np.exp(-2 * lam * s / N)))

    def speed(s):
        return math.sqrt(np.sum(lam * c**2 * np.exp(-2 * lam * s / N))) / N

    def ratio(s):
        return N * speed(s) / z_norm(s)

    return ratio, z_norm, speed


def tight(**changes):
    return tp.trap_options(**changes)


@pytest.fixture(scope="module")
def plateau():
    """Small-init tanh orbit, compared with the adapted flow (~6 s)."""
    params, X, Y = tp.make_scenario("small_init", 0, scale=0.05)
    result = tp.trap(
        params, X, Y, [0.03, 0.1], options=tight(time=650.0, record=201), compare=True
    )
    return result, params, X, Y


# --------------------------------------------------------------------------
# Interval finding on a synthetic r(s)
# --------------------------------------------------------------------------


def sine_ratio(s):
    return 0.5 + 0.4 * np.sin(s)


def test_intervals_match_known_crossings_by_brent():
    """r = 0.5 + 0.4 sin s < 0.3 exactly on (7pi/6, 11pi/6) + 2 pi k."""
    s = np.linspace(0.0, 4 * math.pi + 1.0, 57)
    spans = tp.trapped_intervals(s, sine_ratio(s), 0.3, lambda t: float(sine_ratio(t)))
    expected = [(7 * math.pi / 6 + k, 11 * math.pi / 6 + k) for k in (0.0, 2 * math.pi)]
    assert len(spans) == 2
    for span, (a, b) in zip(spans, expected):
        assert span.s0 == pytest.approx(a, abs=1e-12)
        assert span.s1 == pytest.approx(b, abs=1e-12)
        assert not (span.from_start or span.to_end or span.at_floor)


def test_intervals_without_r_func_interpolate_linearly():
    """Linear interpolation places an end to h^2 |r''| / (8 |r'|)."""
    for n in (50, 200, 800):
        s = np.linspace(0.0, 2 * math.pi, n)
        (span,) = tp.trapped_intervals(s, sine_ratio(s), 0.3)
        h = s[1] - s[0]
        slope = 0.4 * abs(math.cos(7 * math.pi / 6))
        assert abs(span.s0 - 7 * math.pi / 6) <= h**2 * 0.4 / (8 * slope)


def test_intervals_open_at_both_ends_and_cut_at_the_floor():
    s = np.linspace(0.0, 10.0, 101)
    r = 0.1 + 0.01 * s
    r[80:] = np.nan
    (first,) = tp.trapped_intervals(s, r, 1.0)
    assert (first.s0, first.s1) == (0.0, s[79])
    assert first.from_start and first.at_floor and not first.to_end
    (last,) = tp.trapped_intervals(s, 1.0 - 0.05 * s, 0.6)
    assert last.s0 == pytest.approx(8.0, abs=1e-12)
    assert last.s1 == 10.0 and last.to_end and not last.from_start
    assert tp.trapped_intervals(s, np.full(s.size, 2.0), 1.0) == []


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"eps": 0.0}, "eps"),
        ({"r": np.ones(3)}, "same length|one length"),
        ({"s": np.array([0.0, 2.0, 1.0, 3.0])}, "increasing"),
    ],
)
def test_intervals_reject_bad_input(bad, match):
    args = {"s": np.arange(4.0), "r": np.ones(4), "eps": 0.5}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        tp.trapped_intervals(**args)


# --------------------------------------------------------------------------
# Known answers: linear models
# --------------------------------------------------------------------------


def test_constant_ratio_orbit_matches_the_closed_form_bound():
    """G = 4 I: r = 2, one interval [0, T], L_U = |z0|(1 - e^(-4T/3)) / 2."""
    params, X, Y = orthogonal_linear()
    T = 3.0
    result = tp.trap(params, X, Y, [1.5, 2.5], options=tight(time=T), activation="tanh")
    (row,) = result.table
    z0 = float(np.linalg.norm(nw.forward(params, X) - Y))
    decay = 1.0 - math.exp(-4.0 * T / 3.0)
    assert row["eps"] == 2.5 and row["from_start"] and row["to_end"]
    assert (row["s0"], row["s1"], row["length"]) == (0.0, T, T)
    assert row["r_max"] == pytest.approx(2.0, rel=1e-12)
    assert row["z0"] == pytest.approx(z0, rel=1e-12)
    assert row["arc_length"] == pytest.approx(z0 * decay / 2, rel=1e-8)
    assert row["bound"] == pytest.approx(3 * decay / (2 * 2.5), rel=1e-8)
    assert row["bound_sharp"] == pytest.approx(3 * decay / 4, rel=1e-8)
    # A straight orbit: polyline = chord = arc length.
    assert row["polyline"] == pytest.approx(row["arc_length"], rel=1e-8)
    assert row["chord"] == pytest.approx(row["arc_length"], rel=1e-8)
    assert not row["violated"] and result.status == "ok"
    assert result.trapped_time == [0.0, T]


def test_orbit_ending_inside_the_trapped_region():
    """K < QN: r -> 0, so the last interval is cut at the final time."""
    params, X, Y = under_linear()
    ratio, z_norm, speed = linear_closed_form(params, X, Y)
    T, eps, N = 40.0, 0.3, X.shape[0]
    result = tp.trap(params, X, Y, eps, options=tight(time=T))
    row = result.table[-1]
    s_cross = scipy.optimize.brentq(lambda s: ratio(s) - eps, 0.0, T, xtol=1e-14)
    assert ratio(0.0) > eps > ratio(T)
    assert len(result.table) == 1 and row["to_end"] and row["s1"] == T
    assert row["s0"] == pytest.approx(s_cross, rel=CLOSED_FORM_RTOL)
    arc, _ = scipy.integrate.quad(speed, s_cross, T, epsabs=0, epsrel=1e-12, limit=200)
    assert row["arc_length"] == pytest.approx(arc, rel=CLOSED_FORM_RTOL)
    bound = N * arc / (eps * z_norm(s_cross))
    assert row["bound"] == pytest.approx(bound, rel=CLOSED_FORM_RTOL)
    assert row["length"] >= row["bound_sharp"] >= row["bound"]
    assert not row["violated"]


def test_identity_p2_against_the_closed_form():
    """L_U = (1/N) int_I r |z| ds, both sides independently computed."""
    params, X, Y = under_linear()
    ratio, z_norm, _ = linear_closed_form(params, X, Y)
    N = X.shape[0]
    result = tp.trap(params, X, Y, [0.3, 0.6], options=tight(time=40.0))
    for row in result.table:
        rhs, _ = scipy.integrate.quad(
            lambda s: ratio(s) * z_norm(s) / N,
            row["s0"],
            row["s1"],
            epsabs=0,
            epsrel=1e-12,
            limit=200,
        )
        assert row["arc_length"] == pytest.approx(rhs, rel=QUAD_RTOL)


def test_reversed_orbit_is_flagged_loudly():
    """|z| grows along the reversed orbit: the bound fails and says so."""
    params, X, Y = orthogonal_linear()
    flow = fl.integrate(params, X, Y, tight(time=3.0, record=121))
    s, theta = flow.records["s"], flow.records["theta"]
    with pytest.warns(tp.BoundViolationWarning, match="not a failure"):
        result = tp.trap_records(s, theta[::-1], X, Y, [3, 1], 2.5)
    assert result.status == "violated" and result.bound_violations == 1
    assert "BOUND VIOLATED" in result.message
    assert result.table[0]["z_rise"] > 1.0
    assert result.interpolation_defect > 1.0


# --------------------------------------------------------------------------
# A nonlinear plateau: P1, P2, P3
# --------------------------------------------------------------------------


def test_p1_bound_and_sharper_bound_on_every_component(plateau):
    result = plateau[0]
    assert result.status == "ok" and result.bound_violations == 0
    assert len(result.table) >= 3
    for row in result.table:
        assert row["length"] >= row["bound"]
        assert row["length"] >= row["bound_sharp"] >= row["bound"] * (1 - 1e-12)
        assert row["bound"] >= row["bound_chord"]
        assert row["r_max"] <= row["eps"] * (1 + 1e-9)
        assert row["z_rise"] <= 1e-9
    assert any(row["from_start"] for row in result.table)


def pointwise(params_widths, X, Y, theta):
    """r and |z| at theta by the network's own functions."""
    params = nw.unflatten(theta, params_widths)
    z = (nw.forward(params, X, "tanh") - Y).ravel()
    grad = nw.vjp(params, X, z / X.shape[0], "tanh")
    return X.shape[0] * np.linalg.norm(grad) / np.linalg.norm(z), np.linalg.norm(z)


def test_p2_identity_on_a_fine_grid(plateau):
    result, params, X, Y = plateau
    widths, N = nw.widths_of(params), X.shape[0]
    for row in result.table:
        s = np.linspace(row["s0"], row["s1"], 2001)
        values = np.array([pointwise(widths, X, Y, result.orbit(t)) for t in s])
        rhs = scipy.integrate.simpson(values[:, 0] * values[:, 1], x=s) / N
        assert row["arc_length"] == pytest.approx(rhs, rel=QUAD_RTOL)
    stored = result.arrays()
    valid = ~np.isnan(stored["r"])
    assert np.allclose(
        N * stored["speed"][valid],
        stored["r"][valid] * stored["z_norm"][valid],
        rtol=1e-12,
    )


def test_p3_polyline_grows_toward_the_arc_length(plateau):
    result = plateau[0]
    row = max(result.table, key=lambda r: r["length"])
    lengths = []
    for n in (5, 17, 65, 257, 1025):
        s = np.linspace(row["s0"], row["s1"], n)
        theta = np.array([result.orbit(t) for t in s])
        lengths.append(np.linalg.norm(np.diff(theta, axis=0), axis=1).sum())
    tol = QUAD_RTOL * row["arc_length"]
    assert np.all(np.diff(lengths) >= 0)
    assert lengths[-1] <= row["arc_length"] + tol
    assert lengths[-1] == pytest.approx(row["arc_length"], rel=QUAD_RTOL)
    for r in result.table:
        assert r["chord"] <= r["polyline"] <= r["arc_length"] + tol


# --------------------------------------------------------------------------
# Comparison, recorded orbits, results
# --------------------------------------------------------------------------


def test_comparison_times_in_closed_form():
    """G = 4 I, N = 3: C = e^(-8s/3) C0 (standard), e^(-2s/3) C0 (adapted)."""
    params, X, Y = orthogonal_linear()
    stages = set()
    result = tp.trap(
        params,
        X,
        Y,
        2.5,
        options=tight(time=12.0),
        compare=True,
        compare_damping=0.0,
        progress=lambda stage, done, total: stages.add(stage),
    )
    d = result.as_dict()
    decades = math.log(1 / tp.THRESHOLD_REL)
    assert d["time_to_threshold_standard"] == pytest.approx(3 / 8 * decades, rel=1e-8)
    assert d["time_to_threshold_adapted"] == pytest.approx(3 / 2 * decades, rel=1e-8)
    assert d["adapted_damping"] == 0.0
    assert stages == {"standard", "profile", "adapted", "adapted_profile"}


def test_adapted_flow_escapes_much_sooner(plateau):
    result, _, X, _ = plateau
    d = result.as_dict()
    t_std, t_ad = d["time_to_threshold_standard"], d["time_to_threshold_adapted"]
    assert t_std is not None and t_ad is not None
    assert t_ad < t_std / 10
    # Damped full-rank adapted flow: C = e^(-2s/N) C0 up to the damping.
    N = X.shape[0]
    assert t_ad == pytest.approx(N / 2 * math.log(1 / tp.THRESHOLD_REL), rel=1e-2)
    cost = result.profile["cost"]
    k = np.searchsorted(result.profile["s"], t_std)
    assert cost[k - 1] > d["threshold"] >= cost[k]
    for std, ad in zip(d["trapped_share_standard"], d["trapped_share_adapted"]):
        assert ad < 0.01 < std


def test_records_reproduce_the_integrated_intervals(plateau):
    result, params, X, Y = plateau
    flow = result.flow
    again = tp.trap_records(
        flow.records["s"], flow.records["theta"], X, Y, nw.widths_of(params), result.eps
    )
    assert again.source == "records" and again.bound_violations == 0
    assert len(again.table) == len(result.table)
    for a, b in zip(again.table, result.table):
        assert a["s0"] == pytest.approx(b["s0"], rel=1e-4, abs=1e-6)
        assert a["s1"] == pytest.approx(b["s1"], rel=1e-4)
        assert a["arc_length"] == pytest.approx(b["arc_length"], rel=1e-3)


def test_as_dict_and_arrays(plateau):
    result = plateau[0]
    d = result.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["intervals"] == len(d["interval_table"]) == sum(d["intervals_per_eps"])
    assert d["eps"] == [0.03, 0.1] and len(d["trapped_time"]) == 2
    assert d["bound_violations"] == 0
    arrays = result.arrays()
    n = d["intervals"]
    for key in tp.TABLE_KEYS:
        assert arrays[f"interval_{key}"].shape == (n,)
    size = arrays["s"].size
    for key in ("r", "speed", "z_norm", "cost"):
        assert arrays[key].shape == (size,)
    assert arrays["adapted_s"].size > 0
    assert arrays["ntk_eigenvalues"].shape == (d["QN"],)


@pytest.mark.parametrize("solver", ["DOP853", "euler"])
def test_on_step_pieces_chain_into_the_orbit(solver):
    """flows.integrate(on_step=...) hands over theta(s) on [0, s_final]."""
    params, X, Y = orthogonal_linear()
    pieces = []
    options = tight(time=1.0, record=11, solver=solver, step=0.01)
    flow = fl.integrate(
        params, X, Y, options, on_step=lambda d, a, b: pieces.append((a, b, d))
    )
    starts = np.array([a for a, _, _ in pieces])
    ends = np.array([b for _, b, _ in pieces])
    assert starts[0] == 0.0 and ends[-1] == flow.s_final
    assert np.array_equal(starts[1:], ends[:-1])
    for s, theta in zip(flow.records["s"], flow.records["theta"]):
        k = min(np.searchsorted(ends, s), len(pieces) - 1)
        assert np.allclose(pieces[k][2](s), theta, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------
# Critical points
# --------------------------------------------------------------------------


def test_rank_of_d_with_duplicated_inputs():
    """3 distinct inputs, Q = 2: rank D = 6 exactly, critical dim K - 6."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3, 3))[[0, 0, 1, 1, 2, 2]]
    Y = rng.standard_normal((6, 2))
    params = nw.init_params([3, 6, 2], rng=4, scheme="glorot", bias_scale=0.1)
    point = tp.critical_point(params, X, Y)
    K = nw.param_count([3, 6, 2])
    assert point.rank == 6 and point.critical_dimension == K - 6
    assert point.QN == 12 and point.K == K
    grad = nw.vjp(params, X, (nw.forward(params, X, "tanh") - Y) / 6, "tanh")
    assert point.grad_norm == pytest.approx(np.linalg.norm(grad), rel=1e-12)
    # The residual's within-pair differences are invisible to D.
    z = nw.forward(params, X, "tanh") - Y
    diff = (z[0::2] - z[1::2]) / 2
    share = math.sqrt(2 * np.sum(diff**2)) / np.linalg.norm(z)
    assert point.residual_outside_range == pytest.approx(share, rel=1e-8)


def test_underparametrized_orbit_ends_trapped_near_a_critical_point():
    params, X, Y = tp.make_scenario("underparametrized", 0)
    result = tp.trap(params, X, Y, 0.1, options=tight(time=200.0))
    d = result.as_dict()
    assert d["K"] < d["QN"] and d["bound_violations"] == 0
    assert result.table[-1]["to_end"]
    assert d["rank_D"] <= d["K"]
    assert d["critical_dimension"] == d["K"] - d["rank_D"]
    assert d["ratio_final"] < 0.1


# --------------------------------------------------------------------------
# Scenarios and argument checks
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("near_duplicates", {"spread": 1e-2}),
        ("dead_units", {"activation": "softplus", "margin": 4.0}),
    ],
)
def test_scenarios_spend_most_of_the_time_trapped(name, knobs):
    params, X, Y = tp.make_scenario(name, 0, **knobs)
    result = tp.trap(
        params,
        X,
        Y,
        0.1,
        options=tight(time=300.0),
        activation=knobs.get("activation", "tanh"),
    )
    assert result.bound_violations == 0
    assert result.trapped_time[0] > 0.5 * result.s_final


def test_small_init_scales_every_parameter():
    params, X, Y = tp.make_scenario("small_init", 1, scale=1.0)
    small = tp.small_init(params, 1e-2)
    assert np.allclose(nw.flatten(small), 1e-2 * nw.flatten(params))


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_dead_units_push_preactivations_below_the_margin(activation):
    params, X, Y = tp.make_scenario(
        "dead_units", 2, activation=activation, fraction=0.5, margin=2.0, hidden=(6, 6)
    )
    cache = nw.forward_cache(params, X, activation)
    for Z in cache.preactivations[:-1]:
        dead = np.all(Z <= -2.0 + 1e-12, axis=0)
        assert np.count_nonzero(dead) >= 3
    if activation == "relu":
        D = nw.jacobian(params, X, "relu")
        assert np.count_nonzero(np.all(D == 0, axis=0)) > 0


def test_near_duplicates_form_tight_groups():
    rng = np.random.default_rng(5)
    X = tp.near_duplicates(rng.standard_normal((9, 2)), 3, 1e-4, rng=6)
    groups = np.arange(9) % 3
    for g in range(3):
        members = X[groups == g]
        assert np.max(np.abs(members - members[0])) < 1e-3
    assert np.min(np.abs(X[0] - X[1])) > 1e-3


def test_underparametrized_scenario_has_fewer_parameters_than_outputs():
    params, X, Y = tp.make_scenario("underparametrized", 0, n_samples=12)
    assert nw.param_count(nw.widths_of(params)) < Y.size


def test_unknown_scenario_and_bad_arguments_are_explained():
    params, X, Y = orthogonal_linear()
    with pytest.raises(ValueError, match="scenario: expected one of"):
        tp.apply_scenario("frozen", params, X, Y)
    with pytest.raises(ValueError, match="eps"):
        tp.trap(params, X, Y, [], options=tight(time=1.0))
    with pytest.raises(NotImplementedError, match="L2"):
        tp.trap(
            params, X, np.full_like(Y, 0.5), 0.1, options=tight(time=1.0, loss="ce")
        )
    with pytest.raises(NotImplementedError, match="euler"):
        tp.trap(params, X, Y, 0.1, options=tight(time=1.0, solver="euler", step=0.1))
