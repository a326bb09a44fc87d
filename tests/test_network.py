"""Tests for dlmin.core.network: derivatives four ways, kernel, parameters.

Reference identities (flows.md section 2): J1 Jacobian against central
differences, J2 JVP/VJP against the explicit Jacobian and the adjoint
identity, J3 layer-wise kernel against D D^T; plus closed-form kernels of
linear networks, flattening order, initializer statistics and npz files.
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dlmin.core import network as nw

ACTIVATIONS = nw.ACTIVATIONS

# Central-difference step; its truncation error is O(STEP^2) and its
# rounding error O(eps / STEP), both far below the J1 tolerance.
STEP = 1e-6

# ReLU is not differentiable at 0: require every hidden pre-activation to be
# at least this far from 0, so that no stencil point crosses a kink.
KINK_MARGIN = 1e-3

SHAPES = [
    [3, 2],
    [2, 5, 1],
    [4, 6, 3],
    [3, 4, 5, 2],
    [2, 3, 3, 3, 4],
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def make_problem(widths, n_samples, activation, seed):
    """Random params and inputs, with ReLU pre-activations off the kinks."""
    rng = np.random.default_rng(seed)
    for _ in range(50):
        params = nw.init_params(widths, rng=rng, scheme="glorot", bias_scale=0.5)
        X = rng.standard_normal((n_samples, widths[0]))
        if activation != "relu" or kink_distance(params, X) > KINK_MARGIN:
            return params, X
    raise AssertionError("no draw kept the ReLU pre-activations off zero")


def kink_distance(params, X):
    """Smallest |z| over all hidden pre-activations and samples."""
    cache = nw.forward_cache(params, X, activation="relu")
    hidden = cache.preactivations[:-1]
    return min((np.abs(Z).min() for Z in hidden), default=np.inf)


def central_differences(params, X, activation):
    """D by central differences in every parameter, shape (N*Q, K)."""
    widths = nw.widths_of(params)
    theta = nw.flatten(params)
    columns = []
    for k in range(theta.size):
        shift = np.zeros_like(theta)
        shift[k] = STEP
        up = nw.forward(nw.unflatten(theta + shift, widths), X, activation)
        down = nw.forward(nw.unflatten(theta - shift, widths), X, activation)
        columns.append((up - down).ravel() / (2 * STEP))
    return np.stack(columns, axis=1)


def assert_kernel_close(G, expected, rtol=1e-12):
    scale = max(np.abs(expected).max(), np.finfo(float).tiny)
    assert G.shape == expected.shape
    assert np.abs(G - expected).max() <= rtol * scale


# --------------------------------------------------------------------------
# Parameters: layout, flattening
# --------------------------------------------------------------------------


def test_flatten_order_is_row_major_weights_then_bias():
    W1 = np.arange(6.0).reshape(2, 3)
    b1 = np.array([10.0, 11.0])
    W2 = np.array([[20.0, 21.0]])
    b2 = np.array([30.0])
    theta = nw.flatten([(W1, b1), (W2, b2)])
    expected = [0, 1, 2, 3, 4, 5, 10, 11, 20, 21, 30]
    np.testing.assert_array_equal(theta, expected)
    # Entry (i, k) of W_l sits at offset_l + i * M_(l-1) + k.
    assert theta[0 + 1 * 3 + 2] == W1[1, 2]
    assert theta[8 + 0 * 2 + 1] == W2[0, 1]


def test_param_count_matches_formula():
    assert nw.param_count([20, 128, 128, 10]) == 20490
    assert nw.param_count([3, 2]) == 8


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_flatten_unflatten_round_trip(widths, seed):
    params = nw.init_params(widths, rng=seed, bias_scale=1.0)
    theta = nw.flatten(params)
    assert theta.shape == (nw.param_count(widths),)
    back = nw.unflatten(theta, widths)
    assert nw.widths_of(back) == widths
    for (W, b), (W2, b2) in zip(params, back):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(nw.flatten(back), theta)


def test_unflatten_returns_copies():
    theta = np.arange(8.0)
    params = nw.unflatten(theta, [3, 2])
    theta[:] = -1.0
    assert params[0][0][0, 0] == 0.0


def test_unflatten_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"expected shape \(8,\).*got \(7,\)"):
        nw.unflatten(np.zeros(7), [3, 2])


@pytest.mark.parametrize("widths", [[3], [3, 0, 2], [2.5, 3], "abc"])
def test_bad_widths_are_rejected(widths):
    with pytest.raises(ValueError, match="widths"):
        nw.param_count(widths)


def test_params_that_do_not_chain_are_rejected():
    W1, b1 = np.zeros((4, 3)), np.zeros(4)
    with pytest.raises(ValueError, match=r"W2: expected shape \(2, 4\)"):
        nw.widths_of([(W1, b1), (np.zeros((2, 5)), np.zeros(2))])
    with pytest.raises(ValueError, match=r"b1: expected shape \(4,\)"):
        nw.widths_of([(W1, np.zeros(3))])
    with pytest.raises(ValueError, match="non-empty list"):
        nw.widths_of([])


# --------------------------------------------------------------------------
# Activations and forward pass
# --------------------------------------------------------------------------


def scalar_net():
    """f(x) = sigma(x): one hidden unit with unit weights, zero biases."""
    one = np.ones((1, 1))
    return [(one, np.zeros(1)), (one, np.zeros(1))]


def test_activations_and_slopes_on_a_scalar_net():
    t = np.array([[-3.0], [-0.5], [0.0], [0.7], [4.0]])
    expected = {
        "relu": (np.maximum(t, 0), (t > 0).astype(float)),
        "tanh": (np.tanh(t), 1 - np.tanh(t) ** 2),
        "softplus": (np.log1p(np.exp(t)), 1 / (1 + np.exp(-t))),
    }
    for name, (value, slope) in expected.items():
        f = nw.forward(scalar_net(), t, activation=name)
        np.testing.assert_allclose(f, value, rtol=1e-15, atol=1e-15)
        # Column 2 of D is d f / d b_1 = sigma'(x) * W_2 = sigma'(x).
        D = nw.jacobian(scalar_net(), t, activation=name)
        np.testing.assert_allclose(D[:, 1:2], slope, rtol=1e-15, atol=1e-15)


def test_relu_slope_at_zero_is_zero():
    D = nw.jacobian(scalar_net(), np.zeros((1, 1)), activation="relu")
    assert D[0, 1] == 0.0


def test_softplus_is_stable_for_large_arguments():
    t = np.array([[-800.0], [800.0]])
    f = nw.forward(scalar_net(), t, activation="softplus")
    assert f[0, 0] == 0.0 and f[1, 0] == 800.0
    G = nw.ntk(scalar_net(), t, activation="softplus")
    assert np.all(np.isfinite(G))


def test_unknown_activation_names_the_allowed_ones():
    params, X = make_problem([2, 3, 1], 2, "tanh", 0)
    for fn in (nw.forward, nw.jacobian, nw.ntk):
        with pytest.raises(ValueError, match="relu.*tanh.*softplus.*'gelu'"):
            fn(params, X, activation="gelu")


def test_forward_cache_matches_forward():
    params, X = make_problem([3, 4, 5, 2], 6, "tanh", 1)
    cache = nw.forward_cache(params, X, activation="tanh")
    np.testing.assert_array_equal(cache.output, nw.forward(params, X, "tanh"))
    assert [A.shape for A in cache.inputs] == [(6, 3), (6, 4), (6, 5)]
    assert [Z.shape for Z in cache.preactivations] == [(6, 4), (6, 5), (6, 2)]
    assert [E.shape for E in cache.slopes] == [(6, 4), (6, 5)]


def test_inputs_of_wrong_shape_are_rejected():
    params, _ = make_problem([3, 4, 2], 1, "tanh", 0)
    match = r"X: expected shape .*3\).*got \(5, 2\)"
    with pytest.raises(ValueError, match=match):
        nw.forward(params, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="X: expected"):
        nw.ntk(params, np.zeros(3))


# --------------------------------------------------------------------------
# J1: Jacobian against central differences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("widths", SHAPES, ids=str)
def test_jacobian_matches_central_differences(activation, widths):
    params, X = make_problem(widths, 5, activation, seed=len(widths))
    D = nw.jacobian(params, X, activation=activation)
    assert D.shape == (5 * widths[-1], nw.param_count(widths))
    reference = central_differences(params, X, activation)
    tolerance = 1e-7 * max(1.0, np.abs(D).max())
    assert np.abs(D - reference).max() <= tolerance


def test_jacobian_rows_are_sample_major():
    params, X = make_problem([3, 4, 2], 3, "tanh", 5)
    D = nw.jacobian(params, X, activation="tanh")
    for n in range(3):
        one = nw.jacobian(params, X[n : n + 1], activation="tanh")
        np.testing.assert_allclose(D[2 * n : 2 * n + 2], one, rtol=1e-14)


# --------------------------------------------------------------------------
# J2: JVP and VJP
# --------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("widths", SHAPES, ids=str)
def test_jvp_vjp_match_explicit_jacobian(activation, widths):
    params, X = make_problem(widths, 4, activation, seed=7)
    rng = np.random.default_rng(11)
    D = nw.jacobian(params, X, activation=activation)
    v = rng.standard_normal(D.shape[1])
    c = rng.standard_normal(D.shape[0])
    Dv = nw.jvp(params, X, v, activation=activation)
    Dtc = nw.vjp(params, X, c, activation=activation)
    assert np.abs(Dv - D @ v).max() <= 1e-12 * np.abs(D @ v).max()
    assert np.abs(Dtc - D.T @ c).max() <= 1e-12 * np.abs(D.T @ c).max()
    # Adjoint identity <c, D v> = <D^T c, v>, relative to |c| |D| |v|.
    scale = np.linalg.norm(c) * np.linalg.norm(D, 2) * np.linalg.norm(v)
    assert abs(c @ Dv - Dtc @ v) <= 1e-12 * scale


def test_vjp_accepts_flat_and_matrix_cotangents():
    params, X = make_problem([3, 4, 2], 5, "softplus", 2)
    c = np.random.default_rng(3).standard_normal((5, 2))
    flat = nw.vjp(params, X, c.ravel(), activation="softplus")
    matrix = nw.vjp(params, X, c, activation="softplus")
    np.testing.assert_array_equal(flat, matrix)
    match = r"c: expected shape \(5, 2\) or \(10,\)"
    with pytest.raises(ValueError, match=match):
        nw.vjp(params, X, c.T, activation="softplus")


def test_vjp_is_the_gradient_of_the_squared_loss():
    params, X = make_problem([3, 5, 2], 6, "tanh", 4)
    Y = np.random.default_rng(5).standard_normal((6, 2))
    widths, theta = nw.widths_of(params), nw.flatten(params)

    def cost(theta):
        out = nw.forward(nw.unflatten(theta, widths), X, "tanh")
        return np.sum((out - Y) ** 2) / (2 * len(X))

    residual = nw.forward(params, X, "tanh") - Y
    grad = nw.vjp(params, X, residual / len(X), activation="tanh")
    eye = np.eye(theta.size) * STEP
    numeric = [(cost(theta + e) - cost(theta - e)) / (2 * STEP) for e in eye]
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


def test_jvp_rejects_wrong_direction_length():
    params, X = make_problem([3, 2], 2, "tanh", 0)
    match = r"v: expected shape \(8,\).*got \(9,\)"
    with pytest.raises(ValueError, match=match):
        nw.jvp(params, X, np.zeros(9), activation="tanh")


# --------------------------------------------------------------------------
# J3: the kernel
# --------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("widths", SHAPES, ids=str)
def test_ntk_matches_jacobian_gram(activation, widths):
    params, X = make_problem(widths, 6, activation, seed=3)
    D = nw.jacobian(params, X, activation=activation)
    G = nw.ntk(params, X, activation=activation)
    assert_kernel_close(G, D @ D.T)
    np.testing.assert_array_equal(G, G.T)
    eigenvalues = np.linalg.eigvalsh(G)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


DEPTHS = [[3, 3], [3, 5, 3], [3, 5, 4, 3], [2, 4, 4, 4, 3]]


@pytest.mark.parametrize("widths", DEPTHS, ids=str)
@pytest.mark.parametrize("block_rows", [1, 4, 7, 30])
def test_ntk_blocking_does_not_change_the_kernel(monkeypatch, block_rows, widths):
    # Uneven blocks, blocks smaller than Q and a single block, for 0 to 3
    # hidden layers (each sums its layer terms differently).
    params, X = make_problem(widths, 11, "tanh", 8)
    D = nw.jacobian(params, X, activation="tanh")
    monkeypatch.setattr(nw, "NTK_BLOCK_ROWS", block_rows)
    G = nw.ntk(params, X, activation="tanh")
    assert_kernel_close(G, D @ D.T)
    np.testing.assert_array_equal(G, G.T)


def test_ntk_of_one_linear_layer_in_closed_form():
    # f(x) = W x + b: d f_q / d W_qk = x_k, d f_q / d b_q = 1, so
    # G = (X X^T + 1) kron I_Q.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 4))
    params = nw.init_params([4, 3], rng=1, bias_scale=1.0)
    expected = np.kron(X @ X.T + 1.0, np.eye(3))
    for activation in ACTIVATIONS:
        G = nw.ntk(params, X, activation=activation)
        assert_kernel_close(G, expected)


def test_ntk_of_a_two_layer_net_in_its_linear_region():
    # All hidden pre-activations positive: ReLU acts as the identity and
    # f = W2 (W1 x + b1) + b2. Then Delta^1 = W2^T for every sample and
    # G = (A1 A1^T + 1) kron I_Q + (X X^T + 1) kron (W2 W2^T).
    rng = np.random.default_rng(2)
    X = rng.uniform(0.5, 1.5, size=(6, 3))
    W1 = rng.uniform(0.5, 1.0, size=(5, 3))
    b1 = rng.uniform(0.1, 0.2, size=5)
    W2 = rng.standard_normal((2, 5))
    b2 = rng.standard_normal(2)
    A1 = X @ W1.T + b1
    expected = np.kron(A1 @ A1.T + 1, np.eye(2))
    expected += np.kron(X @ X.T + 1, W2 @ W2.T)
    G = nw.ntk([(W1, b1), (W2, b2)], X, activation="relu")
    assert_kernel_close(G, expected)


def test_ntk_of_duplicated_inputs_is_singular():
    params, X = make_problem([3, 6, 2], 4, "softplus", 9)
    X = np.vstack([X, X[:1]])
    G = nw.ntk(params, X, activation="softplus")
    np.testing.assert_array_equal(G[:2], G[-2:])
    assert np.linalg.matrix_rank(G) <= 8


def test_ntk_never_forms_the_jacobian():
    # K = 42,405 and N*Q = 500: D would take 170 MB, G takes 2 MB.
    params = nw.init_params([5, 200, 200, 5], rng=0)
    X = np.random.default_rng(1).standard_normal((100, 5))
    tracemalloc.start()
    try:
        nw.ntk(params, X, activation="tanh")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


@given(
    hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    n_inputs=st.integers(1, 4),
    n_outputs=st.integers(1, 4),
    n_samples=st.integers(1, 6),
    activation=st.sampled_from(ACTIVATIONS),
    seed=st.integers(0, 2**32 - 1),
)
def test_derivatives_agree_for_any_shape(
    hidden, n_inputs, n_outputs, n_samples, activation, seed
):
    widths = [n_inputs, *hidden, n_outputs]
    rng = np.random.default_rng(seed)
    params = nw.init_params(widths, rng=rng, bias_scale=0.3)
    X = rng.standard_normal((n_samples, n_inputs))
    D = nw.jacobian(params, X, activation=activation)
    assume(np.abs(D).max() > 0)
    G = nw.ntk(params, X, activation=activation)
    assert_kernel_close(G, D @ D.T)
    np.testing.assert_array_equal(G, G.T)
    v = rng.standard_normal(D.shape[1])
    c = rng.standard_normal(D.shape[0])
    scale = 1e-12 * np.abs(D).max() * (np.abs(v).sum() + np.abs(c).sum())
    Dv = nw.jvp(params, X, v, activation=activation)
    Dtc = nw.vjp(params, X, c, activation=activation)
    assert np.abs(Dv - D @ v).max() <= scale
    assert np.abs(Dtc - D.T @ c).max() <= scale


# --------------------------------------------------------------------------
# Initializers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme, variance",
    [
        ("he", lambda fan_in, fan_out: 2.0 / fan_in),
        ("glorot", lambda fan_in, fan_out: 2.0 / (fan_in + fan_out)),
        ("gaussian", lambda fan_in, fan_out: 1.0),
    ],
)
def test_initializer_variances(scheme, variance):
    widths, scale = [400, 300, 200], 1.5
    params = nw.init_params(widths, rng=0, scheme=scheme, scale=scale)
    for (W, b), fan_in, fan_out in zip(params, widths, widths[1:]):
        expected = scale**2 * variance(fan_in, fan_out)
        # Relative standard error of a sample variance: sqrt(2 / size) < 0.5%.
        assert abs(W.var() / expected - 1) < 0.03
        assert abs(W.mean()) < 0.03 * np.sqrt(expected)
        np.testing.assert_array_equal(b, 0.0)


def test_initializer_bias_scale_and_independence_of_weights():
    plain = nw.init_params([50, 400, 3], rng=4)
    biased = nw.init_params([50, 400, 3], rng=4, bias_scale=0.5)
    for (W, _), (W2, b2) in zip(plain, biased):
        np.testing.assert_array_equal(W, W2)
    assert abs(biased[0][1].std() / 0.5 - 1) < 0.15


def test_initializer_is_deterministic_from_its_seed():
    a = nw.flatten(nw.init_params([3, 5, 2], rng=123))
    b = nw.flatten(nw.init_params([3, 5, 2], rng=np.random.default_rng(123)))
    c = nw.flatten(nw.init_params([3, 5, 2], rng=124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "xavier"}, "scheme: expected one of"),
        ({"scale": -1.0}, "scale: expected a finite number"),
        ({"bias_scale": np.nan}, "bias_scale: expected a finite number"),
    ],
)
def test_initializer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nw.init_params([3, 2], rng=0, **kwargs)


# --------------------------------------------------------------------------
# npz files
# --------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    params = nw.init_params([4, 6, 5, 3], rng=0, bias_scale=1.0)
    path = tmp_path / "net.npz"
    nw.save_npz(path, params)
    with np.load(path) as archive:
        assert sorted(archive.files) == ["W1", "W2", "W3", "b1", "b2", "b3"]
    back = nw.load_npz(path, widths=[4, 6, 5, 3])
    np.testing.assert_array_equal(nw.flatten(back), nw.flatten(params))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_errors_name_the_problem(tmp_path):
    W1, b1, W2, b2 = np.ones((3, 2)), np.ones(3), np.ones((1, 3)), np.ones(1)
    first = {"W1": W1, "b1": b1}
    cases = [
        ({**first, "W2": W2}, r"missing arrays \['b2'\]"),
        ({**first, "W3": W2, "b3": b2}, r"missing arrays \['W2', 'b2'\]"),
        ({**first, "extra": b1}, r"unexpected arrays \['extra'\]"),
        ({**first, "W2": np.ones((1, 4)), "b2": b2}, r"W2: expected shape"),
        ({"W1": W1, "b1": np.ones(2)}, r"b1: expected shape \(3,\)"),
        ({"W1": W1 * np.inf, "b1": b1}, "non-finite"),
        ({}, "no arrays"),
    ]
    for index, (arrays, match) in enumerate(cases):
        path = write_npz(tmp_path / f"case{index}.npz", **arrays)
        with pytest.raises(ValueError, match=match):
            nw.load_npz(path)


def test_npz_widths_mismatch_and_unreadable_files(tmp_path):
    path = tmp_path / "net.npz"
    nw.save_npz(path, nw.init_params([2, 3, 1], rng=0))
    match = r"expected widths \[2, 4, 1\], got \[2, 3, 1\]"
    with pytest.raises(ValueError, match=match):
        nw.load_npz(path, widths=[2, 4, 1])
    text = tmp_path / "not.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot read as .npz"):
        nw.load_npz(text)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(ValueError, match="cannot read as .npz"):
        nw.load_npz(single)
    with pytest.raises(FileNotFoundError):
        nw.load_npz(tmp_path / "missing.npz")
