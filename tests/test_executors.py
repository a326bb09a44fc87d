"""Executors at scale: shards, pools, Dask, killed workers and drivers, gather."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import executors as ex
from dlmin.core import spec as sp
from dlmin.core import store

from helpers import write_spec

DLMIN = str(Path(sys.executable).with_name("dlmin"))
ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
experiments:
  - name: sweep
    kind: construct
    data: {{source: clusters, classes: 3, dim: 4, points: {points}, radius: 0.05}}
    construct: {{heldout: 10}}
    sweep:
      data.radius: {radii}
      seed: {seeds}
"""


def sweep_spec(tmp_path, n_seeds=4, radii=(0.02, 0.04), points=20, name="sweep.yaml"):
    text = SWEEP.format(points=points, radii=list(radii), seeds=list(range(n_seeds)))
    return write_spec(tmp_path, text, name)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def json_rows(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def complete_files(folder):
    return sorted(
        p.name for p in Path(folder).rglob("*.h5") if store.root_attrs(p)["complete"]
    )


# ------------------------------------------------------------------ shards


def test_shards_partition_the_runs_and_survive_added_values(tmp_path):
    runs = sp.plan(sp.load_spec(sweep_spec(tmp_path, n_seeds=6)))
    for count in (1, 2, 3, 7):
        parts = [ex.select_shard(runs, (i, count)) for i in range(count)]
        keys = [(r.experiment, r.run_id) for part in parts for r in part]
        assert sorted(keys) == sorted((r.experiment, r.run_id) for r in runs)
        assert len(set(keys)) == len(keys)
    more = sp.plan(
        sp.load_spec(
            sweep_spec(tmp_path, n_seeds=9, radii=(0.02, 0.03, 0.04), name="more.yaml")
        )
    )
    before = {r.run_id: ex.shard_of(r, 3) for r in runs}
    after = {r.run_id: ex.shard_of(r, 3) for r in more}
    assert all(after[k] == v for k, v in before.items())


@pytest.mark.parametrize("text", ["1", "2/2", "-1/3", "a/b", "1/0"])
def test_bad_shards_are_usage_errors(tmp_path, text):
    result = invoke(
        "construct", sweep_spec(tmp_path), "--shard", text, "-o", tmp_path / "o"
    )
    assert result.exit_code == 2 and "--shard" in result.stderr
    assert not (tmp_path / "o").exists()


def test_plan_lists_exactly_a_shard(tmp_path):
    spec = sweep_spec(tmp_path)
    rows = [
        json_rows(invoke("plan", spec, "--shard", f"{i}/3", "--json").stdout)
        for i in range(3)
    ]
    ids = sorted(r["run_id"] for part in rows for r in part)
    assert ids == sorted(
        r["run_id"] for r in json_rows(invoke("plan", spec, "--json").stdout)
    )


# -------------------------------------------------------------------- pool


def test_pool_matches_serial_results(tmp_path):
    spec = sweep_spec(tmp_path)
    one = json_rows(
        invoke("construct", spec, "-o", tmp_path / "a", "-j", "1", "--json").stdout
    )
    two = json_rows(
        invoke("construct", spec, "-o", tmp_path / "b", "-j", "2", "--json").stdout
    )
    assert len(one) == len(two) == 8
    by_id = {r["run_id"]: r for r in two}
    for r in one:
        assert by_id[r["run_id"]]["cost"] == r["cost"]
        assert by_id[r["run_id"]]["status"] == r["status"] == "ok"
    again = json_rows(
        invoke("construct", spec, "-o", tmp_path / "b", "-j", "2", "--json").stdout
    )
    assert {r["status"] for r in again} == {"skipped"}


def test_dask_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    spec = sweep_spec(tmp_path, n_seeds=2)
    result = invoke(
        "construct", spec, "-o", tmp_path / "o", "--dask", "-j", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["status"] for r in json_rows(result.stdout)) == ["ok"] * 4
    assert len(complete_files(tmp_path / "o")) == 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_real_dask_scheduler_and_worker(tmp_path):
    pytest.importorskip("distributed")
    dask = str(Path(sys.executable).with_name("dask"))
    port, sched_file = _free_port(), tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    dask,
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-dashboard",
                    "--scheduler-file",
                    str(sched_file),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for(sched_file.exists, 60, "the scheduler file")
        procs.append(
            subprocess.Popen(
                [
                    dask,
                    "worker",
                    f"tcp://127.0.0.1:{port}",
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        spec = sweep_spec(tmp_path, n_seeds=2)
        result = subprocess.run(
            [
                DLMIN,
                "construct",
                str(spec),
                "-o",
                str(tmp_path / "o"),
                "--scheduler-file",
                str(sched_file),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert len(json_rows(result.stdout)) == 4
        result = subprocess.run(
            [
                DLMIN,
                "construct",
                str(spec),
                "-o",
                str(tmp_path / "o2"),
                "--scheduler",
                f"tcp://127.0.0.1:{port}",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and len(complete_files(tmp_path / "o2")) == 4
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)


# ------------------------------------------------- kills and interruptions


def _children(pid):
    """Direct children of a process, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _start(args):
    return subprocess.Popen(
        [DLMIN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_killed_mid_sweep_loses_nothing(tmp_path):
    spec = sweep_spec(tmp_path, n_seeds=15, points=3000)
    out = tmp_path / "o"
    proc = _start(["construct", spec, "-o", out, "-j", "2", "--json", "-q"])
    _wait_for(lambda: len(list(out.rglob("*.h5"))) >= 2, 60, "the first results")
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    rows = json_rows(stdout)
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    assert len(complete_files(out)) == 30 and not list(out.rglob("*.partial"))


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -9), (signal.SIGINT, 130)])
def test_driver_stopped_mid_sweep_then_rerun(tmp_path, sig, code):
    spec = sweep_spec(tmp_path, n_seeds=10, points=3000)
    out = tmp_path / "o"
    proc = _start(["construct", spec, "-o", out, "-j", "1", "--json"])
    _wait_for(lambda: len(list(out.rglob("*.h5"))) >= 2, 60, "the first results")
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    assert proc.returncode == code
    done_before = complete_files(out)
    assert 0 < len(done_before) < 20
    for path in out.rglob("*.h5"):
        assert store.root_attrs(path)[
            "complete"
        ]  # nothing half-written under a final name
    rerun = subprocess.run(
        [DLMIN, "construct", str(spec), "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert rerun.returncode == 0
    rows = json_rows(rerun.stdout)
    assert sum(r["status"] == "skipped" for r in rows) >= len(done_before)
    assert len(complete_files(out)) == 20 and not list(out.rglob("*.partial"))


def test_two_shards_concurrently_in_one_folder(tmp_path):
    spec = sweep_spec(tmp_path, n_seeds=6)
    out = tmp_path / "o"
    procs = [
        _start(["construct", spec, "-o", out, "--shard", f"{i}/2", "-j", "1", "--json"])
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    ids = sorted(r["run_id"] for o in outputs for r in json_rows(o[0]))
    assert len(ids) == 12 and len(set(ids)) == 12
    assert len(complete_files(out)) == 12


# ------------------------------------------------------------ gather, show


def test_gather_csv_and_show_folder(tmp_path):
    spec = sweep_spec(tmp_path, radii=(0.02, 0.6), n_seeds=2)
    invoke("construct", spec, "-o", tmp_path / "o", "-j", "1")
    result = invoke("gather", tmp_path / "o")
    lines = result.stdout.strip().splitlines()
    header = lines[0].split(",")
    assert header[:7] == [
        "experiment",
        "run_id",
        "kind",
        "status",
        "path",
        "data.radius",
        "seed",
    ]
    assert len(lines) == 5 and "cost" in header and header[-1] == "message"
    table = invoke("gather", tmp_path / "o", "-o", tmp_path / "t.csv")
    assert table.exit_code == 0 and (tmp_path / "t.csv").read_text().count("\n") == 5
    show = invoke("show", tmp_path / "o")
    assert (
        "4 runs" in show.stdout and "2 failed" in show.stdout and "2 ok" in show.stdout
    )


def test_gather_parquet_when_pyarrow_is_there(tmp_path):
    spec = sweep_spec(tmp_path, n_seeds=1)
    invoke("construct", spec, "-o", tmp_path / "o", "-j", "1")
    result = invoke("gather", tmp_path / "o", "-o", tmp_path / "t.parquet")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert result.exit_code == 2 and "pyarrow" in result.stderr
        return
    assert pq.read_table(tmp_path / "t.parquet").num_rows == 2


def test_readme_makefile_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```make\n(.*?)```", readme, re.S)
    assert block, "README has no ```make block"
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    (tmp_path / "Makefile").write_text(block.group(1))
    sweep_spec(tmp_path, n_seeds=3, name="experiments.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["make", "-j", "2", "table.csv"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / "table.csv").read_text().strip().splitlines()
    assert len(lines) == 7
