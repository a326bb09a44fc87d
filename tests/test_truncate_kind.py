"""`kind: truncate`: trained, constructed and stored networks, layer by layer."""

import json

import numpy as np
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import store

from helpers import write_spec

SPEC = """\
experiments:
  - name: trained
    kind: truncate
    data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.15}
    network: {hidden: [3, 3], activation: relu, init: {bias_scale: 0.1}}
    flow: {kind: standard, solver: euler, step: 0.05, time: 20, record: {points: 5}}
  - name: built
    kind: truncate
    data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.05}
    truncate: {of: construct}
  - name: stored
    kind: truncate
    truncate: {of: result, path: out/trained/run.h5}
"""


def test_truncate_kind_end_to_end(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", str(spec), "-o", str(out), "--json", "-j", "1"]
    )
    assert result.exit_code == 0, result.output
    rows = {
        json.loads(l)["experiment"]: json.loads(l) for l in result.stdout.splitlines()
    }
    trained = rows["trained"]
    for key in ("collapsed", "partly", "fixed", "spread"):
        assert np.shape(trained[key]) == (2, 3)
    fr = np.array([trained["collapsed"], trained["partly"], trained["fixed"]])
    np.testing.assert_allclose(fr.sum(axis=0), 1.0)
    view = store.load(trained["path"])["truncview"]
    assert view["fractions_t"].shape == (5, 2, 3, 3) and view["s"].shape == (5,)
    np.testing.assert_allclose(view["fractions_t"][-1], view["fractions"])
    built = np.array(rows["built"]["collapsed"])  # class l collapsed from layer l on
    np.testing.assert_array_equal(built, np.tril(np.ones((3, 3))))
    stored = store.load(rows["stored"]["path"])["truncview"]
    np.testing.assert_allclose(stored["fractions"], view["fractions"])
    assert stored["fractions_t"].shape == view["fractions_t"].shape


def test_partial_start_truncates_a_class_in_part_and_training_truncates_more(tmp_path):
    text = """\
    experiments:
      - name: partial
        kind: truncate
        data: {source: clusters, classes: 3, dim: 3, points: 20, radius: 0.1}
        network: {activation: relu, init: {source: partial, layer: 1, weight: 0.45}}
        flow: {kind: standard, solver: euler, step: 0.05, time: 30, record: {points: 4}}
    """
    result = CliRunner().invoke(
        app,
        ["run", str(write_spec(tmp_path, text)), "-o", str(tmp_path / "o"), "--json"],
    )
    row = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    first = store.load(row["path"])["truncview"]["fractions_t"][:, 0, 0, 0]
    assert 0 < first[0] < 1 and first[-1] > first[0]
    bad = text.replace("weight: 0.45", "weight: 1.5")
    check = CliRunner().invoke(
        app, ["validate", str(write_spec(tmp_path, bad, "b.yaml"))]
    )
    assert check.exit_code == 2 and "weight" in check.stderr
