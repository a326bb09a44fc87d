"""Spec parsing, error locations, sweep expansion and stable run ids."""

import numpy as np
import pytest

from dlmin.core import spec as sp

from helpers import SMALL, write_spec


def errors_of(tmp_path, text):
    with pytest.raises(sp.SpecErrors) as info:
        sp.load_spec(write_spec(tmp_path, text))
    return info.value.errors


def one_error(tmp_path, text):
    errs = errors_of(tmp_path, text)
    assert len(errs) == 1, [str(e) for e in errs]
    return errs[0]


BASE = """\
experiments:
  - name: a
    kind: construct
    data:
      source: clusters
      classes: 3
      dim: 3
      points: 10
      radius: {radius}
"""


def test_shipped_spec_is_valid_and_expands():
    spec = sp.load_spec("experiments.yaml")
    runs = sp.plan(spec, "results")
    names = {r.experiment for r in runs}
    assert {"clusters-q3", "clusters-q5-m8", "radius-sweep"} <= names
    assert len({(r.experiment, r.run_id) for r in runs}) == len(runs)


@pytest.mark.parametrize(
    "text,value",
    [("1e-3", 1e-3), ("2E+1", 20.0), ("0.5", 0.5), (".5", 0.5), ("1_000.0", 1000.0)],
)
def test_yaml_floats_without_dot_are_floats(tmp_path, text, value):
    spec = sp.load_spec(write_spec(tmp_path, BASE.format(radius=text)))
    (run,) = sp.plan(spec)
    assert run.config.data.radius == value


def test_unknown_key_names_line_and_allowed_keys(tmp_path):
    err = one_error(tmp_path, BASE.format(radius=0.1) + "      radus: 3\n")
    assert err.line == 10
    assert err.path == "experiments[0].data.radus"
    assert "unknown key 'radus'" in err.found
    assert "radius" in err.allowed and "layout" in err.allowed


def test_bad_value_names_found_and_bound(tmp_path):
    err = one_error(tmp_path, BASE.format(radius=-0.1))
    assert (err.line, err.path) == (9, "experiments[0].data.radius")
    assert err.found == "-0.1" and err.allowed == "a number >= 0"
    assert str(err).startswith(f"{err.file}:9: experiments[0].data.radius: found -0.1")


def test_bad_kind_lists_allowed_kinds(tmp_path):
    err = one_error(tmp_path, BASE.format(radius=0.1).replace("construct", "flwo"))
    assert err.line == 3 and "'flwo'" in err.found and "construct" in err.allowed


def test_missing_key_and_bad_source(tmp_path):
    err = one_error(
        tmp_path, BASE.format(radius=0.1).replace("      radius: 0.1\n", "")
    )
    assert err.path == "experiments[0].data.radius" and "missing" in err.found
    err = one_error(tmp_path, BASE.format(radius=0.1).replace("clusters", "clustres"))
    assert "clustres" in err.found and "clusters" in err.allowed and err.line == 5


def test_cross_field_problem_points_at_its_key(tmp_path):
    text = BASE.format(radius=0.1).replace("points: 10", "points: [10, 20]")
    err = one_error(tmp_path, text)
    assert err.path == "experiments[0].data.points" and err.line == 8
    assert "3 class sizes" in err.allowed
    text = BASE.format(radius=0.1) + "    network: {hidden: [3, 4, 3]}\n"
    err = one_error(tmp_path, text)
    assert err.path == "experiments[0].network.hidden" and err.line == 10


def test_sweep_errors_point_at_the_value(tmp_path):
    text = BASE.format(radius=0.1) + "    sweep:\n      data.radius: [0.1, -2]\n"
    err = one_error(tmp_path, text)
    assert err.line == 11 and err.path.endswith("sweep.data.radius[1]")
    text = BASE.format(radius=0.1) + "    sweep:\n      data.radios: [0.1]\n"
    err = one_error(tmp_path, text)
    assert err.line == 11 and "radios" in err.found
    text = BASE.format(radius=0.1) + "    sweep:\n      data.radius: []\n"
    assert "non-empty list" in one_error(tmp_path, text).allowed


def test_structural_errors(tmp_path):
    assert "invalid YAML" in one_error(tmp_path, "experiments: [a, b\n").found
    assert one_error(tmp_path, "experiments: []\n").path == "experiments"
    typo, missing = errors_of(tmp_path, "experiment: []\n")
    assert (typo.path, missing.path) == ("experiment", "experiments")
    assert "experiments" in typo.allowed and "unknown key" in typo.found
    dup = BASE.format(radius=0.1) + "    kind: construct\n"
    assert "duplicate key" in one_error(tmp_path, dup).found
    twice = BASE.format(radius=0.1) + BASE.format(radius=0.2).replace(
        "experiments:\n", ""
    )
    err = one_error(tmp_path, twice)
    assert "not used before" in err.allowed and err.line == 10


def test_all_errors_reported_at_once(tmp_path):
    text = BASE.format(radius=-1).replace("classes: 3", "classes: 0")
    assert len(errors_of(tmp_path, text)) == 2


def test_defaults_merge_and_seed(tmp_path):
    spec = sp.load_spec(write_spec(tmp_path, SMALL))
    runs = sp.plan(spec)
    small = [r for r in runs if r.experiment == "small"][0]
    assert small.seed == 3
    seeds = sorted(r.seed for r in runs if r.experiment == "sweep")
    assert seeds == [0, 0, 1, 1]


def test_adding_sweep_values_changes_no_other_run(tmp_path):
    before = sp.plan(sp.load_spec(write_spec(tmp_path, SMALL)))
    more = SMALL.replace("[0.02, 0.6]", "[0.02, 0.3, 0.6]").replace(
        "[0, 1]", "[0, 1, 2]"
    )
    after = sp.plan(sp.load_spec(write_spec(tmp_path, more, "more.yaml")))
    key = {(r.experiment, r.run_id): (r.run_key, r.seed, r.spec_hash) for r in after}
    for r in before:
        assert key[(r.experiment, r.run_id)] == (r.run_key, r.seed, r.spec_hash)
        twin = next(
            a for a in after if a.run_id == r.run_id and a.experiment == r.experiment
        )
        np.testing.assert_array_equal(r.rng().random(5), twin.rng().random(5))
    assert len(after) == len(before) + 5


def test_run_key_ignores_seed_but_not_other_values():
    assert sp.run_key("e", {"seed": 1, "x": 2}) == sp.run_key("e", {"seed": 7, "x": 2})
    assert sp.run_key("e", {"x": 2}) != sp.run_key("e", {"x": 3})
    assert sp.run_key("e", {"x": 2}) != sp.run_key("f", {"x": 2})


def test_run_ids_are_readable_and_bounded():
    assert sp.run_id_for({}) == "run"
    assert sp.run_id_for({"data.radius": 0.05, "seed": 1}) == "data.radius=0.05_seed=1"
    assert sp.run_id_for({"data.points": [10, 20]}) == "data.points=10-20"
    long = sp.run_id_for({"data.means": [[float(i)] * 10 for i in range(10)]})
    assert len(long) <= sp.RUN_ID_MAX and long.startswith("h")


def test_spec_hash_follows_config_and_data_file(tmp_path):
    cfg = {"name": "a", "data": {"source": "file", "path": "d.npz"}}
    np.savez(tmp_path / "d.npz", X=np.eye(2), labels=[0, 1])
    h1 = sp.spec_hash(cfg, tmp_path)
    assert h1 == sp.spec_hash(dict(cfg, description="words"), tmp_path)
    np.savez(tmp_path / "d.npz", X=2 * np.eye(2), labels=[0, 1])
    assert sp.spec_hash(cfg, tmp_path) != h1
