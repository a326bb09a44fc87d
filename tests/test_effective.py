"""Effective (beta, R) flow of one truncation layer: flows.md section 11 (h).

Tests E1-E6 of the reference, each against a quantity computed here
independently of the code under test: finite differences of the cost through
the truncation map of :mod:`dlmin.core.truncation`, a Heun integration with
its own sign-based vector field, and closed forms. Errors are reported in
units of the tolerance. Samples are rows: a cluster has shape (n, Q).
"""

import json

import numpy as np
import pytest
import scipy.linalg

from dlmin.core import effective as ef
from dlmin.core.truncation import truncate_beta

FD_TOL = 1e-7  # E1: central differences against the gradients
KINK_GAP = 1e-3  # E1: min |v_i| so that no stencil crosses a kink
FORM_TOL = 1e-14  # E2: skew-part and commutator forms of Omega, relative
ORTH_TOL = 1e-12  # E3: |R^T R - I| along the fixed-step schemes
EVENT_TOL = 1e-6  # E4: event scheme against a fine fixed-step integration
SLOPE_TOL = 1e-6  # E5: slope of log C after the collapse
ROUND = 1e-13  # rounding allowance, relative, for monotone sequences

# Reference integrator of E4: Heun with this base step (its smooth error per
# unit time is about rate^3 h^2 / 6, below 1e-7 for rates up to 2) and steps
# across a pattern change halved down to this length (error per crossing at
# most H_MIN times the jump of the field, about 1e-9).
H_REF = 2.5e-4
H_MIN = 1e-7


def assert_within(err, tol, what):
    """Fail with the error measured in units of the tolerance."""
    ratio = err / tol
    assert ratio <= 1.0, f"{what}: error {err:.3g} is {ratio:.3g} x {tol:.1g}"


def orthogonal(rng, Q):
    """Haar-random orthogonal matrix, shape (Q, Q)."""
    q, r = np.linalg.qr(rng.standard_normal((Q, Q)))
    return q * np.sign(np.diag(r))


def cost_via_truncation(clusters, Y, beta, R):
    """``sum_c 1/2 mean |tau(xi) - y_c|^2`` through the library's truncation map."""
    return sum(
        0.5 * np.mean(np.sum((truncate_beta(R, beta, X) - y) ** 2, 1))
        for X, y in zip(clusters, Y)
    )


def off_kink_data(rng, Q, sizes):
    """Clusters, targets, beta and R with every ``|v_i| > KINK_GAP``.

    Points straddle the hyperplanes (both states occur in every coordinate);
    the few too close to a kink are dropped.
    """
    R, beta = orthogonal(rng, Q), rng.standard_normal(Q)
    clusters, Y = [], rng.standard_normal((len(sizes), Q))
    for n in sizes:
        X = rng.standard_normal((n, Q)) - beta
        V = (X + beta) @ R.T
        clusters.append(X[np.min(np.abs(V), axis=1) > KINK_GAP])
    return clusters, Y, beta, R


def basis_skews(Q):
    """The Q(Q-1)/2 skew matrices ``e_i e_k^T - e_k e_i^T``, i < k."""
    for i in range(Q):
        for k in range(i + 1, Q):
            A = np.zeros((Q, Q))
            A[i, k], A[k, i] = 1.0, -1.0
            yield (i, k), A


# --------------------------------------------------------------------------
# Cost and gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[40], [30, 25, 20]])
def test_cost_is_the_truncation_map_cost(rng, sizes):
    """C(beta, R) equals the cost of tau_{W, W beta} for W = Lambda R."""
    clusters, Y, beta, R = off_kink_data(rng, 4, sizes)
    C = ef.effective_cost(clusters, Y, beta, R)
    assert_within(
        abs(C - cost_via_truncation(clusters, Y, beta, R)),
        1e-13 * C,
        "cost against truncate_beta",
    )
    W = np.diag(rng.uniform(0.5, 2.0, 4)) @ R  # activation-adapted weight
    assert_within(
        abs(C - cost_via_truncation(clusters, Y, beta, W)),
        1e-12 * C,
        "cost is independent of the diagonal factor",
    )


@pytest.mark.parametrize("sizes", [[60], [30, 25, 20]])
@pytest.mark.parametrize("Q", [2, 4])
def test_E1_gradients_match_central_differences(rng, Q, sizes):
    """E1: dC/dbeta and <Omega, A> against central differences of C."""
    clusters, Y, beta, R = off_kink_data(rng, Q, sizes)
    C = lambda b, M: ef.effective_cost(clusters, Y, b, M)  # noqa: E731
    g, Omega, q = ef.effective_gradients(clusters, Y, beta, R)
    assert np.all((q > 0) & (q < 1)), "data should straddle every hyperplane"

    eps = 1e-6  # C is quadratic in beta off the kinks: no truncation error
    for k in range(Q):
        e = eps * np.eye(Q)[k]
        fd = (C(beta + e, R) - C(beta - e, R)) / (2 * eps)
        assert_within(abs(fd - g[k]), FD_TOL, f"dC/dbeta_{k}")

    eps = 1e-5  # truncation error eps^2 C''' ~ 1e-10
    for (i, k), A in basis_skews(Q):
        up, down = scipy.linalg.expm(eps * A), scipy.linalg.expm(-eps * A)
        fd = (C(beta, up @ R) - C(beta, down @ R)) / (2 * eps)
        pairing = np.sum(Omega * A)  # tr(Omega^T A) = 2 Omega_ik
        assert_within(abs(fd - pairing), FD_TOL, f"<Omega, A_{i}{k}>")


@pytest.mark.parametrize("sizes", [[80], [30, 25, 20]])
def test_E2_skew_part_and_commutator_forms_agree(rng, sizes):
    """E2: the two formulas for Omega agree to rounding."""
    for _ in range(5):
        clusters, Y, beta, R = off_kink_data(rng, 5, sizes)
        a = ef.effective_gradients(clusters, Y, beta, R, form="commutator")
        b = ef.effective_gradients(clusters, Y, beta, R, form="skew")
        scale = np.linalg.norm(a.Omega)
        assert scale > 1e-2
        assert_within(
            np.linalg.norm(a.Omega - b.Omega),
            FORM_TOL * scale,
            "skew-part against commutator form",
        )
        assert np.allclose(a.Omega, -a.Omega.T, rtol=0, atol=0)
        assert np.array_equal(a.grad_beta, b.grad_beta)


def test_several_clusters_add_up(rng):
    """C, dC/dbeta and Omega of several clusters are sums of one-cluster values."""
    clusters, Y, beta, R = off_kink_data(rng, 3, [30, 25, 20])
    total = ef.effective_gradients(clusters, Y, beta, R)
    parts = [ef.effective_gradients(X, y, beta, R) for X, y in zip(clusters, Y)]
    assert np.allclose(
        total.grad_beta, sum(p.grad_beta for p in parts), rtol=1e-14, atol=1e-15
    )
    assert np.allclose(total.Omega, sum(p.Omega for p in parts), rtol=1e-14, atol=1e-15)
    assert np.array_equal(total.q, np.vstack([p.q for p in parts]))
    C = ef.effective_cost(clusters, Y, beta, R)
    assert np.isclose(
        C,
        sum(ef.effective_cost(X, y, beta, R) for X, y in zip(clusters, Y)),
        rtol=1e-14,
    )


def test_flow_direction_descends_at_the_stated_rate(rng):
    """Along (beta', R') = (-g, -Omega R), dC/ds = -|g|^2 - |Omega|_F^2."""
    clusters, Y, beta, R = off_kink_data(rng, 3, [60, 40])
    g, Omega, _ = ef.effective_gradients(clusters, Y, beta, R)

    def along(eps):
        M = scipy.linalg.expm(-eps * Omega) @ R
        return ef.effective_cost(clusters, Y, beta - eps * g, M)

    eps = 1e-5
    slope = (along(eps) - along(-eps)) / (2 * eps)
    assert_within(abs(slope + g @ g + np.sum(Omega**2)), FD_TOL, "dC/ds")


# --------------------------------------------------------------------------
# Fixed-step schemes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("stepper", ["heun", "euler"])
@pytest.mark.parametrize("method", ["cayley", "lie-euler"])
def test_E3_monotone_and_orthogonal(method, stepper):
    """E3: C and |beta + y| never increase and R stays orthogonal."""
    clusters, Y, beta, R = off_kink_data(np.random.default_rng(0), 3, [60])
    res = ef.integrate_effective(
        clusters,
        Y,
        beta,
        R,
        time=2.0,
        step=1e-2,
        method=method,
        stepper=stepper,
        record="steps",
    )
    rec = res.records
    assert rec["omega_norm"][0] > 1.0, "the rotation must actually act"
    assert np.linalg.norm(res.R - R) > 1.0
    C, dist = rec["cost"], rec["distance"][:, 0]
    assert_within(max(np.diff(C).max(), 0.0), ROUND * C[0], "cost increase")
    assert_within(max(np.diff(dist).max(), 0.0), ROUND * dist[0], "|beta + y| increase")
    assert C[-1] < 0.1 * C[0]
    assert_within(res.orthogonality_error, ORTH_TOL, "|R^T R - I|")
    assert res.contraction_bound is None and "Omega" in res.contraction_bound_reason


def test_fixed_step_is_first_order_against_events():
    """Euler's error against the exact event solution halves with h."""
    rng = np.random.default_rng(3)
    sc = ef.effective_scenario(2, 80, 0.5, rng, rotation=0.3)
    args = (sc.clusters, sc.y_tilde, sc.beta0, sc.R0)
    exact = ef.integrate_effective(*args, time=2.0, method="events", record=11).records[
        "beta"
    ]
    errors = []
    for h in (4e-3, 2e-3, 1e-3):
        res = ef.integrate_effective(
            *args, time=2.0, step=h, freeze_R=True, stepper="euler", record=11
        )
        errors.append(np.abs(res.records["beta"] - exact).max())
    order = np.polyfit(np.log([4e-3, 2e-3, 1e-3]), np.log(errors), 1)[0]
    assert 0.8 < order < 1.3, f"observed order {order:.3g}, errors {errors}"


def test_lie_euler_step_is_the_matrix_exponential(rng):
    """One Lie-Euler step is R1 = expm(-h Omega) R0 with SciPy's expm."""
    clusters, Y, beta, R = off_kink_data(rng, 4, [50])
    Omega = ef.effective_gradients(clusters, Y, beta, R).Omega
    res = ef.integrate_effective(
        clusters,
        Y,
        beta,
        R,
        time=0.3,
        step=0.3,
        method="lie-euler",
        stepper="euler",
        record=2,
    )
    expected = scipy.linalg.expm(-0.3 * Omega) @ R
    assert_within(np.abs(res.R - expected).max(), 1e-14, "expm step")


# --------------------------------------------------------------------------
# Event-driven scheme
# --------------------------------------------------------------------------


def reference_beta(clusters, Y, beta, R, times):
    """Heun for ``beta' = -sum_c R^T q_c R (beta + y_c)`` with ``R`` fixed.

    Own sign-based field (``v = R (xi + beta) <= 0`` truncated); a step
    across which the activation pattern changes is halved down to ``H_MIN``.
    Returns beta at ``times``, shape (len(times), Q).
    """
    P = [X @ R.T for X in clusters]
    Yr = Y @ R.T

    def pattern(b):
        return np.concatenate([(p + b > 0).ravel() for p in P])

    def field(b):
        q = np.array([np.mean(p + b <= 0, axis=0) for p in P])
        return -np.sum(q * (b + Yr), axis=0)

    def advance(b, h):
        f = field(b)
        b1 = b + 0.5 * h * (f + field(b + h * f))
        if h <= H_MIN or np.array_equal(pattern(b1), pattern(b)):
            return b1
        return advance(advance(b, 0.5 * h), 0.5 * h)

    b, s, out = R @ beta, 0.0, []
    for t in times:
        while s < t - 1e-12:
            h = min(H_REF, t - s)
            b, s = advance(b, h), s + h
        out.append(R.T @ b)
    return np.array(out)


def assert_events_match_reference(clusters, Y, beta, R, time):
    res = ef.integrate_effective(
        clusters, Y, beta, R, time=time, method="events", record=9
    )
    ref = reference_beta(clusters, Y, beta, R, res.records["s"])
    scale = max(1.0, np.abs(beta).max())
    assert_within(
        np.abs(res.records["beta"] - ref).max(),
        EVENT_TOL * scale,
        "event scheme against refined Heun",
    )
    return res


def test_E4_events_match_fine_integration_one_cluster():
    """E4: one cluster, R frozen away from the identity."""
    rng = np.random.default_rng(11)
    sc = ef.effective_scenario(3, 60, 0.5, rng, rotation=0.5)
    res = assert_events_match_reference(sc.clusters, sc.y_tilde, sc.beta0, sc.R0, 2.0)
    assert res.flips > 60 and res.contraction_time is not None


def test_E4_events_match_fine_integration_two_clusters():
    """E4: two clusters share beta, the fixed point moves at every flip."""
    rng = np.random.default_rng(12)
    sc = ef.effective_scenario(2, 50, 0.5, rng, rotation=0.3, n_clusters=2, spread=0.5)
    res = assert_events_match_reference(sc.clusters, sc.y_tilde, sc.beta0, sc.R0, 2.0)
    assert res.flips > 50 and not res.stuck_coordinates


def test_E4_ties_zero_length_steps_and_idle_coordinates():
    """Duplicated points, a point on its kink and a coordinate with q = 0."""
    rng = np.random.default_rng(13)
    X = np.vstack([rng.uniform(-2.0, -0.2, (10, 2))] * 2)  # exact duplicates
    X[:, 1] = np.abs(X[:, 1]) + 0.5  # coordinate 1: every point active
    y, beta, R = np.zeros(2), np.array([1.0, 0.0]), np.eye(2)
    X[[0, 10], 0] = -beta[0]  # on the kink v_0 = 0: truncated by convention
    res = assert_events_match_reference([X], y, beta, R, 2.0)
    assert res.records["q"][0, 1] == 0.0 and res.beta[1] == beta[1]
    assert res.flips % 2 == 0, "duplicates cross together, in pairs"
    assert res.contraction_bound is None
    assert "margin" in res.contraction_bound_reason


def test_events_leave_truncation_and_stop_on_the_flat_side():
    """w < 0: points leave truncation one by one; after the last, w stays put.

    Closed form: u = xi = (0.3, 0.7, 1.2), w(0) = -1.5, all truncated; w
    rises as exp(-q s) and points leave at w = -1.2, -0.7, -0.3 with
    q = 1, 2/3, 1/3 before; then q = 0 and w = -0.3 for ever.
    """
    X, y, beta = np.array([[0.3], [0.7], [1.2]]), np.zeros(1), np.array([-1.5])
    edges = np.cumsum([
        0.0,
        np.log(1.5 / 1.2),
        1.5 * np.log(1.2 / 0.7),
        3.0 * np.log(0.7 / 0.3),
    ])
    rates, starts = np.array([1.0, 2 / 3, 1 / 3]), np.array([-1.5, -1.2, -0.7])

    def w(s):
        k = min(np.searchsorted(edges, s, side="right") - 1, 3)
        if k == 3:
            return -0.3
        return starts[k] * np.exp(-rates[k] * (s - edges[k]))

    res = ef.integrate_effective(
        [X], y, beta, np.eye(1), time=6.0, method="events", record=25
    )
    exact = np.array([w(s) for s in res.records["s"]])
    assert_within(
        np.abs(res.records["beta"][:, 0] - exact).max(),
        1e-14,
        "against the closed form",
    )
    assert res.flips == 3 and res.records["q"][-1, 0] == 0.0


def test_events_hold_a_coordinate_at_a_two_sided_kink():
    """Two clusters whose pulls meet at a kink: the flow stops there."""
    far = np.array([[-10.0]])  # always truncated, pulls beta towards -3
    kink = np.array([[0.0]])  # truncated iff beta <= 0, pulls towards 6
    Y = np.array([[3.0], [-6.0]])
    res = ef.integrate_effective(
        [far, kink], Y, np.array([1.0]), np.eye(1), time=5.0, method="events"
    )
    assert res.stuck_coordinates == [0] and res.beta[0] == 0.0
    assert "kink" in res.message


# --------------------------------------------------------------------------
# Contraction (E5) and equilibria (E6)
# --------------------------------------------------------------------------


def post_collapse_slope(res):
    """Slope of log C over the records after the contraction time."""
    rec = res.records
    after = rec["s"] > res.contraction_time
    assert after.sum() >= 5
    return np.polyfit(rec["s"][after], np.log(rec["cost"][after]), 1)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_E5_frozen_rotation_contracts_before_the_bound(seed):
    """E5: with R frozen the cluster is a point by s*, then C ~ exp(-2 s)."""
    rng = np.random.default_rng(seed)
    sc = ef.effective_scenario(3, 100, 0.5, rng, rotation=0.3)
    res = ef.integrate_effective(
        sc.clusters, sc.y_tilde, sc.beta0, sc.R0, time=8.0, method="events", record=81
    )
    bound = res.contraction_bound
    assert bound is not None, res.contraction_bound_reason
    assert 0.0 < res.contraction_time <= bound
    assert res.contraction_times == [res.contraction_time]
    after = res.records["s"] > res.contraction_time
    assert np.all(res.records["q"][after] == 1.0)
    assert_within(abs(post_collapse_slope(res) + 2.0), SLOPE_TOL, "slope of log C")


def test_E5_one_dimension_contracts_with_the_fixed_step_scheme(rng):
    """E5 for Q = 1 (Omega = 0 without freezing) with Cayley and Heun."""
    sc = ef.effective_scenario(1, 200, 0.3, rng)
    res = ef.integrate_effective(
        sc.clusters, sc.y_tilde, sc.beta0, sc.R0, time=5.0, step=1e-3, record=51
    )
    assert res.contraction_bound is not None
    assert 0.0 < res.contraction_time <= res.contraction_bound + 1e-3
    assert_within(abs(post_collapse_slope(res) + 2.0), SLOPE_TOL, "slope of log C")


def test_bound_is_refused_outside_its_assumptions(rng):
    """No bound for several clusters, for a margin <= 0 or a trapped state."""
    sc = ef.effective_scenario(2, 30, 0.5, rng, n_clusters=2)
    bound, why = ef.contraction_bound(sc.clusters, sc.y_tilde, sc.beta0, sc.R0)
    assert bound is None and "one cluster" in why
    trapped = ef.effective_scenario(2, 30, 0.5, rng, trapped=True)
    bound, why = ef.contraction_bound(
        trapped.clusters, trapped.y_tilde, trapped.beta0, trapped.R0
    )
    assert bound is None and "margin" in why


@pytest.mark.parametrize("method", ["cayley", "lie-euler", "events"])
def test_E6_collapsed_cluster_at_its_target_is_an_exact_equilibrium(rng, method):
    """E6: beta = -y with every point truncated: beta' = 0, Omega = 0, C = 0."""
    sc = ef.effective_scenario(3, 40, 0.5, rng, rotation=0.5)
    X, y = sc.clusters[0], sc.y_tilde[0]
    beta = -y
    g, Omega, q = ef.effective_gradients(X, y, beta, sc.R0)
    _, Omega_skew, _ = ef.effective_gradients(X, y, beta, sc.R0, form="skew")
    assert np.all(q == 1.0)
    assert not g.any() and not Omega.any() and not Omega_skew.any()
    assert ef.effective_cost(X, y, beta, sc.R0) == 0.0
    res = ef.integrate_effective(X, y, beta, sc.R0, time=1.0, step=0.1, method=method)
    assert np.array_equal(res.beta, beta) and np.array_equal(res.R, sc.R0)
    assert res.final_cost == 0.0 and res.contraction_time == 0.0


@pytest.mark.parametrize("method", ["cayley", "lie-euler", "events"])
def test_E6_cluster_in_the_positive_orthant_is_trapped(rng, method):
    """E6: every point active: beta' = 0, Omega = 0, the cost stays > 0."""
    sc = ef.effective_scenario(3, 40, 0.5, rng, rotation=0.5, trapped=True)
    args = (sc.clusters, sc.y_tilde, sc.beta0, sc.R0)
    g, Omega, q = ef.effective_gradients(*args)
    assert np.all(q == 0.0) and not g.any() and not Omega.any()
    skew = ef.effective_gradients(*args, form="skew").Omega
    assert np.abs(skew).max() <= 1e-14 * ef.effective_cost(*args)
    res = ef.integrate_effective(*args, time=1.0, step=0.1, method=method)
    assert np.array_equal(res.beta, sc.beta0) and np.array_equal(res.R, sc.R0)
    assert res.final_cost == res.initial_cost > 0.0
    assert res.contraction_time is None


# --------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------


def test_result_summary_and_records(rng):
    sc = ef.effective_scenario(2, 30, 0.5, rng, n_clusters=2)
    seen = []
    res = ef.integrate_effective(
        sc.clusters,
        sc.y_tilde,
        sc.beta0,
        sc.R0,
        time=1.0,
        step=0.05,
        record=[0.25, 0.5],
        progress=lambda s, t: seen.append(s),
    )
    summary = json.loads(json.dumps(res.as_dict()))
    for key in (
        "contraction_time",
        "contraction_bound",
        "final_cost",
        "orthogonality_error",
    ):
        assert key in summary
    rec = res.records
    assert np.allclose(rec["s"], [0.0, 0.25, 0.5, 1.0], rtol=0, atol=1e-15)
    shapes = {
        "beta": (4, 2),
        "R": (4, 2, 2),
        "q": (4, 2),
        "q_clusters": (4, 2, 2),
        "cost": (4,),
        "distance": (4, 2),
        "omega_norm": (4,),
        "orthogonality": (4,),
    }
    assert {k: rec[k].shape for k in shapes} == shapes
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 20


def test_bad_input_is_refused_with_a_reason(rng):
    sc = ef.effective_scenario(2, 10, 0.5, rng)
    args = (sc.clusters, sc.y_tilde, sc.beta0)
    with pytest.raises(ValueError, match="orthogonal"):
        ef.integrate_effective(*args, 2.0 * sc.R0, time=1.0)
    with pytest.raises(ValueError, match="freeze_R=True"):
        ef.integrate_effective(*args, sc.R0, time=1.0, method="events", freeze_R=False)
    with pytest.raises(ValueError, match="one target row per cluster"):
        ef.effective_cost(sc.clusters, np.zeros((3, 2)), sc.beta0, sc.R0)
    with pytest.raises(ValueError, match="method"):
        ef.integrate_effective(*args, sc.R0, time=1.0, method="rk45")
