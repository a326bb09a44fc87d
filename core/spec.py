"""Experiment specs: YAML to validated models, sweep expansion and run ids.

A spec file holds ``defaults`` (merged under every experiment) and a list of
``experiments``. Each experiment may carry a ``sweep``: a grid over dotted
keys (``data.radius``, ``seed``, ...). Every problem is reported as a
:class:`SpecError` naming the file, line, key path, what was found and what
is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
RUN_ID_MAX = 120  # longer readable run ids are replaced by a hash
KINDS = ("construct", "flow", "trap", "collapse", "truncate", "landscape")
LATER_KINDS = ()


# ------------------------------------------------------------------ errors


@dataclass
class SpecError(Exception):
    """One problem in a spec, located to a file, line and key path."""

    file: str
    line: int | None
    path: str
    found: str
    allowed: str

    def __str__(self):
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} found {self.found}; allowed: {self.allowed}"


class SpecErrors(Exception):
    """All problems found in one spec, in file order."""

    def __init__(self, errors):
        self.errors = sorted(errors, key=lambda e: (e.line or 0, e.path))
        super().__init__("\n".join(str(e) for e in self.errors))


# ------------------------------------------------------------------ models


class _Strict(BaseModel):
    # No key of a spec takes infinities or NaN (YAML's .inf, .nan).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Matrix = list[list[float]]


class ClustersData(_Strict):
    """Q clusters in R^dim: balls or Gaussians about chosen means."""

    source: Literal["clusters"]
    classes: int = Field(ge=1)
    dim: int = Field(ge=1)
    points: int | list[int] = Field(
        description="points per class, one number or one per class"
    )
    radius: float = Field(ge=0)
    distribution: Literal["ball", "gaussian"] = "ball"
    layout: Literal["simplex", "random", "given"] = "simplex"
    scale: float = Field(1.0, gt=0)
    separation: float | None = Field(None, ge=0)
    means: Matrix | None = None
    targets: Literal["onehot"] | Matrix = "onehot"

    @model_validator(mode="after")
    def _shapes(self):
        Q = self.classes
        if isinstance(self.points, list):
            _expect(
                len(self.points) == Q,
                "points",
                self.points,
                f"{Q} class sizes (one per class)",
            )
            _expect(
                all(p >= 1 for p in self.points), "points", self.points, "sizes >= 1"
            )
        else:
            _expect(self.points >= 1, "points", self.points, "an integer >= 1")
        if self.layout == "given":
            ok = (
                self.means is not None
                and len(self.means) == Q
                and all(len(m) == self.dim for m in self.means)
            )
            _expect(
                ok,
                "means",
                self.means,
                f"{Q} rows of {self.dim} numbers with layout: given",
            )
        else:
            _expect(
                self.means is None, "means", self.means, "means only with layout: given"
            )
        _check_targets(self.targets, Q)
        return self


class FileData(_Strict):
    """Points read from ``.npz`` (X, labels, optional Y) or ``.csv``."""

    source: Literal["file"]
    path: str
    targets: Literal["onehot", "file"] | Matrix = "file"

    @model_validator(mode="after")
    def _suffix(self):
        _expect(
            Path(self.path).suffix in (".npz", ".csv"),
            "path",
            self.path,
            "a .npz or .csv file",
        )
        return self


class SklearnData(_Strict):
    """A dataset bundled with scikit-learn, standardized, optionally PCA-reduced."""

    source: Literal["sklearn"]
    name: Literal["iris", "wine", "breast_cancer", "digits"]
    standardize: bool = True
    dim: int | None = Field(None, ge=1)
    augment: bool = False
    targets: Literal["onehot"] | Matrix = "onehot"


DataSpec = Annotated[
    Union[ClustersData, FileData, SklearnData, "SlsData"], Field(discriminator="source")
]


class SeedInit(_Strict):
    """Random initial weights drawn from the run's seed."""

    source: Literal["seed"] = "seed"
    scheme: Literal["he", "glorot", "gaussian"] = "he"
    scale: float = Field(1.0, gt=0)
    bias_scale: float = Field(0.0, ge=0)


class FileInit(_Strict):
    """Initial weights from an ``.npz`` with arrays ``W1, b1, W2, b2, ...``."""

    source: Literal["file"]
    path: str


class ResultInit(_Strict):
    """Initial weights from the network of a dlmin result file, optionally perturbed.

    ``pattern`` rebuilds the collapse/keep network of that pattern on the
    result's data (reference/construct.md section 6) instead of taking the
    stored network; ``perturb`` adds to every weight and bias tensor an
    independent Gaussian direction of that norm (times the tensor's own norm
    when ``relative``), drawn from the run's seed.
    """

    source: Literal["result"]
    path: str
    perturb: float = Field(0.0, ge=0)
    relative: bool = False
    pattern: list[Annotated[int, Field(ge=0, le=1)]] | None = None


class PartialInit(_Strict):
    """The constructed network (``construct:`` block) with one cone layer's apex
    moved between its collapse and keep positions, so it truncates a class in part."""

    source: Literal["partial"]
    layer: int = Field(1, ge=1)
    weight: float = Field(0.5, ge=0, le=1)


InitSpec = Annotated[
    Union[SeedInit, FileInit, ResultInit, PartialInit], Field(discriminator="source")
]


class NetworkSpec(_Strict):
    """Architecture and initial weights.

    ``hidden`` defaults, for ``construct``, to Q layers of width ``dim``.
    """

    hidden: list[Annotated[int, Field(ge=1)]] | None = None
    activation: Literal["relu", "tanh", "softplus"] = "relu"
    init: InitSpec = SeedInit()

    @model_validator(mode="before")
    @classmethod
    def _seed_is_the_default_source(cls, raw):
        if (
            isinstance(raw, dict)
            and isinstance(raw.get("init"), dict)
            and "source" not in raw["init"]
        ):
            raw = dict(raw, init=dict(raw["init"], source="seed"))
        return raw


class RecordSpec(_Strict):
    """Where along the orbit a flow is recorded."""

    points: int = Field(101, ge=2)
    grid: Literal["linear", "log", "t"] = "linear"


class FlowSpec(_Strict):
    """Options of ``dlmin flow`` (reference/flows.md sections 4-8, 10, 12)."""

    kind: Literal["standard", "adapted", "homotopy"] = "standard"
    alpha: float = Field(0.5, ge=0, le=1)
    loss: Literal["l2", "ce"] = "l2"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    time: float | None = Field(None, gt=0)
    solver: Literal[
        "auto", "RK45", "DOP853", "LSODA", "BDF", "Radau", "euler", "sgd"
    ] = "auto"
    rtol: float = Field(1e-8, gt=0)
    atol: float = Field(1e-10, gt=0)
    step: float | None = Field(None, gt=0)
    max_step: float | None = Field(None, gt=0)
    record: RecordSpec = RecordSpec()
    damping: float = Field(0.0, ge=0)
    rank_cutoff: float = Field(1e-12, gt=0, lt=0.1)
    stop_cost: float | None = Field(None, ge=0)
    wall_limit: float | None = Field(None, gt=0)
    store_theta: bool | None = None
    spectrum: bool = True
    route: Literal["kernel", "jacobian"] = "kernel"
    lr: float | None = Field(None, gt=0)
    batch: int | None = Field(None, ge=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    epochs: int | None = Field(None, ge=1)


class SlsData(_Strict):
    """Sequentially linearly separable data that Construction A cannot handle."""

    source: Literal["sls"]
    classes: int = Field(ge=2)
    dim: int = Field(ge=2)
    points: int | list[int]
    order: list[int] | None = None
    distance: float = Field(1.0, gt=0)
    length: float = Field(1.5, gt=0)
    width: float = Field(1.2, gt=0)
    gap: float = Field(0.15, gt=0)
    offset: float = Field(1.0, gt=0)
    targets: Literal["onehot"] | Matrix = "onehot"

    @model_validator(mode="after")
    def _shapes(self):
        Q = self.classes
        _expect(Q <= self.dim, "dim", self.dim, f"at least classes = {Q}")
        if isinstance(self.points, list):
            _expect(len(self.points) == Q, "points", self.points, f"{Q} class sizes")
        if self.order is not None:
            _expect(
                sorted(self.order) == list(range(Q)),
                "order",
                self.order,
                f"a permutation of 0..{Q - 1}",
            )
        _check_targets(self.targets, Q)
        return self


METHODS = ("clustered", "sls", "shallow", "collapse-keep")


class ConstructSpec(_Strict):
    """Options of ``dlmin construct`` (reference/construct.md sections 4-8)."""

    method: Literal["clustered", "sls", "shallow", "collapse-keep"] = "clustered"
    reduced_width: bool = False
    planes: Matrix | None = None
    theta_frac: float = Field(0.5, gt=0, lt=1)
    max_classes: int = Field(10, ge=1)
    nu_rule: Literal["sin", "sqrt"] = "sin"
    mu_factor: float = Field(2.5, gt=2, lt=3)
    theta0: float = Field(0.05, gt=0, lt=math.pi)
    radius: Literal["auto", "data"] | Annotated[float, Field(ge=0)] = "auto"
    order: list[int] | None = None
    intercept: bool = False
    strict: bool = True
    heldout: int = Field(100, ge=0)
    store_limit: int = Field(10000, ge=0)


# The field `construct` shadows BaseModel.construct, a deprecated alias of
# model_construct that this project never calls; the spec key must keep its name.
warnings.filterwarnings(
    "ignore", message='Field name "construct"', category=UserWarning
)


class EffectiveSpec(_Strict):
    """The effective (beta, R) flow of cluster truncation (flows.md section 11)."""

    dim: int = Field(2, ge=1)
    points: int = Field(50, ge=1)
    radius: float = Field(0.3, gt=0)
    clusters: int = Field(1, ge=1)
    rotation: float = Field(0.0, ge=0)
    truncated: float = Field(0.3, ge=0, le=1)
    trapped: bool = False
    time: float = Field(10.0, gt=0)
    step: float | None = Field(None, gt=0)
    method: Literal["cayley", "lie-euler", "events"] = "events"
    freeze_R: bool | None = None
    record: int = Field(101, ge=2)


class CollapseSpec(_Strict):
    """Options of ``dlmin collapse`` (reference/collapse.md)."""

    of: Literal["construct", "flow", "result", "features", "effective"] = "construct"
    path: str | None = None
    weighting: Literal["balanced", "sample"] = "balanced"
    ddof: int = Field(0, ge=0, le=1)
    rank_tol: float | None = Field(None, gt=0)
    center_classifier: bool = False
    truncation: bool = True

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.of in ("result", "features"):
            _expect(
                self.path is not None, "path", None, f"a file path with of: {self.of}"
            )
        return self


class ScenarioSpec(_Strict):
    """A modification of the start that makes the orbit trap on purpose."""

    name: Literal["small_init", "dead_units", "near_duplicates", "underparametrized"]
    scale: float | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0, le=1)
    margin: float | None = Field(None, gt=0)
    n_groups: int | None = Field(None, ge=1)
    spread: float | None = Field(None, ge=0)
    width: int | None = Field(None, ge=1)

    def knobs(self):
        return {
            k: v for k, v in self.model_dump().items() if k != "name" and v is not None
        }


class TrapSpec(_Strict):
    """Options of ``dlmin trap`` (reference/flows.md section 9)."""

    eps: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.1])
    compare: bool = False
    threshold: float | None = Field(None, gt=0)
    compare_damping: float | None = Field(None, ge=0)
    grid_points: int = Field(2001, ge=11)
    scenario: ScenarioSpec | None = None
    path: str | None = None


def _odd(value, key):
    _expect(
        value % 2 == 1,
        key,
        value,
        "an odd number >= 3 (the minimizer is the middle grid point)",
    )


class LandscapeSpec(_Strict):
    """Options of ``kind: landscape``: the cost around a minimizer."""

    of: Literal["construct", "result"] = "construct"
    path: str | None = None
    pattern: list[Annotated[int, Field(ge=0, le=1)]] | None = None
    lambdas: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [0.01, 0.1, 0.5], min_length=1
    )
    relative: bool = False
    trials: int = Field(10, ge=1)
    train: bool = False
    threshold: Literal["auto"] | Annotated[float, Field(ge=0)] = "auto"
    quantiles: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9], min_length=1
    )
    directions: int = Field(3, ge=0)
    points: int = Field(41, ge=3)
    span: float | None = Field(None, gt=0)
    plane: bool = True
    plane_points: int = Field(21, ge=3)

    @model_validator(mode="after")
    def _consistent(self):
        if self.of == "result":
            _expect(
                self.path is not None, "path", None, "a result file with of: result"
            )
        _odd(self.points, "points")
        _odd(self.plane_points, "plane_points")
        _expect(
            len(set(self.lambdas)) == len(self.lambdas),
            "lambdas",
            self.lambdas,
            "distinct sizes (a repeated size would repeat the same trials; raise "
            "landscape.trials instead)",
        )
        return self


class TruncateSpec(_Strict):
    """Options of ``kind: truncate``: the network seen through its truncation maps."""

    of: Literal["flow", "construct", "result"] = "flow"
    path: str | None = None
    time: Literal["all", "last"] = "all"

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.of == "result":
            _expect(
                self.path is not None, "path", None, "a result file with of: result"
            )
        return self


class Experiment(_Strict):
    """One experiment of a spec, as validated for one run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: str
    description: str | None = None
    seed: int = Field(0, ge=0)
    data: DataSpec | None = None
    network: NetworkSpec = NetworkSpec()
    construct: ConstructSpec = ConstructSpec()
    flow: FlowSpec = FlowSpec()
    collapse: CollapseSpec = CollapseSpec()
    trap: TrapSpec = TrapSpec()
    truncate: TruncateSpec = TruncateSpec()
    landscape: LandscapeSpec = Field(default_factory=LandscapeSpec)
    effective: EffectiveSpec = EffectiveSpec()
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_and_shapes(self):
        if self.kind not in KINDS:
            later = (
                f" ({', '.join(LATER_KINDS)} are not built yet)"
                if self.kind in LATER_KINDS
                else ""
            )
            raise _FieldProblem("kind", self.kind, " | ".join(KINDS) + later)
        needs_data = (
            self.kind in ("construct", "flow")
            or (self.kind == "truncate" and self.truncate.of != "result")
            or (self.kind == "trap" and self.trap.path is None)
            or (self.kind == "collapse" and self.collapse.of in ("construct", "flow"))
            or (self.kind == "landscape" and self.landscape.of == "construct")
        )
        if needs_data:
            _expect(
                self.data is not None,
                "data",
                None,
                f"a data block (kind: {self.kind} needs data)",
            )
        if self.kind == "collapse" and self.collapse.of == "flow":
            _check_flow(self)
        if self.kind == "construct":
            _check_relu(self)
            if isinstance(self.data, (ClustersData, SlsData)):
                _check_construct_shapes(self)
        if self.kind == "landscape":
            _check_landscape(self)
        if self.kind == "trap" and self.trap.path is None:
            _expect(
                self.flow.solver not in ("euler", "sgd"),
                "flow.solver",
                self.flow.solver,
                "an ODE solver or auto: trap integrates the continuous standard "
                "flow (DOP853); gradient descent and SGD are not that flow",
            )
        if (
            self.kind == "flow"
            or (self.kind == "trap" and self.trap.path is None)
            or (self.kind == "truncate" and self.truncate.of == "flow")
        ):
            _check_flow(self)
        return self


def _check_relu(exp):
    _expect(
        exp.network.activation == "relu",
        "network.activation",
        exp.network.activation,
        "relu (the constructions are ReLU networks)",
    )


def _check_landscape(exp):
    """The minimizer's construction and, when trials train, the flow block."""
    land = exp.landscape
    if land.of == "construct":
        _check_relu(exp)
    if land.of == "construct" and land.pattern is None:
        if isinstance(exp.data, (ClustersData, SlsData)):
            _check_construct_shapes(exp)
    if (
        land.of == "construct"
        and land.pattern is not None
        and isinstance(exp.data, (ClustersData, SlsData))
    ):
        _expect(
            len(land.pattern) == exp.data.classes,
            "landscape.pattern",
            land.pattern,
            f"one 0 (collapse) or 1 (keep) per class: {exp.data.classes} entries",
        )
    if land.train:
        _check_solver(exp.flow)


def _check_construct_shapes(exp):
    d, Q = exp.data.dim, exp.data.classes
    hidden, opt = exp.network.hidden, exp.construct
    problem = hidden_problem(opt.method, opt.reduced_width, hidden, d, Q)
    if problem:
        _expect(False, "network.hidden", hidden, problem)
    order = opt.order
    if order is not None:
        _expect(
            sorted(order) == list(range(Q)),
            "construct.order",
            order,
            f"a permutation of 0..{Q - 1}",
        )
    if opt.planes is not None:
        _expect(
            order is not None
            and len(opt.planes) == Q
            and all(len(r) == d + 1 for r in opt.planes),
            "construct.planes",
            opt.planes,
            f"{Q} rows (h_j, c_j) of {d + 1} numbers, with construct.order",
        )
    if opt.reduced_width:
        _expect(
            opt.method == "clustered",
            "construct.reduced_width",
            True,
            "true only with method: clustered (reduced widths are not covered for "
            f"method {opt.method})",
        )


def hidden_problem(method, reduced, hidden, dim, Q):
    """What is wrong with ``network.hidden`` for a construction method, or ''."""
    if hidden is None:
        return ""
    if method == "shallow":
        return "" if hidden == [dim] else f"one hidden layer of width data.dim = {dim}"
    if method == "collapse-keep":
        ok = len(hidden) == Q and all(w == dim for w in hidden)
        return "" if ok else f"{Q} hidden layers of width {dim} (one per class)"
    width = Q if reduced else dim
    if all(w == width for w in hidden):
        return ""
    what = "the number of classes" if reduced else "data.dim"
    shape = "reduced" if reduced else "square"
    return f"widths equal to {what} = {width} ({shape} layers)"


def _check_flow(exp):
    init = exp.network.init
    if isinstance(init, SeedInit):
        _expect(
            exp.network.hidden is not None,
            "network.hidden",
            None,
            "a list of hidden widths (or network.init from a file or result)",
        )
    _check_solver(exp.flow)


def _check_solver(flow):
    if flow.solver == "sgd":
        _check_sgd(flow)
    else:
        _check_not_sgd(flow)
    if flow.solver == "euler":
        _expect(
            flow.step is not None,
            "flow.step",
            None,
            "a step size with solver: euler (gradient descent with this learning rate)",
        )


def _check_sgd(flow):
    _expect(flow.lr is not None, "flow.lr", None, "a learning rate with solver: sgd")
    _expect(
        flow.kind == "standard",
        "flow.kind",
        flow.kind,
        "standard with solver: sgd (adapted and homotopy flows need an ODE solver)",
    )
    for key, what in (("time", "flow.epochs"), ("step", "flow.lr")):
        _expect(
            getattr(flow, key) is None,
            f"flow.{key}",
            getattr(flow, key),
            f"nothing with solver: sgd (it runs for {what})",
        )
    _expect(
        not flow.nesterov or flow.momentum > 0,
        "flow.nesterov",
        flow.nesterov,
        "true only with flow.momentum > 0 (without momentum it is plain SGD)",
    )


# Keys of the sgd solver, and their values when unset.
SGD_KEYS = {
    "lr": None,
    "batch": None,
    "momentum": 0.0,
    "nesterov": False,
    "epochs": None,
}


def _check_not_sgd(flow):
    """The sgd keys do nothing for the other solvers: refuse them there."""
    for key, unset in SGD_KEYS.items():
        value = getattr(flow, key)
        _expect(
            value == unset,
            f"flow.{key}",
            value,
            f"nothing with solver: {flow.solver} (flow.{key} is a key of solver: sgd)",
        )


class _FieldProblem(ValueError):
    """A cross-field check that names its own key path."""

    def __init__(self, path, found, allowed):
        self.path, self.found, self.allowed = path, found, allowed
        super().__init__(f"{path}: found {found!r}; allowed: {allowed}")


def _expect(ok, path, found, allowed):
    if not ok:
        raise _FieldProblem(path, found, allowed)


def _check_targets(targets, Q):
    if isinstance(targets, list):
        ok = len(targets) == Q and len({len(r) for r in targets}) == 1
        _expect(ok, "targets", targets, f"{Q} rows of equal length (row j is y_j)")


# --------------------------------------------------------------- YAML, lines


class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-3`` as a float (YAML 1.2), not a string."""


_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$"
    r"|^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _parse_yaml(text, file):
    """Parse YAML text into Python values and a map from key paths to lines."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines = {}
        value = _walk(node, (), lines, loader, file) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise SpecErrors(
            [
                SpecError(
                    file,
                    line,
                    "",
                    f"invalid YAML ({exc.problem})",
                    "a YAML mapping with 'defaults' and 'experiments'",
                )
            ]
        ) from None
    finally:
        loader.dispose()
    return value, lines


def _walk(node, path, lines, loader, file):
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out = {}
        for k_node, v_node in node.value:
            key = loader.construct_object(k_node, deep=True)
            if key in out:
                raise SpecErrors(
                    [
                        SpecError(
                            file,
                            k_node.start_mark.line + 1,
                            _dotted(path + (key,)),
                            f"duplicate key {key!r}",
                            "each key once per mapping",
                        )
                    ]
                )
            out[key] = _walk(v_node, path + (key,), lines, loader, file)
            lines[path + (key,)] = k_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _walk(v, path + (i,), lines, loader, file) for i, v in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def _dotted(path):
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# ------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run of an experiment: a sweep point with its config and output.

    Attributes
    ----------
    experiment, kind, run_id : str
    point : dict
        Swept values of this run, by dotted key.
    config : Experiment
        The validated configuration of this run.
    seed : int
        Root seed of the run; its random stream is
        ``numpy.random.default_rng([run_key, seed])``.
    run_key : int
        Stable integer from the experiment name and the non-seed sweep values.
    path : pathlib.Path
        Output file, ``<out>/<experiment>/<run_id>.h5``.
    spec_hash : str
        Hash of everything that determines the result.
    resolved : dict
        The run's resolved configuration (``spec_text`` is it as YAML).
    """

    experiment: str
    kind: str
    run_id: str
    point: dict
    config: Experiment
    seed: int
    run_key: int
    path: Path
    spec_hash: str
    resolved: dict
    source_text: str = ""
    spec_file: str = ""

    @property
    def spec_text(self):
        """The run's resolved configuration as YAML (made when a file is written)."""
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(self.resolved, Dumper=dumper, sort_keys=False)

    def rng(self, purpose="run"):
        """Random stream of this run for one purpose.

        ``"data"`` is keyed by the data block alone and ``"init"`` by the
        data and network blocks, so runs that differ only in other keys
        (``flow.kind``, ``construct.theta0``, ...) share their data and initial
        weights; ``"run"`` (held-out points, subsamples) is keyed by the
        experiment name and the sweep point. All include the seed.
        """
        import numpy as np

        if purpose == "run":
            key = self.run_key
        elif purpose == "data":
            key = content_key("data", _dump(self.config.data))
        elif purpose == "init":
            key = content_key(
                "init",
                _dump(self.config.data),
                self.config.network.model_dump(mode="json"),
            )
        else:
            raise ValueError(f"purpose must be run, data or init, got {purpose!r}")
        return np.random.default_rng([key, self.seed])


@dataclass
class Spec:
    """A parsed spec: the file, its text and raw experiments with defaults merged."""

    file: str
    text: str
    experiments: list = field(default_factory=list)
    lines: dict = field(default_factory=dict)


TOP_KEYS = ("defaults", "experiments")


def load_spec(path):
    """Read and check a spec file; raise :class:`SpecErrors` listing every problem."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise SpecErrors(
            [SpecError(file, None, "", "no such file", "a path to a YAML spec")]
        )
    text = path.read_text()
    raw, lines = _parse_yaml(text, file)
    spec = Spec(file, text, lines=lines)
    errors = _check_top(raw, file, lines)
    if errors:
        raise SpecErrors(errors)
    defaults = raw.get("defaults") or {}
    seen = {}
    for i, exp in enumerate(raw["experiments"]):
        if not isinstance(exp, dict):
            errors.append(
                SpecError(
                    file,
                    lines.get(("experiments", i)),
                    f"experiments[{i}]",
                    _short(exp),
                    "a mapping with name, kind, data, ...",
                )
            )
            continue
        merged = _deep_merge(defaults, exp)
        name = exp.get("name")
        if name in seen:
            errors.append(
                SpecError(
                    file,
                    lines.get(("experiments", i, "name")),
                    f"experiments[{i}].name",
                    repr(name),
                    f"a name not used before (line {seen[name]})",
                )
            )
        seen[name] = lines.get(("experiments", i, "name"))
        spec.experiments.append((i, merged))
    for i, merged in spec.experiments:
        errors += _check_experiment(spec, i, merged)
    if errors:
        raise SpecErrors(_dedupe(errors))
    return spec


def _check_top(raw, file, lines):
    if not isinstance(raw, dict):
        return [
            SpecError(
                file, 1, "", _short(raw), "a mapping with keys defaults, experiments"
            )
        ]
    errors = [
        SpecError(file, lines.get((k,)), k, f"unknown key {k!r}", ", ".join(TOP_KEYS))
        for k in raw
        if k not in TOP_KEYS
    ]
    exps = raw.get("experiments")
    if not isinstance(exps, list) or not exps:
        errors.append(
            SpecError(
                file,
                lines.get(("experiments",), 1),
                "experiments",
                _short(exps),
                "a non-empty list of experiments",
            )
        )
    if "defaults" in raw and not isinstance(raw["defaults"], (dict, type(None))):
        errors.append(
            SpecError(
                file,
                lines.get(("defaults",)),
                "defaults",
                _short(raw["defaults"]),
                "a mapping of experiment keys",
            )
        )
    return errors


def _deep_merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _sweep_points(sweep):
    """Grid over the sweep: a list of {dotted key: value}, in file order."""
    if not sweep:
        return [{}]
    keys = list(sweep)
    return [
        dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))
    ]


def _check_sweep(spec, i, merged):
    sweep = merged.get("sweep") or {}
    base = ("experiments", i, "sweep")
    if not isinstance(sweep, dict):
        return [
            SpecError(
                spec.file,
                spec.lines.get(base),
                f"experiments[{i}].sweep",
                _short(sweep),
                "a mapping from dotted keys to lists of values",
            )
        ]
    errors = []
    for key, values in sweep.items():
        line = spec.lines.get(base + (key,))
        where = f"experiments[{i}].sweep.{key}"
        if not isinstance(key, str) or key.split(".")[0] in ("name", "kind", "sweep"):
            errors.append(
                SpecError(
                    spec.file,
                    line,
                    where,
                    repr(key),
                    "a dotted key other than name, kind and sweep",
                )
            )
        elif not isinstance(values, list) or not values:
            errors.append(
                SpecError(
                    spec.file, line, where, _short(values), "a non-empty list of values"
                )
            )
    return errors


def _check_experiment(spec, i, merged):
    errors = _check_sweep(spec, i, merged)
    if errors:
        return errors
    for point in _sweep_points(merged.get("sweep") or {}):
        raw = _apply_point(merged, point)
        try:
            Experiment.model_validate(raw)
        except ValidationError as exc:
            errors += [_locate(spec, i, raw, point, e) for e in exc.errors()]
    return errors


def _apply_point(merged, point):
    raw = copy.deepcopy(merged)
    for key, value in point.items():
        parts = key.split(".")
        target = raw
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                target[p] = {}
            target = target[p]
        target[parts[-1]] = copy.deepcopy(value)
    return raw


def _locate(spec, i, raw, point, err):
    """Turn one pydantic error into a SpecError with line and key path."""
    path, allowed = _raw_path(raw, err["loc"]), _allowed(err, raw)
    ctx_err = err.get("ctx", {}).get("error")
    if isinstance(ctx_err, _FieldProblem):
        path = path + tuple(ctx_err.path.split("."))
        allowed = ctx_err.allowed
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path = path + ("source",)
    found = _found(raw, path, err)
    if isinstance(ctx_err, _FieldProblem) and ctx_err.found is None:
        found = "nothing (the key is missing)"
    dotted = ".".join(str(p) for p in path)
    swept = next((k for k in point if dotted == k or dotted.startswith(k + ".")), None)
    if swept is not None:
        vals = raw.get("sweep", {}).get(swept, [])
        idx = next((n for n, v in enumerate(vals) if v == point[swept]), 0)
        line = spec.lines.get(
            ("experiments", i, "sweep", swept, idx),
            spec.lines.get(("experiments", i, "sweep", swept)),
        )
        where = f"experiments[{i}].sweep.{swept}[{idx}]"
    else:
        line = _line_for(spec, i, path)
        where = _dotted(("experiments", i) + path)
    return SpecError(spec.file, line, where, found, allowed)


# Names pydantic gives the members of a union in error locations.
_TYPE_TAGS = ("int", "float", "str", "bool")


def _raw_path(raw, loc):
    """Drop pydantic's union tags from an error location."""
    out, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part == node.get("source"):
            continue
        elif (
            isinstance(part, str)
            and "-" not in part  # pydantic's tags: function-after, constrained-float
            and part not in _TYPE_TAGS
            and "[" not in part
        ):
            out.append(part)
            node = None
    return tuple(out)


def _line_for(spec, i, path):
    for n in range(len(path), -1, -1):
        line = spec.lines.get(("experiments", i) + path[:n])
        if line is not None:
            return line
        line = spec.lines.get(("defaults",) + path[:n]) if n else None
        if line is not None:
            return line
    return None


def _found(raw, path, err):
    if err["type"] == "missing":
        return "nothing (the key is missing)"
    node = raw
    for p in path:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return _short(err.get("input"))
    if err["type"] == "extra_forbidden":
        return f"unknown key {path[-1]!r}"
    return _short(node)


def _allowed(err, raw):
    typ, ctx = err["type"], err.get("ctx", {})
    if typ == "extra_forbidden":
        keys = _model_keys(err["loc"][:-1], raw)
        return "one of " + ", ".join(keys) if keys else "no such key here"
    if typ == "missing":
        return "a value is required here"
    if typ == "literal_error":
        return ctx.get("expected", "").replace(" or ", " | ")
    if typ == "union_tag_invalid":
        return ctx.get("expected_tags", "").replace("'", "")
    if typ == "union_tag_not_found":
        tags = {
            "data": "clusters | file | sklearn | sls",
            "init": "seed | file | result | partial",
        }
        return "a 'source' key: " + tags.get(str(err["loc"][-1]), "see the README")
    bounds = {
        "greater_than": "> {gt}",
        "greater_than_equal": ">= {ge}",
        "less_than": "< {lt}",
        "less_than_equal": "<= {le}",
    }
    if typ == "too_short":
        return f"a list of at least {ctx.get('min_length')} item(s)"
    if typ in bounds:
        return "a number " + bounds[typ].format(**{k: f"{v:g}" for k, v in ctx.items()})
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def _model_keys(loc, raw):
    """Field names of the model at ``loc`` below Experiment."""
    model, node = Experiment, raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) else None
            continue
        if model is None:
            return []
        if part not in model.model_fields:
            continue  # a union tag
        node = node.get(part) if isinstance(node, dict) else None
        model = _submodel(model.model_fields[part].annotation, node)
    return sorted(model.model_fields) if model else []


def _submodel(annotation, node):
    found = []

    def collect(t):
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append(t)
        for a in get_args(t):
            collect(a)

    collect(annotation)
    if len(found) > 1 and isinstance(node, dict):
        for m in found:
            tag = m.model_fields.get("source")
            if tag is not None and node.get("source") in get_args(tag.annotation):
                return m
    return found[0] if found else None


def _short(value, limit=60):
    text = "nothing" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dedupe(errors):
    """One error per key: a union's failed members join their 'allowed' parts."""
    out = {}
    for e in errors:
        key = (e.line, e.path, e.found)
        if key not in out:
            out[key] = e
        elif e.allowed not in out[key].allowed.split(" or "):
            first = out[key]
            out[key] = SpecError(
                first.file,
                first.line,
                first.path,
                first.found,
                f"{first.allowed} or {e.allowed}",
            )
    return list(out.values())


# ------------------------------------------------------------------ planning


def plan(spec, out_dir="results", names=None, kinds=None):
    """Expand a spec into its runs, in file order.

    Parameters
    ----------
    spec : Spec
    out_dir : str or Path
        Result files go to ``out_dir/<experiment>/<run_id>.h5``.
    names : iterable of str, optional
        Only these experiments; an unknown name raises SpecErrors.
    kinds : iterable of str, optional
        Only experiments of these kinds.

    Returns
    -------
    list of Run
    """
    all_names = [m.get("name") for _, m in spec.experiments]
    if names:
        unknown = [n for n in names if n not in all_names]
        if unknown:
            raise SpecErrors(
                [
                    SpecError(
                        spec.file,
                        None,
                        "-e",
                        ", ".join(map(repr, unknown)),
                        "experiment names: " + ", ".join(all_names),
                    )
                ]
            )
    runs = []
    for _, merged in spec.experiments:
        if names and merged["name"] not in names:
            continue
        if kinds and merged.get("kind") not in kinds:
            continue
        runs += _expand(spec, merged, Path(out_dir))
    return runs


def _expand(spec, merged, out_dir):
    runs = []
    ids = set()
    for point in _sweep_points(merged.get("sweep") or {}):
        config = Experiment.model_validate(_apply_point(merged, point))
        resolved = config.model_dump(mode="json", exclude={"sweep"})
        run_id = run_id_for(point)
        if run_id in ids:
            run_id = run_id + "-" + _digest(point)[:8]
        ids.add(run_id)
        runs.append(
            Run(
                experiment=config.name,
                kind=config.kind,
                run_id=run_id,
                point=point,
                config=config,
                seed=config.seed,
                run_key=run_key(config.name, point),
                path=out_dir / config.name / f"{run_id}.h5",
                spec_hash=spec_hash(resolved, Path(spec.file).parent),
                resolved=resolved,
                source_text=spec.text,
                spec_file=spec.file,
            )
        )
    return runs


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _digest(obj):
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


def run_key(name, point):
    """Stable integer for an experiment's sweep point, ignoring its seed."""
    rest = {k: v for k, v in point.items() if k != "seed"}
    return int(_digest([name, rest])[:16], 16)


def _dump(model):
    return None if model is None else model.model_dump(mode="json")


def content_key(*parts):
    """Stable integer from JSON-able content (seeds the shared random streams)."""
    return int(_digest(list(parts))[:16], 16)


def _fmt(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def run_id_for(point):
    """Readable run id from a sweep point, e.g. ``data.radius=0.05_seed=1``.

    Depends only on the point itself, so adding sweep values leaves every
    other run's id unchanged. Overlong ids become a hash.
    """
    if not point:
        return "run"
    text = "_".join(f"{k}={_fmt(v)}" for k, v in point.items())
    text = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    return text if len(text) <= RUN_ID_MAX else "h" + _digest(point)[:16]


def spec_hash(resolved, base_dir):
    """Hash of a run's resolved config (and of its data file's bytes)."""
    payload = {
        "schema": SCHEMA_VERSION,
        "config": {k: v for k, v in resolved.items() if k != "description"},
    }
    data = resolved.get("data") or {}
    if data.get("source") == "file":
        p = Path(data["path"])
        p = p if p.is_absolute() else base_dir / p
        payload["data_file"] = _file_digest(p)
    return _digest(payload)[:32]


def _file_digest(path):
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"
