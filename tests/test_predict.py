"""`dlmin predict`: stored networks applied to new inputs, both rules."""

import json

import numpy as np
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import data, store

from helpers import write_spec

SPEC = """\
experiments:
  - name: net
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: 20, radius: 0.05}
  - name: bad
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: 20, radius: 0.5}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def built(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    invoke("construct", spec, "-o", tmp_path / "out", "-j", "1")
    return tmp_path / "out" / "net" / "run.h5"


def test_heldout_points_of_the_balls_map_exactly_to_their_targets(tmp_path, rng):
    path = built(tmp_path)
    res = store.load(path)
    centers, radius = res["data"]["centers"], res["data"]["attrs"]["radius"]
    X, labels = data.draw_clusters(centers, [200, 200, 200], radius, "ball", rng)
    np.savez(tmp_path / "new.npz", X=X, labels=labels)
    result = invoke(
        "predict", path, tmp_path / "new.npz", "-o", tmp_path / "pred.npz", "--json"
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["accuracy"] == 1.0 and row["agreement"] == 1.0 and row["n"] == 600
    with np.load(tmp_path / "pred.npz") as f:
        np.testing.assert_allclose(f["outputs"], res["data"]["Y"][labels], atol=1e-12)
        np.testing.assert_array_equal(f["classes"], labels)
        np.testing.assert_array_equal(f["metric_classes"], labels)


def test_far_points_follow_both_rules_and_csv_output(tmp_path, rng):
    path = built(tmp_path)
    X = 3 * rng.standard_normal((50, 3))
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    result = invoke("predict", path, tmp_path / "x.csv")
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 0 and lines[0] == "class,metric_class,out0,out1,out2"
    table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    Y = store.load(path)["data"]["Y"]
    nearest = np.argmin(((table[:, 2:, None] - Y.T[None]) ** 2).sum(1), axis=1)
    np.testing.assert_array_equal(table[:, 0], nearest)
    assert "agree" in result.stderr


def test_predict_errors(tmp_path):
    path = built(tmp_path)
    np.savez(tmp_path / "wide.npz", X=np.zeros((4, 5)))
    result = invoke("predict", path, tmp_path / "wide.npz")
    assert result.exit_code == 2 and "(n, 3)" in result.stderr
    failed = tmp_path / "out" / "bad" / "run.h5"
    result = invoke("predict", failed, tmp_path / "wide.npz")
    assert result.exit_code == 2 and "holds no network" in result.stderr
    result = invoke("predict", path, tmp_path / "missing.npz")
    assert result.exit_code == 2 and "no such file" in result.stderr
