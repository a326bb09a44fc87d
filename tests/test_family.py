"""Collapse/keep family (reference sections 6 and 9 item 11).

Only what section 6 allows is asserted: the pattern (certificate and the
truncated points), C_N > 0 for s != 0, independence of the keep shifts, the
trace identity with the truncated data's own means, and local minimality for
the all-keep pattern alone. Samples are rows: ``X`` has shape (N, M).
"""

import numpy as np
import pytest

from dlmin.core import family as fam
from dlmin.core.data import clusters

COST_TOL = 1e-20  # squared cost of the all-collapse pattern (clustered data, cond ~ 1)
POINT_TOL = 1e-12  # truncated points against apexes and inputs
REL_TOL = 1e-10  # costs compared with each other


def family_data(Q, M, seed, radius=0.05):
    """Reference random family: means 2 e_j + 0.3 u_Q, unequal sizes, uniform balls."""
    rng = np.random.default_rng(seed)
    means = np.zeros((Q, M))
    means[:, :Q] = 2.0 * np.eye(Q) + 0.3
    means[:, Q:] = rng.uniform(-0.5, 0.5, (Q, M - Q))
    sizes = rng.choice(np.arange(30, 81), Q, replace=False)
    d = clusters(Q, M, sizes, radius, rng, layout="given", means=means)
    return d.X, d.labels, rng.standard_normal((Q, Q)) + 2 * np.eye(Q)


@pytest.fixture(scope="module")
def table():
    X, labels, Y = family_data(3, 3, seed=1)
    return X, labels, Y, fam.all_patterns(X, labels, Y, rng=3)


def assert_rel(a, b, tol, what):
    assert abs(a - b) <= tol * max(abs(b), 1e-300), f"{what}: {a!r} vs {b!r}"


def test_all_patterns_enumerates_and_certifies(table):
    X, labels, Y, F = table
    assert F.configurations == 8 and len(F.rows()) == 8
    assert [p.row()["pattern"] for p in F.patterns][:2] == ["000", "001"]
    for p in F.patterns:
        assert p.status == "ok" and p.certified, p.message
        assert (p.margins > 0).all()


def test_pattern_moves_exactly_the_collapsed_classes(table):
    X, labels, Y, F = table
    for p in F.patterns:
        for j in range(3):
            rows = p.truncated[labels == j]
            target = p.apexes[j] if p.s[j] == 0 else X[labels == j]
            assert np.abs(rows - target).max() <= POINT_TOL, (p.s, j)


def test_all_collapse_is_global_minimum(table):
    _, _, _, F = table
    p = F.patterns[0]
    assert p.collapsed == [0, 1, 2]
    assert p.cost_no_intercept <= COST_TOL and p.cost_intercept <= COST_TOL


def test_every_other_pattern_costs_something(table):
    _, _, _, F = table
    for p in F.patterns[1:]:
        assert p.cost_no_intercept > 1e-8 and p.cost_intercept > 1e-8, p.s
        assert p.cost_intercept <= p.cost_no_intercept * (1 + 1e-12)


def test_all_keep_is_identity_and_survives_perturbations(table):
    X, _, _, F = table
    keep = F.patterns[-1]
    assert keep.collapsed == []
    assert np.abs(keep.truncated - X).max() <= POINT_TOL
    check = F.local_min
    assert check.changes.shape == (fam.PERTURB_TRIALS,) and check.intercept
    assert check.min_change >= -1e-12 and check.passed


def test_trace_identity_needs_the_truncated_means(table):
    """Section 6 'What holds' 1: own means give the no-intercept LS exactly."""
    _, _, _, F = table
    for p in F.patterns[1:]:
        assert_rel(p.trace_own, p.cost_no_intercept, REL_TOL, f"trace_own {p.s}")
    keep = F.patterns[-1]
    assert_rel(keep.trace_raw, keep.trace_own, REL_TOL, "raw = own for s = 1")
    mixed = F.patterns[3]  # s = (0, 1, 1): class 0 collapsed
    assert abs(mixed.trace_raw - mixed.trace_own) > 1e-6 * mixed.trace_own


def test_keep_shifts_do_not_matter_collapse_shifts_do():
    X, labels, Y = family_data(3, 3, seed=2)
    s = [0, 1, 1]
    base = fam.build_collapse_keep(X, labels, Y, s)
    far = fam.build_collapse_keep(X, labels, Y, s, nu_factor=4.0)
    assert far.certified and np.abs(far.apexes[1] - base.apexes[1]).max() > 0.01
    assert_rel(far.cost_no_intercept, base.cost_no_intercept, REL_TOL, "no intercept")
    assert_rel(far.cost_intercept, base.cost_intercept, REL_TOL, "intercept")

    moved = fam.build_collapse_keep(X, labels, Y, s, mu_factor=2.9)
    assert moved.certified
    change = abs(moved.cost_no_intercept - base.cost_no_intercept)
    assert change > 1e-6 * base.cost_no_intercept
    assert abs(moved.cost_intercept - base.cost_intercept) > 1e-6 * base.cost_intercept


def test_sqrt_keep_rule_and_wider_inputs():
    X, labels, Y = family_data(2, 5, seed=4)
    for s in ([0, 1], [1, 1]):
        p = fam.build_collapse_keep(X, labels, Y, s, nu_rule="sqrt")
        assert p.status == "ok" and p.certified
        assert np.isnan(p.trace_own)  # the trace identity is for dim = Q only
        assert p.cost_no_intercept > 0


def test_too_short_keep_distance_fails_certificate():
    X, labels, Y = family_data(3, 3, seed=5)
    p = fam.build_collapse_keep(X, labels, Y, [1, 1, 1], nu=np.full(3, 1e-3))
    assert p.status == "failed" and not p.certified and "keep class" in p.message


def test_guards():
    X, labels, Y = family_data(3, 3, seed=6)
    with pytest.raises(ValueError, match="max_classes = 2"):
        fam.all_patterns(X, labels, Y, max_classes=2)
    with pytest.raises(ValueError, match="pattern s"):
        fam.build_collapse_keep(X, labels, Y, [0, 2, 1])
    with pytest.raises(ValueError, match="nu_rule"):
        fam.build_collapse_keep(X, labels, Y, [0, 1, 1], nu_rule="cos")
    with pytest.raises(ValueError, match="mu_factor"):
        fam.build_collapse_keep(X, labels, Y, [0, 1, 1], mu_factor=3.5)
