"""Neural-collapse metrics against closed forms, invariances and edge cases.

Numbers refer to the test properties of reference/collapse.md section 12.
"""

import json
import math
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlmin.core import collapse as co
from dlmin.core.collapse import CollapseWarning

ATOL = 1e-12

NC1_KEYS = ("nc1", "nc1_quotient", "nc1_norm", "cdnv", "cdnv_max", "d_hesu")
NC2_KEYS = (
    "equinorm_means",
    "equiangular_means",
    "maxangle_means",
    "mean_cos_means",
    "etf_gap_means",
)
NC3_KEYS = ("self_duality", "duality_gram_gap", "duality_cos")


# --------------------------------------------------------------------------
# Fixtures and independent reference formulas
# --------------------------------------------------------------------------


def etf(C, D, alpha, rng):
    """Centred simplex-ETF means of norm alpha, rows, shape (C, D)."""
    U, _ = np.linalg.qr(rng.standard_normal((D, C)))
    star = math.sqrt(C / (C - 1)) * (np.eye(C) - 1.0 / C)
    return alpha * (U @ star).T


def offset(D, size, rng):
    t = rng.standard_normal(D)
    return size * t / np.linalg.norm(t)


def random_orthogonal(D, rng):
    Q, R = np.linalg.qr(rng.standard_normal((D, D)))
    return Q * np.sign(np.diag(R))


def quiet(fn, *args, **kw):
    """Call fn with CollapseWarning silenced (cases not about warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        return fn(*args, **kw)


def explicit_scatter(H, y, weighting="balanced"):
    """Sigma_W and Sigma_B as D x D matrices, straight from section 1."""
    H = np.asarray(H, dtype=np.float64)
    classes = np.unique(y)
    counts = np.array([np.sum(y == c) for c in classes])
    pi = (
        np.full(len(classes), 1 / len(classes))
        if weighting == "balanced"
        else counts / counts.sum()
    )
    mu = np.array([H[y == c].mean(axis=0) for c in classes])
    mt = mu - pi @ mu
    Sw = sum(
        p / n * (H[y == c] - m).T @ (H[y == c] - m)
        for p, n, c, m in zip(pi, counts, classes, mu)
    )
    Sb = (mt.T * pi) @ mt
    return Sw, Sb, mt, pi


def explicit_nc1_eigh(H, y, r):
    """tr(Sigma_W Sigma_B^{+,r}) / C by eigendecomposing the D x D Sigma_B."""
    Sw, Sb, mt, _ = explicit_scatter(H, y)
    w, V = np.linalg.eigh(Sb)
    Vr, wr = V[:, -r:], w[-r:]
    return float(np.trace(Vr.T @ Sw @ Vr / wr)) / mt.shape[0]


def explicit_trace_gram(H, y, r, weighting="balanced"):
    """tr(Sigma_W Sigma_B^{+,r}) through the C x C Gram of B = diag(sqrt pi) M~.

    With B B^T = E L E^T, the top-r eigenvectors of Sigma_B = B^T B are
    B^T e_i / sqrt(l_i), so Sigma_B^{+,r} = sum_i B^T e_i e_i^T B / l_i^2.
    """
    Sw, _, mt, pi = explicit_scatter(H, y, weighting)
    Bm = np.sqrt(pi)[:, None] * mt
    lam, E = np.linalg.eigh(Bm @ Bm.T)
    Er, lr = E[:, -r:], lam[-r:]
    P = Bm.T @ Er / lr  # columns u_i / s_i
    return float(np.einsum("di,de,ei->", P, Sw, P))


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# --------------------------------------------------------------------------
# 1. Exact collapse
# --------------------------------------------------------------------------


def test_exact_collapse_gives_zeros(rng):
    C, D, beta = 4, 6, 1.7
    means = etf(C, D, 2.0, rng) + offset(D, 3.0, rng)
    y = np.repeat(np.arange(C), [3, 5, 4, 6])
    H = means[y]
    mt = means - means.mean(axis=0)
    W = beta * mt
    b = -W @ means.mean(axis=0)
    res = co.collapse_metrics(H, y, W=W, b=b, predictions=y)
    for key in NC1_KEYS + NC2_KEYS[:3] + ("etf_gap_means",) + NC3_KEYS[:2]:
        assert abs(res.metrics[key]) < ATOL, key
    for key in (
        "equinorm_classifier",
        "equiangular_classifier",
        "maxangle_classifier",
        "etf_gap_classifier",
        "bias_gap",
    ):
        assert abs(res.metrics[key]) < ATOL, key
    off = res.cos_means[np.triu_indices(C, 1)]
    np.testing.assert_allclose(off, -1 / (C - 1), atol=ATOL)
    assert res.rank == C - 1
    assert res.duality_cos == pytest.approx(1.0, abs=ATOL)
    assert res.ncc_mismatch == 0.0 and res.ncc_acc == 1.0
    assert not res.warnings


# --------------------------------------------------------------------------
# 2. Closed forms
# --------------------------------------------------------------------------


def test_symmetric_deviations_closed_forms(rng):
    """ETF means of norm alpha, deviations +-a e_k: Sigma_W = (a^2/D) I."""
    C, D, alpha, a = 3, 5, 2.0, 0.5
    means = etf(C, D, alpha, rng) + offset(D, 4.0, rng)
    dev = np.vstack([a * np.eye(D), -a * np.eye(D)])
    H = np.vstack([m + dev for m in means])
    y = np.repeat(np.arange(C), 2 * D)
    res = co.collapse_metrics(H, y)
    nc1 = a**2 * (C - 1) ** 2 / (D * C * alpha**2)
    assert res.nc1 == pytest.approx(nc1, rel=1e-12)
    assert res.nc1_quotient == pytest.approx(a**2 / alpha**2, rel=1e-12)
    assert res.nc1_norm == pytest.approx(a**2 / (a**2 + alpha**2), rel=1e-12)
    cdnv = a**2 * (C - 1) / (2 * C * alpha**2)
    assert res.cdnv == pytest.approx(cdnv, rel=1e-12)
    assert res.cdnv_max == pytest.approx(cdnv, rel=1e-12)
    assert res.d_hesu == pytest.approx(C * nc1, rel=1e-12)
    np.testing.assert_allclose(res.class_variances, a**2, rtol=1e-12)


def hand_1d():
    """Class 0 at {-1, 1} (V = 1), class 1 at {3, 5, 7} (V = 8/3)."""
    H = np.array([[-1.0], [1.0], [3.0], [5.0], [7.0]])
    y = np.array([0, 0, 1, 1, 1])
    return H, y


def test_hand_worked_two_classes_in_1d():
    """Balanced: mu_G = 2.5, Sigma_B = 6.25, Sigma_W = 11/6.

    Sample weights (2/5, 3/5): mu_G = 3, Sigma_B = 6, Sigma_W = 2, so
    D_HeSu = 1/3; centred means (-3, 2): equinorm = 0.5 / 2.5.
    """
    H, y = hand_1d()
    with pytest.warns(CollapseWarning, match="C = 2"):
        res = co.collapse_metrics(H, y)
    assert res.nc1 == pytest.approx(11 / 75, rel=1e-14)
    assert res.nc1_quotient == pytest.approx(22 / 75, rel=1e-14)
    assert res.nc1_norm == pytest.approx(22 / 97, rel=1e-14)
    assert res.cdnv == pytest.approx(11 / 150, rel=1e-14)
    assert res.d_hesu == pytest.approx(1 / 3, rel=1e-14)
    assert res.trace_within == pytest.approx(11 / 6, rel=1e-14)
    assert res.trace_between == pytest.approx(6.25, rel=1e-14)
    assert res.equinorm_means == pytest.approx(0.0, abs=ATOL)
    assert res.flags["two_classes"]
    with pytest.warns(CollapseWarning):
        sample = co.collapse_metrics(H, y, weighting="sample")
    assert sample.global_mean[0] == pytest.approx(3.0, rel=1e-14)
    assert sample.equinorm_means == pytest.approx(0.2, rel=1e-14)
    assert sample.mean_cos_means == pytest.approx(-1.0, abs=ATOL)
    assert sample.nc1 == pytest.approx(2 / 6 / 2, rel=1e-14)
    assert sample.d_hesu == pytest.approx(1 / 3, rel=1e-14)


def test_ddof_cov_of_norms_1_1_1_2(rng):
    """Norms (1, 1, 1, 2): CoV sqrt(3)/5 (ddof 0) and 2/5 (ddof 1)."""
    C = D = 4
    means = etf(C, D, 3.0, rng)
    y = np.repeat(np.arange(C), 5)
    H = means[y] + 0.1 * rng.standard_normal((y.size, D))
    W = np.diag([1.0, 1.0, 1.0, 2.0])
    r0 = co.collapse_metrics(H, y, W=W)
    r1 = co.collapse_metrics(H, y, W=W, ddof=1)
    assert r0.equinorm_classifier == pytest.approx(math.sqrt(3) / 5, rel=1e-14)
    assert r1.equinorm_classifier == pytest.approx(0.4, rel=1e-14)
    assert r1.equinorm_classifier / r0.equinorm_classifier == pytest.approx(
        math.sqrt(C / (C - 1)), rel=1e-14
    )
    assert r1.options["ddof"] == 1 and r0.as_dict()["ddof"] == 0


def test_rotated_classifier_duality_closed_form():
    """C = 3 ETF in the plane, W = means rotated by theta.

    Each w_c makes angle theta with m_c: cos = cos(theta), and with equal
    Frobenius norms the squared self-duality is 2 - 2 cos(theta).
    """
    theta = 0.3
    phi = 2 * np.pi * np.arange(3) / 3
    means = 2.0 * np.c_[np.cos(phi), np.sin(phi)]
    W = 5.0 * np.c_[np.cos(phi + theta), np.sin(phi + theta)]
    y = np.repeat(np.arange(3), 2)
    H = means[y] + np.array([[0.1, 0], [-0.1, 0]] * 3)
    res = co.collapse_metrics(H, y, W=W)
    assert res.self_duality == pytest.approx(2 - 2 * math.cos(theta), rel=1e-13)
    assert res.duality_cos == pytest.approx(math.cos(theta), rel=1e-13)
    assert res.duality_cos_cov == pytest.approx(0.0, abs=ATOL)
    assert res.equinorm_classifier == pytest.approx(0.0, abs=ATOL)
    aligned = co.collapse_metrics(H, y, W=3.0 * means)
    assert aligned.duality_gram_gap == pytest.approx(0.0, abs=ATOL)


def test_bias_gap_targets_by_hand():
    """W = [[1], [-1]], b = 0, mu_G = 2.5: W mu_G = (2.5, -2.5).

    Cross-entropy target 0: sqrt(12.5); L2 target y_bar = (1/2, 1/2):
    (2, -3), sqrt(13).
    """
    H, y = hand_1d()
    W = np.array([[1.0], [-1.0]])
    with pytest.warns(CollapseWarning):
        ce = co.collapse_metrics(H, y, W=W)
        l2 = co.collapse_metrics(H, y, W=W, loss="l2")
    assert ce.bias_gap == pytest.approx(math.sqrt(12.5), rel=1e-14)
    assert l2.bias_gap == pytest.approx(math.sqrt(13.0), rel=1e-14)


def test_ncc_by_hand():
    """Means 3 (class 0 at 0, 1, 8) and 11 (class 1 at 10, 12).

    The point 8 is nearer 11: NCC accuracy 4/5. Held out: 6.5 -> 0 (right),
    7.5 -> 1 (wrong), 7 is a tie -> 0, and label 9 is unknown (wrong).
    """
    H = np.array([0.0, 1.0, 8.0, 10.0, 12.0])[:, None]
    y = np.array([0, 0, 0, 1, 1])
    held = (
        np.array([[6.5], [7.5], [7.0], [11.0]]),
        np.array([0, 0, 0, 9]),
        np.array([0, 0, 1, 1]),
    )
    with pytest.warns(CollapseWarning):
        res = co.collapse_metrics(H, y, predictions=y, heldout=held)
    assert res.ncc_acc == pytest.approx(4 / 5)
    assert res.ncc_mismatch == pytest.approx(1 / 5)
    assert res.ncc_acc_heldout == pytest.approx(2 / 4)
    assert res.ncc_mismatch_heldout == pytest.approx(2 / 4)
    assert res.n_heldout == 4
    assert res.ncc_mismatch_against == "predictions"


def test_ncc_mismatch_against_the_classifier():
    """Without predictions the classifier decides: W h + b = (7 - h, h - 7).

    Its threshold 7 is the midpoint of the means 3 and 11, ties to class 0
    like the NCC rule, so the two rules agree everywhere.
    """
    H = np.array([0.0, 1.0, 8.0, 10.0, 12.0])[:, None]
    y = np.array([0, 0, 0, 1, 1])
    held = (np.array([[6.5], [7.5], [7.0], [11.0]]), np.array([0, 0, 0, 1]))
    W, b = np.array([[-1.0], [1.0]]), np.array([7.0, -7.0])
    with pytest.warns(CollapseWarning):
        res = co.collapse_metrics(H, y, W=W, b=b, heldout=held)
        l2 = co.collapse_metrics(H, y, W=W, b=b, heldout=held, loss="l2")
    assert res.ncc_mismatch == 0.0 and res.ncc_mismatch_heldout == 0.0
    assert res.ncc_mismatch_against == "classifier"
    assert l2.ncc_mismatch == 0.0 and l2.ncc_mismatch_heldout == 0.0


# --------------------------------------------------------------------------
# 3. Invariances
# --------------------------------------------------------------------------


def random_problem(rng, C=5, D=8, sizes=(7, 11, 9, 13, 10), spread=0.6):
    means = etf(C, D, 2.0, rng) + 0.4 * rng.standard_normal((C, D))
    y = np.repeat(np.arange(C), sizes)
    H = means[y] + spread * rng.standard_normal((y.size, D))
    return H, y


@pytest.mark.parametrize("s", [3.5, -0.2])
def test_similarity_invariance(rng, s):
    H, y = random_problem(rng)
    Q = random_orthogonal(H.shape[1], rng)
    t = rng.standard_normal(H.shape[1]) * 5
    base = co.collapse_metrics(H, y)
    moved = co.collapse_metrics(s * H @ Q.T + t, y)
    for key in NC1_KEYS + NC2_KEYS:
        assert rel(moved.metrics[key], base.metrics[key]) < 1e-10, key
    assert moved.rank == base.rank
    assert moved.ncc_acc == base.ncc_acc


def test_classifier_scale_and_joint_rotation(rng):
    H, y = random_problem(rng)
    C, D = 5, H.shape[1]
    W, b = rng.standard_normal((C, D)), rng.standard_normal(C)
    base = co.collapse_metrics(H, y, W=W, b=b)
    scaled = co.collapse_metrics(H, y, W=4.0 * W, b=b)
    Q = random_orthogonal(D, rng)
    turned = co.collapse_metrics(H @ Q.T, y, W=W @ Q.T, b=b)
    for key in NC3_KEYS + ("duality_cos_cov",):
        assert rel(scaled.metrics[key], base.metrics[key]) < 1e-10, key
    for key in NC3_KEYS + ("bias_gap", "etf_gap_classifier"):
        assert rel(turned.metrics[key], base.metrics[key]) < 1e-10, key


def test_class_relabelling(rng):
    """Arbitrary label values in another order give the same metrics."""
    H, y = random_problem(rng)
    W = rng.standard_normal((5, H.shape[1]))
    names = np.array([40, 7, 19, -3, 2])  # label of class c
    base = co.collapse_metrics(H, y, W=W, predictions=y)
    order = np.argsort(names)  # sorted label order
    renamed = co.collapse_metrics(H, names[y], W=W[order], predictions=names[y])
    for key in NC1_KEYS + NC2_KEYS + NC3_KEYS + ("ncc_acc", "ncc_mismatch"):
        assert rel(renamed.metrics[key], base.metrics[key]) < 1e-10, key
    assert list(renamed.classes) == sorted(names.tolist())


# --------------------------------------------------------------------------
# 4. Streaming equals in-memory
# --------------------------------------------------------------------------


def chunked(H, y, pred, cuts, order):
    def factory():
        Hp, yp, pp = H[order], y[order], pred[order]
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield Hp[a:b], yp[a:b], pp[a:b]

    return factory


def assert_same(a, b, rtol):
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for key, va in da.items():
        vb = db[key]
        if isinstance(va, float) and isinstance(vb, float):
            assert abs(va - vb) <= rtol * max(abs(va), abs(vb)) + 1e-300, key
        else:
            assert va == vb, key


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_equals_in_memory(rng, seed):
    H, y = random_problem(rng)
    W, b = rng.standard_normal((5, 8)), rng.standard_normal(5)
    pred = (y + (rng.random(y.size) < 0.2)) % 5
    held = random_problem(rng, sizes=(3, 4, 2, 5, 3))
    kw = dict(W=W, b=b, l2_lam=0.05, weighting="sample")
    base = co.collapse_metrics(H, y, predictions=pred, heldout=held, **kw)
    local = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable") if seed else local.permutation(y.size)
    cuts = np.r_[0, np.sort(local.choice(np.arange(1, y.size), 9, False)), y.size]
    stream = co.collapse_metrics_streaming(
        chunked(H, y, pred, cuts, order), heldout_factory=lambda: iter([held]), **kw
    )
    assert_same(stream, base, 1e-12)


def test_many_classes_take_the_sorted_path(rng):
    """C = 40 > MASK_CLASSES: per-class sums by sorting, same numbers."""
    C, D = 40, 50
    y = np.r_[np.arange(C), rng.integers(0, C, 300)]
    H = rng.standard_normal((C, D))[y] + 0.3 * rng.standard_normal((y.size, D))
    assert C > co.MASK_CLASSES
    res = co.collapse_metrics(H, y)
    ref = explicit_trace_gram(H, y, res.rank) / C
    assert res.rank == C - 1 and rel(res.nc1, ref) < 1e-10
    order = rng.permutation(y.size)
    cuts = np.r_[0, 17, 150, 151, y.size]
    stream = co.collapse_metrics_streaming(chunked(H, y, y, cuts, order))
    base = co.collapse_metrics(H, y, predictions=y)
    assert_same(stream, base, 1e-12)


def test_progress_reports_rows_of_both_passes(rng):
    H, y = random_problem(rng)
    calls = []
    co.collapse_metrics(H, y, progress=lambda done, total: calls.append((done, total)))
    N = y.size
    assert calls[0] == (N, None) and calls[-1] == (2 * N, 2 * N)


def test_streaming_refuses_changed_data(rng):
    H, y = random_problem(rng)
    calls = []

    def factory():
        calls.append(1)
        yield (H if len(calls) == 1 else H + 1.0), y

    with pytest.raises(ValueError, match="same samples"):
        co.collapse_metrics_streaming(factory)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_and_npy_streams(rng, tmp_path, compression):
    H, y = random_problem(rng)
    H32 = H.astype(np.float32)
    pred = y[::-1].copy()
    path = tmp_path / "feats.npz"
    (np.savez_compressed if compression == zipfile.ZIP_DEFLATED else np.savez)(
        path, features=H32, labels=y, predictions=pred
    )
    base = co.collapse_metrics(H32, y, predictions=pred)
    from_npz = co.collapse_metrics_streaming(co.npz_chunks(path, chunk_rows=7))
    assert_same(from_npz, base, 1e-12)
    np.save(tmp_path / "h.npy", H32)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", pred)
    from_npy = co.collapse_metrics_streaming(
        co.npy_chunks(
            tmp_path / "h.npy", tmp_path / "y.npy", tmp_path / "p.npy", chunk_rows=13
        )
    )
    assert_same(from_npy, base, 1e-12)
    with pytest.raises(ValueError, match="no array 'feats'"):
        co.npz_chunks(path, features="feats")


# --------------------------------------------------------------------------
# 5-10. Blind spot and degenerate cases
# --------------------------------------------------------------------------


def test_blind_spot_noise_outside_span(rng):
    """Symmetric noise orthogonal to span(M~) is invisible to projected NC1."""
    C, D = 3, 7
    means = etf(C, D, 2.0, rng)
    basis, _ = np.linalg.qr(np.c_[means.T, rng.standard_normal((D, D))])
    perp = basis[:, C - 1 : C + 1].T  # two unit directions
    dev = 0.3 * np.vstack([perp, -perp])
    H = np.vstack([m + dev for m in means])
    y = np.repeat(np.arange(C), 4)
    res = co.collapse_metrics(H, y)
    assert res.nc1 <= 1e-12
    assert res.nc1_quotient > 1e-3 and res.cdnv > 1e-3


def test_two_classes_vacuous_nc2(rng):
    y = np.repeat([0, 1], [9, 14])
    H = rng.standard_normal((y.size, 6)) + 3.0
    with pytest.warns(CollapseWarning, match="NC2 is vacuous"):
        res = co.collapse_metrics(H, y)
    assert res.equinorm_means == pytest.approx(0.0, abs=ATOL)
    assert res.mean_cos_means == pytest.approx(-1.0, abs=ATOL)
    assert res.flags["two_classes"] and res.as_dict()["flag_two_classes"]


def test_orthogonal_frame(rng):
    C, alpha = 4, 3.0
    means = alpha * np.eye(C)
    y = np.repeat(np.arange(C), 3)
    H = means[y]
    res = co.collapse_metrics(H, y)
    assert res.of_gap_means == pytest.approx(0.0, abs=ATOL)
    for key in (
        "equinorm_means",
        "equiangular_means",
        "maxangle_means",
        "etf_gap_means",
    ):
        assert abs(res.metrics[key]) < ATOL, key
    assert res.mean_cos_means == pytest.approx(-1 / (C - 1), abs=ATOL)
    shifted = co.collapse_metrics(H + 1.0, y)
    assert shifted.of_gap_means > 0.1  # not translation invariant


def test_coinciding_means(rng):
    C, D = 4, 5
    means = etf(C, D, 2.0, rng)
    means[3] = means[2]
    dev = 0.1 * np.vstack([np.eye(D), -np.eye(D)])
    H = np.vstack([m + dev for m in means])
    y = np.repeat(np.arange(C), 2 * D)
    with pytest.warns(CollapseWarning, match="coincide"):
        res = co.collapse_metrics(H, y)
    assert np.isinf(res.cdnv_pairs[2, 3]) and np.isinf(res.cdnv_pairs[3, 2])
    assert res.flags["coinciding_means"] == 1
    assert res.rank < C - 1 and res.flags["rank_deficient"]
    assert all(math.isfinite(res.metrics[k]) for k in NC1_KEYS + NC2_KEYS)


def test_zero_centred_mean_excluded_from_cosines(rng):
    """Three means with a zero centred mean: its cosines are NaN, excluded."""
    means = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    y = np.repeat(np.arange(3), 2)
    H = means[y] + np.array([[0.0, 0.1], [0.0, -0.1]] * 3)
    with pytest.warns(CollapseWarning, match="zero"):
        res = co.collapse_metrics(H, y)
    assert res.flags["zero_centred_means"] == 1
    assert np.isnan(res.cos_means[0, 1]) and res.cos_means[0, 2] == -1.0
    assert res.mean_cos_means == -1.0


def test_empty_and_singleton_classes(rng):
    H, y = random_problem(rng, C=3, sizes=(5, 1, 6))
    W = rng.standard_normal((4, H.shape[1]))
    with pytest.warns(CollapseWarning) as record:
        res = co.collapse_metrics(H, y, classes=[0, 1, 2, 3], W=W)
    text = " ".join(str(w.message) for w in record)
    assert "empty" in text and "one sample" in text
    assert res.n_classes == 4 and res.n_classes_eff == 3
    assert res.flags["empty_classes"] == 1
    assert res.flags["singleton_classes"] == 1
    assert res.class_variances[1] == 0.0
    assert all(math.isfinite(res.metrics[k]) for k in NC1_KEYS + NC2_KEYS)
    with pytest.raises(ValueError, match="have no samples"):
        co.collapse_metrics(H, y, classes=[0, 1, 2, 3], empty="raise")


def test_more_classes_than_dimensions(rng):
    C, D = 7, 3
    y = np.repeat(np.arange(C), 4)
    H = rng.standard_normal((C, D))[y] + 0.1 * rng.standard_normal((y.size, D))
    with pytest.warns(CollapseWarning, match="no simplex ETF"):
        res = co.collapse_metrics(H, y, W=rng.standard_normal((C, D)))
    assert res.flags["no_simplex_etf"] and res.rank <= D
    finite = [v for v in res.metrics.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in finite)
    assert res.etf_gap_means > 0.1


def test_all_means_coincide_is_flagged_not_nan(rng):
    dev = 0.2 * np.vstack([np.eye(3), -np.eye(3)])
    H = np.vstack([dev, dev[::-1], dev]) + 1.0
    y = np.repeat([0, 1, 2], 6)
    with pytest.warns(CollapseWarning) as record:
        res = co.collapse_metrics(H, y)
    assert "all class means coincide" in str(record[-1].message)
    assert res.flags["coinciding_means"] == 3
    assert res.rank == 0 and res.nc1 == 0.0
    assert math.isinf(res.nc1_quotient)
    assert res.as_dict()["nc1_quotient"] is None
    json.dumps(res.as_dict(arrays=True), allow_nan=False)


# --------------------------------------------------------------------------
# 11-13. Numerics: pseudo-inverse, explicit formula, cancellation
# --------------------------------------------------------------------------


def large_d_problem(D, dtype, sigma, rng, C=10, n=20):
    means = etf(C, D, 5.0, rng) + offset(D, 20.0, rng)
    y = np.repeat(np.arange(C), n)
    H = means[y] + sigma * rng.standard_normal((y.size, D))
    return H.astype(dtype), y


def test_float32_large_d_against_explicit_rank_r(rng):
    """Section 12.11: float32, D = 512; the D x D pinv fails by far."""
    H, y = large_d_problem(512, np.float32, 0.1, rng)
    res = co.collapse_metrics(H, y)
    assert res.rank == 9 and res.input_dtype == "float32"
    reference = explicit_nc1_eigh(H, y, r=9)
    assert rel(res.nc1, reference) < 1e-4
    _, Sb, mt, _ = explicit_scatter(H, y)
    Sw = explicit_scatter(H, y)[0]
    mt32 = mt.astype(np.float32)
    Sb32 = (mt32.T @ mt32 / 10).astype(np.float64)  # formed in float32
    naive = float(np.trace(Sw @ np.linalg.pinv(Sb32))) / 10
    assert abs(naive - reference) > 100 * reference


def test_float64_large_d_against_explicit_rank_r(rng):
    """Section 12.11: float64, D = 2048, sigma = 1e-2."""
    H, y = large_d_problem(2048, np.float64, 1e-2, rng)
    res = co.collapse_metrics(H, y)
    assert res.rank == 9
    assert rel(res.nc1, explicit_trace_gram(H, y, r=9) / 10) < 1e-10


@given(
    C=st.integers(2, 6),
    D=st.integers(1, 7),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    sample=st.booleans(),
)
def test_nc1_nonnegative_and_explicit(C, D, n, seed, sample):
    """Section 12.12 on random shapes, both weightings."""
    local = np.random.default_rng(seed)
    y = np.r_[np.arange(C), local.integers(0, C, n * C)]
    H = local.standard_normal((y.size, D)) * local.uniform(0.1, 10)
    weighting = "sample" if sample else "balanced"
    res = quiet(co.collapse_metrics, H, y, weighting=weighting)
    assert res.nc1 >= 0 and res.d_hesu >= 0
    if res.rank:
        ref = explicit_trace_gram(H, y, res.rank, weighting) / C
        assert res.nc1 == pytest.approx(ref, rel=1e-10, abs=1e-14)
    if res.rank == min(C - 1, D):  # the sample-weighted B has it too
        ref = explicit_trace_gram(H, y, res.rank, "sample")
        assert res.d_hesu == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_two_pass_variance_survives_large_offset(rng):
    """Section 12.13: |mu| / sigma = 1e8; one pass E|h|^2 - |mu|^2 fails."""
    C, D, n = 3, 16, 50
    centre = offset(D, 1e8, rng)
    noise = rng.standard_normal((C * n, D))
    y = np.repeat(np.arange(C), n)
    H = centre + 0.5 * np.arange(C)[y, None] + noise
    res = co.collapse_metrics(H, y)
    truth = np.array([
        ((noise[y == c] - noise[y == c].mean(0)) ** 2).sum(1).mean() for c in range(C)
    ])
    np.testing.assert_allclose(res.class_variances, truth, rtol=1e-6)
    one_pass = np.array([
        (H[y == c] ** 2).sum(1).mean() - (H[y == c].mean(0) ** 2).sum()
        for c in range(C)
    ])
    assert np.max(np.abs(one_pass - truth) / truth) > 1e-2


# --------------------------------------------------------------------------
# 15. Weighting
# --------------------------------------------------------------------------


def test_weighting_changes_only_imbalanced_results(rng):
    H, y = random_problem(rng)
    bal = co.collapse_metrics(H, y)
    smp = co.collapse_metrics(H, y, weighting="sample")
    assert np.linalg.norm(bal.global_mean - smp.global_mean) > 1e-3
    assert abs(bal.equinorm_means - smp.equinorm_means) > 1e-4
    for res, weighting in ((bal, "balanced"), (smp, "sample")):
        Sw, Sb, _, pi = explicit_scatter(H, y, weighting)
        Hc = H - res.global_mean
        St = sum(
            p / np.sum(y == c) * Hc[y == c].T @ Hc[y == c] for p, c in zip(pi, range(5))
        )
        np.testing.assert_allclose(St, Sw + Sb, atol=1e-12)
        assert res.trace_within + res.trace_between == pytest.approx(
            np.trace(St), rel=1e-12
        )
    Hb, yb = random_problem(rng, sizes=(8,) * 5)
    a = co.collapse_metrics(Hb, yb)
    b = co.collapse_metrics(Hb, yb, weighting="sample")
    assert_same_numbers(a, b, NC1_KEYS + NC2_KEYS)


def assert_same_numbers(a, b, keys):
    for key in keys:
        assert rel(a.metrics[key], b.metrics[key]) < 1e-12, key


# --------------------------------------------------------------------------
# 16. L2 loss decomposition
# --------------------------------------------------------------------------


def direct_l2(H, y, W, b, Y, lam):
    C = Y.shape[0]
    out = H @ W.T + b - Y[y]
    per = np.array([(out[y == c] ** 2).sum(1).mean() for c in range(C)])
    return 0.5 * per.mean() + 0.5 * lam * ((W**2).sum() + (b**2).sum())


@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("general", [False, True])
def test_l2_decomposition_closes(rng, lam, general):
    H, y = random_problem(rng)
    C, D = 5, H.shape[1]
    Y = rng.standard_normal((C, 3)) if general else np.eye(C)
    W, b = rng.standard_normal((Y.shape[1], D)), rng.standard_normal(Y.shape[1])
    res = co.collapse_metrics(
        H, y, W=W, b=b, targets=Y if general else None, loss="l2", l2_lam=lam
    )
    l2 = res.l2
    assert l2.loss == pytest.approx(direct_l2(H, y, W, b, Y, lam), rel=1e-12)
    assert l2.nc1 + l2.nc23 + l2.perp == pytest.approx(l2.loss, rel=1e-10)
    at_ls = co.collapse_metrics(
        H,
        y,
        W=l2.W_ls,
        b=l2.b_ls,
        loss="l2",
        targets=Y if general else None,
        l2_lam=lam,
    )
    assert at_ls.l2.perp == pytest.approx(0.0, abs=1e-10 * l2.loss)
    if lam == 0.0:
        ybar = Y.mean(axis=0)
        np.testing.assert_allclose(
            l2.W_ls @ res.global_mean + l2.b_ls, ybar, atol=1e-10
        )
        assert at_ls.bias_gap == pytest.approx(0.0, abs=1e-10)


def test_l2_decomposition_collapsed_features(rng):
    """lambda = 0 with Sigma_T of rank C - 1 < D: closes, no LinAlgError."""
    C, D = 4, 9
    means = etf(C, D, 2.0, rng) + offset(D, 1.0, rng)
    y = np.repeat(np.arange(C), [2, 3, 4, 5])
    W, b = rng.standard_normal((C, D)), rng.standard_normal(C)
    res = co.collapse_metrics(means[y], y, W=W, b=b, loss="l2", l2_lam=0.0)
    l2 = res.l2
    assert l2.nc1 + l2.nc23 + l2.perp == pytest.approx(l2.loss, rel=1e-10)
    assert l2.nc1 == pytest.approx(0.0, abs=1e-12)
    assert l2.nc23 == pytest.approx(0.0, abs=1e-10)


# --------------------------------------------------------------------------
# 17 and feature sources: layers, truncation maps, a constructed network
# --------------------------------------------------------------------------


def test_layer_and_truncation_features(rng):
    from dlmin.core.network import forward, init_params
    from dlmin.core.truncation import truncation_chain

    params = init_params([3, 5, 4, 2], rng=rng)
    X = rng.standard_normal((10, 3))
    feats = co.layer_features(params, X)
    assert [f.shape[1] for f in feats] == [3, 5, 4, 2]
    np.testing.assert_allclose(feats[-1], forward(params, X), atol=1e-14)
    Wc = [np.array([[1.0, 0, 0], [0, 1.0, 0]])]
    chain = co.truncation_features([(Wc[0], np.zeros(2))], X)
    np.testing.assert_array_equal(chain[-1], truncation_chain(Wc, [np.zeros(2)], X)[-1])


def test_network_decisions():
    F = np.array([[0.9, 0.2], [0.4, 0.5], [3.0, 3.0]])
    np.testing.assert_array_equal(co.network_decisions(F, loss="ce"), [0, 1, 0])
    Y = np.array([[1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(co.network_decisions(F, Y), [0, 1, 0])


def test_constructed_network_collapses(rng):
    from dlmin.core.construct import build_clustered
    from dlmin.core.data import clusters, uniform_ball

    Q = 3
    ds = clusters(Q, Q, 15, 0.05, rng)
    net = build_clustered(ds.X, ds.labels, ds.Y)
    assert net.status == "ok", net.message
    held_y = np.repeat(np.arange(Q), 5)
    held_X = ds.centers[held_y] + uniform_ball(held_y.size, Q, 0.05, rng)
    rows = quiet(
        co.network_collapse, net.layers, ds.X, ds.labels, heldout=(held_X, held_y)
    )
    assert [r.source for r in rows][-1] == "output" and len(rows) == Q + 2
    last_hidden, output = rows[-2], rows[-1]
    for key in ("nc1", "nc1_quotient", "cdnv"):
        assert abs(last_hidden.metrics[key]) < 1e-12, key
    np.testing.assert_allclose(output.means, ds.Y, atol=1e-10)
    assert output.of_gap_means < 1e-10 and output.etf_gap_means < 1e-10
    assert all(r.ncc_acc_heldout == 1.0 for r in rows[-2:])
    assert last_hidden.ncc_acc == 1.0 and last_hidden.ncc_mismatch == 0.0
    trunc = co.truncation_features(net.cumulative[:-1], ds.X)
    tail = quiet(co.metrics_per_layer, trunc[-1:], ds.labels)[0]
    assert tail.nc1_quotient < 1e-12 and tail.ncc_acc == 1.0


# --------------------------------------------------------------------------
# Records and errors
# --------------------------------------------------------------------------


def test_record_is_json_with_required_keys(rng):
    H, y = random_problem(rng)
    plain = co.collapse_metrics(H, y).as_dict()
    for key in (
        "nc1",
        "nc1_quotient",
        "cdnv",
        "equinorm_means",
        "equiangular_means",
        "maxangle_means",
        "self_duality",
        "ncc_mismatch",
        "rank",
        "weighting",
        "ddof",
        "rank_tol",
        "center_classifier",
        "flag_two_classes",
    ):
        assert key in plain, key
    assert plain["self_duality"] is None and plain["ncc_mismatch"] is None
    full = co.collapse_metrics(
        H, y, W=np.eye(5, 8), predictions=y, center_classifier=True
    ).as_dict(arrays=True)
    assert full["self_duality"] is not None and full["ncc_mismatch"] == 0.0
    json.dumps(full, allow_nan=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weighting": "uniform"}, "weighting must be one of"),
        ({"ddof": 2}, "ddof must be 0 or 1"),
        ({"W": np.ones((5, 3))}, r"W must have shape \(K, 8\)"),
        ({"W": np.ones((4, 8))}, "pass classes="),
        ({"classes": [0, 1]}, "label 2 is not among the classes"),
    ],
)
def test_errors_teach(rng, kwargs, match):
    H, y = random_problem(rng)
    with pytest.raises(ValueError, match=match):
        co.collapse_metrics(H, y, **kwargs)


def test_bad_features_rejected(rng):
    H, y = random_problem(rng)
    with pytest.raises(ValueError, match="2-D array"):
        co.collapse_metrics(H[:, 0], y)
    for bad in (np.nan, np.inf, 1e300):
        H2 = H.copy()
        H2[3, 2] = bad
        with pytest.raises(ValueError, match="not finite or overflow"):
            co.collapse_metrics(H2, y)
    with pytest.raises(ValueError, match="not finite"):
        co.collapse_metrics(H, y, heldout=(np.full((2, 8), np.inf), y[:2]))
    with pytest.raises(ValueError, match="at least two non-empty classes"):
        co.collapse_metrics(H[4:9], np.zeros(5))
