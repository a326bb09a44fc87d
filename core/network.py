"""Exact derivatives of a multilayer perceptron in its parameters.

The network has ``L`` hidden layers and a linear output layer::

    a^0 = xi,   z^l = W_l a^(l-1) + b_l,   a^l = sigma(z^l)   (l = 1..L),
    f(xi) = W_(L+1) a^L + b_(L+1).

Widths are ``[M, M_1, ..., M_L, Q]``: ``M`` inputs, ``Q`` outputs. ``W_l`` has
shape ``(M_l, M_(l-1))`` (out, in) and ``b_l`` shape ``(M_l,)``.

Conventions used by every function here:

- Samples are rows: inputs ``X`` have shape ``(N, M)``, outputs ``(N, Q)``.
- ``params`` is a list of ``(W_l, b_l)`` pairs, ``l = 1..L+1``.
- The parameter vector ``theta`` (length ``K``) concatenates, layer by layer,
  ``W_l`` flattened row-major and then ``b_l``.
- Stacked outputs are sample-major: entry ``n*Q + q`` is output ``q`` of sample
  ``n``, i.e. the ``(N, Q)`` output array flattened row-major.
- The Jacobian ``D`` has shape ``(N*Q, K)``; entry ``(r, k)`` is the derivative
  of stacked output ``r`` in parameter ``theta_k``. The empirical neural
  tangent kernel is ``G = D D^T``, shape ``(N*Q, N*Q)``.

``jvp``, ``vjp`` and ``ntk`` never form ``D``. Everything is float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "INIT_SCHEMES",
    "ForwardCache",
    "widths_of",
    "param_count",
    "flatten",
    "unflatten",
    "init_params",
    "save_npz",
    "load_npz",
    "forward",
    "forward_cache",
    "jacobian",
    "jvp",
    "vjp",
    "ntk",
]

ACTIVATIONS = ("relu", "tanh", "softplus")
INIT_SCHEMES = ("he", "glorot", "gaussian")

# Rows of the kernel per block in `ntk`: each block row is one GEMM per hidden
# layer, (rows, M_l) x (M_l, <= N*Q). About 100 rows keep these thin GEMMs
# near their BLAS speed and the block buffers (1.6 MB each at N*Q = 2000) in
# cache for the elementwise work; the diagonal blocks, computed whole, add
# rows / (N*Q) to the flops. Measured optimum, flat between 100 and 300.
NTK_BLOCK_ROWS = 100

_NPZ_NAME = re.compile(r"^([Wb])([1-9][0-9]*)$")


# --------------------------------------------------------------------------
# Parameters: shapes, flattening, initialization, files
# --------------------------------------------------------------------------


def widths_of(params):
    """Read the layer widths ``[M, M_1, ..., M_L, Q]`` off a parameter list.

    Parameters
    ----------
    params : sequence of (W, b) pairs
        ``W_l`` of shape ``(M_l, M_(l-1))``, ``b_l`` of shape ``(M_l,)``.

    Returns
    -------
    widths : list of int, length L + 2

    Raises
    ------
    ValueError
        If the pairs are malformed or consecutive layers do not chain.
    """
    return _check_params(params)[1]


def param_count(widths):
    """Count the parameters ``K = sum_l (M_l M_(l-1) + M_l)`` of an MLP.

    Parameters
    ----------
    widths : sequence of int, length >= 2
        ``[M, M_1, ..., M_L, Q]``.

    Returns
    -------
    int
    """
    widths = _check_widths(widths)
    return sum(m_out * (m_in + 1) for m_in, m_out in zip(widths, widths[1:]))


def flatten(params):
    """Stack the parameters into one vector ``theta`` in the project's order.

    The order is ``W_1`` row-major, ``b_1``, ``W_2`` row-major, ``b_2``, ...;
    entry ``(i, k)`` of ``W_l`` sits at ``offset_l + i * M_(l-1) + k``.

    Parameters
    ----------
    params : sequence of (W, b) pairs

    Returns
    -------
    theta : ndarray, shape (n_params,)
    """
    params, _ = _check_params(params)
    return _flatten(params)


def unflatten(theta, widths):
    """Split a parameter vector back into ``(W, b)`` pairs (inverse of flatten).

    Parameters
    ----------
    theta : array_like, shape (n_params,)
        In the order of :func:`flatten`.
    widths : sequence of int
        ``[M, M_1, ..., M_L, Q]``; ``n_params`` must equal ``param_count``.

    Returns
    -------
    params : list of (W, b) pairs
        Fresh arrays (copies), so later changes to ``theta`` do not leak in.
    """
    widths = _check_widths(widths)
    theta = np.asarray(theta, dtype=np.float64)
    expected = param_count(widths)
    if theta.shape != (expected,):
        raise ValueError(
            f"theta: expected shape ({expected},) for widths {widths}, "
            f"got {theta.shape}"
        )
    params = []
    offset = 0
    for m_in, m_out in zip(widths, widths[1:]):
        W = theta[offset : offset + m_out * m_in].reshape(m_out, m_in)
        offset += m_out * m_in
        b = theta[offset : offset + m_out]
        offset += m_out
        params.append((W.copy(), b.copy()))
    return params


def init_params(widths, *, rng, scheme="he", scale=1.0, bias_scale=0.0):
    """Draw random MLP parameters for given widths, reproducibly from a seed.

    Weights are Gaussian with mean zero and standard deviation

    - ``"he"``: ``scale * sqrt(2 / fan_in)`` (He et al., for ReLU);
    - ``"glorot"``: ``scale * sqrt(2 / (fan_in + fan_out))`` (Glorot normal);
    - ``"gaussian"``: ``scale``, whatever the fan.

    Biases are ``bias_scale`` times standard normals (zero by default). Every
    layer draws its weights and then its bias normals, so the weights do not
    depend on ``bias_scale``.

    Parameters
    ----------
    widths : sequence of int
        ``[M, M_1, ..., M_L, Q]``, all positive.
    rng : int, sequence of int, numpy.random.SeedSequence or Generator
        Seed or generator, passed to :func:`numpy.random.default_rng`.
    scheme : {"he", "glorot", "gaussian"}
    scale : float
        Non-negative gain on the weight standard deviation.
    bias_scale : float
        Non-negative standard deviation of the biases.

    Returns
    -------
    params : list of (W, b) pairs
    """
    widths = _check_widths(widths)
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme: expected one of {INIT_SCHEMES}, got {scheme!r}")
    for name, value in (("scale", scale), ("bias_scale", bias_scale)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    generator = np.random.default_rng(rng)
    params = []
    for m_in, m_out in zip(widths, widths[1:]):
        std = scale * _base_std(scheme, m_in, m_out)
        W = std * generator.standard_normal((m_out, m_in))
        b = bias_scale * generator.standard_normal(m_out)
        params.append((W, b))
    return params


def save_npz(path, params):
    """Write parameters to ``.npz`` as arrays ``W1, b1, W2, b2, ...``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; NumPy appends ``.npz`` if missing.
    params : sequence of (W, b) pairs
    """
    params, _ = _check_params(params)
    arrays = {}
    for index, (W, b) in enumerate(params, start=1):
        arrays[f"W{index}"] = W
        arrays[f"b{index}"] = b
    np.savez(path, **arrays)


def load_npz(path, widths=None):
    """Read parameters from ``.npz`` arrays ``W1, b1, ..., W{L+1}, b{L+1}``.

    ``W{l}`` must have shape ``(M_l, M_(l-1))`` and ``b{l}`` shape ``(M_l,)``;
    this is the format :func:`save_npz` writes.

    Parameters
    ----------
    path : str or os.PathLike
    widths : sequence of int, optional
        When given, the file's widths must equal these.

    Returns
    -------
    params : list of (W, b) pairs, float64

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not an ``.npz`` archive, an array is missing, an
        array name is not of the form ``W<l>``/``b<l>``, shapes do not chain,
        values are not finite, or the widths differ from ``widths``.
    """
    arrays = _read_npz(path)
    params = _params_from_arrays(arrays, where=str(path))
    if widths is not None:
        expected = _check_widths(widths)
        found = widths_of(params)
        if found != expected:
            raise ValueError(f"{path}: expected widths {expected}, got {found}")
    return params


def _read_npz(path):
    """Return the arrays of an npz archive as a dict; errors name the path."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: cannot read as .npz (found a single array of shape "
            f"{loaded.shape}, expected an archive of W1, b1, ...)"
        )
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _base_std(scheme, fan_in, fan_out):
    """Weight standard deviation of an init scheme before the gain."""
    if scheme == "he":
        return np.sqrt(2.0 / fan_in)
    if scheme == "glorot":
        return np.sqrt(2.0 / (fan_in + fan_out))
    return 1.0


def _params_from_arrays(arrays, where):
    """Turn a name -> array mapping from an npz file into checked params."""
    unknown = sorted(name for name in arrays if not _NPZ_NAME.match(name))
    if unknown:
        raise ValueError(
            f"{where}: unexpected arrays {unknown}; expected only W1, b1, W2, b2, ..."
        )
    indices = [int(_NPZ_NAME.match(name).group(2)) for name in arrays]
    n_layers = max(indices, default=0)
    if n_layers == 0:
        raise ValueError(f"{where}: no arrays W1, b1, ... found")
    names = [f"{kind}{l}" for l in range(1, n_layers + 1) for kind in "Wb"]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(
            f"{where}: missing arrays {missing} for a network with "
            f"{n_layers} layers (W{n_layers} is present)"
        )
    params = [(arrays[f"W{l}"], arrays[f"b{l}"]) for l in range(1, n_layers + 1)]
    try:
        params, _ = _check_params(params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    for l, (W, b) in enumerate(params, start=1):
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise ValueError(f"{where}: W{l} or b{l} has non-finite values")
    return params


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_widths(widths):
    """Return widths as a list of positive ints, or raise ValueError."""
    try:
        values = [int(w) for w in widths]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"widths: expected a sequence of positive ints, got {widths!r}"
        ) from exc
    if len(values) < 2 or min(values) < 1 or values != list(widths):
        raise ValueError(
            "widths: expected [M, M_1, ..., M_L, Q], at least two positive "
            f"ints, got {widths!r}"
        )
    return values


def _check_params(params):
    """Validate (W, b) pairs; return float64 copies-or-views and the widths.

    Messages name layers ``W1, b1, ...`` (1-based), as in the npz format.
    """
    if isinstance(params, np.ndarray) or not params:
        raise ValueError(
            "params: expected a non-empty list of (W, b) pairs, "
            f"got {type(params).__name__}"
        )
    checked = []
    widths = None
    for l, pair in enumerate(params, start=1):
        if len(pair) != 2:
            raise ValueError(
                f"params[{l - 1}]: expected a (W{l}, b{l}) pair, got {len(pair)} items"
            )
        W = np.asarray(pair[0], dtype=np.float64)
        b = np.asarray(pair[1], dtype=np.float64)
        if W.ndim != 2 or min(W.shape) < 1:
            raise ValueError(
                f"W{l}: expected a non-empty 2-d array (out, in), got shape {W.shape}"
            )
        if widths is None:
            widths = [W.shape[1]]
        if W.shape[1] != widths[-1]:
            raise ValueError(
                f"W{l}: expected shape ({W.shape[0]}, {widths[-1]}) to take "
                f"the {widths[-1]} outputs of the previous layer, got "
                f"{W.shape}"
            )
        if b.shape != (W.shape[0],):
            raise ValueError(
                f"b{l}: expected shape ({W.shape[0]},) to match W{l} of shape "
                f"{W.shape}, got {b.shape}"
            )
        widths.append(W.shape[0])
        checked.append((W, b))
    return checked, widths


def _check_inputs(X, n_inputs):
    """Return X as a float64 (N, M) array, or raise ValueError."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != n_inputs or X.shape[0] < 1:
        raise ValueError(
            f"X: expected shape (n_samples >= 1, {n_inputs}) with samples as "
            f"rows, got {X.shape}"
        )
    return X


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {ACTIVATIONS}, got {activation!r}"
        )


def _prepare(params, X, activation):
    """Check the common arguments; return (params, widths, X)."""
    _check_activation(activation)
    params, widths = _check_params(params)
    X = _check_inputs(X, widths[0])
    return params, widths, X


def _flatten(params):
    pieces = []
    for W, b in params:
        pieces.append(W.ravel())
        pieces.append(b)
    return np.concatenate(pieces)


# --------------------------------------------------------------------------
# Activations and the forward pass
# --------------------------------------------------------------------------


def _activate(activation, Z):
    """Return ``sigma(Z)`` and ``sigma'(Z)``, elementwise, same shape as Z.

    ReLU takes ``sigma'(0) = 0``. Softplus ``log(1 + e^t)`` is evaluated as
    ``log1p(e^-|t|) + max(t, 0)`` and its slope, the logistic function, from
    ``e^-|t|`` too, so neither overflows.
    """
    if activation == "relu":
        return np.maximum(Z, 0.0), (Z > 0).astype(np.float64)
    if activation == "tanh":
        A = np.tanh(Z)
        return A, 1.0 - A * A
    with np.errstate(under="ignore"):
        E = np.exp(-np.abs(Z))
    A = np.log1p(E) + np.maximum(Z, 0.0)
    slope = np.where(Z >= 0, 1.0, E) / (1.0 + E)
    return A, slope


@dataclass(frozen=True)
class ForwardCache:
    """Everything a backward or forward-mode pass needs from one forward pass.

    Attributes
    ----------
    inputs : tuple of ndarray
        ``inputs[l - 1]`` is the input of layer ``l`` (``l = 1..L+1``),
        shape ``(N, M_(l-1))``: ``X`` itself, then ``a^1, ..., a^L``.
    preactivations : tuple of ndarray
        ``preactivations[l - 1]`` is ``z^l``, shape ``(N, M_l)``, for
        ``l = 1..L+1``; the last one is the network output.
    slopes : tuple of ndarray
        ``slopes[l - 1]`` is ``sigma'(z^l)``, shape ``(N, M_l)``, ``l = 1..L``.
    """

    inputs: tuple
    preactivations: tuple
    slopes: tuple

    @property
    def output(self):
        """Network output, shape ``(N, Q)``."""
        return self.preactivations[-1]


def forward(params, X, activation="relu"):
    """Evaluate the network ``f(xi_n)`` on every sample.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
        Samples as rows.
    activation : {"relu", "tanh", "softplus"}
        Hidden-layer activation; the output layer is linear.

    Returns
    -------
    ndarray, shape (n_samples, n_outputs)
        Row ``n`` is ``f(X[n])``; ``.ravel()`` gives the sample-major stack.
    """
    params, _, X = _prepare(params, X, activation)
    A = X
    for W, b in params[:-1]:
        A, _ = _activate(activation, A @ W.T + b)
    W, b = params[-1]
    return A @ W.T + b


def forward_cache(params, X, activation="relu"):
    """Run the forward pass and keep what derivatives need.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    activation : {"relu", "tanh", "softplus"}

    Returns
    -------
    ForwardCache
        Layer inputs, pre-activations and activation slopes.
    """
    params, _, X = _prepare(params, X, activation)
    return _forward_cache(params, X, activation)


def _forward_cache(params, X, activation):
    inputs, preactivations, slopes = [X], [], []
    for W, b in params[:-1]:
        Z = inputs[-1] @ W.T + b
        A, E = _activate(activation, Z)
        preactivations.append(Z)
        inputs.append(A)
        slopes.append(E)
    W, b = params[-1]
    preactivations.append(inputs[-1] @ W.T + b)
    return ForwardCache(tuple(inputs), tuple(preactivations), tuple(slopes))


# --------------------------------------------------------------------------
# Derivatives
# --------------------------------------------------------------------------


def _sensitivities(params, cache):
    """Back-propagate the identity: ``S_l``, shape (N*Q, M_l), l = 1..L.

    Row ``n*Q + q`` of ``S_l`` is ``d f_q(xi_n) / d z^l``, i.e. column ``q``
    of ``Delta^l`` for sample ``n``. The output layer's ``S`` is the identity
    and is not returned.
    """
    n_samples = cache.inputs[0].shape[0]
    n_outputs = params[-1][0].shape[0]
    sens = [None] * (len(params) - 1)
    upstream = None
    for l in range(len(params) - 2, -1, -1):
        W_next = params[l + 1][0]
        E = cache.slopes[l][:, None, :]
        if upstream is None:
            S = E * W_next[None, :, :]
        else:
            S = (upstream @ W_next).reshape(n_samples, n_outputs, -1)
            S *= E
        upstream = S.reshape(n_samples * n_outputs, -1)
        sens[l] = upstream
    return sens


def jacobian(params, X, activation="relu"):
    """Form the explicit Jacobian ``D = d x / d theta`` of the stacked outputs.

    Memory is ``N*Q*K`` floats; use :func:`jvp`, :func:`vjp` or :func:`ntk`
    when only products or the kernel are needed.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    activation : {"relu", "tanh", "softplus"}

    Returns
    -------
    D : ndarray, shape (n_samples * n_outputs, n_params)
        Entry ``(n*Q + q, k)`` is ``d f_q(X[n]) / d theta_k``, columns in the
        order of :func:`flatten`.
    """
    params, widths, X = _prepare(params, X, activation)
    cache = _forward_cache(params, X, activation)
    n_samples, n_outputs = X.shape[0], widths[-1]
    eye = np.broadcast_to(np.eye(n_outputs), (n_samples, n_outputs, n_outputs))
    sens = _sensitivities(params, cache) + [eye.reshape(-1, n_outputs)]
    D = np.empty((n_samples * n_outputs, param_count(widths)))
    offset = 0
    for S, A in zip(sens, cache.inputs):
        m_out, m_in = S.shape[1], A.shape[1]
        S3 = S.reshape(n_samples, n_outputs, m_out)
        block = S3[:, :, :, None] * A[:, None, None, :]
        D[:, offset : offset + m_out * m_in] = block.reshape(-1, m_out * m_in)
        offset += m_out * m_in
        D[:, offset : offset + m_out] = S
        offset += m_out
    return D


def jvp(params, X, v, activation="relu"):
    """Push a parameter direction through the network: ``D v`` (forward mode).

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    v : array_like, shape (n_params,)
        Tangent of ``theta``, in the order of :func:`flatten`.
    activation : {"relu", "tanh", "softplus"}

    Returns
    -------
    ndarray, shape (n_samples * n_outputs,)
        Sample-major: entry ``n*Q + q`` is ``sum_k D[n*Q + q, k] v[k]``.
    """
    params, widths, X = _prepare(params, X, activation)
    v = np.asarray(v, dtype=np.float64)
    n_params = param_count(widths)
    if v.shape != (n_params,):
        raise ValueError(f"v: expected shape ({n_params},), got {v.shape}")
    tangents = unflatten(v, widths)
    cache = _forward_cache(params, X, activation)
    dA = None
    for l, ((W, _), (dW, db)) in enumerate(zip(params, tangents)):
        dZ = cache.inputs[l] @ dW.T + db
        if dA is not None:
            dZ += dA @ W.T
        if l < len(params) - 1:
            dA = cache.slopes[l] * dZ
    return dZ.ravel()


def vjp(params, X, c, activation="relu"):
    """Pull an output cotangent back to the parameters: ``D^T c``.

    One backward pass; ``D`` is never formed. With ``c = (x - y) / N`` this
    is the gradient of the cost ``|x - y|^2 / (2N)``.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    c : array_like, shape (n_samples * n_outputs,) or (n_samples, n_outputs)
        Cotangent of the stacked outputs, sample-major when flat.
    activation : {"relu", "tanh", "softplus"}

    Returns
    -------
    ndarray, shape (n_params,)
        In the order of :func:`flatten`.
    """
    params, widths, X = _prepare(params, X, activation)
    shape = (X.shape[0], widths[-1])
    c = np.asarray(c, dtype=np.float64)
    if c.shape not in (shape, (shape[0] * shape[1],)):
        raise ValueError(
            f"c: expected shape {shape} or ({shape[0] * shape[1]},), got {c.shape}"
        )
    cache = _forward_cache(params, X, activation)
    grad = c.reshape(shape)
    pieces = []
    for l in range(len(params) - 1, -1, -1):
        pieces.append(grad.sum(axis=0))
        pieces.append((grad.T @ cache.inputs[l]).ravel())
        if l > 0:
            grad = (grad @ params[l][0]) * cache.slopes[l - 1]
    return np.concatenate(pieces[::-1])


def ntk(params, X, activation="relu"):
    """Empirical neural tangent kernel ``G = D D^T`` without forming ``D``.

    Layer by layer (``S_l`` the back-propagated sensitivities of shape
    ``(N*Q, M_l)``, ``A_l`` the layer inputs of shape ``(N, M_(l-1))``)::

        G = sum_(l=1)^(L+1) (S_l S_l^T) o ((A_l A_l^T + 1) kron 1_(QxQ)),

    ``o`` elementwise; the output layer has ``S = I``, so its term is
    ``(A A^T + 1) kron I_Q``. Only the lower block triangle is computed, in
    row blocks of about :data:`NTK_BLOCK_ROWS` rows, each mirrored to the
    upper triangle. Memory is G plus ``O(N*Q*(sum_l M_l + NTK_BLOCK_ROWS))``;
    the work is about ``(N*Q)^2 * sum_(l<=L) M_l`` flops.

    Parameters
    ----------
    params : sequence of (W, b) pairs
    X : array_like, shape (n_samples, n_inputs)
    activation : {"relu", "tanh", "softplus"}

    Returns
    -------
    G : ndarray, shape (n_samples * n_outputs, n_samples * n_outputs)
        Entry ``(n*Q + q, m*Q + p)`` is ``<grad_theta f_q(X[n]),
        grad_theta f_p(X[m])>``. Exactly symmetric; positive semidefinite up
        to rounding.
    """
    params, widths, X = _prepare(params, X, activation)
    cache = _forward_cache(params, X, activation)
    sens = _sensitivities(params, cache)
    return _assemble_kernel(sens, cache.inputs, widths[-1])


def _assemble_kernel(sens, inputs, n_outputs):
    """Fill G one block row at a time: lower block triangle, then mirror."""
    n_samples = inputs[0].shape[0]
    size = n_samples * n_outputs
    step = max(1, NTK_BLOCK_ROWS // n_outputs)
    G = np.empty((size, size))
    workspace = np.empty((3, step * n_outputs * size))
    for start in range(0, n_samples, step):
        block = (start, min(n_samples, start + step))
        _kernel_rows(G, sens, inputs, n_outputs, block, workspace)
    return G


def _kernel_rows(G, sens, inputs, n_outputs, block, workspace):
    """Compute rows ``start*Q:stop*Q`` of G left of the diagonal, then mirror.

    The layer terms are summed in ``workspace`` (three buffers of at least
    ``rows * stop*Q`` floats), where the elementwise work stays in cache; the
    last sum writes straight into G, which is then copied once to its mirror
    image. The diagonal block is symmetrized so that G is exactly symmetric.
    """
    start, stop = block
    Q = n_outputs
    lo, hi = start * Q, stop * Q
    total, layer = (buf[: (hi - lo) * hi].reshape(hi - lo, hi) for buf in workspace[:2])
    rows = G[lo:hi, :hi]
    if not sens:
        total[...] = 0.0
        _add_output_term(total, inputs[-1], Q, block)
    for index, S in enumerate(sens):
        target = total if index == 0 else layer
        np.matmul(S[lo:hi], S[:hi].T, out=target)
        view = target.reshape(stop - start, Q, hi)
        view *= _layer_weights(inputs[index], Q, block, workspace[2])
        if index == 0:
            _add_output_term(total, inputs[-1], Q, block)
        elif index < len(sens) - 1:
            total += layer
        else:
            np.add(total, layer, out=rows)
    if len(sens) < 2:
        rows[...] = total
    diagonal = rows[:, lo:hi]
    diagonal[...] = 0.5 * (diagonal + diagonal.T)
    G[:lo, lo:hi] = rows[:, :lo].T


def _gram_rows(A, block):
    """Rows ``start:stop`` of ``A A^T + 1`` up to column ``stop``."""
    start, stop = block
    C = A[start:stop] @ A[:stop].T
    C += 1.0
    return C


def _layer_weights(A, n_outputs, block, buffer):
    """Rows of ``(A A^T + 1) kron 1_(1xQ)`` as shape (rows, 1, stop*Q)."""
    start, stop = block
    C = _gram_rows(A, block)
    if n_outputs == 1:
        return C[:, None, :]
    expanded = buffer[: C.size * n_outputs].reshape(*C.shape, n_outputs)
    expanded[...] = C[:, :, None]
    return expanded.reshape(stop - start, 1, stop * n_outputs)


def _add_output_term(total, A, n_outputs, block):
    """Add the output layer's ``(A A^T + 1) kron I_Q`` to a block row."""
    start, stop = block
    blocks = total.reshape(stop - start, n_outputs, stop, n_outputs)
    same_output = np.einsum("nqmq->nqm", blocks)
    same_output += _gram_rows(A, block)[:, None, :]
