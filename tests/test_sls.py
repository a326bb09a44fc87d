"""Construction B on sequentially separable data (reference sections 5, 9 items 8, 12).

Samples are rows: ``X`` has shape (N, M), ``Y[j]`` is ``y_j``; an order lists
0-based classes in collapse order. Two hand-made data sets pin down the
order search: "bars" (classes 0 and 1 are long parallel bars, class 2 a
blob between them whose centre is the midpoint of a point of each bar, so
class 2 can never go first) and "crossing" (two segments that cross, so no
order exists). Separability claims are re-checked here with an LP of our own.
"""

import numpy as np
import pytest
from scipy.optimize import linprog

from dlmin.core import construct as cs
from dlmin.core import sls
from dlmin.core.data import DataError, clusters

COST_RTOL = 1e-16  # squared cost in units of cond^2 (reference section 9)
POINT_TOL = 1e-10  # truncated points against apexes, relative to cond
FINE_GRID = np.linspace(0.01, 0.99, 99)  # t-grid of the papers' LP form
GENERATED = [(2, 2), (3, 3), (4, 6), (5, 5)]


def separable(A, B):
    """Our own LP: is there (h, c) with h.a + c <= -1 on A and >= 1 on B?"""
    n = A.shape[1] + 1
    rows = np.vstack([
        np.hstack([A, np.ones((len(A), 1))]),
        -np.hstack([B, np.ones((len(B), 1))]),
    ])
    res = linprog(
        np.zeros(n),
        A_ub=rows,
        b_ub=-np.ones(len(rows)),
        bounds=[(None, None)] * n,
        method="highs",
    )
    assert res.status in (0, 2), res.message
    return res.status == 0


def bars():
    """Bars y = 4 (class 0), y = 0 (class 1), x in [-3, 3]; blob at (1, 2) (class 2).

    Coordinates (x, y, 1). The blob centre (1, 2) is the midpoint of (1, 4)
    and (1, 0), so class 2 can never go first. Means (0, 4), (0, 0), (1, 2),
    barycenter (1/3, 2); c0 = 3 / (2/3) = 4.5. After class 0, class 2 is
    separable only when p_0 is near the barycenter: the edge from (3, 0) to
    p_0 = (t/3, 4 - 2t) passes above the blob for t = 1/2, below for t = 0.98.
    """
    g = np.linspace(-3.0, 3.0, 13)
    u = np.linspace(-0.2, 0.2, 5)
    blob = np.array([(1.0 + a, 2.0 + b) for a in u for b in u])
    X = np.vstack([np.c_[g, np.full(13, 4.0)], np.c_[g, np.zeros(13)], blob])
    return np.c_[X, np.ones(len(X))], np.repeat([0, 1, 2], [13, 13, 25])


def crossing():
    """Two crossing segments; the barycenter (0.1, 0.625) lies on neither."""
    a = np.c_[np.linspace(-1, 1, 9), np.zeros(9)]
    b = np.c_[np.full(9, 0.2), np.linspace(-1, 3, 9)]
    X = np.vstack([a, b])
    return np.c_[X, np.ones(len(X))], np.repeat([0, 1], 9)


def hand_stats(X, labels):
    Q = labels.max() + 1
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    return means, means.mean(axis=0)


def assert_zero_cost(r, X, labels, Y):
    assert r.status == "ok" and r.certified, r.message
    out = r.predict(X)
    cost = sum(
        ((out[labels == j] - Y[j]) ** 2).sum() / (labels == j).sum()
        for j in range(Y.shape[0])
    )
    tol = COST_RTOL * r.cond**2 * max(1.0, (Y**2).sum())
    assert cost <= tol, f"C_N {cost:.3g} above {tol:.3g} (cond {r.cond:.3g})"
    assert r.costs["C_N"] <= tol


def assert_description(r, X, labels):
    """Apexes on their segments and planes, angles in (theta_min, pi), |h| = 1."""
    means, bary = hand_stats(X, labels)
    Q, M = means.shape
    assert r.description.shape == (Q, M + 2)
    assert np.all(r.theta_min < r.theta) and np.all(r.theta < np.pi)
    for row, pl in zip(r.description, r.planes):
        h, t = row[1:-1], row[-1]
        assert abs(np.linalg.norm(h) - 1) <= 1e-12 and 0 < t < 1
        apex = t * bary + (1 - t) * means[pl.cls]
        assert np.abs(apex - pl.apex).max() <= 1e-12 * max(1, np.abs(X).max())
        assert abs(h @ apex + pl.offset) <= 1e-12 * max(1, np.abs(X).max())
        assert (X[labels == pl.cls] @ h + pl.offset).max() < 0


# ------------------------------------------------------------ zero cost


@pytest.mark.parametrize("Q,M", GENERATED)
def test_generated_sls_data_reach_zero_cost(Q, M):
    rng = np.random.default_rng(100 + 10 * Q + M)
    d = sls.make_sls_data(Q, M, rng.integers(30, 80, Q), rng)
    cond = cs.clustered_conditions(d.X, d.labels)
    assert cond.c0 >= 0.25 or not np.max(cond.theta_j) < np.pi
    assert cs.build_clustered(d.X, d.labels, d.Y).status == "failed"
    r = sls.build_sls(d.X, d.labels, d.Y)
    assert_zero_cost(r, d.X, d.labels, d.Y)
    assert_description(r, d.X, d.labels)
    final = r.truncated[-1]
    assert np.abs(final - r.apexes[d.labels]).max() <= POINT_TOL * r.cond
    assert r.composition_error <= POINT_TOL * r.cond


def test_far_from_clustered_bars_reach_zero_cost():
    X, labels = bars()
    cond = cs.clustered_conditions(X, labels)
    assert abs(cond.c0 - 4.5) < 1e-12  # eighteen times the clustered limit 1/4
    r = sls.build_sls(X, labels, np.eye(3))
    assert r.order[0] in (0, 1) and r.search.found
    assert_zero_cost(r, X, labels, np.eye(3))
    assert_description(r, X, labels)


def test_given_hyperplanes_from_the_generator():
    rng = np.random.default_rng(4)
    d = sls.make_sls_data(3, 4, 40, rng, order=[2, 0, 1])
    r = sls.build_sls(
        d.X, d.labels, d.Y, order=d.extra["order"], planes=d.extra["planes"]
    )
    assert r.search is None and r.order == [2, 0, 1]
    assert_zero_cost(r, d.X, d.labels, d.Y)
    assert_description(r, d.X, d.labels)


def test_clustered_data_are_sls_with_normals_f():
    d = clusters(3, 4, [30, 45, 60], 0.05, np.random.default_rng(8), scale=2.0)
    cond = cs.clustered_conditions(d.X, d.labels)
    means, _ = hand_stats(d.X, d.labels)
    p = means + 2.5 * cond.radius * cond.f
    planes = np.hstack([cond.f, -(cond.f * p).sum(axis=1, keepdims=True)])
    r = sls.build_sls(d.X, d.labels, d.Y, order=[0, 1, 2], planes=planes)
    assert_zero_cost(r, d.X, d.labels, d.Y)
    assert np.abs(r.apexes - p).max() <= 1e-12
    assert sls.find_sls_order(d.X, d.labels).found


# ------------------------------------------------------------ failures


def test_order_that_must_fail_names_its_blockers():
    X, labels = bars()
    res = sls.find_sls_order(X, labels, order=[2, 0, 1])
    assert not res.found and res.order == []
    assert "class 2" in res.message and "classes 0 and 1 together" in res.message
    (block,) = res.dead_end
    assert (block.cls, block.classes, block.apexes) == (2, [0, 1], [])
    assert not block.barycenter
    assert [b.cls for b in res.first_step] == [2]
    assert not sls.sls_step_feasible(X, labels, [2, 0, 1], 0)
    assert not any(
        sls.sls_step_feasible(X, labels, [2, 0, 1], 0, t=t) for t in (0.1, 0.5, 0.9)
    )
    # our own LP: each bar alone can be cut from the blob, both together cannot
    blob, bar0, bar1 = (X[labels == j] for j in (2, 0, 1))
    assert separable(blob, bar0) and separable(blob, bar1)
    assert not separable(blob, np.vstack([bar0, bar1]))


def test_no_order_exists_for_crossing_segments():
    X, labels = crossing()
    res = sls.find_sls_order(X, labels)
    assert not res.found and res.exhaustive
    assert {b.cls: b.classes for b in res.first_step} == {0: [1], 1: [0]}
    assert "no SLS order exists" in res.message
    r = sls.build_sls(X, labels, np.eye(2))
    assert r.status == "failed" and r.message == res.message and not r.layers
    a, b = X[labels == 0], X[labels == 1]
    assert not separable(a, b) and not separable(b, a)


def test_orders_with_apex_trouble_retry_on_the_t_grid():
    """Order (0, 2, 1): p_0 mid-range blocks class 2; p_0 near x_bar does not."""
    X, labels = bars()
    res = sls.find_sls_order(X, labels, order=[0, 2, 1])
    assert res.found and res.policy == "top"
    assert res.planes[0].t > 0.9


# ------------------------------------------------------------ LP forms agree


def lp_cases():
    X, labels = bars()
    means, bary = hand_stats(X, labels)
    t_lo, t_hi = sls.sls_t_range(X, labels, [0, 2, 1], 0)
    mid = (t_lo + t_hi) / 2
    apex = lambda t: (t * bary + (1 - t) * means[0])[None]  # noqa: E731
    Xc, lc = crossing()
    rng = np.random.default_rng(3)
    d = sls.make_sls_data(3, 3, 15, rng, order=[0, 1, 2])
    return [
        ("bars first 0", X, labels, [0, 1, 2], 0, None),
        ("bars first 2", X, labels, [2, 0, 1], 0, None),
        ("bars 2 after p_0 mid", X, labels, [0, 2, 1], 1, apex(mid)),
        ("bars 2 after p_0 high", X, labels, [0, 2, 1], 1, apex(0.98)),
        ("crossing", Xc, lc, [0, 1], 0, None),
        ("generated step 1", d.X, d.labels, [0, 1, 2], 1, first_apex(d.X, d.labels)),
    ]


def first_apex(X, labels):
    """Apex of the first step of order (0, 1, 2) as the search puts it, shape (1, M)."""
    return sls.find_sls_order(X, labels, order=[0, 1, 2]).planes[0].apex[None]


@pytest.mark.parametrize("case", lp_cases(), ids=lambda c: c[0])
def test_t_free_and_t_grid_lps_agree(case):
    _, X, labels, order, step, apexes = case
    free = sls.sls_step_feasible(X, labels, order, step, apexes)
    grid = np.array([
        sls.sls_step_feasible(X, labels, order, step, apexes, t=t) for t in FINE_GRID
    ])
    assert free == grid.any()
    ends = sls.sls_t_range(X, labels, order, step, apexes)
    if not free:
        assert ends is None
        return
    t_lo, t_hi = ends  # the feasible positions are exactly the open range
    inside = (FINE_GRID > t_lo + 1e-6) & (FINE_GRID < t_hi - 1e-6)
    outside = (FINE_GRID < t_lo - 1e-6) | (FINE_GRID > t_hi + 1e-6)
    assert grid[inside].all() and not grid[outside].any()


def test_expected_feasibility_of_the_lp_cases():
    verdicts = {c[0]: sls.sls_step_feasible(*c[1:]) for c in lp_cases()}
    assert verdicts == {
        "bars first 0": True,
        "bars first 2": False,
        "bars 2 after p_0 mid": False,
        "bars 2 after p_0 high": True,
        "crossing": False,
        "generated step 1": True,
    }


# ------------------------------------------------------------ network facts


def test_hidden_layers_do_not_depend_on_Y_and_singular_Y_works():
    rng = np.random.default_rng(5)
    d = sls.make_sls_data(3, 3, 40, rng)
    G = rng.standard_normal((3, 3))
    Y_sing = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]])
    a = sls.build_sls(d.X, d.labels, d.Y)
    b = sls.build_sls(d.X, d.labels, Y_sing)
    c = sls.build_sls(d.X, d.labels, d.Y @ G.T)
    for (Wa, ba), (Wb, bb) in zip(a.layers[:-1], b.layers[:-1]):
        assert np.array_equal(Wa, Wb) and np.array_equal(ba, bb)
    assert_zero_cost(b, d.X, d.labels, Y_sing)
    # Y -> G Y (columns) is Y -> Y G^T (rows): the output layer becomes G W_out
    assert np.abs(c.layers[-1][0] - G @ a.layers[-1][0]).max() <= 1e-9 * np.abs(G).max()


def test_orthogonal_transform_and_padding():
    rng = np.random.default_rng(6)
    d = sls.make_sls_data(3, 4, 35, rng)
    O, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    r = sls.build_sls(d.X @ O.T, d.labels, d.Y)
    assert_zero_cost(r, d.X @ O.T, d.labels, d.Y)
    shifted = d.X + rng.standard_normal(4)  # means stay linearly independent
    assert_zero_cost(sls.build_sls(shifted, d.labels, d.Y), shifted, d.labels, d.Y)
    base = sls.build_sls(d.X, d.labels, d.Y, hidden_layers=3)
    padded = sls.build_sls(d.X, d.labels, d.Y, hidden_layers=5, intercept=True)
    assert len(padded.layers) == 6
    diff = np.abs(padded.predict(d.X) - base.predict(d.X)).max()
    assert diff <= POINT_TOL * base.cond
    short = sls.build_sls(d.X, d.labels, d.Y, hidden_layers=2)
    assert short.status == "ok" and short.costs["C_N"] > 1e-6
    assert "only 2 of 3" in short.message


def test_generator_promises():
    rng = np.random.default_rng(7)
    d = sls.make_sls_data(4, 5, [30, 40, 50, 60], rng, order=[3, 1, 0, 2])
    order, H = d.extra["order"], d.extra["planes"]
    means, bary = hand_stats(d.X, d.labels)
    apexes = []
    for k, cls in enumerate(order):
        h, c = H[k, :-1], H[k, -1]
        assert (d.X[d.labels == cls] @ h + c).max() < 0
        later = np.isin(d.labels, order[k + 1 :])
        assert (d.X[later] @ h + c > 0).all() and h @ bary + c > 0
        assert all(h @ p + c > 0 for p in apexes)
        g0, g1 = h @ means[cls] + c, h @ bary + c
        t = g0 / (g0 - g1)
        apexes.append(t * bary + (1 - t) * means[cls])
        assert sls.sls_step_feasible(d.X, d.labels, order, k, np.array(apexes[:-1]))
    assert np.bincount(d.labels).tolist() == [30, 40, 50, 60]


def test_bad_arguments():
    X, labels = bars()
    with pytest.raises(ValueError, match="permutation"):
        sls.find_sls_order(X, labels, order=[0, 0, 1])
    with pytest.raises(ValueError, match="t_grid"):
        sls.find_sls_order(X, labels, t_grid=[0.0, 0.5])
    with pytest.raises(ValueError, match="at least 2 classes"):
        sls.find_sls_order(X, np.zeros(len(X), int))
    bad = np.tile([0.0, 1.0, 0.0, -10.0], (3, 1))  # y = 10: every mean is below
    with pytest.raises(ValueError, match="open segment"):
        sls.build_sls(X, labels, np.eye(3), order=[0, 1, 2], planes=bad)
    with pytest.raises(ValueError, match="collapse order"):
        sls.build_sls(X, labels, np.eye(3), planes=bad)
    with pytest.raises(DataError, match="Q <= M"):
        sls.make_sls_data(4, 3, 10, np.random.default_rng(0))
