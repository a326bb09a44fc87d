"""Construction A with reduced widths (reference sections 4.5, 9 items 5 and 7, A9).

Samples are rows: ``X`` has shape (N, M), ``W`` has shape (out, in). Weight
counts, projections and round trips are recomputed here from definitions.
"""

import numpy as np
import pytest

from dlmin.core import construct as cs
from dlmin.core import reduced as rd
from dlmin.core import sls
from dlmin.core import truncation as tr
from dlmin.core.data import clusters, uniform_ball

COST_TOL = 1e-20  # squared cost, clustered data, cond ~ 1 (reference section 9)
MATRIX_TOL = 1e-10  # matrix identities (reference section 9)
POINT_TOL = 1e-12  # truncated points and outputs
FAMILY = [(Q, M) for Q in range(2, 6) for M in (Q, Q + 3)]


def family(Q, M, seed, radius=0.05):
    """Reference random family: means 2 e_j + 0.3 u_Q, unequal sizes, uniform balls."""
    rng = np.random.default_rng(seed)
    means = np.zeros((Q, M))
    means[:, :Q] = 2.0 * np.eye(Q) + 0.3
    means[:, Q:] = rng.uniform(-0.5, 0.5, (Q, M - Q))
    sizes = rng.choice(np.arange(30, 81), Q, replace=False)
    return clusters(Q, M, sizes, radius, rng, layout="given", means=means)


@pytest.mark.parametrize("Q,M", FAMILY)
def test_widths_weight_count_and_zero_cost(Q, M):
    d = family(Q, M, seed=Q * 7 + M)
    r = rd.build_clustered_reduced(d.X, d.labels, d.Y)
    assert r.status == "ok" and r.certified, r.message
    assert r.widths == [M] + [Q] * Q + [Q]
    assert [W.shape for W, _ in r.layers] == [(Q, M)] + [(Q, Q)] * Q
    assert cs.weight_count(r.layers) == Q * (M + Q**2)
    assert sum(b.size for _, b in r.layers) == Q * (Q + 1)
    out = r.predict(d.X)
    assert ((out - d.Y[d.labels]) ** 2).sum(axis=1).max() <= COST_TOL
    assert r.costs["C_N"] <= COST_TOL


@pytest.mark.parametrize("Q,M", [(3, 3), (3, 6), (5, 8)])
def test_round_trip_of_cumulative_parameters(Q, M):
    d = family(Q, M, seed=1)
    r = rd.build_clustered_reduced(d.X, d.labels, d.Y)
    Wc = [W for W, _ in r.cumulative]
    bc = [b for _, b in r.cumulative]
    Ws, bs = tr.layers_from_cumulative(Wc, bc, check_nested=True)
    Wc2, bc2 = tr.cumulative_from_layers(Ws, bs)
    for A, B in zip(Wc + bc, Wc2 + bc2):
        assert np.abs(A - B).max() <= MATRIX_TOL * max(1.0, np.abs(A).max())
    assert r.round_trip_error <= MATRIX_TOL
    U = r.basis
    assert np.abs(U.T @ U - np.eye(Q)).max() <= MATRIX_TOL
    for W in Wc:  # every row space is span{means}
        assert np.abs(W - W @ U @ U.T).max() <= MATRIX_TOL


def test_truncated_points_projected_or_collapsed():
    Q, M = 3, 6
    d = family(Q, M, seed=2)
    r = rd.build_clustered_reduced(d.X, d.labels, d.Y, order=[2, 0, 1])
    U = r.basis
    after_first = r.truncated[1]
    collapsed = d.labels == 2
    assert np.abs(after_first[collapsed] - r.apexes[2]).max() <= POINT_TOL
    kept = d.X[~collapsed]
    assert np.abs(after_first[~collapsed] - kept @ U @ U.T).max() <= POINT_TOL
    final = r.truncated[-1]
    assert np.abs(final - r.apexes[d.labels]).max() <= POINT_TOL


def test_unseen_points_of_the_build_balls_reach_targets():
    Q, M, radius = 3, 6, 0.05
    d = family(Q, M, seed=3, radius=radius)
    r = rd.build_clustered_reduced(d.X, d.labels, d.Y, radius=radius)
    rng = np.random.default_rng(9)
    for j in range(Q):
        fresh = d.centers[j] + uniform_ball(200, M, radius, rng)
        # the build radius is at least the empirical delta about the empirical mean;
        # keep the fresh points inside that ball
        mean = d.X[d.labels == j].mean(axis=0)
        fresh = fresh[np.linalg.norm(fresh - mean, axis=1) <= r.conditions.radius]
        assert len(fresh) > 50
        assert np.abs(r.predict(fresh) - d.Y[j]).max() <= POINT_TOL


def test_padding_and_intercept_keep_outputs():
    d = family(3, 5, seed=4)
    base = rd.build_clustered_reduced(d.X, d.labels, d.Y)
    padded = rd.build_clustered_reduced(
        d.X, d.labels, d.Y, hidden_layers=5, intercept=True
    )
    assert padded.widths == [5] + [3] * 5 + [3]
    assert np.abs(padded.predict(d.X) - base.predict(d.X)).max() <= POINT_TOL
    short = rd.build_clustered_reduced(d.X, d.labels, d.Y, hidden_layers=2)
    assert short.costs["C_N"] > 1e-8 and "only 2 of 3" in short.message


def test_first_rows_recipe_is_not_nested():
    """Reference A9: first Q rows of W_theta R_l with different R_l do not nest."""
    d = family(3, 6, seed=5)
    cond = cs.clustered_conditions(d.X, d.labels)
    stats = cs.class_stats(d.X, d.labels)
    Wc, bc = [], []
    for j in range(3):
        W, b = tr.cone_layer(
            stats.means[j] + 2.5 * cond.radius * cond.f[j], cond.f[j], cond.theta_star
        )
        Wc.append(W[:3])
        bc.append(b[:3])
    with pytest.raises(ValueError, match="row space"):
        tr.layers_from_cumulative(Wc, bc, check_nested=True)


def test_failure_paths_and_sls_reduced_refused():
    d = family(3, 3, seed=6, radius=0.9)
    r = rd.build_clustered_reduced(d.X, d.labels, d.Y)
    assert r.status == "failed" and "assumption" in r.message
    with pytest.raises(NotImplementedError, match="sls"):
        rd.build_sls_reduced(d.X, d.labels, d.Y)
    with pytest.raises(NotImplementedError, match="sls"):
        sls.build_sls(d.X, d.labels, d.Y, reduced_width=True)
