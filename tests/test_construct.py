"""Costs, Construction A and its failure paths.

Reference sections 1, 4, 8, 9.6-9.7 and 9.12.

Samples are rows: ``X`` has shape (N, M), ``Y[j]`` is the target ``y_j`` and
``W`` has shape (out, in). The reference writes columns, so its ``Y -> G Y``
is ``Y -> Y G^T`` here. Class means, radii, apexes and angles are recomputed
in this file from their definitions, not taken from the code under test.
"""

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from dlmin.core import construct as cs
from dlmin.core import truncation as tr
from dlmin.core.data import clusters, uniform_ball

COST_TOL = 1e-20  # squared cost on clustered data, cond ~ 1 (reference section 9)
MATRIX_TOL = 1e-10  # matrix identities (reference section 9)
POINT_TOL = 1e-12  # truncated points against apexes, outputs against targets
GEN_RADIUS = 0.05  # ball radius of the reference's random family

seeds = st.integers(0, 2**32 - 1)
FAMILY = [(Q, M) for Q in range(2, 6) for M in (Q, Q + 3)]


def assert_within(err, tol, what):
    """Fail with the error measured in units of the tolerance."""
    ratio = err / tol
    msg = f"{what}: error {err:.3g} is {ratio:.3g} tolerances of {tol:.1g}"
    assert ratio <= 1.0, msg


def family_means(Q, M, rng):
    """Means 2 e_j + 0.3 u_Q in the first Q coordinates, random after, shape (Q, M)."""
    means = np.zeros((Q, M))
    means[:, :Q] = 2.0 * np.eye(Q) + 0.3
    means[:, Q:] = rng.uniform(-0.5, 0.5, (Q, M - Q))
    return means


def family(Q, M, seed, radius=GEN_RADIUS, targets=None):
    """The reference's random family: unequal N_j in 30..80, uniform balls."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice(np.arange(30, 81), Q, replace=False)
    means = family_means(Q, M, rng)
    return clusters(
        Q, M, sizes, radius, rng, layout="given", means=means, targets=targets
    )


def stats_by_hand(X, labels):
    """Means, delta, barycenter of the means and unit vectors f_j, by loops."""
    Q = labels.max() + 1
    means = np.array([X[labels == j].mean(axis=0) for j in range(Q)])
    delta = max(np.linalg.norm(x - means[j]) for x, j in zip(X, labels))
    bary = means.mean(axis=0)
    f = np.array([(bary - m) / np.linalg.norm(bary - m) for m in means])
    return means, delta, bary, f


def cost_by_hand(out, labels, Y):
    """C_N = sum_j (1/N_j) sum_i |out - y_j|^2, by loops."""
    total = 0.0
    for j in range(Y.shape[0]):
        rows = out[labels == j]
        total += ((rows - Y[j]) ** 2).sum() / len(rows)
    return total


def hidden(result):
    return result.layers[:-1]


def params_differ(a, b):
    """Largest difference between the parameters (all layers) of two constructions."""
    return max(
        max(np.abs(Wa - Wb).max(), np.abs(ba - bb).max())
        for (Wa, ba), (Wb, bb) in zip(a.layers, b.layers)
    )


def assert_zero_cost(result, X, labels, Y, tol=COST_TOL):
    """Status ok, certified, C_N ~ 0 both as stored and recomputed from predict."""
    assert result.status == "ok", result.message
    assert result.certified
    out = result.predict(X)
    scale = max(1.0, float((Y**2).sum()))
    assert_within(cost_by_hand(out, labels, Y), tol * scale, "C_N recomputed")
    for kind in ("C_N", "C_N_spread", "C_N_mismatch", "flow", "half_sum"):
        assert_within(result.costs[kind], tol * scale * len(X), kind)


# ------------------------------------------------------------------ costs


@st.composite
def labelled_outputs(draw):
    Q = draw(st.integers(1, 5))
    dim = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 12), min_size=Q, max_size=Q))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(Q), sizes))
    out = rng.standard_normal((labels.size, dim)) * rng.uniform(0.1, 10.0)
    Y = rng.standard_normal((Q, dim))
    return out, labels, Y


@given(labelled_outputs())
def test_cost_kinds_against_hand_formulas(case):
    out, labels, Y = case
    sq = [np.sum((o - Y[j]) ** 2) for o, j in zip(out, labels)]
    N = len(labels)
    c_n = cost_by_hand(out, labels, Y)
    assert abs(cs.cost(out, labels, Y) - c_n) <= 1e-12 * c_n
    assert abs(cs.cost(out, labels, Y, "flow") - sum(sq) / (2 * N)) <= 1e-12 * sum(sq)
    assert abs(cs.cost(out, labels, Y, "half_sum") - sum(sq) / 2) <= 1e-12 * sum(sq)


@given(labelled_outputs())
def test_cost_split_spread_plus_mismatch_is_C_N(case):
    """C_N = sum_j (1/N_j) sum_i |o - mean_j o|^2 + sum_j |mean_j o - y_j|^2."""
    out, labels, Y = case
    spread, mismatch = cs.cost_split(out, labels, Y)
    means = np.array([out[labels == j].mean(axis=0) for j in range(Y.shape[0])])
    spread_hand = sum(
        ((out[labels == j] - means[j]) ** 2).sum() / (labels == j).sum()
        for j in range(Y.shape[0])
    )
    mismatch_hand = ((means - Y) ** 2).sum()
    c_n = cost_by_hand(out, labels, Y)
    assert abs(spread - spread_hand) <= 1e-12 * c_n
    assert abs(mismatch - mismatch_hand) <= 1e-12 * c_n
    assert abs(spread + mismatch - c_n) <= 1e-12 * c_n
    costs = cs.all_costs(out, labels, Y)
    assert costs["C_N_spread"] == spread and costs["C_N_mismatch"] == mismatch
    assert abs(costs["C_N"] - c_n) <= 1e-12 * c_n


def test_cost_split_degenerate_cases(rng):
    labels = np.array([0, 0, 1, 2, 2, 2])
    Y = rng.standard_normal((3, 2))
    assert cs.all_costs(Y[labels], labels, Y) == {
        "C_N": 0.0,
        "C_N_spread": 0.0,
        "C_N_mismatch": 0.0,
        "flow": 0.0,
        "half_sum": 0.0,
    }

    shift = rng.standard_normal((3, 2))  # every class on one wrong point: spread 0
    spread, mismatch = cs.cost_split((Y + shift)[labels], labels, Y)
    assert spread < 1e-28
    assert abs(mismatch - (shift**2).sum()) <= 1e-12 * (shift**2).sum()

    # one point per class: spread 0 and C_N = sum_j |o_j - y_j|^2
    out = rng.standard_normal((3, 2))
    spread, mismatch = cs.cost_split(out, np.arange(3), Y)
    assert spread == 0.0
    assert abs(mismatch - ((out - Y) ** 2).sum()) <= 1e-12 * mismatch

    with pytest.raises(ValueError, match="kind"):
        cs.cost(out, np.arange(3), Y, kind="sqrt")
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        cs.cost_split(out[:2], np.array([0, 2]), Y)


# ------------------------------------------------------------ output fit


def weighted_normal_equations(Z, labels, Y, intercept):
    """argmin sum_k (1/N_j(k)) |A z_k + c - y_j(k)|^2 by the normal equations."""
    w = 1.0 / np.bincount(labels)[labels]
    D = np.hstack([Z, np.ones((len(Z), 1))]) if intercept else Z
    G = D.T @ (w[:, None] * D)
    sol = np.linalg.solve(G, D.T @ (w[:, None] * Y[labels]))
    return sol[: Z.shape[1]].T, (sol[-1] if intercept else np.zeros(Y.shape[1])), D, w


@pytest.mark.parametrize("intercept", [False, True])
def test_fit_output_against_normal_equations_and_lstsq(intercept, rng):
    Q, dim, out_dim = 3, 4, 2
    labels = np.repeat(np.arange(Q), [7, 12, 20])
    Z = rng.standard_normal((labels.size, dim)) + 3.0
    Y = rng.standard_normal((Q, out_dim))
    fit = cs.fit_output(Z, labels, Y, intercept=intercept)
    A, c, D, w = weighted_normal_equations(Z, labels, Y, intercept)
    assert_within(np.abs(fit.A - A).max(), MATRIX_TOL, "A")
    assert_within(np.abs(fit.c - c).max(), MATRIX_TOL, "c")
    assert fit.rank == dim + intercept

    sw = np.sqrt(w)
    sol = np.linalg.lstsq(D * sw[:, None], Y[labels] * sw[:, None], rcond=None)[0]
    assert_within(
        np.abs(fit.A - sol[:dim].T).max(), MATRIX_TOL, "A against numpy lstsq"
    )
    sv = np.linalg.svd(D * sw[:, None], compute_uv=False)
    assert abs(fit.cond - sv[0] / sv[-1]) <= 1e-8 * fit.cond

    # optimality: the weighted residual is orthogonal to the design's columns
    residual = Z @ fit.A.T + fit.c - Y[labels]
    assert_within(
        np.abs(D.T @ (w[:, None] * residual)).max(), MATRIX_TOL, "normal equations"
    )


def test_fit_output_intercept_never_worse(rng):
    labels = np.repeat(np.arange(3), [10, 15, 9])
    Z = rng.standard_normal((34, 3)) + 5.0
    Y = np.eye(3)
    costs = []
    for intercept in (False, True):
        fit = cs.fit_output(Z, labels, Y, intercept)
        costs.append(cs.cost(Z @ fit.A.T + fit.c, labels, Y))
    assert costs[1] <= costs[0] * (1 + 1e-12)


def test_fit_output_rank_deficient_designs_raise(rng):
    labels = np.repeat(np.arange(3), [4, 5, 6])
    Y = np.eye(3)
    dependent = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="linearly dependent"):
        cs.fit_output(dependent[labels], labels, Y)

    collinear = np.array([[1.0, 0.0, 1.0], [2.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    with pytest.raises(ValueError, match="affinely dependent"):
        cs.fit_output(collinear[labels], labels, Y, intercept=True)

    # three points in R^2 are always linearly dependent: fewer columns than classes
    plane = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(ValueError, match="rank 2, needs 3"):
        cs.fit_output(plane[labels], labels, Y)

    # ... but affinely independent, so an output bias fits every target exactly
    fit = cs.fit_output(plane[labels], labels, Y, intercept=True)
    assert_within(np.abs(plane @ fit.A.T + fit.c - Y).max(), MATRIX_TOL, "affine fit")
    # linearly dependent, affinely independent (collinear minus a point off the line)
    fit = cs.fit_output(dependent[labels], labels, Y, intercept=True)
    assert_within(
        np.abs(dependent @ fit.A.T + fit.c - Y).max(), MATRIX_TOL, "affine fit"
    )


# ------------------------------------------------------ assumption numbers


def brute_force_theta_star(means, f, radius, n_sphere, rng):
    """theta*_j = 2 max of angle(x - mean_j, f_j) over |x - mean_k| = 4 radius."""
    M = means.shape[1]
    S = rng.standard_normal((n_sphere, M))
    S *= 4.0 * radius / np.linalg.norm(S, axis=1, keepdims=True)
    theta = []
    for j in range(len(means)):
        worst = 0.0
        for k in range(len(means)):
            if k != j:
                D = means[k] + S - means[j]
                c = (D @ f[j]) / np.linalg.norm(D, axis=1)
                worst = max(worst, np.arccos(np.clip(c, -1, 1)).max())
        theta.append(2 * worst)
    return np.array(theta)


@pytest.mark.parametrize("Q, radius", [(2, 0.02), (3, 0.02), (3, 0.2)])
def test_clustered_conditions_against_brute_force(Q, radius):
    rng = np.random.default_rng(Q)
    means = rng.uniform(-1, 1, (Q, Q)) + 2.0 * np.eye(Q)
    ds = clusters(Q, Q, [5, 9, 14][:Q], radius, rng, layout="given", means=means)
    cond = cs.clustered_conditions(ds.X, ds.labels)
    m, delta, bary, f = stats_by_hand(ds.X, ds.labels)

    assert abs(cond.delta - delta) <= 1e-14 and cond.radius == cond.delta
    assert_within(np.abs(cond.f - f).max(), MATRIX_TOL, "f_j")
    c0 = delta / min(np.linalg.norm(m - bary, axis=1))
    assert abs(cond.c0 - c0) <= 1e-14 * c0
    brute = brute_force_theta_star(m, f, delta, 400_000, rng)
    assert np.all(brute <= cond.theta_j + 1e-12)  # samples cannot beat the maximum
    assert_within(np.abs(cond.theta_j - brute).max(), 1e-4, "theta*_j against sampling")
    assert cond.theta_star == max(cond.theta_j.max() + cs.THETA0, np.pi / 2)
    assert cond.ok


def test_clustered_conditions_closed_form_two_classes():
    """Q = 2: f_0 points at mean_1: theta*_j = 2 arcsin(4 delta / |mean_1 - mean_0|)."""
    X = np.array([[1.0, 0.0], [1.2, 0.0], [0.0, 2.0], [0.0, 2.0]])
    labels = np.array([0, 0, 1, 1])
    cond = cs.clustered_conditions(X, labels)
    d = np.linalg.norm([1.1, -2.0])
    assert abs(cond.delta - 0.1) < 1e-15
    np.testing.assert_allclose(cond.theta_j, 2 * np.arcsin(0.4 / d), rtol=1e-13)
    assert abs(cond.c0 - 0.1 / (d / 2)) < 1e-14
    assert cond.theta_star == np.pi / 2  # the angle never drops below 90 degrees
    cond = cs.clustered_conditions(X, labels, radius=0.3)  # a build radius above delta
    assert cond.radius == 0.3
    np.testing.assert_allclose(cond.theta_j, 2 * np.arcsin(1.2 / d), rtol=1e-13)


# ------------------------------------------------------------ Construction A


@pytest.mark.parametrize("Q, M", FAMILY)
def test_construction_A_on_the_random_family(Q, M):
    ds = family(Q, M, seed=100 * Q + M)
    res = cs.build_clustered(ds.X, ds.labels, ds.Y)
    assert_zero_cost(res, ds.X, ds.labels, ds.Y)
    assert res.message == ""
    assert len(res.layers) == Q + 1 and res.order == list(range(Q))
    assert res.max_output_error < 1e-12
    assert res.composition_error < 1e-12

    margin = cs.CERT_MARGIN_REL * max(1.0, np.abs(ds.X).max())
    assert res.margins.shape == (Q, 2) and np.all(res.margins >= margin)

    m, delta, bary, f = stats_by_hand(ds.X, ds.labels)
    assert res.conditions.ok
    assert (
        abs(res.conditions.c0 - delta / np.linalg.norm(m - bary, axis=1).min()) < 1e-14
    )
    lam = res.lam
    assert lam == tr.squeeze_factor(res.conditions.theta_star, M)
    for ell, (W, _) in enumerate(hidden(res), start=1):  # cond(W_l) <= 1/lambda^2
        assert np.linalg.cond(W) <= (1 + 1e-9) / lam**2, f"layer {ell}"


@pytest.mark.parametrize("Q, M", [(3, 3), (4, 7), (5, 5)])
def test_construction_A_layer_by_layer(Q, M):
    """Per layer: pre-activations <= -m on the class, >= m elsewhere (earlier apexes
    included), the class lands on its apex and every other point stays put."""
    ds = family(Q, M, seed=Q + 7 * M)
    order = list(np.random.default_rng(Q).permutation(Q))
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, order=order)
    assert res.status == "ok", res.message
    m, delta, bary, f = stats_by_hand(ds.X, ds.labels)
    apex = m + cs.MU_FACTOR * delta * f
    assert_within(
        np.abs(res.apexes - apex).max(), POINT_TOL, "p_j = mean_j + 2.5 delta f_j"
    )
    margin = cs.CERT_MARGIN_REL * max(1.0, np.abs(ds.X).max())

    for ell, j in enumerate(order):
        W, b = res.cumulative[ell]
        before, after = res.truncated[ell], res.truncated[ell + 1]
        Z = before @ W.T + b
        mine, others = ds.labels == j, ds.labels != j
        done = order[:ell]
        assert Z[mine].max() <= -margin
        assert Z[others].min() >= margin
        if done:
            assert (apex[done] @ W.T + b).min() >= margin
        collapse = -Z[mine].max()
        keep = min([Z[others].min()] + ([(apex[done] @ W.T + b).min()] if done else []))
        np.testing.assert_allclose(res.margins[ell], [collapse, keep], rtol=1e-12)

        assert_within(
            np.abs(after[mine] - apex[j]).max(), POINT_TOL, f"class {j} at p_{j}"
        )
        assert_within(
            np.abs(after[others] - before[others]).max(),
            POINT_TOL,
            f"layer {ell + 1} keeps the other points",
        )

    final = res.truncated[-1]
    for j in range(Q):
        assert_within(
            np.abs(final[ds.labels == j] - apex[j]).max(),
            POINT_TOL,
            f"x^(tau,Q) = p_{j}",
        )


@pytest.mark.parametrize("Q, M", [(2, 2), (4, 4), (5, 8)])
def test_apexes_are_independent_as_section_4_3_says(Q, M):
    """P^red = X^red A with A = diag(1 - t) + (1/Q) t u^T (rows); det A > 0."""
    ds = family(Q, M, seed=Q * M)
    res = cs.build_clustered(ds.X, ds.labels, ds.Y)
    m, delta, bary, f = stats_by_hand(ds.X, ds.labels)
    t = cs.MU_FACTOR * delta / np.linalg.norm(bary - m, axis=1)
    assert np.all((0 < t) & (t < 1))
    A = np.diag(1 - t) + np.outer(t, np.ones(Q)) / Q  # rows: P^red = A X^red
    assert_within(
        np.abs(A @ m - res.apexes).max(), POINT_TOL, "p_j = (1 - t_j) mean_j + t_j bary"
    )
    det = np.prod(1 - t) * (1 + np.sum(t / (Q * (1 - t))))
    assert abs(np.linalg.det(A) - det) <= 1e-12 and det > 0
    assert np.linalg.matrix_rank(res.apexes) == Q


@pytest.mark.parametrize("Q, M", [(2, 5), (3, 3), (5, 5)])
def test_unseen_points_in_the_build_balls_map_to_their_targets(Q, M):
    """Build for radius R = r_gen + max |c_j - mean_j|; then B_R(mean_j), and hence the
    generator ball B_r_gen(c_j), is mapped exactly to y_j (boundary points included)."""
    rng = np.random.default_rng(Q + M)
    Y = rng.standard_normal((Q, Q)) + 2 * np.eye(Q)
    ds = family(Q, M, seed=11 * Q + M, targets=Y)
    m, delta, _, _ = stats_by_hand(ds.X, ds.labels)
    R = GEN_RADIUS + np.linalg.norm(ds.centers - m, axis=1).max()
    res = cs.build_clustered(ds.X, ds.labels, Y, radius=R)
    assert res.status == "ok", res.message
    assert res.conditions.radius == R > delta

    sizes = np.full(Q, 200)
    X_gen, lab_gen = ds.resample(sizes, rng)
    sphere = rng.standard_normal((Q * 200, M))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    lab = np.repeat(np.arange(Q), 200)
    X_gen_sphere = ds.centers[lab] + GEN_RADIUS * sphere  # generator ball boundary
    X_build_sphere = m[lab] + R * sphere  # build ball boundary
    X_build_inside = m[lab] + uniform_ball(Q * 200, M, R, rng)
    for X, labels in [
        (X_gen, lab_gen),
        (X_gen_sphere, lab),
        (X_build_sphere, lab),
        (X_build_inside, lab),
    ]:
        err = np.abs(res.predict(X) - Y[labels]).max()
        assert_within(err, POINT_TOL * np.abs(Y).max(), "unseen point -> y_j")


@pytest.mark.parametrize("Q, M", [(3, 3), (4, 7)])
def test_predictions_follow_the_truncation_and_the_metric_rule(Q, M):
    """For any input: output = A tau(x) + c, and argmin_j |out - y_j| =
    argmin_j |Y (P^red)^+ (tau(x) - p_j)| (reference section 4.4)."""
    rng = np.random.default_rng(M)
    Y = rng.standard_normal((Q, Q)) + 3 * np.eye(Q)
    ds = family(Q, M, seed=5 * Q + M, targets=Y)
    res = cs.build_clustered(ds.X, ds.labels, Y)
    X = 3.0 * rng.standard_normal((500, M))
    Wc = [W for W, _ in res.cumulative]
    bc = [b for _, b in res.cumulative]
    T = tr.truncation_chain(Wc[:-1], bc[:-1], X)[-1]
    out = res.predict(X)
    assert_within(
        np.abs(out - (T @ Wc[-1].T + bc[-1])).max(),
        MATRIX_TOL * max(1.0, np.abs(out).max()),
        "composition identity",
    )
    A = Y.T @ np.linalg.pinv(res.apexes).T  # row form of Y (P^red)^+
    assert_within(np.abs(A - Wc[-1]).max(), MATRIX_TOL, "W^(Q+1) = Y (P^red)^+")
    by_output = np.argmin(np.linalg.norm(out[:, None, :] - Y[None], axis=2), axis=1)
    metric = np.linalg.norm((T[:, None, :] - res.apexes[None]) @ A.T, axis=2)
    assert np.array_equal(by_output, np.argmin(metric, axis=1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(mu_factor=2.05),
        dict(mu_factor=2.95),
        dict(theta0=0.3),
        dict(theta0=0.6),
        dict(order=[2, 0, 3, 1]),
    ],
)
def test_other_parameters_give_zero_cost_with_different_weights(kw):
    """A continuum of global minimizers: mu in (2, 3), theta0 and the order.

    (theta0 matters only once max theta*_j + theta0 passes 90 degrees; here
    max theta*_j is about 79 degrees.)
    """
    ds = family(4, 4, seed=44)
    base = cs.build_clustered(ds.X, ds.labels, ds.Y)
    other = cs.build_clustered(ds.X, ds.labels, ds.Y, **kw)
    assert_zero_cost(other, ds.X, ds.labels, ds.Y)
    assert params_differ(base, other) > 1e-3
    if "theta0" in kw:
        assert other.conditions.theta_star > base.conditions.theta_star + 0.1
    if "order" in kw:  # the apexes do not depend on the order
        assert_within(np.abs(other.apexes - base.apexes).max(), POINT_TOL, "apexes")
    if "mu_factor" in kw:
        m, delta, _, f = stats_by_hand(ds.X, ds.labels)
        assert_within(
            np.abs(other.apexes - (m + kw["mu_factor"] * delta * f)).max(),
            POINT_TOL,
            "apexes with mu_factor",
        )


def test_bad_build_arguments_raise():
    ds = family(3, 3, seed=3)
    for mu in (2.0, 3.0, 1.0):
        with pytest.raises(ValueError, match="mu_factor"):
            cs.build_clustered(ds.X, ds.labels, ds.Y, mu_factor=mu)
    with pytest.raises(ValueError, match="permutation"):
        cs.build_clustered(ds.X, ds.labels, ds.Y, order=[0, 0, 1])
    with pytest.raises(ValueError, match="hidden_layers"):
        cs.build_clustered(ds.X, ds.labels, ds.Y, hidden_layers=0)


@pytest.mark.parametrize("Q, M, extra", [(3, 3, 1), (4, 7, 3)])
def test_padding_with_identity_layers_leaves_outputs_unchanged(Q, M, extra, rng):
    ds = family(Q, M, seed=Q + M + extra)
    base = cs.build_clustered(ds.X, ds.labels, ds.Y)
    padded = cs.build_clustered(ds.X, ds.labels, ds.Y, hidden_layers=Q + extra)
    assert_zero_cost(padded, ds.X, ds.labels, ds.Y)
    assert len(padded.layers) == Q + extra + 1
    for W, b in padded.layers[Q : Q + extra]:
        np.testing.assert_array_equal(W, np.eye(M))
        np.testing.assert_array_equal(b, np.zeros(M))
    for W, W_rep in zip(padded.cumulative[Q : Q + extra], padded.cumulative[Q - 1 : Q]):
        np.testing.assert_array_equal(W[0], W_rep[0])
    X_any = np.vstack([ds.X, 4.0 * rng.standard_normal((300, M))])
    out = base.predict(X_any)
    assert_within(
        np.abs(padded.predict(X_any) - out).max(),
        POINT_TOL * max(1.0, np.abs(out).max()),
        "padded outputs",
    )


@pytest.mark.parametrize("Q, M", [(3, 3), (4, 4), (4, 7)])
def test_fewer_hidden_layers_collapse_exactly_that_many_classes(Q, M):
    ds = family(Q, M, seed=Q * 13 + M)
    for L in range(1, Q):
        res = cs.build_clustered(ds.X, ds.labels, ds.Y, hidden_layers=L)
        assert res.status == "ok" and res.certified
        assert f"only {L} of {Q} classes collapsed" in res.message
        assert len(res.layers) == L + 1
        collapsed = np.flatnonzero(~np.isnan(res.apexes[:, 0]))
        assert list(collapsed) == list(range(L))
        final = res.truncated[-1]
        out = res.predict(ds.X)
        for j in range(Q):
            rows = ds.labels == j
            if j < L:
                assert_within(
                    np.abs(final[rows] - res.apexes[j]).max(), POINT_TOL, "collapsed"
                )
                assert np.ptp(out[rows], axis=0).max() < 1e-12  # no output spread
            else:
                assert_within(np.abs(final[rows] - ds.X[rows]).max(), POINT_TOL, "kept")
                assert np.ptp(out[rows], axis=0).max() > 1e-6
        assert res.costs["C_N"] > 1e-8
        assert res.costs["C_N_spread"] > 1e-8


# ------------------------------------------------------------ invariances


def test_targets_change_only_the_output_layer(rng):
    """Y -> G Y (rows Y G^T): same hidden layers, W_out -> G W_out, b_out -> G b_out."""
    Q = 4
    ds = family(Q, 7, seed=21)
    base = cs.build_clustered(ds.X, ds.labels, ds.Y)
    G = rng.standard_normal((Q, Q)) + 2 * np.eye(Q)
    moved = cs.build_clustered(ds.X, ds.labels, ds.Y @ G.T)
    assert_zero_cost(
        moved, ds.X, ds.labels, ds.Y @ G.T, tol=COST_TOL * np.linalg.cond(G) ** 2
    )
    for (W, b), (W2, b2) in zip(hidden(base), hidden(moved)):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    (W, b), (W2, b2) = base.layers[-1], moved.layers[-1]
    scale = np.abs(G).max() * max(1.0, np.abs(W).max(), np.abs(b).max())
    assert_within(np.abs(W2 - G @ W).max(), MATRIX_TOL * scale, "W_out -> G W_out")
    assert_within(np.abs(b2 - G @ b).max(), MATRIX_TOL * scale, "b_out -> G b_out")


@pytest.mark.parametrize(
    "name", ["zero", "rank one", "two equal targets", "scalar output"]
)
def test_singular_and_non_square_targets_still_cost_zero(name, rng):
    Q = 4
    ds = family(Q, 4, seed=8)
    Y = {
        "zero": np.zeros((Q, Q)),
        "rank one": np.outer(rng.standard_normal(Q), rng.standard_normal(Q)),
        "two equal targets": np.vstack([np.eye(Q)[:3], np.eye(Q)[2]]),
        "scalar output": rng.standard_normal((Q, 1)),
    }[name]
    res = cs.build_clustered(ds.X, ds.labels, Y)
    assert_zero_cost(res, ds.X, ds.labels, Y)
    base = cs.build_clustered(ds.X, ds.labels, ds.Y)
    for (W, b), (W2, b2) in zip(hidden(base), hidden(res)):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)


@pytest.mark.parametrize("Q, M", [(3, 3), (4, 7)])
def test_rotated_and_translated_data_rebuild_with_zero_cost(Q, M, rng):
    """Only angles and distances enter: the geometry moves with the data."""
    ds = family(Q, M, seed=Q * M + 1)
    base = cs.build_clustered(ds.X, ds.labels, ds.Y)
    O = np.linalg.qr(rng.standard_normal((M, M)))[0]
    t = rng.uniform(-1.0, 1.0, M)
    for name, X, move in [
        ("rotated", ds.X @ O.T, lambda P: P @ O.T),
        ("translated", ds.X + t, lambda P: P + t),
        ("both", ds.X @ O.T + t, lambda P: P @ O.T + t),
    ]:
        means = np.array([X[ds.labels == j].mean(axis=0) for j in range(Q)])
        assert np.linalg.matrix_rank(means) == Q  # still linearly independent
        res = cs.build_clustered(X, ds.labels, ds.Y)
        assert_zero_cost(res, X, ds.labels, ds.Y)
        assert_within(np.abs(res.apexes - move(base.apexes)).max(), POINT_TOL, name)
        assert abs(res.conditions.theta_star - base.conditions.theta_star) < 1e-12
        assert abs(res.conditions.c0 - base.conditions.c0) < 1e-12


@pytest.mark.parametrize("Q, M", [(3, 3), (5, 8)])
def test_intercept_true_also_costs_zero(Q, M):
    ds = family(Q, M, seed=Q + 2 * M)
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, intercept=True)
    assert_zero_cost(res, ds.X, ds.labels, ds.Y)
    assert res.output_fit.rank == Q  # Q collapsed points: rank Q, min-norm solution


def test_single_point_classes_have_zero_radius_and_cost_zero():
    """Degenerate delta = 0: the build radius falls back to a tiny floor."""
    rng = np.random.default_rng(5)
    means = family_means(3, 5, rng)
    labels = np.array([0, 1, 1, 2])
    X = means[labels]
    res = cs.build_clustered(X, labels, np.eye(3))
    assert res.conditions.delta == 0.0 < res.conditions.radius
    assert_zero_cost(res, X, labels, np.eye(3))


# ------------------------------------------------------ assumption failures


def test_radius_too_large_fails_assumption_ii_with_its_c0():
    ds = family(3, 3, seed=31)
    m, _, bary, _ = stats_by_hand(ds.X, ds.labels)
    dmin = np.linalg.norm(m - bary, axis=1).min()
    radius = 0.26 * dmin
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=radius)
    assert res.status == "failed" and not res.certified and res.layers == []
    assert "assumption (ii)" in res.message
    assert f"{radius / dmin:.4g}" in res.message  # c0 = 0.26
    assert "(iii)" not in res.message and "(i)" not in res.message
    just_below = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.249 * dmin)
    assert just_below.status == "ok", just_below.message


def _two_close_means():
    rng = np.random.default_rng(9)
    means = np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 5.0]])
    return clusters(3, 3, [20, 25, 30], 0.02, rng, layout="given", means=means)


def test_overlapping_balls_fail_assumption_iii():
    """Means 0 and 1 are 0.1 apart, far from the barycenter: (ii) holds for r = 0.03,
    the balls B_4r overlap. (At r = 0.02 they do not, but the angle is too wide.)"""
    ds = _two_close_means()
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.03)  # 4 * 0.03 > 0.1
    assert res.status == "failed"
    assert "assumption (iii)" in res.message and "4 * radius = 0.12" in res.message
    assert "classes 0 and 1" in res.message
    assert "(ii)" not in res.message and "(i)" not in res.message
    assert np.isinf(res.conditions.theta_j[:2]).all()
    apart = cs.build_clustered(ds.X, ds.labels, ds.Y)  # 4 * delta < 0.1
    assert apart.status == "failed" and "4 * radius" not in apart.message
    assert "theta*_" in apart.message
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.03, strict=False)
    assert res.status == "failed" and "(iii)" in res.message  # a hard failure


def test_other_clusters_around_a_mean_fail_assumption_iii():
    """From mean 0 the others are at 90 and ~79 degrees from f_0: theta*_0 > 180 deg."""
    rng = np.random.default_rng(4)
    means = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [1.0, 0.2, 1.0]])
    ds = clusters(3, 3, [20, 20, 20], 0.005, rng, layout="given", means=means)
    res = cs.build_clustered(ds.X, ds.labels, ds.Y)
    assert res.status == "failed"
    assert "assumption (iii)" in res.message and "theta*_0" in res.message
    assert res.conditions.theta_j[0] > np.pi
    assert "(ii)" not in res.message


def test_theta0_pushing_the_angle_to_180_degrees_fails():
    ds = family(4, 4, seed=2)
    max_theta = cs.clustered_conditions(ds.X, ds.labels).theta_j.max()
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, theta0=np.pi - max_theta + 0.01)
    assert res.status == "failed" and "theta0" in res.message
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, theta0=np.pi - max_theta - 0.05)
    assert_zero_cost(res, ds.X, ds.labels, ds.Y, tol=COST_TOL / res.lam**2)


@pytest.mark.parametrize("case", ["M < Q", "collinear means"])
@pytest.mark.parametrize("strict", [True, False])
def test_dependent_means_fail_assumption_i(case, strict):
    rng = np.random.default_rng(6)
    if case == "M < Q":
        means = 2.0 * np.vstack([np.eye(3), [1.0, 1.0, 1.0]])
    else:  # three points on a line span only a plane
        means = np.array([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 3.0, 0.0]])
    Q = means.shape[0]
    ds = clusters(Q, 3, 20, 0.01, rng, layout="given", means=means)
    for j in range(Q):  # make the empirical means exactly the dependent ones
        ds.X[ds.labels == j] += means[j] - ds.X[ds.labels == j].mean(axis=0)
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, strict=strict)
    assert res.status == "failed" and not res.certified
    assert "assumption (i)" in res.message
    assert res.conditions.rank < Q


def _two_classes(radius):
    rng = np.random.default_rng(12)
    means = np.array([[2.3, 0.3], [0.3, 2.3]])
    return clusters(2, 2, [40, 50], radius, rng, layout="given", means=means)


def test_strict_false_builds_past_assumption_ii_when_the_geometry_allows():
    """c0 = 0.28 > 1/4, yet every cone condition holds: the certificate decides."""
    ds = _two_classes(0.01)
    strict = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.4)
    assert strict.status == "failed" and "assumption (ii)" in strict.message
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.4, strict=False)
    assert res.conditions.c0 > 0.25
    assert_zero_cost(res, ds.X, ds.labels, ds.Y)
    assert "assumption (ii)" in res.message
    assert np.all(res.margins > 0)


def test_strict_false_reports_a_failing_certificate():
    """Q = 2, build radius 0.22 |mean_1 - mean_0|: (ii) fails, (iii) holds, and the
    apex 2.5 * 0.22 = 0.55 of the way along overshoots the barycenter, so layer 2
    collapses the first apex onto the second. The certificate must say so."""
    ds = _two_classes(0.01)
    d = np.linalg.norm([2.0, -2.0])
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, radius=0.22 * d, strict=False)
    assert res.status == "failed" and not res.certified
    assert "certificate fails at layer 2 (class 1)" in res.message
    assert "output layer cannot separate" in res.message  # the consequence
    assert res.margins.shape == (2, 2) and res.layers == []
    assert res.margins[0].min() > 0 and res.margins[1, 1] < 0


# -------------------------------------------------------- property tests


@st.composite
def random_clustered(draw):
    Q = draw(st.integers(2, 5))
    M = Q + draw(st.integers(0, 3))
    sizes = draw(st.lists(st.integers(1, 40), min_size=Q, max_size=Q))
    radius = 10.0 ** draw(st.floats(-3.0, 0.2))
    rng = np.random.default_rng(draw(seeds))
    ds = clusters(
        Q, M, sizes, radius, rng, layout="given", means=family_means(Q, M, rng)
    )
    return ds, radius


def assert_ok_means_zero_cost(res, ds):
    event(f"status {res.status}")
    if res.status != "ok":
        assert res.message
        return
    margin = cs.CERT_MARGIN_REL * max(1.0, np.abs(ds.X).max())
    assert res.certified and np.all(res.margins >= margin)
    assert_zero_cost(res, ds.X, ds.labels, ds.Y, tol=COST_TOL / res.lam**2)


@given(random_clustered())
def test_property_small_radius_builds_and_ok_means_zero_cost(case):
    ds, radius = case
    res = cs.build_clustered(ds.X, ds.labels, ds.Y)
    if radius <= 0.1:
        assert res.status == "ok", res.message
    if res.conditions.ok:  # the theorem: (i)-(iii) imply the certificate
        assert res.status == "ok", res.message
    else:
        assert res.status == "failed"
    assert_ok_means_zero_cost(res, ds)
    if res.status == "ok":  # and unseen points of the build balls reach y_j
        Q, M = ds.Y.shape[0], ds.X.shape[1]
        rng = np.random.default_rng(Q * M)
        lab = np.repeat(np.arange(Q), 50)
        means = np.array([ds.X[ds.labels == j].mean(axis=0) for j in range(Q)])
        sphere = rng.standard_normal((lab.size, M))
        sphere *= res.conditions.radius / np.linalg.norm(sphere, axis=1, keepdims=True)
        err = np.abs(res.predict(means[lab] + sphere) - ds.Y[lab]).max()
        assert_within(err, POINT_TOL / res.lam**2, "unseen point -> y_j")


@given(random_clustered())
def test_property_without_strict_ok_still_means_zero_cost(case):
    ds, _ = case
    res = cs.build_clustered(ds.X, ds.labels, ds.Y, strict=False)
    assert_ok_means_zero_cost(res, ds)
    if res.status == "failed" and res.margins is not None and len(res.margins):
        assert not res.certified or "output layer" in res.message
