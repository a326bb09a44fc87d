"""Construction B: zero-cost ReLU networks on sequentially linearly separable data.

Reference/construct.md section 5 ([CE-SLS] Def. 5.1, Thm. 5.2). Data are SLS
when, in some order of the classes, each class ``j`` can be cut off by a
hyperplane through a point ``p_j = t_j x_bar + (1 - t_j) mean_j`` of the segment
from its mean to the barycenter ``x_bar`` of the means, with everything not yet
collapsed and every earlier apex ``p_i`` strictly on the other side. One cone
layer per class, of axis ``h_j`` (the unit normal pointing away from the class)
and angle ``theta_j``, then sends the class to ``p_j`` and keeps the rest.

Orders and hyperplanes are found by linear programming (HiGHS through
``scipy.optimize.linprog``). Samples are rows: ``X`` has shape
``(n_samples, dim)``, ``Y[j]`` is the target of class ``j``, class indices
are 0-based and an *order* lists classes in the order they collapse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog

from . import construct as cs
from . import truncation as tr
from .data import DataError, Dataset, one_hot, uniform_ball

MAX_EXHAUSTIVE = 7  # 7! = 5040 orders; beyond that only greedy search with backtracking
GREEDY_BRANCHING = 2  # greedy search tries the two most separable classes per step
MAX_LP_SOLVES = 20000  # search budget: at a few ms per LP, about a minute
T_GRID = np.linspace(0.02, 0.98, 49)  # segment positions tried when a later step fails
T_EDGE = 1e-6  # t is kept this far inside the closed range of feasible positions
THETA_FRAC = 0.5  # theta_j = theta_min + THETA_FRAC (pi - theta_min): the midpoint
SLS_COST_RTOL = 1e-16  # squared-cost tolerance in units of cond^2 (reference section 9)
MAX_SLS_DRAWS = 50  # the generator redraws a data set at most this often
MAX_CLASS_BATCHES = 200  # rejection batches per class before the generator gives up


# ------------------------------------------------------------ LP geometry


class _Problem:
    """Class point sets centred at the barycenter and scaled to unit size.

    Every LP of this module runs in these coordinates, ``y = (x - x_bar) / s``,
    so the barycenter is 0 and HiGHS sees numbers of order one. Separability
    and the segment position ``t`` are unchanged by the affine map.
    """

    def __init__(self, X, labels, Q):
        stats = cs.class_stats(X, labels, Q)
        self.shift = stats.barycenter
        self.scale = max(float(np.abs(X - self.shift).max()), np.finfo(float).tiny)
        Z = (X - self.shift) / self.scale
        self.points = [Z[labels == j] for j in range(Q)]
        self.means = (stats.means - self.shift) / self.scale
        self.Q, self.dim = Q, X.shape[1]
        self.lp_solves = 0
        self.base_memo = {}

    def to_input(self, y):
        return self.shift + self.scale * np.asarray(y)

    def to_scaled(self, x):
        return (np.asarray(x, dtype=float) - self.shift) / self.scale

    def stack(self, classes, apexes=None):
        """Points of ``classes`` and the rows of ``apexes``, shape (n, dim)."""
        blocks = [self.points[k] for k in classes]
        if apexes is not None and len(apexes):
            blocks.append(np.asarray(apexes).reshape(-1, self.dim))
        return np.vstack(blocks) if blocks else np.empty((0, self.dim))

    def linprog(self, c, A_ub, b_ub, A_eq=None, b_eq=None, bounds=None):
        """HiGHS; raises unless it proves optimality or infeasibility."""
        self.lp_solves += 1
        res = linprog(
            c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs"
        )
        if res.status not in (0, 2):
            raise RuntimeError(
                f"HiGHS did not settle an SLS linear program (status {res.status}: "
                f"{res.message}); expected optimal or infeasible"
            )
        return res

    def separable(self, neg, pos, through=None):
        """Is there ``(h, c)`` with ``h.x + c <= -1`` on ``neg``, ``>= 1`` on ``pos``?

        With ``through`` (a point) the hyperplane must also contain it,
        ``h.through + c = 0``: the papers' form with ``p_j`` fixed.
        """
        n = self.dim + 1
        A = np.vstack([
            np.hstack([neg, np.ones((len(neg), 1))]),
            -np.hstack([pos, np.ones((len(pos), 1))]),
        ])
        A_eq = b_eq = None
        if through is not None:
            A_eq, b_eq = np.append(through, 1.0)[None, :], [0.0]
        res = self.linprog(
            np.zeros(n), A, -np.ones(len(A)), A_eq, b_eq, [(None, None)] * n
        )
        return res.status == 0

    def t_range(self, neg, pos, mean):
        """Closure ``[t_lo, t_hi]`` of the segment positions of strict separators.

        With ``h.mean = -1`` the hyperplane ``h.y + c = 0`` meets the segment
        from ``mean`` to the barycenter (0) at ``t = 1 - c``, linear in the
        unknowns, so two LPs in ``(h, c, s)`` give its extremes.
        """
        n = self.dim + 2
        rows = [
            np.hstack([neg, np.ones((len(neg), 1)), np.ones((len(neg), 1))]),
            np.hstack([-pos, -np.ones((len(pos), 1)), np.ones((len(pos), 1))]),
            np.append(np.zeros(self.dim), [-1.0, 1.0])[None, :],
        ]
        A = np.vstack(rows)
        A_eq = np.append(mean, [0.0, 0.0])[None, :]
        bounds = [(None, None)] * (self.dim + 1) + [(0.0, None)]
        ends = []
        for sign in (1.0, -1.0):
            c = np.zeros(n)
            c[self.dim] = sign
            res = self.linprog(c, A, np.zeros(len(A)), A_eq, [-1.0], bounds)
            if res.status != 0:
                return None
            ends.append(1.0 - res.x[self.dim])
        return min(ends), max(ends)

    def plane_through(self, neg, pos, p):
        """Normal of the hyperplane through ``p`` with the widest angular margin.

        Maximizes ``s`` subject to ``h.u <= -s`` for the unit directions ``u``
        from ``p`` to ``neg`` and ``h.u >= s`` towards ``pos``, ``|h|_inf <= 1``.
        The box makes this an LP; it approximates the max-min cosine.

        Returns
        -------
        h : ndarray, shape (dim,), unit norm, or None when no margin is left
        cos_margin : float
            Smallest cosine of a direction with ``-h`` (class) or ``h`` (rest).
        """
        Un, Up = _unit_rows(neg - p), _unit_rows(pos - p)
        if Un is None or Up is None:
            return None, 0.0
        A = np.vstack([
            np.hstack([Un, np.ones((len(Un), 1))]),
            np.hstack([-Up, np.ones((len(Up), 1))]),
        ])
        c = np.zeros(self.dim + 1)
        c[-1] = -1.0
        bounds = [(-1.0, 1.0)] * self.dim + [(None, 1.0)]
        res = self.linprog(c, A, np.zeros(len(A)), bounds=bounds)
        if res.status != 0 or res.x[-1] <= 0.0:
            return None, 0.0
        h = res.x[: self.dim] / np.linalg.norm(res.x[: self.dim])
        margin = min(float((-Un @ h).min()), float((Up @ h).min()) if len(Up) else 1.0)
        return (h, margin) if margin > 0.0 else (None, 0.0)


def _unit_rows(D):
    """Rows scaled to unit length; None when a row vanishes."""
    norms = np.linalg.norm(D, axis=1)
    if len(norms) and norms.min() <= 1e-14:
        return None
    return D / norms[:, None] if len(D) else D


# ------------------------------------------------------------ one step


@dataclass
class _Step:
    """A solved step in scaled coordinates."""

    cls: int
    t: float
    t_lo: float
    t_hi: float
    p: np.ndarray
    h: np.ndarray
    cos_margin: float


def _base_feasible(prob, cls, later):
    """Step feasibility ignoring earlier apexes (a necessary condition), memoized."""
    key = (cls, frozenset(later))
    if key not in prob.base_memo:
        pos = np.vstack([prob.stack(later), np.zeros((1, prob.dim))])
        prob.base_memo[key] = prob.separable(prob.points[cls], pos)
    return prob.base_memo[key]


def _solve_step(prob, cls, later, apexes, policy, t_grid):
    """Hyperplane for collapsing ``cls`` now.

    Returns
    -------
    step : _Step or None
    reason : {"", "points", "apexes", "thin"}
        Why it failed: the remaining points alone block the class, the
        earlier apexes do, or the feasible set is too thin to use.
    """
    if not _base_feasible(prob, cls, later):
        return None, "points"
    neg, pos = prob.points[cls], prob.stack(later, apexes)
    with_bary = np.vstack([pos, np.zeros((1, prob.dim))])
    if len(apexes) and not prob.separable(neg, with_bary):
        return None, "apexes"
    ends = prob.t_range(neg, pos, prob.means[cls])
    if ends is None:
        return None, "thin"
    t = _pick_t(*ends, policy, t_grid)
    p = (1.0 - t) * prob.means[cls]
    h, margin = prob.plane_through(neg, pos, p)
    if h is None:
        return None, "thin"
    return _Step(cls, t, ends[0], ends[1], p, h, margin), ""


def _pick_t(t_lo, t_hi, policy, t_grid):
    """Middle of the feasible range, or its highest grid point ("top").

    A higher ``t`` moves ``p_j`` towards the barycenter, which every later
    hyperplane has on its positive side: the later steps can only get easier.
    """
    mid = 0.5 * (t_lo + t_hi)
    if policy == "mid":
        return mid
    inside = t_grid[(t_grid > t_lo + T_EDGE) & (t_grid < t_hi - T_EDGE)]
    return float(inside.max()) if inside.size else mid


# ------------------------------------------------------------ diagnostics


@dataclass
class Blocking:
    """A smallest set of objects that keeps a class from being cut off.

    No hyperplane separates class ``cls`` from the union of these objects
    once the classes in ``prefix`` are collapsed; dropping any one of them
    makes it separable (a deletion filter over groups, which drops the
    barycenter and the apexes first when classes alone suffice).

    Attributes
    ----------
    cls : int
    prefix : tuple of int
        Classes collapsed before (their apexes are candidates).
    classes : list of int
        Remaining classes whose points belong to the set.
    apexes : list of int
        Earlier classes whose apex ``p_i`` belongs to the set.
    barycenter : bool
        Whether the barycenter of the means belongs to it (it must lie on
        the far side for ``p`` to sit inside the segment).
    """

    cls: int
    prefix: tuple
    classes: list
    apexes: list
    barycenter: bool

    def describe(self):
        """One sentence naming what blocks the class."""
        parts = []
        if self.classes:
            parts.append(f"the points of {_names('class', self.classes)}")
        if self.apexes:
            word = "apexes" if len(self.apexes) > 1 else "apex"
            parts.append(f"the {word} of {_names('class', self.apexes)}")
        if self.barycenter:
            parts.append("the barycenter of the means")
        when = "first" if not self.prefix else f"after {list(self.prefix)}"
        n_items = len(self.classes) + len(self.apexes) + self.barycenter
        joint = " together" if n_items > 1 else ""
        return (
            f"class {self.cls} cannot be collapsed {when}: no hyperplane "
            f"separates it from {' and '.join(parts)}{joint}"
        )


def _names(word, ks):
    """``"class 2"``, ``"classes 0 and 1"``, ``"apexes 0, 1 and 3"``."""
    ks = [str(k) for k in ks]
    if len(ks) == 1:
        return f"{word} {ks[0]}"
    return f"{word}es " + ", ".join(ks[:-1]) + " and " + ks[-1]


def _blocking(prob, cls, prefix, apexes, later):
    """Deletion filter over classes, apexes and the barycenter; None if not blocked."""
    # Minimal sets need not be unique; the barycenter and the apexes are tried
    # for removal first so that classes are named whenever they suffice.
    items = [("barycenter", None)] + [("apex", i) for i in range(len(prefix))]
    items += [("class", k) for k in later]

    def pos_of(chosen):
        rows = [prob.points[k] for kind, k in chosen if kind == "class"]
        rows += [apexes[i][None, :] for kind, i in chosen if kind == "apex"]
        rows += [np.zeros((1, prob.dim)) for kind, _ in chosen if kind == "barycenter"]
        return np.vstack(rows) if rows else np.empty((0, prob.dim))

    if prob.separable(prob.points[cls], pos_of(items)):
        return None
    keep = list(items)
    for item in items:
        trial = [it for it in keep if it != item]
        if not prob.separable(prob.points[cls], pos_of(trial)):
            keep = trial
    return Blocking(
        cls,
        tuple(prefix),
        classes=[k for kind, k in keep if kind == "class"],
        apexes=[prefix[i] for kind, i in keep if kind == "apex"],
        barycenter=any(kind == "barycenter" for kind, _ in keep),
    )


# ------------------------------------------------------------ the search


@dataclass
class SLSPlane:
    """The separating hyperplane of one step, in input coordinates.

    Attributes
    ----------
    cls : int
        Class collapsed at this step.
    normal : ndarray, shape (dim,)
        Unit normal ``h_j``, pointing away from the class.
    offset : float
        ``c_j`` with the hyperplane ``h_j . x + c_j = 0``.
    t : float
        Segment position: ``apex = t x_bar + (1 - t) mean_j``, in (0, 1).
    apex : ndarray, shape (dim,)
        ``p_j``, on the hyperplane.
    t_range : tuple of float
        Closure of the positions a strict separator could have had.
    cos_margin : float
        Smallest cosine between ``h_j`` and the directions from ``p_j`` to the
        rest, or ``-h_j`` and those to the class (NaN for given planes).
    """

    cls: int
    normal: np.ndarray
    offset: float
    t: float
    apex: np.ndarray
    t_range: tuple = (np.nan, np.nan)
    cos_margin: float = np.nan


@dataclass
class SLSOrder:
    """Result of the search for an SLS order and its hyperplanes.

    Attributes
    ----------
    found : bool
    order : list of int
        Collapse order (0-based classes); partial when nothing was found.
    planes : list of SLSPlane
        One per step of ``order``.
    message : str
    exhaustive : bool
        Every order was examined; a failure is then a proof (up to the
        t-grid where apexes were involved).
    policy : {"mid", "top"}
        Segment positions used: middle of each feasible range, or the
        highest grid point in it (the retry).
    first_step : list of Blocking
        For every class that cannot go first, what blocks it.
    dead_end : list of Blocking
        At the deepest partial order reached, what blocks each remaining class.
    dead_end_prefix : tuple of int
    lp_solves : int
    """

    found: bool
    order: list
    planes: list
    message: str
    exhaustive: bool = True
    policy: str = "mid"
    first_step: list = field(default_factory=list)
    dead_end: list = field(default_factory=list)
    dead_end_prefix: tuple = ()
    lp_solves: int = 0

    def hyperplanes(self):
        """Rows ``(h_j, c_j)`` in collapse order, shape (n_steps, dim + 1)."""
        return np.array([np.append(p.normal, p.offset) for p in self.planes])


class _Search:
    """Depth-first search over orders, pruning at the first infeasible step."""

    def __init__(self, prob, t_grid, exhaustive, budget):
        self.prob, self.t_grid = prob, t_grid
        self.exhaustive, self.budget = exhaustive, budget
        self.complete = True
        self.apex_trouble = False
        self.deepest = []

    def run(self, policy):
        self.policy, self.deepest = policy, []
        return self._dfs([], tuple(range(self.prob.Q)))

    def _dfs(self, steps, remaining):
        if not remaining:
            return steps
        if len(steps) > len(self.deepest) or not self.deepest:
            self.deepest = list(steps)
        if self.prob.lp_solves > self.budget:
            self.complete = False
            return None
        apexes = [st.p for st in steps]
        cands = []
        for c in remaining:
            later = tuple(k for k in remaining if k != c)
            st, why = _solve_step(self.prob, c, later, apexes, self.policy, self.t_grid)
            self.apex_trouble |= why in ("apexes", "thin")
            if st is not None:
                cands.append(st)
        cands.sort(key=lambda st: -st.cos_margin)
        if not self.exhaustive and len(cands) > GREEDY_BRANCHING:
            cands, self.complete = cands[:GREEDY_BRANCHING], False
        for st in cands:
            out = self._dfs(steps + [st], tuple(k for k in remaining if k != st.cls))
            if out is not None:
                return out
        return None


def _walk(prob, order, policy, t_grid):
    """Solve the steps of a fixed order: (steps, failing index or None, reason)."""
    steps = []
    for k, c in enumerate(order):
        later = tuple(j for j in range(prob.Q) if j not in order[: k + 1])
        st, why = _solve_step(prob, c, later, [s.p for s in steps], policy, t_grid)
        if st is None:
            return steps, k, why
        steps.append(st)
    return steps, None, ""


def find_sls_order(
    X,
    labels,
    order=None,
    t_grid=None,
    max_exhaustive=MAX_EXHAUSTIVE,
    *,
    Q=None,
    max_lp_solves=MAX_LP_SOLVES,
):
    """Find a collapse order and separating hyperplanes that make the data SLS.

    Each step solves the t-free feasibility LP of reference section 5:
    ``h.x + c <= -1`` on the class, ``>= 1`` on the remaining points, on the
    earlier apexes and at the barycenter. The segment position is then set
    to the middle of its feasible range; if that fails later, the search is
    repeated with every position at the top of its range on ``t_grid``,
    which can only make later steps easier. Orders are searched depth-first
    over all permutations for ``Q <= max_exhaustive``, greedily with
    backtracking otherwise.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    order : sequence of int, optional
        Only check this order (a permutation of ``0..Q-1``).
    t_grid : ndarray, optional
        Segment positions for the retry, inside (0, 1); default ``T_GRID``.
    max_exhaustive : int
    Q : int, optional
        Number of classes, default ``labels.max() + 1``.
    max_lp_solves : int
        Budget of linear programs for the search.

    Returns
    -------
    SLSOrder
    """
    X, labels, Q = _check_data(X, labels, Q)
    t_grid = _check_grid(t_grid)
    prob = _Problem(X, labels, Q)
    if order is not None:
        order = _check_order(order, Q)
        return _check_given_order(prob, order, t_grid)
    search = _Search(prob, t_grid, Q <= max_exhaustive, max_lp_solves)
    steps, policy = search.run("mid"), "mid"
    if steps is None and search.apex_trouble:
        steps, policy = search.run("top"), "top"
    if steps is not None:
        return _found(prob, steps, policy, exhaustive=search.complete)
    return _not_found(prob, search.deepest, search.complete, search.apex_trouble)


def _check_given_order(prob, order, t_grid):
    steps, k, why = _walk(prob, order, "mid", t_grid)
    policy = "mid"
    if k is not None and why != "points":
        steps, k, why = _walk(prob, order, "top", t_grid)
        policy = "top"
    if k is None:
        return _found(prob, steps, policy, exhaustive=True)
    apexes = [s.p for s in steps]
    later = [j for j in range(prob.Q) if j not in order[: k + 1]]
    block = _blocking(prob, order[k], order[:k], apexes, later)
    dead = [block] if block is not None else []
    text = block.describe() if block else "its feasible set is too thin to use"
    message = (
        f"order {order} fails at step {k + 1} of {prob.Q} (class {order[k]}): {text}"
    )
    if why != "points":
        message += "; segment positions were also tried on the t-grid"
    return SLSOrder(
        False,
        order[:k],
        [_plane(prob, s) for s in steps],
        message,
        exhaustive=True,
        policy=policy,
        first_step=_first_step(prob),
        dead_end=dead,
        dead_end_prefix=tuple(order[:k]),
        lp_solves=prob.lp_solves,
    )


def _found(prob, steps, policy, exhaustive):
    order = [s.cls for s in steps]
    return SLSOrder(
        True,
        order,
        [_plane(prob, s) for s in steps],
        f"SLS order {order} found ({policy} segment positions, "
        f"{prob.lp_solves} linear programs)",
        exhaustive=exhaustive,
        policy=policy,
        lp_solves=prob.lp_solves,
    )


def _not_found(prob, deepest, complete, apex_trouble):
    prefix = [s.cls for s in deepest]
    apexes = [s.p for s in deepest]
    later = [j for j in range(prob.Q) if j not in prefix]
    dead = [
        b
        for c in later
        if (b := _blocking(prob, c, prefix, apexes, [k for k in later if k != c]))
    ]
    first = _first_step(prob)
    if not complete:
        head = (
            "no SLS order found by greedy search with backtracking (not "
            "exhaustive: more classes than max_exhaustive or the LP budget "
            "ran out)"
        )
    elif apex_trouble:
        head = (
            "no SLS order exists with segment positions in the middle or at "
            "the top (on the t-grid) of their feasible ranges; every order "
            "was examined"
        )
    else:
        head = (
            "no SLS order exists: every order of the classes reaches an infeasible step"
        )
    lines = [b.describe() for b in first] or ["every class can go first"]
    if prefix:
        lines += [f"deepest partial order {prefix}: " + b.describe() for b in dead]
    return SLSOrder(
        False,
        prefix,
        [_plane(prob, s) for s in deepest],
        head + "; " + "; ".join(lines),
        exhaustive=complete,
        policy="top" if apex_trouble else "mid",
        first_step=first,
        dead_end=dead,
        dead_end_prefix=tuple(prefix),
        lp_solves=prob.lp_solves,
    )


def _first_step(prob):
    """What blocks each class that cannot be collapsed first."""
    out = []
    for c in range(prob.Q):
        later = [k for k in range(prob.Q) if k != c]
        if not _base_feasible(prob, c, later):
            out.append(_blocking(prob, c, (), [], later))
    return out


def _plane(prob, step):
    """Convert a scaled-coordinate step to an SLSPlane in input coordinates."""
    apex = prob.to_input(step.p)
    return SLSPlane(
        step.cls,
        step.h.copy(),
        float(-step.h @ apex),
        step.t,
        apex,
        (step.t_lo, step.t_hi),
        step.cos_margin,
    )


# ------------------------------------------------------ single-step checks


def sls_step_feasible(X, labels, order, step, apexes=None, t=None, *, Q=None):
    """Decide whether class ``order[step]`` can be cut off at that step.

    Without ``t`` this is the t-free LP of reference section 5 (some segment
    position works); with ``t`` it is the papers' form, the hyperplane
    forced through ``p = t x_bar + (1 - t) mean``.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    order : sequence of int
        At least ``step + 1`` distinct classes; the classes not in
        ``order[:step + 1]`` are the remaining ones.
    step : int
        0-based position in ``order``.
    apexes : ndarray, shape (step, dim), optional
        Apexes of ``order[:step]``; by default those of a successful walk
        of the earlier steps (middle positions, then the t-grid top).
    t : float in (0, 1), optional

    Returns
    -------
    bool
    """
    prob, cls, later, A = _step_setup(X, labels, order, step, apexes, Q)
    neg, pos = prob.points[cls], prob.stack(later, A)
    if t is None:
        return prob.separable(neg, np.vstack([pos, np.zeros((1, prob.dim))]))
    if not 0.0 < t < 1.0:
        raise ValueError(f"segment position t must lie in (0, 1), got {t}")
    return prob.separable(neg, pos, through=(1.0 - t) * prob.means[cls])


def sls_t_range(X, labels, order, step, apexes=None, *, Q=None):
    """Range ``(t_lo, t_hi)`` of segment positions with a strict separator at ``step``.

    The open interval between the two numbers is exactly the set of ``t``
    for which :func:`sls_step_feasible` with that ``t`` succeeds; None when
    the step is infeasible. Arguments as in :func:`sls_step_feasible`.
    """
    prob, cls, later, A = _step_setup(X, labels, order, step, apexes, Q)
    neg, pos = prob.points[cls], prob.stack(later, A)
    if not prob.separable(neg, np.vstack([pos, np.zeros((1, prob.dim))])):
        return None
    return prob.t_range(neg, pos, prob.means[cls])


def _step_setup(X, labels, order, step, apexes, Q):
    X, labels, Q = _check_data(X, labels, Q)
    order = [int(j) for j in order]
    if len(set(order)) != len(order) or not all(0 <= j < Q for j in order):
        raise ValueError(f"order must list distinct classes of 0..{Q - 1}, got {order}")
    if not 0 <= step < len(order):
        raise ValueError(f"step must index order (0..{len(order) - 1}), got {step}")
    prob = _Problem(X, labels, Q)
    if apexes is None:
        steps, k, _ = _walk(prob, order[:step], "mid", T_GRID)
        if k is not None:
            steps, k, _ = _walk(prob, order[:step], "top", T_GRID)
        if k is not None:
            raise ValueError(
                f"step {k + 1} of order {order[:step]} is already infeasible; pass the "
                "earlier apexes explicitly to test a later step"
            )
        A = np.array([s.p for s in steps]).reshape(-1, prob.dim)
    else:
        A = prob.to_scaled(np.asarray(apexes, dtype=float).reshape(-1, prob.dim))
        if len(A) != step:
            raise ValueError(f"expected {step} earlier apexes, got {len(A)}")
    later = [j for j in range(Q) if j not in order[: step + 1]]
    return prob, order[step], later, A


# ------------------------------------------------------------ the network


@dataclass
class SLSConstruction(cs.Construction):
    """A ``construct.Construction`` for SLS data, with the SLS description.

    It is a Construction (same fields, same ``predict``) with these added:

    Attributes
    ----------
    search : SLSOrder or None
        The order search, when the hyperplanes were not given.
    planes : list of SLSPlane
        One per cone layer, in collapse order.
    theta : ndarray, shape (n_cone,)
        Cone angle ``theta_j`` of each layer.
    theta_min : ndarray, shape (n_cone,)
        Smallest admissible angle ``theta_{j,min}``.
    lams : ndarray, shape (n_cone,)
        Squeeze factors; ``cond(W_theta_j) = 1 / lam_j``.
    description : ndarray, shape (n_cone, dim + 2)
        Row ``j``: ``(theta_j, h_j, t_j)``; with ``Y`` these Q (M + 2) numbers
        fix the network.
    cond : float
        ``max(1 / min lam_j, cond of the output fit)``.
    cost_tol : float
        ``SLS_COST_RTOL cond^2 max(1, |Y|_F^2)``, the bound the cost must meet.
    """

    search: SLSOrder | None = None
    planes: list = field(default_factory=list)
    theta: np.ndarray | None = None
    theta_min: np.ndarray | None = None
    lams: np.ndarray | None = None
    description: np.ndarray | None = None
    cond: float = np.nan
    cost_tol: float = np.nan


def build_sls(
    X,
    labels,
    Y,
    order=None,
    planes=None,
    *,
    t_grid=None,
    theta_frac=THETA_FRAC,
    hidden_layers=None,
    intercept=False,
    reduced_width=False,
    keep_rows=None,
    progress=None,
    max_exhaustive=MAX_EXHAUSTIVE,
    max_lp_solves=MAX_LP_SOLVES,
):
    """Build a zero-cost ReLU network on sequentially separable data (Construction B).

    Layer ``j`` is the cone layer ``W = W_theta_j R_h_j``, ``b = -W p_j``, with
    ``theta_j = theta_min + theta_frac (pi - theta_min)``; it sends class
    ``order[j]`` to ``p_j`` and keeps every other current point (certified
    with margins). The output layer maps ``p_j`` to ``y_j``.

    Parameters
    ----------
    X : ndarray, shape (n_samples, dim)
    labels : ndarray of int, shape (n_samples,)
    Y : ndarray, shape (Q, out_dim)
    order : sequence of int, optional
        Collapse order; searched for when neither it nor ``planes`` is given.
    planes : SLSOrder, list of SLSPlane, or ndarray of shape (Q, dim + 1), optional
        Hyperplanes ``h_j . x + c_j = 0`` in collapse order (rows ``(h_j, c_j)``
        need ``order``); each must cross the open segment from its class
        mean to the barycenter with the class on its negative side.
    t_grid : ndarray, optional
        Passed to :func:`find_sls_order`.
    theta_frac : float in (0, 1)
    hidden_layers : int, optional
        L, default Q; above Q identity layers are appended, below Q only
        the first L classes collapse.
    intercept : bool
        Fit an output bias instead of ``b^(L+1) = 0``.
    reduced_width : bool
        Not available for SLS data (raises NotImplementedError).
    keep_rows : ndarray of int, optional
        Rows whose truncated images are returned (default all).
    progress : callable, optional
        Called as ``progress(done, total)`` after each layer.

    Returns
    -------
    SLSConstruction
    """
    if reduced_width:
        raise NotImplementedError(
            "reduced_width=True with method 'sls' is not covered by [CE-SLS] "
            "(reference section 5: 'Narrower layers are not covered'); build "
            "with full width M"
        )
    X, labels, Q = _check_data(X, labels, np.asarray(Y).shape[0])
    Y = np.asarray(Y, dtype=float)
    if not 0.0 < theta_frac < 1.0:
        raise ValueError(f"theta_frac must lie in (0, 1), got {theta_frac}")
    if hidden_layers is not None and hidden_layers < 1:
        raise ValueError(f"hidden_layers must be at least 1, got {hidden_layers}")
    cond = cs.clustered_conditions(X, labels, Q=Q)
    search = None
    if planes is None:
        search = find_sls_order(
            X, labels, order, t_grid, max_exhaustive, Q=Q, max_lp_solves=max_lp_solves
        )
        if not search.found:
            return SLSConstruction(
                "failed", search.message, cond, order=search.order, search=search
            )
        planes = search.planes
    else:
        planes = _given_planes(X, labels, Q, order, planes)
    return _build(
        X,
        labels,
        Y,
        planes,
        cond,
        search,
        theta_frac,
        hidden_layers,
        intercept,
        keep_rows,
        progress,
    )


def _build(
    X,
    labels,
    Y,
    planes,
    cond,
    search,
    theta_frac,
    hidden_layers,
    intercept,
    keep_rows,
    progress,
):
    """Cone layers along the planes, certificate, output layer, costs."""
    Q = Y.shape[0]
    L = Q if hidden_layers is None else int(hidden_layers)
    n_cone = min(L, Q)
    rows = np.arange(X.shape[0]) if keep_rows is None else np.asarray(keep_rows)
    X_cur, cumulative, apexes, margins, failures, thetas, truncated = _cone_layers(
        X, labels, planes[:n_cone], theta_frac, rows, progress
    )
    base = dict(
        conditions=cond,
        apexes=apexes,
        order=[pl.cls for pl in planes],
        search=search,
        planes=planes[:n_cone],
        truncated=truncated,
        margins=np.array(margins).reshape(-1, 2),
        theta=thetas[:, 1],
        theta_min=thetas[:, 0],
        certified=not failures,
    )
    if not np.isfinite(thetas[:, 1]).all():
        return SLSConstruction("failed", "; ".join(failures), **base)
    try:
        fit = cs.fit_output(X_cur, labels, Y, intercept)
    except ValueError as exc:
        return SLSConstruction("failed", "; ".join(failures + [str(exc)]), **base)

    cumulative.append((fit.A, fit.c))
    Ws, bs = tr.layers_from_cumulative(
        [w for w, _ in cumulative], [b for _, b in cumulative]
    )
    cumulative, net = cs.pad_identity(cumulative, list(zip(Ws, bs)), L - n_cone)
    out = cs.forward_relu(net, X)
    lams = np.array([tr.squeeze_factor(th, X.shape[1]) for th in thetas[:, 1]])
    kappa = max(1.0 / lams.min(), fit.cond)
    costs = cs.all_costs(out, labels, Y)
    tol = SLS_COST_RTOL * kappa**2 * max(1.0, float((Y**2).sum()))
    notes = _notes(failures, n_cone, Q, L, costs["C_N"], tol, kappa)
    if progress is not None:
        progress(n_cone + 1, n_cone + 1)
    desc = np.array([
        np.concatenate([[th], pl.normal, [pl.t]])
        for th, pl in zip(thetas[:, 1], planes[:n_cone])
    ])
    failed = bool(failures) or (n_cone == Q and costs["C_N"] > tol)
    return SLSConstruction(
        status="failed" if failed else "ok",
        message="; ".join(notes),
        layers=net,
        cumulative=cumulative,
        costs=costs,
        max_output_error=cs.max_output_error(out, labels, Y),
        composition_error=float(np.abs(out - (X_cur @ fit.A.T + fit.c)).max()),
        output_fit=fit,
        lam=float(lams.min()),
        lams=lams,
        description=desc.reshape(n_cone, -1),
        cond=float(kappa),
        cost_tol=tol,
        **base,
    )


def _notes(failures, n_cone, Q, L, cost, tol, kappa):
    """Certificate failures, a partial collapse, or a cost above rounding."""
    notes = list(failures)
    if n_cone < Q:
        notes.append(f"only {n_cone} of {Q} classes collapsed with {L} hidden layers")
    elif cost > tol:
        notes.append(
            f"cost {cost:.3g} above the rounding tolerance {tol:.3g} (cond {kappa:.3g})"
        )
    return notes


def _cone_layers(X, labels, planes, theta_frac, rows, progress):
    """Apply one certified cone layer per plane; angles as (theta_min, theta) rows."""
    margin = cs.CERT_MARGIN_REL * max(1.0, float(np.abs(X).max()))
    Q = int(labels.max()) + 1
    apexes = np.full((Q, X.shape[1]), np.nan)
    X_cur, truncated = X, [X[rows]]
    cumulative, margins, failures, thetas = [], [], [], []
    for step, pl in enumerate(planes):
        mask = labels == pl.cls
        done = [q.cls for q in planes[:step]]
        rest = np.vstack([X_cur[~mask], apexes[done]])
        th_min = _theta_min(X_cur[mask], rest, pl.apex, pl.normal)
        if th_min >= np.pi:
            failures.append(
                f"step {step + 1} (class {pl.cls}): the hyperplane does not "
                "strictly separate the class from the remaining points and "
                "earlier apexes (theta_min = 180 deg)"
            )
            thetas.append((th_min, np.nan))
            break
        theta = th_min + theta_frac * (np.pi - th_min)
        thetas.append((th_min, theta))
        W, b = tr.cone_layer(pl.apex, pl.normal, theta)
        Z = X_cur @ W.T + b
        ok, m_col, m_keep = tr.certify_z(Z, mask, margin)
        if done:
            m_keep = min(m_keep, float((apexes[done] @ W.T + b).min()))
            ok = ok and m_keep >= margin
        if not ok:
            failures.append(cs.certificate_failure(step, pl.cls, m_col, m_keep, margin))
        margins.append((m_col, m_keep))
        X_cur = tr.truncate_z(W, b, Z)
        truncated.append(X_cur[rows])
        apexes[pl.cls] = pl.apex
        cumulative.append((W, b))
        if progress is not None:
            progress(step + 1, len(planes) + 1)
    thetas = np.array(thetas).reshape(-1, 2)
    return X_cur, cumulative, apexes, margins, failures, thetas, truncated


def _theta_min(cls_pts, rest, p, h):
    """Smallest cone angle: twice the largest angle of ``z - p`` to ``h`` (rest)
    or of ``x - p`` to ``-h`` (class)."""
    D = np.vstack([rest - p, p - cls_pts])  # class directions flipped: angle to h
    norms = np.linalg.norm(D, axis=1)
    if norms.min() <= 0.0:
        return np.pi
    cos = np.clip(D @ h / norms, -1.0, 1.0)
    return float(2.0 * np.arccos(cos.min()))


def _given_planes(X, labels, Q, order, planes):
    """Validate user hyperplanes and place their apexes on the segments."""
    if isinstance(planes, SLSOrder):
        planes = planes.planes
    if len(planes) and isinstance(planes[0], SLSPlane):
        _check_order([pl.cls for pl in planes], Q)
        return list(planes)
    if order is None:
        raise ValueError("hyperplanes given as rows (h_j, c_j) need the collapse order")
    order = _check_order(order, Q)
    H = np.asarray(planes, dtype=float)
    if H.shape != (Q, X.shape[1] + 1):
        raise ValueError(
            f"hyperplanes must be rows (h_j, c_j) of shape (Q, dim + 1) = "
            f"({Q}, {X.shape[1] + 1}), got {H.shape}"
        )
    stats = cs.class_stats(X, labels, Q)
    out = []
    for k, (cls, row) in enumerate(zip(order, H)):
        norm = np.linalg.norm(row[:-1])
        if norm == 0.0:
            raise ValueError(f"hyperplane {k} has a zero normal")
        h, c = row[:-1] / norm, row[-1] / norm
        g0, g1 = h @ stats.means[cls] + c, h @ stats.barycenter + c
        if not g0 < 0.0 < g1:
            raise ValueError(
                f"hyperplane {k} (class {cls}) must cross the open segment "
                "from the class mean to the barycenter with the mean on its "
                f"negative side: got h.mean + c = {g0:.4g}, h.barycenter + c = "
                f"{g1:.4g}, expected < 0 < "
            )
        t = g0 / (g0 - g1)
        out.append(
            SLSPlane(
                cls,
                h,
                float(c),
                float(t),
                t * stats.barycenter + (1.0 - t) * stats.means[cls],
            )
        )
    return out


# ------------------------------------------------------------ validation


def _check_data(X, labels, Q):
    X = np.asarray(X, dtype=float)
    labels = np.asarray(labels)
    if X.ndim != 2 or labels.shape != (X.shape[0],):
        raise ValueError(
            f"expected X (N, M) and labels (N,), got {X.shape} and {labels.shape}"
        )
    labels = labels.astype(int)
    Q = int(labels.max()) + 1 if Q is None else int(Q)
    if Q < 2:
        raise ValueError(
            f"SLS needs at least 2 classes (the segment to the barycenter "
            f"is empty for one), got {Q}"
        )
    return X, labels, Q


def _check_order(order, Q):
    order = [int(j) for j in order]
    if sorted(order) != list(range(Q)):
        raise ValueError(f"order must be a permutation of 0..{Q - 1}, got {order}")
    return order


def _check_grid(t_grid):
    if t_grid is None:
        return T_GRID
    grid = np.sort(np.asarray(t_grid, dtype=float).ravel())
    if grid.size == 0 or grid.min() <= 0.0 or grid.max() >= 1.0:
        raise ValueError(f"t_grid must be non-empty and inside (0, 1), got {t_grid}")
    return grid


# ------------------------------------------------------------ generator


def make_sls_data(
    Q,
    M,
    sizes,
    rng,
    *,
    order=None,
    distance=1.0,
    length=1.5,
    width=1.2,
    gap=0.15,
    offset=1.0,
    targets=None,
    max_draws=MAX_SLS_DRAWS,
):
    """Draw SLS data that Construction A cannot handle (reference section 5).

    In ``R^(M-1)`` the classes sit along the ``Q`` directions ``v_k`` of a
    regular simplex, randomly rotated. Hyperplane ``k`` is
    ``v_k . x = distance - gap`` with normal ``h_k = -v_k``; class ``k`` (in
    collapse order) is a slab piece ``(distance + s) v_k + w`` with
    ``s`` in ``[0, length]`` and ``w`` uniform in a disc of radius ``width``
    orthogonal to ``v_k``, keeping only points at least ``gap`` on the
    positive side of every earlier hyperplane. A data set is redrawn until the
    barycenter and every earlier apex lie on the positive side of each
    hyperplane and Construction A fails (``c0 >= 1/4`` or ``max theta*_j >= pi``).
    A constant coordinate ``offset`` is appended, making the affinely
    independent means linearly independent.

    Parameters
    ----------
    Q : int, 2 <= Q <= M
    M : int
        Dimension of the returned points.
    sizes : int or sequence of int
        Points per class (indexed by class label).
    rng : numpy.random.Generator
    order : sequence of int, optional
        Class label collapsed at each step; default a random permutation.
    distance, length, width, gap : float
        Geometry as above; the clusters are elongated when ``length`` and
        ``width`` are comparable to ``distance``.
    targets : ndarray, shape (Q, out_dim), optional
        Default one-hot.

    Returns
    -------
    Dataset
        ``extra["order"]`` is the designed order, ``extra["planes"]`` the rows
        ``(h_k, c_k)`` in that order, shape (Q, M + 1).
    """
    if not 2 <= Q <= M:
        raise DataError(f"make_sls_data needs 2 <= Q <= M, got Q = {Q}, M = {M}")
    sizes = np.asarray(sizes, dtype=int)
    sizes = np.full(Q, sizes) if sizes.ndim == 0 else sizes
    if sizes.shape != (Q,) or sizes.min() < 1:
        raise DataError(
            f"sizes must be one positive count or Q = {Q} of them, got {sizes.tolist()}"
        )
    order = list(rng.permutation(Q)) if order is None else _check_order(order, Q)
    for _ in range(max_draws):
        V = _rotated_simplex(Q, M - 1, rng)
        pts = [
            _draw_class(k, V, sizes[order[k]], distance, length, width, gap, rng)
            for k in range(Q)
        ]
        X = np.vstack(pts)
        labels = np.repeat([order[k] for k in range(Q)], [len(p) for p in pts])
        if _design_ok(X, labels, V, order, distance - gap, gap, offset):
            return _dataset(X, labels, V, order, distance - gap, offset, targets)
    raise DataError(
        f"no SLS data set after {max_draws} draws met the conditions (barycenter and "
        "apexes on the positive sides, c0 >= 1/4 or max theta* >= pi); raise length or "
        "width relative to distance, or lower gap"
    )


def _rotated_simplex(Q, D, rng):
    """Unit vectors of a regular simplex in R^D, randomly rotated, shape (Q, D)."""
    E = np.eye(Q) - 1.0 / Q
    B = np.linalg.svd(E)[2][: Q - 1]  # orthonormal basis of u^perp, shape (Q - 1, Q)
    V = np.zeros((Q, D))
    V[:, : Q - 1] = E @ B.T
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    O, R = np.linalg.qr(rng.standard_normal((D, D)))
    return V @ (O * np.sign(np.diag(R))).T


def _draw_class(k, V, n, distance, length, width, gap, rng):
    """Points of the k-th collapsed class, on the positive side of planes 0..k-1."""
    v = V[k]
    D = V.shape[1]
    perp = np.linalg.svd(v[None, :])[2][1:]  # orthonormal basis of v^perp, (D - 1, D)
    kept = []
    for _ in range(MAX_CLASS_BATCHES):
        s = rng.uniform(0.0, length, n)
        w = uniform_ball(n, D - 1, width, rng) @ perp if D > 1 else np.zeros((n, D))
        P = (distance + s)[:, None] * v + w
        slack = (distance - gap) - P @ V[:k].T  # h_i . x + c_i for earlier planes
        kept.append(P[(slack >= gap).all(axis=1)])
        if sum(len(b) for b in kept) >= n:
            return np.vstack(kept)[:n]
    raise DataError(
        f"class at step {k} keeps too few points on the positive side of the earlier "
        "hyperplanes; lower width or raise distance"
    )


def _design_ok(X, labels, V, order, level, gap, offset):
    """Barycenter and earlier apexes positive for every plane, and not clustered."""
    Q = V.shape[0]
    stats = cs.class_stats(X, labels, Q)
    g_bary = level - V @ stats.barycenter
    if g_bary.min() < gap / 2:
        return False
    for i in range(Q):
        g0 = level - V[i] @ stats.means[order[i]]
        t = g0 / (g0 - g_bary[i])
        p = t * stats.barycenter + (1.0 - t) * stats.means[order[i]]
        if i + 1 < Q and (level - V[i + 1 :] @ p).min() < gap / 2:
            return False
    Xc = np.hstack([X, np.full((len(X), 1), offset)])
    cond = cs.clustered_conditions(Xc, labels, Q=Q)
    return cond.c0 >= cs.C0_LIMIT or not np.max(cond.theta_j) < np.pi


def _dataset(X, labels, V, order, level, offset, targets):
    Q = V.shape[0]
    Xc = np.hstack([X, np.full((len(X), 1), offset)])
    planes = np.hstack([-V, np.zeros((Q, 1)), np.full((Q, 1), level)])
    Y = one_hot(Q) if targets is None else np.asarray(targets, dtype=float)
    return Dataset(
        Xc,
        labels,
        Y,
        source="sls (generated)",
        extra={"order": [int(j) for j in order], "planes": planes},
    )
