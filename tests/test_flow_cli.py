"""`dlmin flow` end to end: rows, shared starts, streamed orbits, partial files."""

import json
import numpy as np
import pytest
from typer.testing import CliRunner

from dlmin.cli.app import app
from dlmin.core import network, store

from helpers import write_spec

FLOW_KEYS = {
    "cost_initial",
    "cost_final",
    "s_final",
    "steps",
    "rhs_evaluations",
    "min_ntk_eigenvalue",
    "exp_rel_error",
    "line_rel_error",
    "K",
    "QN",
    "parametrization",
    "stop_reason",
}

STORY = """\
defaults:
  kind: flow
  data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
  network: {hidden: [12], activation: tanh}
experiments:
  - name: story
    flow: {time: 16, rtol: 1.0e-10, atol: 1.0e-12, record: {points: 9}}
    sweep:
      flow.kind: [standard, homotopy, adapted]
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("story")
    result = invoke("flow", write_spec(tmp, STORY), "-o", tmp / "out", "--json")
    assert result.exit_code == 0, result.output
    return {r["run_id"]: r for r in rows(result)}


def test_rows_carry_the_flow_keys(story):
    for row in story.values():
        assert FLOW_KEYS <= set(row) and row["status"] == "ok"
        assert row["K"] == 3 * 12 + 12 + 12 * 2 + 2 and row["QN"] == 16
        assert row["parametrization"] == "over" and row["s_final"] == pytest.approx(16)
    adapted = story["flow.kind=adapted"]
    assert adapted["exp_rel_error"] < 1e-6 and adapted["line_rel_error"] < 1e-6
    assert story["flow.kind=standard"]["exp_rel_error"] is None


def test_the_three_flows_share_their_start(story):
    costs = {r["cost_initial"] for r in story.values()}
    assert len(costs) == 1
    files = [store.load(r["path"]) for r in story.values()]
    for f in files[1:]:
        np.testing.assert_array_equal(
            f["network"]["initial"]["W1"], files[0]["network"]["initial"]["W1"]
        )
        np.testing.assert_array_equal(f["data"]["X"], files[0]["data"]["X"])


def test_adapted_orbit_is_stored_and_follows_the_exponential_law(story):
    res = store.load(story["flow.kind=adapted"]["path"])
    traj = res["trajectory"]
    s, cost, x = traj["s"], traj["cost"], traj["x"]
    assert s.shape == (9,) and x.shape == (9, 16) and s[-1] == pytest.approx(16)
    N = 8
    np.testing.assert_allclose(cost, cost[0] * np.exp(-2 * s / N), rtol=1e-6)
    y = res["data"]["targets"].ravel()
    t = traj["t"][:, None]
    np.testing.assert_allclose(
        x, (1 - t) * x[0] + t * y, atol=1e-6 * np.abs(x[0] - y).max()
    )
    final = store.read_layers(res["network"])
    out = network.forward(final, res["data"]["X"], activation="tanh")
    assert ((out - res["data"]["targets"]) ** 2).sum() / (2 * N) == pytest.approx(
        story["flow.kind=adapted"]["cost_final"], rel=1e-9
    )
    assert res["attrs"]["complete"] and res["attrs"]["status"] == "ok"


def test_standard_flow_cost_never_increases(story):
    cost = store.load(story["flow.kind=standard"]["path"])["trajectory"]["cost"]
    assert np.all(np.diff(cost) <= 1e-12 * cost[0])


def test_interrupted_flow_leaves_a_readable_partial_file(tmp_path, monkeypatch):
    from dlmin.core import flows

    real = flows.integrate

    def interrupt_after_three(
        params, X, Y, options, activation, on_record, progress, seed
    ):
        seen = []

        def record(rec):
            seen.append(rec)
            on_record(rec)
            if len(seen) == 3:
                raise KeyboardInterrupt

        return real(
            params,
            X,
            Y,
            options,
            activation,
            on_record=record,
            progress=progress,
            seed=seed,
        )

    monkeypatch.setattr(flows, "integrate", interrupt_after_three)
    spec = write_spec(
        tmp_path, STORY.replace("[standard, homotopy, adapted]", "[adapted]")
    )
    result = invoke("flow", spec, "-o", tmp_path / "out")
    assert result.exit_code != 0
    folder = tmp_path / "out" / "story"
    assert not (folder / "flow.kind=adapted.h5").exists()
    partial = folder / "flow.kind=adapted.h5.partial"
    attrs = store.root_attrs(partial)
    assert attrs["status"] == "interrupted" and not attrs["complete"]
    assert store.load(partial)["trajectory"]["cost"].shape == (3,)
    show = invoke("show", partial)
    assert "INCOMPLETE" in show.stdout
    monkeypatch.setattr(flows, "integrate", real)
    rerun = invoke("flow", spec, "-o", tmp_path / "out", "--json")
    assert rows(rerun)[0]["status"] == "ok" and not partial.exists()


def test_init_from_npz_and_from_a_construct_result(tmp_path, rng):
    params = network.init_params([3, 5, 2], rng=rng, scheme="glorot")
    network.save_npz(tmp_path / "w.npz", params)
    text = """\
    experiments:
      - name: from-npz
        kind: flow
        data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
        network: {activation: tanh, init: {source: file, path: w.npz}}
        flow: {kind: adapted, time: 4, record: {points: 3}}
      - name: built
        kind: construct
        data: {source: clusters, classes: 2, dim: 2, points: 5, radius: 0.05}
      - name: from-result
        kind: flow
        data: {source: clusters, classes: 2, dim: 2, points: 5, radius: 0.05}
        network: {activation: relu, init: {source: result, path: out/built/run.h5}}
        flow: {kind: standard, time: 1, record: {points: 3}}
    """
    spec = write_spec(tmp_path, text)
    assert invoke("construct", spec, "-o", tmp_path / "out").exit_code == 0
    table = {
        r["experiment"]: r
        for r in rows(invoke("flow", spec, "-o", tmp_path / "out", "--json"))
    }
    res = store.load(table["from-npz"]["path"])
    np.testing.assert_array_equal(res["network"]["initial"]["W1"], params[0][0])
    # the constructed minimizer is a zero-cost start: the flow stays there
    assert table["from-result"]["cost_initial"] < 1e-20


def test_init_with_wrong_shapes_fails_the_run(tmp_path, rng):
    network.save_npz(tmp_path / "w.npz", network.init_params([5, 4, 2], rng=rng))
    text = """\
    experiments:
      - name: bad
        kind: flow
        data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
        network: {activation: tanh, init: {source: file, path: w.npz}}
    """
    result = invoke("flow", write_spec(tmp_path, text), "-o", tmp_path / "o", "--json")
    (row,) = rows(result)
    assert result.exit_code == 1 and row["status"] == "failed"
    assert "R^5" in row["message"] and "3 inputs" in row["message"]


def test_cross_entropy_needs_positive_labels(tmp_path):
    base = """\
    experiments:
      - name: ce
        kind: flow
        data: {source: clusters, classes: 3, dim: 3, points: 3, radius: 0.2}
        network: {hidden: [10], activation: softplus}
        flow: {kind: adapted, loss: ce, time: 30, record: {points: 5}SMOOTH}
    """
    bad = invoke(
        "flow",
        write_spec(tmp_path, base.replace("SMOOTH", "")),
        "-o",
        tmp_path / "o",
        "--json",
    )
    assert bad.exit_code == 1 and "label_smoothing" in rows(bad)[0]["message"]
    good = invoke(
        "flow",
        write_spec(
            tmp_path, base.replace("SMOOTH", ", label_smoothing: 0.1"), "ce.yaml"
        ),
        "-o",
        tmp_path / "o2",
        "--json",
    )
    (row,) = rows(good)
    assert row["status"] == "ok" and row["cost_kind"] == "cross-entropy"
    traj = store.load(row["path"])["trajectory"]
    assert np.abs(traj["row_sum_drift"]).max() < 1e-8
    assert np.all(np.diff(traj["minimizer_distance"]) <= 1e-9)


@pytest.mark.parametrize(
    "body,needle",
    [
        ("flow: {solver: euler}", "flow.step"),
        ("flow: {kind: sideways}", "sideways"),
        ("flow: {alpha: 2}", "<= 1"),
    ],
)
def test_flow_spec_errors(tmp_path, body, needle):
    text = f"""\
    experiments:
      - name: e
        kind: flow
        data: {{source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}}
        network: {{hidden: [4], activation: tanh}}
        {body}
    """
    result = invoke("validate", write_spec(tmp_path, text))
    assert result.exit_code == 2 and needle in result.stderr, result.stderr


def test_seeded_flow_needs_hidden_widths(tmp_path):
    text = """\
    experiments:
      - name: e
        kind: flow
        data: {source: clusters, classes: 2, dim: 3, points: 4, radius: 0.2}
    """
    result = invoke("validate", write_spec(tmp_path, text))
    assert result.exit_code == 2 and "network.hidden" in result.stderr


def test_rank_loss_experiment_levels_off_at_the_closed_form(tmp_path):
    result = invoke(
        "flow", "experiments.yaml", "-e", "flow-rank-loss", "-o", tmp_path, "--json"
    )
    (row,) = rows(result)
    # two classes share their inputs: C_inf = (1/2N) sum |y_n - group mean|^2 = 1/6
    assert row["status"] == "ok" and row["cost_final"] == pytest.approx(1 / 6, rel=1e-5)
    assert row["parametrization"] == "under"


def test_perturbed_and_pattern_starts_from_a_construct_result(tmp_path):
    text = """\
    experiments:
      - name: built
        kind: construct
        data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.05}
      - name: start
        kind: flow
        data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.05}
        network: {activation: relu, init: {source: result, path: out/built/run.h5,
                                           perturb: 0.01}}
        flow: {kind: standard, time: 1, record: {points: 2}}
        sweep:
          seed: [0, 1]
      - name: keep-all
        kind: flow
        data: {source: clusters, classes: 3, dim: 3, points: 6, radius: 0.05}
        network: {activation: relu, init: {source: result, path: out/built/run.h5,
                                           pattern: [1, 1, 1]}}
        flow: {kind: standard, time: 1, record: {points: 2}}
    """
    spec = write_spec(tmp_path, text)
    assert invoke("construct", spec, "-o", tmp_path / "out").exit_code == 0
    result = invoke("flow", spec, "-o", tmp_path / "out", "--json", "-j", "1")
    assert result.exit_code == 0, result.output
    table = rows(result)
    built = store.load(tmp_path / "out" / "built" / "run.h5")
    base = store.read_layers(built["network"])
    starts = [store.load(r["path"]) for r in table if r["experiment"] == "start"]
    for res in starts:
        init = store.read_layers(res["network"]["initial"])
        for (W0, b0), (W, b) in zip(base, init):
            assert np.linalg.norm(W - W0) == pytest.approx(0.01, rel=1e-12)
            assert np.linalg.norm(b - b0) == pytest.approx(0.01, rel=1e-12)
    first = [store.read_layers(r["network"]["initial"])[0][0] for r in starts]
    assert not np.allclose(first[0], first[1])  # seeds give independent directions
    keep = next(r for r in table if r["experiment"] == "keep-all")
    assert keep["cost_initial"] > 1e-8  # the all-keep pattern is not a zero-cost start
