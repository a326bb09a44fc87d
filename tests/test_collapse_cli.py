"""`dlmin collapse` end to end: constructed layers, flow orbits, features, effective."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import collapse as nc
from dlmin.core import store

from helpers import write_spec

ROW_KEYS = {
    "nc1",
    "nc1_quotient",
    "cdnv",
    "equinorm_means",
    "equiangular_means",
    "maxangle_means",
    "self_duality",
    "ncc_mismatch",
    "rank",
}

SPEC = """\
experiments:
  - name: built
    kind: collapse
    data: {source: clusters, classes: 3, dim: 3, points: 12, radius: 0.1}
    collapse: {of: construct}
  - name: along
    kind: collapse
    data: {source: clusters, classes: 3, dim: 3, points: 5, radius: 0.3}
    network: {hidden: [10], activation: tanh}
    flow: {kind: adapted, time: 30, record: {points: 4}}
    collapse: {of: flow, weighting: sample}
  - name: contraction
    kind: collapse
    collapse: {of: effective}
    effective: {dim: 2, points: 20, radius: 0.3, time: 8, method: events}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collapse")
    result = invoke(
        "collapse", write_spec(tmp, SPEC), "-o", tmp / "out", "--json", "-j", "1"
    )
    assert result.exit_code == 0, result.output
    return {
        json.loads(l)["experiment"]: json.loads(l) for l in result.stdout.splitlines()
    }


def test_constructed_minimizer_collapses_exactly_in_its_last_hidden_layer(table):
    row = table["built"]
    assert ROW_KEYS <= set(row) and row["status"] == "ok"
    assert row["nc1"] < 1e-20 and row["ncc_mismatch"] == 0 and row["layers"] == 3
    res = store.load(row["path"])
    col = res["collapse"]
    assert list(col["layer_name"]) == [
        "input",
        "hidden 1",
        "hidden 2",
        "hidden 3",
        "output",
    ]
    assert col["nc1"][0] > 1e-4 and col["nc1"][3] < 1e-20  # input spread, then none
    trunc = res["collapse"]["truncation"]
    assert trunc["nc1"][-1] < 1e-20 and trunc["nc1"][0] == pytest.approx(col["nc1"][0])
    assert col["attrs"]["options"]["weighting"] == "balanced"


def test_metrics_in_the_file_match_a_direct_computation(table):
    res = store.load(table["built"]["path"])
    X, labels = res["data"]["X"], res["data"]["labels"]
    direct = nc.collapse_metrics(X, labels)
    assert res["collapse"]["nc1"][0] == pytest.approx(direct.nc1, rel=1e-12)


def test_flow_orbit_is_measured_at_every_time_and_layer(table):
    row = table["along"]
    assert row["times"] == 4 and row["weighting"] == "sample"
    res = store.load(row["path"])
    by_layer = res["collapse"]["by_layer"]["nc1"]
    assert by_layer.shape == (4, 3)  # times x (input, hidden, output)
    np.testing.assert_array_equal(res["collapse"]["nc1"], by_layer[:, 1])
    np.testing.assert_allclose(by_layer[:, 0], by_layer[0, 0])  # inputs do not move


def test_effective_run_contracts_before_its_bound(table):
    row = table["contraction"]
    assert {
        "contraction_time",
        "contraction_bound",
        "final_cost",
        "orthogonality_error",
    } <= set(row)
    assert row["contraction_time"] <= row["contraction_bound"]
    eff = store.load(row["path"])["effective"]
    s, cost = eff["s"], eff["cost"]
    late = s > row["contraction_time"] + 1e-9
    slope = np.diff(np.log(cost[late])) / np.diff(s[late])
    np.testing.assert_allclose(slope, -2.0, atol=1e-6)


def test_features_file_streams_and_reports(tmp_path, rng):
    H = np.repeat(3 * np.eye(4, 8), 50, axis=0) + 0.05 * rng.standard_normal((200, 8))
    y = np.repeat(np.arange(4), 50)
    np.savez(
        tmp_path / "f.npz",
        features=H,
        labels=y,
        W=np.eye(4, 8),
        b=np.zeros(4),
        predictions=y,
    )
    result = invoke("collapse", "--features", tmp_path / "f.npz", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert ROW_KEYS <= set(row) and row["ncc_mismatch"] == 0
    direct = nc.collapse_metrics(H, y, W=np.eye(4, 8), b=np.zeros(4), predictions=y)
    assert row["nc1"] == pytest.approx(direct.nc1, rel=1e-10)
    sample = json.loads(
        invoke(
            "collapse",
            "--features",
            tmp_path / "f.npz",
            "--json",
            "--weighting",
            "sample",
        ).stdout
    )
    assert sample["weighting"] == "sample"


def test_features_file_errors_are_usage_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", feats=np.zeros((3, 2)))
    result = invoke("collapse", "--features", tmp_path / "bad.npz")
    assert (
        result.exit_code == 2
        and "features" in result.stderr
        and "labels" in result.stderr
    )
    result = invoke("collapse", "--features", tmp_path / "none.npz")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_collapse_of_a_stored_result(tmp_path):
    text = """\
    experiments:
      - name: net
        kind: construct
        data: {source: clusters, classes: 2, dim: 2, points: 10, radius: 0.05}
      - name: measure
        kind: collapse
        collapse: {of: result, path: out/net/run.h5}
    """
    spec = write_spec(tmp_path, text)
    assert invoke("construct", spec, "-o", tmp_path / "out").exit_code == 0
    result = invoke("collapse", spec, "-o", tmp_path / "out", "--json")
    row = json.loads(result.stdout)
    assert result.exit_code == 0 and row["nc1"] < 1e-20
    assert (
        invoke(
            "validate",
            write_spec(
                tmp_path, text.replace(", path: out/net/run.h5", ""), "nopath.yaml"
            ),
        ).exit_code
        == 2
    )
