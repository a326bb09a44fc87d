"""Shallow network and exact least-squares values (reference 7, 9 items 9, 10, 12).

Samples are rows: ``X`` has shape (N, M), ``Y[j]`` is ``y_j``. The reference's
``X -> G X`` (columns) is ``X -> X G^T`` here. Reference values are computed in
this file by independent routes: exact fractions worked out by hand, the
normal equations solved directly, and ``numpy.linalg.lstsq``.
"""

from fractions import Fraction as F

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlmin.core import construct as cs
from dlmin.core import shallow as sh
from dlmin.core.data import clusters

REL_TOL = 1e-12  # closed forms against each other (reference section 9 item 10)
LSTSQ_TOL = 1e-10  # closed forms against a numerical least-squares solve
FAMILY = [(Q, M) for Q in (2, 3, 5) for M in (Q, Q + 3)]


def assert_rel(value, expected, tol, what):
    err = abs(value - expected) / max(abs(expected), 1e-300)
    assert err <= tol, (
        f"{what}: {value!r} vs {expected!r}, rel. error {err:.3g} > {tol:.1g}"
    )


def family(Q, M, seed, radius=0.05):
    """Reference random family: means 2 e_j + 0.3 u_Q, unequal sizes, uniform balls."""
    rng = np.random.default_rng(seed)
    means = np.zeros((Q, M))
    means[:, :Q] = 2.0 * np.eye(Q) + 0.3
    means[:, Q:] = rng.uniform(-0.5, 0.5, (Q, M - Q))
    sizes = rng.choice(np.arange(30, 81), Q, replace=False)
    d = clusters(Q, M, sizes, radius, rng, layout="given", means=means)
    return d.X, d.labels, rng.standard_normal((Q, Q))


def lstsq_cost(X, labels, Y, intercept):
    """Weighted least squares by numpy on sqrt(1/N_j)-scaled rows."""
    sw = 1.0 / np.sqrt(np.bincount(labels)[labels])
    D = np.hstack([X, np.ones((len(X), 1))]) if intercept else X
    sol = np.linalg.lstsq(D * sw[:, None], Y[labels] * sw[:, None], rcond=None)[0]
    return float((((D @ sol - Y[labels]) * sw[:, None]) ** 2).sum())


# ------------------------------------------------------- hand-derived example

# Q = M = 2, two points per class. Means (2, 0) and (0, 1), so X^red = diag(2, 1).
# Class 0: (2, +-1/2), deviations (0, +-1/2) -> coordinates (0, +-1/2).
# Class 1: (+-3/10, 1), deviations (+-3/10, 0) -> coordinates (+-3/20, 0).
# delta_P = 1/2;  Delta_2 = (1/2)(2 (3/20)^2 e1e1^T) + (1/2)(2 (1/2)^2 e2e2^T)
#                        = diag(9/400, 1/4).
# Y = I:  constructed = Tr Delta_2 = 109/400;  bound = Q |Y|^2 delta_P^2 = 1/2.
# Linear LS = Tr(D2 (I + D2)^{-1}) = (9/400)/(409/400) + (1/4)/(5/4) = 9/409 + 1/5
#           = 454/2045 (also 2 - 4/4.09 - 1/1.25 from S_0 = diag(4.09, 1.25)).
# Affine: x_bar = (1, 1/2), X~ = +-(1, -1/2), Y_c = (1/2)[[1, -1], [-1, 1]],
#   E = diag(9/100, 1/4), x~^T E^{-1} x~ = 100/9 + 1 = 109/9 = k,
#   value = Tr(Y_c (I + X~^T E^{-1} X~)^{-1} Y_c^T) = 1 / (1 + 2k) = 9/227.
# Relative gap = 1 - (454/2045) / (109/400) = 41305/222905; |D2|/(1+|D2|) = 1/5.
HAND_X = np.array([[2.0, 0.5], [2.0, -0.5], [0.3, 1.0], [-0.3, 1.0]])
HAND_LABELS = np.array([0, 0, 1, 1])
HAND = {
    "delta_P": F(1, 2),
    "cost": F(109, 400),
    "bound": F(1, 2),
    "ls_no_intercept": F(454, 2045),
    "ls_intercept": F(9, 227),
    "rel_gap": F(41305, 222905),
    "op_bound": F(1, 5),
    "gap_bound": F(1, 3),
}


def test_hand_example_exact_values():
    r = sh.build_shallow(HAND_X, HAND_LABELS, np.eye(2))
    assert r.status == "ok" and r.identity_regime
    for name, got in [
        ("delta_P", r.delta_P),
        ("cost", r.cost),
        ("cost", r.cost_formula),
        ("bound", r.bound),
        ("ls_no_intercept", r.ls_no_intercept),
        ("ls_no_intercept", r.ls_trace),
        ("ls_intercept", r.ls_intercept),
        ("rel_gap", r.gap.rel_gap),
        ("op_bound", r.gap.op_bound),
        ("gap_bound", r.gap.bound),
    ]:
        assert_rel(got, float(HAND[name]), REL_TOL, name)
    _, D2 = sh.barycentric(HAND_X, HAND_LABELS)
    assert np.allclose(D2, np.diag([9 / 400, 1 / 4]), rtol=0, atol=1e-15)
    assert r.gap.within


def test_hand_example_scaled_targets_scale_every_value():
    """Y -> 3Y multiplies every cost and the bound by 9 and leaves the gap alone."""
    r = sh.build_shallow(HAND_X, HAND_LABELS, 3.0 * np.eye(2))
    for name, got in [
        ("cost", r.cost),
        ("bound", r.bound),
        ("ls_intercept", r.ls_intercept),
        ("ls_no_intercept", r.ls_no_intercept),
    ]:
        assert_rel(got, 9 * float(HAND[name]), REL_TOL, name)
    assert_rel(r.gap.rel_gap, float(HAND["rel_gap"]), REL_TOL, "rel_gap")


# ------------------------------------------------------------ random family


@pytest.mark.parametrize("Q,M", FAMILY)
def test_constructed_cost_equals_formula_and_bound(Q, M):
    X, labels, Y = family(Q, M, seed=10 * Q + M)
    r = sh.build_shallow(X, labels, Y)
    assert r.status == "ok" and r.identity_regime
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    coords = np.linalg.pinv(means.T) @ (X - means[labels]).T  # (X^red)^+ dX, (Q, N)
    w = 1.0 / np.bincount(labels)[labels]
    by_hand = float((w * ((Y.T @ coords) ** 2).sum(axis=0)).sum())
    assert_rel(r.cost, by_hand, 1e-10, "forward pass against |Y (X^red)^+ dX|_N^2")
    assert_rel(r.cost_formula, by_hand, REL_TOL, "cost formula")
    dP = np.linalg.norm(coords, axis=0).max()
    assert_rel(r.delta_P, dP, REL_TOL, "delta_P")
    assert r.cost <= Q * np.linalg.norm(Y, 2) ** 2 * dP**2
    assert_rel(r.bound, Q * np.linalg.norm(Y, 2) ** 2 * dP**2, REL_TOL, "bound")


@pytest.mark.parametrize("Q,M", [(3, 3), (3, 6)])
def test_scaling_deviations_scales_cost_quadratically(Q, M):
    X, labels, Y = family(Q, M, seed=7)
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    base = sh.build_shallow(X, labels, Y)
    for eps in (0.5, 1e-3):
        r = sh.build_shallow(means[labels] + eps * (X - means[labels]), labels, Y)
        assert_rel(r.cost, eps**2 * base.cost, 1e-9, f"cost at eps = {eps}")
        assert_rel(r.delta_P, eps * base.delta_P, 1e-9, f"delta_P at eps = {eps}")


@pytest.mark.parametrize("Q", [2, 3, 5])
def test_square_case_least_squares_values(Q):
    X, labels, Y = family(Q, Q, seed=Q)
    r = sh.build_shallow(X, labels, Y)
    assert_rel(r.ls_no_intercept, r.ls_trace, REL_TOL, "linear LS against Tr formula")
    assert_rel(
        r.ls_no_intercept, lstsq_cost(X, labels, Y, False), LSTSQ_TOL, "linear lstsq"
    )
    assert_rel(
        r.ls_intercept, lstsq_cost(X, labels, Y, True), LSTSQ_TOL, "affine lstsq"
    )
    assert_rel(
        r.ls_intercept, affine_formula_invertible_E(X, labels, Y), 1e-10, "affine form"
    )
    assert r.gap.within
    assert 0.0 <= r.gap.rel_gap <= r.gap.op_bound <= r.gap.bound
    assert r.ls_intercept <= r.ls_no_intercept <= r.cost


def affine_formula_invertible_E(X, labels, Y):
    """Tr(Y_c (I + X~^T E^{-1} X~)^{-1} Y_c^T), the section 7 form for invertible E."""
    Q = Y.shape[0]
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    dev = X - means[labels]
    w = 1.0 / np.bincount(labels)[labels]
    E = dev.T @ (w[:, None] * dev)
    Xt = (means - means.mean(axis=0)).T  # columns x_j - x_bar
    Yc = (Y - Y.mean(axis=0)).T  # columns y_j - y_bar
    K = np.eye(Q) + Xt.T @ np.linalg.solve(E, Xt)
    return float(np.trace(Yc @ np.linalg.solve(K, Yc.T)))


@pytest.mark.parametrize("Q,M", [(2, 5), (3, 6)])
def test_general_dimension_order_of_values(Q, M):
    """dim > Q: lstsq = general formula; affine <= linear <= trace <= constructed."""
    X, labels, Y = family(Q, M, seed=3)
    r = sh.build_shallow(X, labels, Y)
    assert_rel(r.ls_no_intercept, lstsq_cost(X, labels, Y, False), LSTSQ_TOL, "linear")
    assert_rel(r.ls_intercept, lstsq_cost(X, labels, Y, True), LSTSQ_TOL, "affine")
    slack = 1 + 1e-12
    assert r.ls_intercept <= r.ls_no_intercept * slack
    assert r.ls_no_intercept <= r.ls_trace * slack <= r.cost * slack**2
    assert r.gap.within


@given(
    st.integers(2, 4),
    st.integers(0, 3),
    st.floats(0.01, 0.5),
    st.integers(0, 2**32 - 1),
)
def test_value_order_and_gap_for_random_families(Q, extra, radius, seed):
    X, labels, Y = family(Q, Q + extra, seed, radius)
    r = sh.build_shallow(X, labels, Y)
    assert r.status == "ok"
    slack = 1 + 1e-12
    assert r.ls_intercept <= r.ls_no_intercept * slack
    assert r.ls_no_intercept <= r.ls_trace * slack and r.ls_trace <= r.cost * slack
    assert_rel(r.cost, r.cost_formula, 1e-9, "cost formula")
    assert r.cost <= r.bound * slack and r.gap.within


# ------------------------------------------------------------ invariances


def test_invariance_under_linear_input_maps():
    """X -> G X, G in GL(Q): Delta_1, Delta_2, delta_P and the linear value stay."""
    Q = 3
    X, labels, Y = family(Q, Q, seed=11)
    rng = np.random.default_rng(5)
    G = rng.standard_normal((Q, Q)) + 2 * np.eye(Q)
    D1, D2 = sh.barycentric(X, labels)
    D1g, D2g = sh.barycentric(X @ G.T, labels)
    assert np.abs(D1g - D1).max() <= 1e-10 * np.abs(D1).max()
    assert np.abs(D2g - D2).max() <= 1e-10 * np.abs(D2).max()
    assert_rel(sh.delta_P(X @ G.T, labels), sh.delta_P(X, labels), 1e-10, "delta_P")
    assert_rel(
        sh.ls_value(X @ G.T, labels, Y), sh.ls_value(X, labels, Y), 1e-10, "linear"
    )


def test_invariance_of_affine_value_under_affine_maps():
    Q = 3
    X, labels, Y = family(Q, Q + 2, seed=12)
    rng = np.random.default_rng(6)
    G = rng.standard_normal((Q + 2, Q + 2)) + 2 * np.eye(Q + 2)
    a = rng.standard_normal(Q + 2) * 5
    base = sh.ls_value(X, labels, Y, intercept=True)
    moved = sh.ls_value(X @ G.T + a, labels, Y, intercept=True)
    assert_rel(moved, base, 1e-9, "affine")
    # A translation is no symmetry of the linear value: its closed form moves.
    linear = sh.ls_value(X, labels, Y)
    assert sh.ls_value(X + a, labels, Y) != pytest.approx(linear, rel=1e-6)


def test_rotation_R_changes_weights_not_the_network():
    X, labels, Y = family(3, 5, seed=2)
    rng = np.random.default_rng(1)
    R, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = sh.build_shallow(X, labels, Y), sh.build_shallow(X, labels, Y, R=R)
    assert np.abs(a.layers[0][0] - b.layers[0][0]).max() > 1e-3
    assert np.abs(a.predict(X) - b.predict(X)).max() <= 1e-12
    assert_rel(b.cost, a.cost, 1e-10, "cost with R")


def test_predictions_follow_metric_rule():
    Q, M = 3, 5
    X, labels, Y = family(Q, M, seed=4, radius=0.6)
    r = sh.build_shallow(X, labels, Y)
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    out = r.predict(X)
    by_output = np.argmin(((out[:, None, :] - Y[None]) ** 2).sum(axis=2), axis=1)
    assert (by_output == sh.metric_rule(X, means, Y)).all()


# --------------------------------------------------------------- failures


def test_dependent_means_and_bad_arguments():
    X = np.array([[1.0, 0.0], [1.2, 0.0], [2.0, 0.0], [2.2, 0.0]])
    labels = np.array([0, 0, 1, 1])
    r = sh.build_shallow(X, labels, np.eye(2))
    assert r.status == "failed" and "linearly dependent" in r.message
    with pytest.raises(ValueError, match="linearly dependent"):
        sh.delta_P(X, labels)
    with pytest.raises(ValueError, match="Q <= M"):
        sh.build_shallow(X[:, :1], labels, np.eye(2))
    with pytest.raises(ValueError, match="orthogonal"):
        sh.build_shallow(
            HAND_X, HAND_LABELS, np.eye(2), R=np.array([[1.0, 1.0], [0.0, 1.0]])
        )


def test_small_beta_leaves_identity_regime():
    r = sh.build_shallow(HAND_X, HAND_LABELS, np.eye(2), beta=0.0)
    assert r.status == "failed" and not r.identity_regime and "beta" in r.message
    assert abs(r.cost - r.cost_formula) > 1e-3  # clipped: not x -> Y (X^red)^+ x
    assert cs.cost(r.predict(HAND_X), HAND_LABELS, np.eye(2)) == r.cost
