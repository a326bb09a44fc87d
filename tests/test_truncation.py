"""Truncation maps, cumulative parameters and cone geometry.

Reference sections 2-3 and 9.1-9.5.

Samples are rows: ``X`` has shape (n_samples, dim), ``W`` has shape (out, in).
Every identity is checked against a formula computed here, independently of
the code under test (pseudo-inverses through ``numpy.linalg.pinv``, an SVD,
while the code uses solves), and errors are reported in units of the tolerance.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlmin.core import truncation as tr
from dlmin.core.data import uniform_ball

MATRIX_TOL = 1e-10  # matrix identities, relative (reference section 9)
CONE_TOL = 1e-12  # cone lemma, relative to the size of the points (reference section 9)

seeds = st.integers(0, 2**32 - 1)


def assert_within(err, tol, what):
    """Fail with the error measured in units of the tolerance."""
    ratio = err / tol
    msg = f"{what}: error {err:.3g} is {ratio:.3g} tolerances of {tol:.1g}"
    assert ratio <= 1.0, msg


def orthogonal(rng, n):
    """Haar-random orthogonal matrix, shape (n, n)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def well_conditioned(rng, m, n, smin=0.5, smax=2.0):
    """Random full-row-rank matrix of shape (m, n), singular values in [smin, smax]."""
    s = rng.uniform(smin, smax, m)
    return orthogonal(rng, m) @ (s[:, None] * orthogonal(rng, n)[:m])


def tau_reference(W, b, X):
    """``W^+ (relu(W x + b) - b)`` row by row, with an SVD pseudo-inverse."""
    return (np.maximum(X @ W.T + b, 0.0) - b) @ np.linalg.pinv(W).T


def unit(v):
    return v / np.linalg.norm(v)


def random_perp_unit(rng, h, n_samples):
    """Random unit vectors orthogonal to ``h``, shape (n_samples, n); zeros in R^1."""
    G = rng.standard_normal((n_samples, h.size))
    if h.size == 1:
        return np.zeros_like(G)
    hh = unit(h)
    G -= np.outer(G @ hh, hh)
    return G / np.linalg.norm(G, axis=1, keepdims=True)


def cone_points(rng, p, h, half_angle, n_samples, backward=False):
    """Points ``p + t (cos a h/|h| + sin a w)`` with ``a`` in [0, half_angle].

    A quarter of them lie exactly on the cone's boundary and distances ``t``
    span four decades, so boundaries and scales are both exercised.
    """
    a = rng.uniform(0.0, half_angle, n_samples)
    a[: n_samples // 4] = half_angle
    t = 10.0 ** rng.uniform(-2, 2, n_samples)
    axis = -unit(h) if backward else unit(h)
    dirs = np.cos(a)[:, None] * axis + np.sin(a)[:, None] * random_perp_unit(
        rng, h, n_samples
    )
    return p + t[:, None] * dirs


def angles_to(D, h):
    """Angles of the rows of ``D`` to ``h``."""
    c = (D @ h) / (np.linalg.norm(D, axis=1) * np.linalg.norm(h))
    return np.arccos(np.clip(c, -1.0, 1.0))


def relu_forward(Ws, bs, X):
    """Hidden activations ``x^(1..L)`` and the linear output ``x^(L+1)``."""
    acts, A = [], X
    for W, b in zip(Ws[:-1], bs[:-1]):
        A = np.maximum(A @ W.T + b, 0.0)
        acts.append(A)
    return acts, A @ Ws[-1].T + bs[-1]


@st.composite
def layer_shape(draw, square=None):
    n = draw(st.integers(1, 7))
    m = n if square else draw(st.integers(1, n))
    return m, n


# ------------------------------------------------------ three forms of tau


@given(shape=layer_shape(), seed=seeds)
def test_definition_beta_form_and_polyhedral_form_agree(shape, seed):
    """tau(x) = W^+(relu(Wx+b)-b) = W^+ relu(W(x+beta)) - beta
    = p + sum_i max(z_i, 0) v_i."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W = well_conditioned(rng, m, n)
    b = rng.standard_normal(m)
    X = 2.0 * rng.standard_normal((40, n))
    expected = tau_reference(W, b, X)
    scale = max(1.0, np.abs(expected).max(), np.abs(X).max())

    Wp = np.linalg.pinv(W)
    assert_within(
        np.abs(tr.truncate(W, b, X) - expected).max(), MATRIX_TOL * scale, "definition"
    )
    beta = Wp @ b
    assert_within(
        np.abs(tr.truncate_beta(W, beta, X) - expected).max(),
        MATRIX_TOL * scale,
        "beta-form",
    )

    p, V, Z = tr.polyhedral_parts(W, b, X)
    assert_within(np.abs(p + Wp @ b).max(), MATRIX_TOL * scale, "base point p = -W^+ b")
    assert_within(np.abs(V - Wp.T).max(), MATRIX_TOL, "edge vectors v_i = W^+ e_i")
    assert_within(
        np.abs(Z - (X @ W.T + b)).max(), MATRIX_TOL * scale, "pre-activations"
    )
    poly = p + np.maximum(Z, 0.0) @ V
    assert_within(np.abs(poly - expected).max(), MATRIX_TOL * scale, "polyhedral form")


def test_polyhedral_form_drops_negative_coordinates():
    """Closed form in R^2: W = I, b = -p; negative z_i drop the coordinate to p_i."""
    p = np.array([1.0, -2.0])
    X = np.array([[3.0, 5.0], [0.0, 5.0], [3.0, -7.0], [-1.0, -9.0]])
    expected = np.array([[3.0, 5.0], [1.0, 5.0], [3.0, -2.0], [1.0, -2.0]])
    np.testing.assert_array_equal(tr.truncate(np.eye(2), -p, X), expected)
    np.testing.assert_array_equal(tr.truncate_beta(np.eye(2), -p, X), expected)


def test_pinv_rows_is_the_moore_penrose_inverse_and_rejects_tall_matrices(rng):
    W = well_conditioned(rng, 3, 5)
    assert_within(np.abs(tr.pinv_rows(W) - np.linalg.pinv(W)).max(), MATRIX_TOL, "W^+")
    assert_within(
        np.abs(W @ tr.pinv_rows(W) - np.eye(3)).max(), MATRIX_TOL, "W W^+ = I"
    )
    with pytest.raises(ValueError, match="rows"):
        tr.pinv_rows(W.T)


# ----------------------------------------------------- sign certificate


@given(shape=layer_shape(), seed=seeds)
def test_sign_certificate_both_ways(shape, seed):
    """tau(x) = W^+Wx iff z >= 0; tau(x) = -W^+b iff z <= 0 (z = Wx + b).

    "If": points built with prescribed signs of z, some entries exactly 0.
    "Only if": for mixed signs the identities tau - W^+Wx = W^+ relu(-z) and
    tau - p = W^+ relu(z) hold, and W^+ is injective with smallest singular
    value 1/sigma_max(W), so the gap is at least |relu(-z)| / sigma_max.
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    W = well_conditioned(rng, m, n)
    b = rng.standard_normal(m)
    Wp = np.linalg.pinv(W)
    null = np.eye(n) - Wp @ W

    def points_with(Z):
        return (Z - b) @ Wp.T + rng.standard_normal((Z.shape[0], n)) @ null.T

    Zpos = rng.uniform(0.0, 3.0, (30, m))
    Zpos[rng.random((30, m)) < 0.3] = 0.0
    Xpos = points_with(Zpos)
    scale = max(1.0, np.abs(Xpos).max())
    assert_within(
        np.abs(tr.truncate(W, b, Xpos) - Xpos @ (Wp @ W).T).max(),
        MATRIX_TOL * scale,
        "z >= 0 => tau(x) = W^+W x",
    )

    Xneg = points_with(-Zpos)
    p = -Wp @ b
    assert_within(
        np.abs(tr.truncate(W, b, Xneg) - p).max(),
        MATRIX_TOL * max(1.0, np.abs(Xneg).max()),
        "z <= 0 => tau(x) = p",
    )

    Zmix = rng.uniform(0.5, 3.0, (30, m)) * rng.choice([-1.0, 1.0], (30, m))
    Zmix[:, 0] = -1.0  # every row has a negative entry ...
    Zmix[:, -1] = np.where(m > 1, 1.0, -1.0)  # ... and, when m > 1, a positive one
    Xmix = points_with(Zmix)
    T = tr.truncate(W, b, Xmix)
    smax = np.linalg.norm(W, 2)
    gap_keep = np.linalg.norm(T - Xmix @ (Wp @ W).T, axis=1)
    assert np.all(
        gap_keep >= np.linalg.norm(np.maximum(-Zmix, 0), axis=1) / smax * (1 - 1e-9)
    )
    if m > 1:
        gap_base = np.linalg.norm(T - p, axis=1)
        assert np.all(
            gap_base >= np.linalg.norm(np.maximum(Zmix, 0), axis=1) / smax * (1 - 1e-9)
        )


# ------------------------------------------------- idempotence, invariances


@given(shape=layer_shape(), seed=seeds)
def test_truncation_is_idempotent_and_lands_where_z_is_nonnegative(shape, seed):
    rng = np.random.default_rng(seed)
    m, n = shape
    W = well_conditioned(rng, m, n)
    b = 2.0 * rng.standard_normal(m)
    X = 3.0 * rng.standard_normal((50, n))
    T = tr.truncate(W, b, X)
    scale = max(1.0, np.abs(X).max())
    assert_within(
        np.abs(tr.truncate(W, b, T) - T).max(), MATRIX_TOL * scale, "tau o tau = tau"
    )
    assert_within(
        np.abs(T @ W.T + b - np.maximum(X @ W.T + b, 0.0)).max(),
        MATRIX_TOL * scale,
        "W tau(x) + b = relu(W x + b)",
    )


@given(shape=layer_shape(), seed=seeds, log_kappa=st.floats(-6.0, 6.0))
def test_invariance_under_positive_diagonal_times_permutation(shape, seed, log_kappa):
    """tau_{AW,Ab} = tau_{W,b} for A = D Pi (D > 0 diagonal) and A = kappa I."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W = well_conditioned(rng, m, n)
    b = rng.standard_normal(m)
    X = 2.0 * rng.standard_normal((40, n))
    T = tr.truncate(W, b, X)
    scale = max(1.0, np.abs(X).max())

    A = np.diag(10.0 ** rng.uniform(-2, 2, m)) @ np.eye(m)[rng.permutation(m)]
    assert_within(
        np.abs(tr.truncate(A @ W, A @ b, X) - T).max(),
        MATRIX_TOL * scale * 1e2,
        "D Pi invariance (cond(A) <= 1e4)",
    )
    kappa = 10.0**log_kappa
    assert_within(
        np.abs(tr.truncate(kappa * W, kappa * b, X) - T).max(),
        MATRIX_TOL * scale,
        "kappa invariance",
    )


def test_a_negative_diagonal_entry_breaks_the_invariance(rng):
    """Contrast to the invariance: flipping one row's sign is not allowed."""
    W = well_conditioned(rng, 3, 3)
    b = rng.standard_normal(3)
    X = 2.0 * rng.standard_normal((200, 3))
    A = np.diag([2.0, -1.0, 0.5])
    assert np.abs(tr.truncate(A @ W, A @ b, X) - tr.truncate(W, b, X)).max() > 0.1


@given(shape=layer_shape(square=False), seed=seeds)
def test_invariance_under_maps_that_fix_W(shape, seed):
    """tau(P x) = tau(x) when W P = W (P = I + (I - W^+W) K, non-square W)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    n += 2  # strictly fewer rows than columns, so P != I
    W = well_conditioned(rng, m, n)
    b = rng.standard_normal(m)
    null = np.eye(n) - np.linalg.pinv(W) @ W
    P = np.eye(n) + null @ rng.standard_normal((n, n))
    assert_within(np.abs(W @ P - W).max(), MATRIX_TOL, "W P = W")
    X = rng.standard_normal((40, n))
    scale = max(1.0, np.abs(X @ P.T).max())
    assert_within(
        np.abs(tr.truncate(W, b, X @ P.T) - tr.truncate(W, b, X)).max(),
        MATRIX_TOL * scale,
        "tau(Px) = tau(x)",
    )


# ---------------------------------------------------- squeezing matrix W_theta


@pytest.mark.parametrize(
    "n, degrees",
    [
        (2, 90.0),
        (3, np.degrees(2 * np.arctan(1 / np.sqrt(2)))),  # 70.5288 deg
        (4, 60.0),
        (10, np.degrees(2 * np.arctan(1 / 3))),  # 36.8699 deg
    ],
)
def test_theta_n_values(n, degrees):
    assert abs(np.degrees(tr.theta_n(n)) - degrees) < 1e-12


def test_theta_n_decimal_values():
    assert abs(np.degrees(tr.theta_n(3)) - 70.528779) < 1e-6
    assert abs(np.degrees(tr.theta_n(10)) - 36.869898) < 1e-6


@pytest.mark.parametrize("n", range(2, 13))
def test_theta_n_is_the_widest_cone_about_u_in_the_orthant(n):
    """theta_n / 2 = angle(u, u - e_1); u - e_1 is the nearest face point of R^n_+."""
    u = np.ones(n)
    e1 = np.eye(n)[0]
    assert abs(tr.theta_n(n) / 2 - tr.angle(u, u - e1)) < 1e-12


def test_squeeze_factor_closed_form_and_bad_angles():
    n = 3
    tn = tr.theta_n(n)
    assert tr.squeeze_factor(0.5 * tn, n) == 1.0
    assert tr.squeeze_factor(tn, n) == 1.0
    theta = np.radians(150.0)
    expected = (1 / np.sqrt(2)) / np.tan(theta / 2)  # tan(theta_3 / 2) = 1/sqrt(2)
    assert abs(tr.squeeze_factor(theta, n) - expected) < 1e-15
    for bad in (0.0, np.pi, -0.1, 4.0):
        with pytest.raises(ValueError, match="angle"):
            tr.squeeze_factor(bad, n)


@given(n=st.integers(2, 10), theta=st.floats(0.05, np.pi - 0.05))
def test_squeeze_matrix_facts(n, theta):
    """W_theta u = u, symmetric, ||W_theta|| = 1, spectrum {1, lambda (n-1 times)}."""
    W = tr.squeeze_matrix(theta, n)
    tn = 2 * np.arctan(1 / np.sqrt(n - 1))
    lam = np.tan(tn / 2) / np.tan(theta / 2) if theta > tn else 1.0
    u = np.ones(n)
    assert_within(np.abs(W @ u - u).max(), MATRIX_TOL, "W u = u")
    np.testing.assert_array_equal(W, W.T)
    assert_within(abs(np.linalg.norm(W, 2) - 1.0), MATRIX_TOL, "||W_theta|| = 1")
    eig = np.linalg.eigvalsh(W)
    expected = np.r_[np.full(n - 1, lam), 1.0]
    assert_within(np.abs(eig - expected).max(), MATRIX_TOL, "spectrum")
    assert 0.0 < eig[0] <= 1.0


@given(
    n=st.integers(2, 10),
    theta=st.floats(0.05, np.pi - 0.05),
    phi=st.floats(1e-3, np.pi - 1e-3),
    seed=seeds,
)
def test_squeeze_matrix_angle_map(n, theta, phi, seed):
    """A vector at angle phi from u ends at atan2(lambda sin phi, cos phi).

    For phi < pi/2 this is arctan(lambda tan phi), the reference's form.
    """
    rng = np.random.default_rng(seed)
    u = np.ones(n)
    w = random_perp_unit(rng, u, 1)[0]
    v = np.cos(phi) * unit(u) + np.sin(phi) * w
    lam = tr.squeeze_factor(theta, n)
    got = tr.angle(tr.squeeze_matrix(theta, n) @ v, u)
    assert abs(got - np.arctan2(lam * np.sin(phi), np.cos(phi))) < 1e-9
    if phi < np.pi / 2:
        assert abs(got - np.arctan(lam * np.tan(phi))) < 1e-9


@given(n=st.integers(2, 10), theta=st.floats(0.05, np.pi - 0.05), seed=seeds)
def test_squeezed_cones_land_in_the_orthants(n, theta, seed):
    """W_theta C_theta[u] in R^n_+ and W_theta C_theta[-u] in -R^n_+.

    The bound is tight: the boundary point of C_theta[u] leaning away from
    e_i is sent onto the face x_i = 0 (so lambda is no smaller than needed).
    """
    rng = np.random.default_rng(seed)
    u = np.ones(n)
    W = tr.squeeze_matrix(theta, n)
    P = cone_points(rng, np.zeros(n), u, theta / 2, 200)
    scale = np.linalg.norm(P, axis=1)
    assert np.all((P @ W.T).min(axis=1) >= -CONE_TOL * scale)
    assert np.all((-P @ W.T).max(axis=1) <= CONE_TOL * scale)

    if theta >= tr.theta_n(n):
        i = rng.integers(n)
        w = unit(u / n - np.eye(n)[i])
        v = np.cos(theta / 2) * unit(u) + np.sin(theta / 2) * w
        assert abs((W @ v)[i]) < 1e-12


# ------------------------------------------------------- aligning reflection


@given(n=st.integers(1, 9), seed=seeds, log_scale=st.floats(-8, 8))
def test_align_reflection_maps_h_to_the_diagonal(n, seed, log_scale):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal(n) * 10.0**log_scale
    R = tr.align_reflection(h)
    assert_within(
        np.abs(R @ unit(h) - np.ones(n) / np.sqrt(n)).max(), MATRIX_TOL, "R h/|h|"
    )
    assert_within(np.abs(R.T @ R - np.eye(n)).max(), MATRIX_TOL, "orthogonal")
    assert_within(np.abs(R - R.T).max(), MATRIX_TOL, "symmetric")


@given(n=st.integers(2, 9), seed=seeds, log_eps=st.floats(-15, -1))
def test_align_reflection_for_axes_close_to_the_diagonal(n, seed, log_eps):
    """h = u + eps g: the Householder vector h/|h| - u/sqrt(n) cancels; R must not."""
    rng = np.random.default_rng(seed)
    h = np.ones(n) + 10.0**log_eps * rng.standard_normal(n)
    R = tr.align_reflection(h)
    assert_within(
        np.abs(R @ unit(h) - np.ones(n) / np.sqrt(n)).max(), MATRIX_TOL, "R h/|h|"
    )
    assert_within(np.abs(R.T @ R - np.eye(n)).max(), MATRIX_TOL, "orthogonal")
    assert_within(np.abs(R - R.T).max(), MATRIX_TOL, "symmetric")


def test_align_reflection_degenerate_axes():
    n = 4
    u = np.ones(n)
    np.testing.assert_array_equal(tr.align_reflection(3.0 * u), np.eye(n))
    R = tr.align_reflection(-u)
    assert_within(np.abs(R @ (-u) - u).max(), MATRIX_TOL, "R(-u) = u")
    assert_within(
        np.abs(R - (np.eye(n) - 2 * np.outer(u, u) / n)).max(),
        MATRIX_TOL,
        "reflection through the hyperplane u^perp",
    )
    near = u + 1e-12 * np.arange(n)
    assert_within(
        np.abs(tr.align_reflection(near) @ unit(near) - unit(u)).max(),
        MATRIX_TOL,
        "nearly aligned axis",
    )
    with pytest.raises(ValueError, match="zero"):
        tr.align_reflection(np.zeros(n))


# ------------------------------------------------------------- cone lemma


@given(n=st.integers(1, 8), theta=st.floats(0.1, 0.9 * np.pi), seed=seeds)
def test_cone_lemma_identity_forward_apex_backward(n, theta, seed):
    """W = W_theta R_h, b = -W p: tau = x on p + C_theta[h], p on p + C_theta[-h]."""
    rng = np.random.default_rng(seed)
    p = 3.0 * rng.standard_normal(n)
    h = rng.standard_normal(n)
    W, b = tr.cone_layer(p, h, theta)
    assert_within(
        np.abs(W - tr.squeeze_matrix(theta, n) @ tr.align_reflection(h)).max(),
        MATRIX_TOL,
        "W = W_theta R_h",
    )
    assert_within(np.abs(b + W @ p).max(), MATRIX_TOL, "b = -W p")

    F = cone_points(rng, p, h, theta / 2, 300)
    scale = np.maximum(1.0, np.maximum(np.abs(F).max(axis=1), np.abs(p).max()))
    err = np.abs(tr.truncate(W, b, F) - F).max(axis=1) / scale
    assert_within(err.max(), CONE_TOL, "identity on the forward cone")

    B = cone_points(rng, p, h, theta / 2, 300, backward=True)
    scale = np.maximum(1.0, np.maximum(np.abs(B).max(axis=1), np.abs(p).max()))
    err = np.abs(tr.truncate(W, b, B) - p).max(axis=1) / scale
    assert_within(err.max(), CONE_TOL, "apex on the backward cone")


@given(
    k=st.integers(1, 5),
    extra=st.integers(1, 4),
    theta=st.floats(0.1, 0.9 * np.pi),
    seed=seeds,
)
def test_cone_lemma_with_a_basis_projects(k, extra, theta, seed):
    """basis U (orthonormal, M x k), axis h in span U: "x" becomes U U^T x, "p" U U^T p.

    The apex p need not lie in span U; the cones are those of R^M.
    """
    rng = np.random.default_rng(seed)
    M = k + extra
    U = orthogonal(rng, M)[:, :k]
    h = U @ rng.standard_normal(k)
    p = 2.0 * rng.standard_normal(M)
    W, b = tr.cone_layer(p, h, theta, basis=U)
    assert W.shape == (k, M) and b.shape == (k,)
    proj = U @ U.T
    assert_within(
        np.abs(np.linalg.pinv(W) @ W - proj).max(), MATRIX_TOL, "W^+W = U U^T"
    )

    F = cone_points(rng, p, h, theta / 2, 300)
    scale = np.maximum(1.0, np.maximum(np.abs(F).max(axis=1), np.abs(p).max()))
    err = np.abs(tr.truncate(W, b, F) - F @ proj).max(axis=1) / scale
    assert_within(err.max(), CONE_TOL, "U U^T x on the forward cone")

    B = cone_points(rng, p, h, theta / 2, 300, backward=True)
    scale = np.maximum(1.0, np.maximum(np.abs(B).max(axis=1), np.abs(p).max()))
    err = np.abs(tr.truncate(W, b, B) - proj @ p).max(axis=1) / scale
    assert_within(err.max(), CONE_TOL, "U U^T p on the backward cone")


# ------------------------------------------------------------ ball in cone


def _ball_samples(rng, c, r, n_sphere, n_inside):
    n = c.size
    S = rng.standard_normal((n_sphere, n))
    S = c + r * S / np.linalg.norm(S, axis=1, keepdims=True)
    return np.vstack([S, c + uniform_ball(n_inside, n, r, rng)])


@pytest.mark.parametrize("n", [2, 3])
def test_ball_in_cone_against_sampling(n):
    """Yes: every sampled point of the ball is in the cone. No: some sample is out.

    Cases within 0.02 rad of the threshold (or with |c - p| within 10% of r)
    are skipped, as no finite sample decides them; both answers must occur.
    """
    rng = np.random.default_rng(7 + n)
    answers = {True: 0, False: 0}
    for _ in range(150):
        p = rng.standard_normal(n)
        c = p + 3.0 * rng.standard_normal(n)
        h = (c - p) + rng.uniform(0.0, 6.0) * rng.standard_normal(n)
        dist = np.linalg.norm(c - p)
        r = dist * rng.uniform(0.05, 1.3)
        theta = rng.uniform(0.2, np.pi - 0.05)
        if r < dist:
            margin = theta / 2 - tr.angle(c - p, h) - np.arcsin(r / dist)
            if abs(margin) < 0.02 or abs(r / dist - 1) < 0.1:
                continue
        elif r < 1.1 * dist:
            continue
        S = _ball_samples(rng, c, r, 20000, 2000)
        inside = angles_to(S - p, h) <= theta / 2 + 1e-12
        got = tr.ball_in_cone(c, r, p, h, theta)
        assert got == bool(inside.all()), (c, r, p, h, theta)
        answers[got] += 1
    assert min(answers.values()) >= 10, answers


def test_ball_in_cone_closed_cases():
    p = np.zeros(2)
    h = np.array([1.0, 0.0])
    c = np.array([2.0, 0.0])
    # On the axis the ball B_r(c) fits iff arcsin(r/2) <= theta/2.
    assert tr.ball_in_cone(c, 1.0, p, h, np.radians(60.0 + 1e-9))
    assert not tr.ball_in_cone(c, 1.0, p, h, np.radians(60.0 - 1e-6))
    assert not tr.ball_in_cone(c, 2.0, p, h, np.radians(179.0))  # apex on the sphere
    assert not tr.ball_in_cone(c, 3.0, p, h, np.radians(179.0))  # apex inside the ball


# ------------------------------------------- cumulative <-> layer-wise


def random_layers(rng, widths):
    """Full-row-rank layers of the given widths d_0 >= d_1 >= ..."""
    Ws = [
        well_conditioned(rng, widths[i + 1], widths[i]) for i in range(len(widths) - 1)
    ]
    bs = [rng.standard_normal(w) for w in widths[1:]]
    return Ws, bs


@given(n=st.integers(1, 6), L=st.integers(1, 5), seed=seeds)
def test_cumulative_round_trip_square_layers(n, L, seed):
    """W^(l) = W_l...W_1, b^(l) = sum_k W_l...W_{k+1} b_k and
    beta^(l) = sum_k (W^(k))^{-1} b_k; back to the layers."""
    rng = np.random.default_rng(seed)
    Ws, bs = random_layers(rng, [n] * (L + 1))
    Wc, bc = tr.cumulative_from_layers(Ws, bs)
    assert len(Wc) == len(bc) == L

    for ell in range(L):
        prod = np.eye(n)
        for W in Ws[: ell + 1]:
            prod = W @ prod
        bias = np.zeros(n)
        for k in range(ell + 1):
            tail = np.eye(n)
            for W in Ws[k + 1 : ell + 1]:
                tail = W @ tail
            bias += tail @ bs[k]
        beta = sum(np.linalg.solve(Wc[k], bs[k]) for k in range(ell + 1))
        scale = max(1.0, np.abs(prod).max(), np.abs(bias).max())
        assert_within(
            np.abs(Wc[ell] - prod).max(), MATRIX_TOL * scale, f"W^({ell + 1})"
        )
        assert_within(
            np.abs(bc[ell] - bias).max(), MATRIX_TOL * scale, f"b^({ell + 1})"
        )
        assert_within(
            np.abs(np.linalg.solve(Wc[ell], bc[ell]) - beta).max(),
            MATRIX_TOL * scale * 10,
            f"beta^({ell + 1})",
        )

    Ws2, bs2 = tr.layers_from_cumulative(Wc, bc)
    for ell in range(L):
        assert_within(np.abs(Ws2[ell] - Ws[ell]).max(), MATRIX_TOL * 10, f"W_{ell + 1}")
        assert_within(np.abs(bs2[ell] - bs[ell]).max(), MATRIX_TOL * 10, f"b_{ell + 1}")


@given(widths=st.lists(st.integers(1, 7), min_size=2, max_size=6), seed=seeds)
def test_cumulative_round_trip_nested_reduced_widths(widths, seed):
    """Non-increasing widths: row spaces nest and both directions round-trip."""
    rng = np.random.default_rng(seed)
    widths = sorted(widths, reverse=True)
    Ws, bs = random_layers(rng, widths)
    Wc, bc = tr.cumulative_from_layers(Ws, bs)
    assert [W.shape for W in Wc] == [(w, widths[0]) for w in widths[1:]]
    Ws2, bs2 = tr.layers_from_cumulative(Wc, bc)
    for ell, (W, b, W2, b2) in enumerate(zip(Ws, bs, Ws2, bs2), start=1):
        assert W2.shape == W.shape
        assert_within(np.abs(W2 - W).max(), MATRIX_TOL * 10, f"W_{ell}")
        assert_within(np.abs(b2 - b).max(), MATRIX_TOL * 10, f"b_{ell}")
    Wc3, bc3 = tr.cumulative_from_layers(Ws2, bs2)
    for ell, (W, W3, b, b3) in enumerate(zip(Wc, Wc3, bc, bc3), start=1):
        scale = max(1.0, np.abs(W).max(), np.abs(b).max())
        assert_within(np.abs(W3 - W).max(), MATRIX_TOL * scale, f"W^({ell})")
        assert_within(np.abs(b3 - b).max(), MATRIX_TOL * scale, f"b^({ell})")


def test_non_nested_cumulative_parameters_raise(rng):
    """row(W^(2)) not inside row(W^(1)) cannot come from a layer-wise network."""
    W1 = well_conditioned(rng, 2, 5)
    W2 = well_conditioned(rng, 2, 5)
    b1, b2 = rng.standard_normal(2), rng.standard_normal(2)
    with pytest.raises(ValueError, match="layer 2"):
        tr.layers_from_cumulative([W1, W2], [b1, b2])
    Ws, _ = tr.layers_from_cumulative([W1, W2], [b1, b2], check_nested=False)
    assert np.abs(Ws[1] @ W1 - W2).max() > 1e-3  # the realized W^(2) is a different one

    W2_nested = rng.standard_normal((2, 2)) @ W1  # same row space: accepted
    Ws, bs = tr.layers_from_cumulative([W1, W2_nested], [b1, b2])
    assert_within(np.abs(Ws[1] @ W1 - W2_nested).max(), MATRIX_TOL * 10, "W_2 W^(1)")
    assert_within(np.abs(Ws[1] @ b1 + bs[1] - b2).max(), MATRIX_TOL * 10, "b^(2)")


# ---------------------------------------------------- composition identity


@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    out=st.integers(1, 4),
    square=st.booleans(),
    seed=seeds,
)
def test_composition_identity(widths, out, square, seed):
    """x^(l) = W^(l) x^(tau,l) + b^(l) for l = 1..L, and
    x^(L+1) = W^(L+1) x^(tau,L) + b^(L+1)."""
    rng = np.random.default_rng(seed)
    widths = [widths[0]] * len(widths) if square else sorted(widths, reverse=True)
    Ws, bs = random_layers(rng, widths)
    Ws.append(rng.standard_normal((out, widths[-1])))
    bs.append(rng.standard_normal(out))
    L = len(widths) - 1
    X = 2.0 * rng.standard_normal((60, widths[0]))

    acts, output = relu_forward(Ws, bs, X)
    Wc, bc = tr.cumulative_from_layers(Ws, bs)
    chain = tr.truncation_chain(Wc[:L], bc[:L], X)
    assert len(chain) == L + 1
    np.testing.assert_array_equal(chain[0], X)
    for ell in range(1, L + 1):
        got = chain[ell] @ Wc[ell - 1].T + bc[ell - 1]
        scale = max(1.0, np.abs(acts[ell - 1]).max())
        assert_within(
            np.abs(got - acts[ell - 1]).max(), MATRIX_TOL * scale, f"layer {ell}"
        )
    got = chain[L] @ Wc[L].T + bc[L]
    assert_within(
        np.abs(got - output).max(),
        MATRIX_TOL * max(1.0, np.abs(output).max()),
        "output layer",
    )


def test_composition_identity_exercises_truncation(rng):
    """The random networks above do cut: some pre-activations are negative, and the
    truncated chain then differs from the plain affine map."""
    Ws, bs = random_layers(rng, [4, 4, 3])
    X = 2.0 * rng.standard_normal((60, 4))
    Wc, bc = tr.cumulative_from_layers(Ws, bs)
    chain = tr.truncation_chain(Wc, bc, X)
    assert ((X @ Wc[0].T + bc[0]) < 0).any() and ((X @ Wc[0].T + bc[0]) > 0).any()
    assert np.abs(chain[1] - X).max() > 1e-3


# ------------------------------------------------------------- certificate


def test_certify_closed_form_margins():
    """W = I: margins are min(-z) over collapsed rows and min(z) over kept ones."""
    W, b = np.eye(2), np.zeros(2)
    X = np.array([[-1.0, -3.0], [-2.0, -0.5], [4.0, 0.25], [1.0, 2.0]])
    mask = np.array([True, True, False, False])
    assert tr.certify(W, b, X, mask, 0.25) == (True, 0.5, 0.25)
    ok, collapse, keep = tr.certify(W, b, X, mask, 0.3)  # keep margin 0.25 < 0.3
    assert not ok and (collapse, keep) == (0.5, 0.25)
    ok, collapse, keep = tr.certify(W, b, X, ~mask, 0.1)  # roles swapped: both fail
    assert not ok and (collapse, keep) == (-4.0, -3.0)
    ok, collapse, keep = tr.certify(W, b + 1.0, X, mask, 0.1)  # a bias moves every z
    assert not ok and (collapse, keep) == (-0.5, 1.25)
    assert tr.certify(W, b, X[2:], np.zeros(2, bool), 0.1) == (True, np.inf, 0.25)
    assert tr.certify(W, b, X[:2], np.ones(2, bool), 0.1) == (True, 0.5, np.inf)
