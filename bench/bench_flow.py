"""Benchmark: adapted-flow steps and a standard-flow run, Q = 10, N = 200.

The net is 20 -> 128 -> 128 -> 10 with tanh (K = 20 490 parameters, QN = 2000
stacked outputs); targets come from a small random teacher net.

1. Adapted flow: time per fixed step (``solver: euler``, one vector field
   evaluation plus the rank screen per step, taken as the difference of two
   run lengths so that start-up costs cancel), and inside it the time of the
   three pieces a step cannot avoid: one kernel build (``network.ntk``),
   one Cholesky factorization and solve, one VJP (forward and backward
   pass), timed in the run itself. The rest is the share spent outside
   them (goal: under 10 %).
2. Standard flow: gradient descent with a fixed learning rate until
   ``C <= C0 / REDUCTION``, three ways with the same arithmetic: dlmin
   (``integrate`` with ``solver: euler``), a plain NumPy loop written here,
   and PyTorch (``torch.optim.SGD``, float64, CPU) when importable, here or
   in the peers' environment /work/peers-venv (run in a subprocess).
3. Mini-batch SGD (``solver: sgd``, batch SGD_BATCH, momentum SGD_MOMENTUM,
   SGD_EPOCHS epochs): dlmin against a plain NumPy loop written here with
   the same permutations and arithmetic (the same final parameters), so the
   ratio is dlmin's overhead per step (full-cost checks at epoch ends).

Medians over repeats; results go to bench/results/flow.json.

    .venv/bin/python bench/bench_flow.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import scipy.linalg

from dlmin.core import flows as fl
from dlmin.core import network as nw

HERE = Path(__file__).resolve().parent
PEERS_PYTHON = Path("/work/peers-venv/bin/python")

N, DIM, Q = 200, 20, 10
HIDDEN = (128, 128)
ACTIVATION = "tanh"
# Adapted-flow step length for the timing runs (the value does not change
# the work per step); the two run lengths whose difference is timed.
ADAPTED_STEP = 1.0
SHORT_RUN, LONG_RUN = 2, 8
# Standard flow: stop at C <= C0 / REDUCTION, learning rate LR_SCALE * N /
# lambda_max(G) (LR_SCALE < 2 is stable for the output-space linearisation).
REDUCTION = 100.0
LR_SCALE = 1.0
POWER_ITERATIONS = 100
# Mini-batch SGD: 10 steps per epoch on N = 200; a learning rate that the
# momentum keeps stable for this net.
SGD_BATCH, SGD_MOMENTUM, SGD_EPOCHS, SGD_LR, SGD_SEED = 20, 0.9, 20, 0.05, 3


def problem():
    """Inputs, teacher targets and the student's initial parameters."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, DIM))
    teacher = nw.init_params([DIM, 32, Q], rng=9, scheme="glorot")
    Y = nw.forward(teacher, X, activation=ACTIVATION)
    params = nw.init_params([DIM, *HIDDEN, Q], rng=1, scheme="glorot")
    return X, Y, params


# --------------------------------------------------------------------------
# 1. adapted flow: time per step and its parts
# --------------------------------------------------------------------------


class PieceTimer:
    """Time spent in the pieces of a step, measured inside the real run.

    Wraps ``network.ntk`` (kernel), SciPy's ``cho_factor``/``cho_solve``
    (Cholesky) and ``network.forward_cache`` plus the flow's backward pass
    (VJP) where ``flows`` looks them up, so contention on a shared machine
    slows the pieces and the whole step alike.
    """

    PIECES = {
        "kernel": [(nw, "ntk")],
        "cholesky": [(scipy.linalg, "cho_factor"), (scipy.linalg, "cho_solve")],
        "vjp": [(nw, "forward_cache"), (fl, "_pullback")],
    }

    def __init__(self):
        self.seconds = dict.fromkeys(self.PIECES, 0.0)
        self._saved = []

    def __enter__(self):
        for piece, targets in self.PIECES.items():
            for owner, name in targets:
                original = getattr(owner, name)
                self._saved.append((owner, name, original))
                setattr(owner, name, self._wrap(piece, original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def _wrap(self, piece, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[piece] += time.perf_counter() - start

        return timed


def adapted_run(X, Y, params, steps):
    """Wall time of an adapted Euler run and the time of its pieces."""
    opts = fl.FlowOptions(
        kind="adapted",
        solver="euler",
        step=ADAPTED_STEP,
        time=steps * ADAPTED_STEP,
        record=2,
        spectrum=False,
        store_theta=False,
    )
    with PieceTimer() as timer:
        result = fl.integrate(params, X, Y, opts, activation=ACTIVATION)
    assert result.status == "ok" and result.steps == steps, result.message
    return result.wall_time, timer.seconds


def bench_adapted(X, Y, params, repeats):
    """Per-step time and pieces: differences of a long and a short run."""
    rows = []
    for _ in range(repeats):
        short_wall, short = adapted_run(X, Y, params, SHORT_RUN)
        long_wall, long = adapted_run(X, Y, params, LONG_RUN)
        extra = LONG_RUN - SHORT_RUN
        row = {f"{k}_s": (long[k] - short[k]) / extra for k in short}
        row["step_s"] = (long_wall - short_wall) / extra
        inside = row["kernel_s"] + row["cholesky_s"] + row["vjp_s"]
        row["outside_share"] = 1.0 - inside / row["step_s"]
        rows.append(row)
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    out["outside_share_all"] = [row["outside_share"] for row in rows]
    out["step_s_all"] = [row["step_s"] for row in rows]
    return out


# --------------------------------------------------------------------------
# 2. standard flow to C0 / REDUCTION: dlmin, NumPy, PyTorch
# --------------------------------------------------------------------------


def learning_rate(X, params):
    """``LR_SCALE * N / lambda_max(G)``, lambda_max by power iteration."""
    G = nw.ntk(params, X, activation=ACTIVATION)
    v = np.random.default_rng(1).standard_normal(G.shape[0])
    for _ in range(POWER_ITERATIONS):
        v = G @ v
        v /= np.linalg.norm(v)
    return LR_SCALE * N / float(v @ G @ v)


def dlmin_descent(X, Y, params, lr, target):
    opts = fl.FlowOptions(
        kind="standard",
        solver="euler",
        step=lr,
        time=1e12 * lr,
        stop_cost=target,
        record=2,
        spectrum=False,
        store_theta=False,
    )
    result = fl.integrate(params, X, Y, opts, activation=ACTIVATION)
    assert result.stop_reason == "cost", result.message
    return result.steps, result.cost_final


def numpy_descent(X, Y, params, lr, target):
    """Plain full-batch gradient descent on C = |f(X) - Y|^2 / (2N)."""
    Ws = [W.copy() for W, _ in params]
    bs = [b.copy() for _, b in params]
    steps = 0
    while True:
        acts = [X]
        for W, b in zip(Ws[:-1], bs[:-1]):
            acts.append(np.tanh(acts[-1] @ W.T + b))
        residual = acts[-1] @ Ws[-1].T + bs[-1] - Y
        cost = float(np.vdot(residual, residual)) / (2 * N)
        if cost <= target:
            return steps, cost
        delta = residual / N
        for layer in range(len(Ws) - 1, -1, -1):
            grad_W, grad_b = delta.T @ acts[layer], delta.sum(axis=0)
            if layer > 0:
                delta = (delta @ Ws[layer]) * (1.0 - acts[layer] ** 2)
            Ws[layer] -= lr * grad_W
            bs[layer] -= lr * grad_b
        steps += 1


TORCH_SCRIPT = textwrap.dedent("""\
    import json, sys, time
    import numpy as np
    import torch

    data = np.load(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))
    X, Y = torch.from_numpy(data["X"]), torch.from_numpy(data["Y"])
    lr, target, repeats = float(data["lr"]), float(data["target"]), int(sys.argv[3])
    n_layers = (len(data.files) - 4) // 2
    times = []
    for _ in range(repeats):
        layers = []
        for l in range(1, n_layers + 1):
            W = data[f"W{l}"]
            linear = torch.nn.Linear(W.shape[1], W.shape[0]).double()
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(W))
                linear.bias.copy_(torch.from_numpy(data[f"b{l}"]))
            layers += [linear, torch.nn.Tanh()]
        net = torch.nn.Sequential(*layers[:-1])
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        start, steps = time.perf_counter(), 0
        while True:
            opt.zero_grad()
            loss = ((net(X) - Y) ** 2).sum() / (2 * X.shape[0])
            if loss.item() <= target:
                break
            loss.backward()
            opt.step()
            steps += 1
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "steps": steps, "cost": loss.item(),
                      "torch": torch.__version__}))
""")


def torch_python():
    """An interpreter with torch: this one, the peers' venv, or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return str(PEERS_PYTHON) if PEERS_PYTHON.exists() else None
    return sys.executable


def torch_descent(X, Y, params, lr, target, repeats, threads):
    python = torch_python()
    if python is None:
        return None
    arrays = {"X": X, "Y": Y, "lr": lr, "target": target}
    for l, (W, b) in enumerate(params, start=1):
        arrays[f"W{l}"], arrays[f"b{l}"] = W, b
    with tempfile.TemporaryDirectory() as tmp:
        data, script = Path(tmp) / "data.npz", Path(tmp) / "gd.py"
        np.savez(data, **arrays)
        script.write_text(TORCH_SCRIPT)
        proc = subprocess.run(
            [python, str(script), str(data), str(threads), str(repeats)],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        print(f"torch run failed, skipped:\n{proc.stderr}", file=sys.stderr)
        return None
    out = json.loads(proc.stdout)
    return {
        "s": statistics.median(out["times"]),
        "steps": out["steps"],
        "cost": out["cost"],
        "python": python,
        "torch": out["torch"],
    }


def dlmin_sgd(X, Y, params):
    opts = fl.FlowOptions(
        kind="standard",
        solver="sgd",
        lr=SGD_LR,
        batch=SGD_BATCH,
        momentum=SGD_MOMENTUM,
        epochs=SGD_EPOCHS,
        record=2,
        spectrum=False,
        store_theta=False,
    )
    result = fl.integrate(params, X, Y, opts, activation=ACTIVATION, seed=SGD_SEED)
    return result.steps, nw.flatten(result.params)


def numpy_sgd(X, Y, params):
    """Heavy-ball SGD on mini-batches, permutations as dlmin draws them."""
    rng = np.random.default_rng(SGD_SEED)
    Ws = [W.copy() for W, _ in params]
    bs = [b.copy() for _, b in params]
    vW = [np.zeros_like(W) for W in Ws]
    vb = [np.zeros_like(b) for b in bs]
    steps = 0
    for _ in range(SGD_EPOCHS):
        order = rng.permutation(N)
        for first in range(0, N, SGD_BATCH):
            rows = order[first : first + SGD_BATCH]
            acts = [X[rows]]
            for W, b in zip(Ws[:-1], bs[:-1]):
                acts.append(np.tanh(acts[-1] @ W.T + b))
            delta = (acts[-1] @ Ws[-1].T + bs[-1] - Y[rows]) / len(rows)
            for layer in range(len(Ws) - 1, -1, -1):
                grad_W, grad_b = delta.T @ acts[layer], delta.sum(axis=0)
                if layer > 0:
                    delta = (delta @ Ws[layer]) * (1.0 - acts[layer] ** 2)
                vW[layer] = SGD_MOMENTUM * vW[layer] + grad_W
                vb[layer] = SGD_MOMENTUM * vb[layer] + grad_b
                Ws[layer] -= SGD_LR * vW[layer]
                bs[layer] -= SGD_LR * vb[layer]
            steps += 1
    return steps, nw.flatten(list(zip(Ws, bs)))


def bench_sgd(X, Y, params, repeats):
    """dlmin's SGD against the NumPy loop, interleaved; checks they agree."""
    times = {"dlmin": [], "numpy": []}
    for _ in range(repeats):
        for name, fn in (("dlmin", dlmin_sgd), ("numpy", numpy_sgd)):
            start = time.perf_counter()
            steps, theta = fn(X, Y, params)
            times[name].append(time.perf_counter() - start)
            if name == "dlmin":
                reference = theta
            else:
                gap = float(np.max(np.abs(theta - reference)))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "steps": steps,
        "dlmin_s": medians["dlmin"],
        "numpy_s": medians["numpy"],
        "ratio": medians["dlmin"] / medians["numpy"],
        "max_parameter_gap": gap,
        "s_all": times,
    }


def timed(fn, *args):
    start = time.perf_counter()
    steps, cost = fn(*args)
    return {"s": time.perf_counter() - start, "steps": steps, "cost": cost}


def bench_standard(X, Y, params, repeats):
    """The three descents, interleaved repeat by repeat against drift."""
    lr = learning_rate(X, params)
    cost0 = fl.cost_and_gradient(nw.forward(params, X, activation=ACTIVATION), Y)[0]
    target = cost0 / REDUCTION
    args = (X, Y, params, lr, target)
    runs = {"dlmin": [], "numpy": [], "torch": []}
    for _ in range(repeats):
        runs["dlmin"].append(timed(dlmin_descent, *args))
        runs["numpy"].append(timed(numpy_descent, *args))
        runs["torch"].append(torch_descent(*args, 1, blas_threads()))
    out = {"lr": lr, "cost_initial": cost0, "target": target}
    for name, rows in runs.items():
        out[name] = (
            None
            if rows[0] is None
            else {
                "s": statistics.median(row["s"] for row in rows),
                "s_all": [row["s"] for row in rows],
                "steps": rows[-1]["steps"],
                "cost": rows[-1]["cost"],
                **{
                    k: v
                    for k, v in rows[-1].items()
                    if k not in ("s", "s_all", "steps", "cost")
                },
            }
        )
    return out


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.cpu_count()
    counts = [
        info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"
    ]
    return max(counts) if counts else os.cpu_count()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def print_table(record):
    a, s = record["adapted_step"], record["standard_run"]
    print(
        f"flow benchmark: N = {N}, Q = {Q}, inputs R^{DIM}, hidden "
        f"{list(HIDDEN)} {ACTIVATION}, K = {record['K']}, QN = {N * Q}"
    )
    print(
        f"machine: {record['machine']['cores']} cores, BLAS threads "
        f"{record['machine']['blas_threads']}, load average before "
        f"{record['machine']['load_before']:.2f}"
    )
    print("\nadapted flow, one step (median):")
    for key, label in [
        ("step_s", "whole step"),
        ("kernel_s", "kernel build"),
        ("cholesky_s", "Cholesky + solve"),
        ("vjp_s", "VJP"),
    ]:
        print(f"  {label:<18} {1e3 * a[key]:9.1f} ms")
    print(f"  outside the three  {100 * a['outside_share']:8.1f} %  (goal < 10 %)")
    print(
        f"\nstandard flow, gradient descent lr = {s['lr']:.4g} to "
        f"C <= C0/{REDUCTION:g} (C0 = {s['cost_initial']:.4g}):"
    )
    print(f"  {'':<8} {'median s':>9} {'steps':>7} {'ms/step':>8} {'final C':>11}")
    for name in ("dlmin", "numpy", "torch"):
        row = s[name]
        if row is None:
            print(f"  {name:<8} skipped (torch not importable)")
            continue
        print(
            f"  {name:<8} {row['s']:9.3f} {row['steps']:7d} "
            f"{1e3 * row['s'] / max(row['steps'], 1):8.3f} "
            f"{row['cost']:11.5g}"
        )
    g = record["sgd_run"]
    print(
        f"\nmini-batch SGD, batch {SGD_BATCH}, momentum {SGD_MOMENTUM}, "
        f"{SGD_EPOCHS} epochs ({g['steps']} steps):"
    )
    print(f"  dlmin    {g['dlmin_s']:9.3f} s")
    print(f"  numpy    {g['numpy_s']:9.3f} s   dlmin / numpy = {g['ratio']:.2f}")
    print(f"  largest parameter difference {g['max_parameter_gap']:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    X, Y, params = problem()
    load = os.getloadavg()[0]
    record = {
        "benchmark": "flow",
        "N": N,
        "Q": Q,
        "dim": DIM,
        "hidden": list(HIDDEN),
        "activation": ACTIVATION,
        "K": nw.param_count(nw.widths_of(params)),
        "repeats": args.repeats,
        "adapted_step": bench_adapted(X, Y, params, args.repeats),
        "standard_run": bench_standard(X, Y, params, args.repeats),
        "sgd_run": bench_sgd(X, Y, params, args.repeats),
        "machine": {
            "python": platform.python_version(),
            "system": platform.platform(),
            "cores": os.cpu_count(),
            "blas_threads": blas_threads(),
            "load_before": load,
            "load_after": os.getloadavg()[0],
        },
    }
    out = HERE / "results" / "flow.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"\nrecorded in {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
