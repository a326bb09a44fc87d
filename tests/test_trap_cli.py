"""`dlmin trap` end to end: rows, stored intervals, stored orbits, spec errors."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import store

from helpers import write_spec

SPEC = """\
experiments:
  - name: plateau
    kind: trap
    data: {source: clusters, classes: 2, dim: 2, points: 3, radius: 0.3}
    network: {hidden: [6], activation: tanh}
    flow: {time: 60}
    trap: {eps: [0.1, 0.3], compare: true, grid_points: 401,
           scenario: {name: small_init, scale: 0.05}}
  - name: orbit
    kind: flow
    data: {source: clusters, classes: 2, dim: 2, points: 3, radius: 0.3}
    network: {hidden: [6], activation: tanh, init: {scale: 0.05}}
    flow: {kind: standard, time: 60, rtol: 1.0e-10, atol: 1.0e-12, store_theta: true,
           record: {points: 201}}
  - name: from-file
    kind: trap
    trap: {eps: [0.1], path: out/orbit/run.h5, grid_points: 401}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trap")
    spec = write_spec(tmp, SPEC)
    assert invoke("flow", spec, "-o", tmp / "out", "-j", "1").exit_code == 0
    result = invoke("trap", spec, "-o", tmp / "out", "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    return {
        json.loads(l)["experiment"]: json.loads(l) for l in result.stdout.splitlines()
    }


def test_rows_carry_the_trap_keys(rows):
    row = rows["plateau"]
    for key in (
        "intervals",
        "trapped_time",
        "bound_violations",
        "eps",
        "time_to_threshold_standard",
        "time_to_threshold_adapted",
    ):
        assert key in row
    assert row["eps"] == [0.1, 0.3] and row["bound_violations"] == 0
    assert row["intervals"] >= 1 and len(row["trapped_time"]) == 2
    standard, adapted = (
        row["time_to_threshold_standard"],
        row["time_to_threshold_adapted"],
    )
    assert adapted is not None and (standard is None or adapted < standard)


def test_every_stored_interval_satisfies_the_bound(rows):
    trap = store.load(rows["plateau"]["path"])["trap"]
    length, bound = trap["interval_length"], trap["interval_bound"]
    assert length.size == rows["plateau"]["intervals"]
    assert np.all(length >= bound * (1 - 1e-6)) and not trap["interval_violated"].any()
    assert trap["s"].size == trap["r"].size and np.all(np.diff(trap["s"]) > 0)
    inside = [
        (trap["s"] > a) & (trap["s"] < b)
        for a, b in zip(trap["interval_s0"], trap["interval_s1"])
    ]
    for mask, eps in zip(inside, trap["interval_eps"]):
        assert np.all(trap["r"][mask] < eps + 1e-9)


def test_a_stored_orbit_gives_the_same_intervals(rows):
    from_file, table = rows["from-file"], rows["from-file"]["interval_table"]
    assert from_file["status"] == "ok" and from_file["source"]
    assert from_file["bound_violations"] == 0
    for interval in table:
        assert interval["length"] >= interval["bound"] * (1 - 1e-6)


@pytest.mark.parametrize(
    "body,needle",
    [
        ("trap: {eps: [-1]}", "> 0"),
        ("trap: {scenario: {name: lava}}", "lava"),
    ],
)
def test_trap_spec_errors(tmp_path, body, needle):
    text = f"""\
    experiments:
      - name: e
        kind: trap
        data: {{source: clusters, classes: 2, dim: 2, points: 3, radius: 0.3}}
        network: {{hidden: [4], activation: tanh}}
        {body}
    """
    result = invoke("validate", write_spec(tmp_path, text))
    assert result.exit_code == 2 and needle in result.stderr, result.stderr


def test_a_flow_without_theta_is_refused(tmp_path):
    text = """\
    experiments:
      - name: orbit
        kind: flow
        data: {source: clusters, classes: 2, dim: 2, points: 3, radius: 0.3}
        network: {hidden: [4], activation: tanh}
        flow: {kind: standard, time: 2, store_theta: false}
      - name: t
        kind: trap
        trap: {path: out/orbit/run.h5}
    """
    spec = write_spec(tmp_path, text)
    invoke("flow", spec, "-o", tmp_path / "out")
    result = invoke("trap", spec, "-o", tmp_path / "out", "--json")
    assert (
        result.exit_code == 1 and "store_theta" in json.loads(result.stdout)["message"]
    )
