"""The command line end to end: exit codes, stdout rows, files, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import store

from helpers import SMALL, write_spec

JSON_KEYS = {
    "run_id",
    "experiment",
    "kind",
    "status",
    "path",
    "cost",
    "cost_spread",
    "cost_mismatch",
    "certified",
    "max_output_error",
    "heldout_max_output_error",
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def files_under(path):
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def test_construct_json_rows_files_and_exit_code(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    result = invoke("construct", spec, "-o", out, "--json")
    assert result.exit_code == 1  # the sweep has a radius that must fail
    table = rows(result)
    assert len(table) == 5 and all(JSON_KEYS <= set(r) for r in table)
    ok = [r for r in table if r["status"] == "ok"]
    failed = [r for r in table if r["status"] == "failed"]
    assert len(ok) == 3 and len(failed) == 2
    for r in ok:
        assert r["certified"] and r["cost"] < 1e-20 and r["max_output_error"] < 1e-9
        assert Path(r["path"]).exists()
    small = next(r for r in ok if r["experiment"] == "small")
    assert small["heldout_max_output_error"] < 1e-9
    for r in failed:
        assert "assumption" in r["message"] and r["certified"] is False
        assert store.root_attrs(r["path"])["status"] == "failed"
    assert "failed sweep/" in result.stderr
    assert not list(Path(out).rglob("*.partial"))


def test_second_run_skips_and_force_redoes(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    invoke("construct", spec, "-o", out, "-e", "small")
    again = rows(invoke("construct", spec, "-o", out, "-e", "small", "--json"))
    assert [r["status"] for r in again] == ["skipped"]
    assert again[0]["cost"] < 1e-20  # scalars come back from the file
    forced = rows(
        invoke("construct", spec, "-o", out, "-e", "small", "--json", "--force")
    )
    assert [r["status"] for r in forced] == ["ok"]


def test_plain_rows_start_with_the_path(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    result = invoke("run", spec, "-o", out, "-e", "small", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    path, status, name, cost = result.stdout.strip().split("\t")
    assert Path(path).exists() and status == "ok" and name == "small/run"
    assert cost.startswith("C_N=")


def test_validate_and_plan(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    result = invoke("validate", spec)
    assert result.exit_code == 0 and "5 runs" in result.stdout
    planned = rows(invoke("plan", spec, "-o", out, "--json"))
    assert [p["run_id"] for p in planned][:2] == ["run", "data.radius=0.02_seed=0"]
    assert not any(p["done"] for p in planned)
    invoke("construct", spec, "-o", out, "-e", "small")
    planned = rows(invoke("plan", spec, "-o", out, "--json"))
    assert planned[0]["done"] and planned[0]["path"] == str(out / "small" / "run.h5")
    text = invoke("plan", spec, "-o", out, "-e", "sweep").stdout.splitlines()
    assert len(text) == 4 and text[0].endswith("todo")


BAD_SPECS = {
    "unknown key": (
        "data: {source: clusters, classes: 3, dim: 3, points: 5, radius: 0.1, "
        "color: red}",
        "unknown key 'color'",
    ),
    "bad value": (
        "data: {source: clusters, classes: 3, dim: 3, points: 5, radius: -1}",
        "found -1",
    ),
    "bad type": (
        "data: {source: clusters, classes: three, dim: 3, points: 5, radius: 1}",
        "found 'three'",
    ),
    "missing": ("data: {source: clusters, classes: 3, dim: 3, points: 5}", "missing"),
    "bad source": ("data: {source: mnist, classes: 3}", "found 'mnist'"),
    "bad kind": (
        "kind: trapp\n    data: {source: file, path: x.npz}",
        "construct | flow | trap | collapse",
    ),
    "bad sweep": (
        "data: {source: clusters, classes: 3, dim: 3, points: 5, radius: 1}\n"
        "    sweep: {data.radius: 3}",
        "non-empty list",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
@pytest.mark.parametrize("command", ["validate", "construct", "run", "plan"])
def test_spec_errors_exit_2_with_location_and_write_nothing(tmp_path, case, command):
    body, needle = BAD_SPECS[case]
    text = f"experiments:\n  - name: e\n    kind: construct\n    {body}\n"
    if case == "bad kind":
        text = f"experiments:\n  - name: e\n    {body}\n"
    spec, out = write_spec(tmp_path, text), tmp_path / "out"
    args = [command, spec] + ([] if command == "validate" else ["-o", out])
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and f"{spec}:" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert not Path(out).exists()


def test_unknown_experiment_name_is_a_usage_error(tmp_path):
    result = invoke(
        "construct", write_spec(tmp_path), "-e", "nope", "-o", tmp_path / "o"
    )
    assert (
        result.exit_code == 2 and "nope" in result.stderr and "small" in result.stderr
    )


def test_missing_spec_file(tmp_path):
    result = invoke("validate", tmp_path / "none.yaml")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_show_human_and_json(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    invoke("construct", spec, "-o", out, "-e", "small")
    path = out / "small" / "run.h5"
    text = invoke("show", path).stdout
    assert "status" in text and "ok" in text and "/network/W4" in text and "C_N" in text
    info = json.loads(invoke("show", path, "--json").stdout)
    assert (
        info["attrs"]["kind"] == "construct" and info["groups"]["metrics"]["certified"]
    )
    bad = invoke("show", tmp_path / "missing.h5")
    assert bad.exit_code == 2 and "no such file" in bad.stderr


def test_same_spec_twice_gives_identical_arrays(tmp_path):
    spec = write_spec(tmp_path)
    for out in ("a", "b"):
        invoke("construct", spec, "-o", tmp_path / out, "-e", "small")
    a, b = (store.load(tmp_path / o / "small" / "run.h5") for o in ("a", "b"))
    for group in ("data", "network", "truncation"):
        for key, value in a[group].items():
            if key != "attrs" and not isinstance(value, dict):
                np.testing.assert_array_equal(value, b[group][key])
    assert a["metrics"]["attrs"]["C_N"] == b["metrics"]["attrs"]["C_N"]


def test_result_file_round_trip_matches_the_network(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    invoke("construct", spec, "-o", out, "-e", "small")
    res = store.load(out / "small" / "run.h5")
    layers = store.read_layers(res["network"])
    X, labels, Y = res["data"]["X"], res["data"]["labels"], res["data"]["Y"]
    from dlmin.core.construct import forward_relu

    assert np.abs(forward_relu(layers, X) - Y[labels]).max() < 1e-12
    assert len(layers) == 4 and res["spec"]["run"].startswith("name: small")
    attrs = res["attrs"]
    for key in (
        "schema_version",
        "kind",
        "run_id",
        "status",
        "spec_hash",
        "seed",
        "versions",
        "wall_time",
        "git_commit",
        "created",
    ):
        assert key in attrs
    assert attrs["complete"] and "numpy" in attrs["versions"]
    cum = store.read_layers(res["network"]["cumulative"])
    chain_end = res["truncation"]["layer3"]
    np.testing.assert_allclose(
        chain_end @ cum[-1][0].T + cum[-1][1],
        Y[labels[res["truncation"]["rows"]]],
        atol=1e-12,
    )


def test_store_limit_subsamples_the_truncated_data(tmp_path):
    text = SMALL.replace("heldout: 20", "heldout: 20, store_limit: 10")
    spec, out = write_spec(tmp_path, text), tmp_path / "out"
    invoke("construct", spec, "-o", out, "-e", "small")
    res = store.load(out / "small" / "run.h5")
    rows_kept = res["truncation"]["rows"]
    assert rows_kept.shape == (10,) and np.all(np.diff(rows_kept) > 0)
    np.testing.assert_array_equal(
        res["truncation"]["layer0"], res["data"]["X"][rows_kept]
    )


def test_interrupt_leaves_no_file(tmp_path, monkeypatch):
    from dlmin.core import construct

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(construct, "build_clustered", interrupted)
    spec, out = write_spec(tmp_path), tmp_path / "out"
    result = invoke("construct", spec, "-o", out, "-e", "small")
    assert result.exit_code != 0
    assert files_under(out) == []


def test_main_exits_130_on_interrupt(monkeypatch):
    from dlmin.cli import app as app_mod

    def boom():
        raise KeyboardInterrupt

    monkeypatch.setattr(app_mod, "app", boom)
    with pytest.raises(SystemExit) as info:
        app_mod.main()
    assert info.value.code == 130


def test_data_files_npz_and_csv(tmp_path, rng):
    from dlmin.core.data import clusters

    ds = clusters(3, 4, 12, 0.05, rng)
    np.savez(tmp_path / "d.npz", X=ds.X, labels=ds.labels, Y=2 * ds.Y)
    lines = ["x1,x2,x3,x4,label"] + [
        ",".join(map(str, x.tolist())) + f",c{l}" for x, l in zip(ds.X, ds.labels)
    ]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    text = """\
    experiments:
      - name: npz
        kind: construct
        data: {source: file, path: d.npz}
      - name: csv
        kind: construct
        data: {source: file, path: d.csv}
    """
    result = invoke(
        "construct", write_spec(tmp_path, text), "-o", tmp_path / "o", "--json"
    )
    assert result.exit_code == 0, result.output
    table = rows(result)
    assert all(
        r["cost"] < 1e-20 and r["heldout_max_output_error"] is None for r in table
    )
    res = store.load(tmp_path / "o" / "npz" / "run.h5")
    np.testing.assert_array_equal(res["data"]["Y"], 2 * ds.Y)


def test_unreadable_data_file_fails_the_run_only(tmp_path):
    text = """\
    experiments:
      - name: gone
        kind: construct
        data: {source: file, path: nothing.npz}
    """
    result = invoke(
        "construct", write_spec(tmp_path, text), "-o", tmp_path / "o", "--json"
    )
    assert result.exit_code == 1
    (row,) = rows(result)
    assert row["status"] == "failed" and "no such file" in row["message"]


def _python(code, cwd):
    exe = Path(sys.executable)
    return subprocess.run(
        [str(exe), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )


def test_installed_names_and_light_help(tmp_path):
    assert _python("import core", tmp_path).returncode != 0
    probe = (
        "import sys, dlmin.cli.app; "
        "print(sorted(m for m in ('numpy', 'h5py', 'scipy', 'pydantic') "
        "if m in sys.modules))"
    )
    out = _python(probe, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    help_text = invoke("--help").stdout
    for command in ("construct", "run", "validate", "plan", "show"):
        assert command in help_text
