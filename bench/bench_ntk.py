"""Time dlmin's empirical NTK against the dgemm bound and against peers.

Problem (issue 4): Q = 10 outputs, N = 200 samples in R^20, two hidden ReLU
layers of width 128, He initialization, float64, so the kernel is 2000 x 2000
and K = 20,490.

Measured, each as the median of several repetitions, each repetition timed
over back-to-back calls lasting about BATCH_S (one call for slow peers) and
taken again when another process used the CPU meanwhile (Linux; bounded,
and the timings that never got a quiet CPU are counted in the record):

- ``dlmin.core.network.ntk``;
- the dgemm bound: the floating-point operations the layer-wise kernel needs
  (counted below) divided by the rate of this machine's dgemm on a square
  product of about the same operation count, timed interleaved with ntk;
- every peer that imports: torch.func (jacrev, then J J^T), JAX (jacrev under
  jit, x64) and neural-tangents' empirical NTK (structured derivatives and
  the other implementations; also its default output-traced N x N kernel,
  a smaller object, for context). Peers run in child processes, in this
  interpreter or the first of ``--peers-python`` that can import them, on
  the same arrays, and their kernels are compared with ours;
- a memory check: N*Q = 4000 with three hidden layers of width 512 (an
  explicit Jacobian would take about 17 GB), run in a child process.

Results go to ``bench/results/ntk.json`` with the BLAS configuration; a peer
that cannot be imported in this run keeps its previous record, marked so.

Usage::

    .venv/bin/python bench/bench_ntk.py [--repeats 9] [--skip-big]
        [--peers-python /path/to/python ...]

Peers are never dependencies of dlmin; install them in separate virtual
environments and pass their interpreters, e.g. one with ``torch jax``, and
one with ``neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 'numpy<2'``
(neural-tangents 0.6.5 fails to import, or fails in structured derivatives,
with newer JAX).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ntk.json"

WIDTHS = [20, 128, 128, 10]
N_SAMPLES = 200
BIG_WIDTHS = [20, 512, 512, 512, 10]
BIG_SAMPLES = 400
SEED = 0

# A timed call starts only once other processes have used less than this
# fraction of one CPU over a short window, so a busy neighbour does not
# distort a median; after QUIET_TIMEOUT_S seconds it starts anyway.
QUIET_CPU_FRACTION = 0.05
QUIET_WINDOW_S = 0.1
QUIET_TIMEOUT_S = 20.0
# A timing during which another process ran is repeated, this often.
QUIET_ATTEMPTS = 5
# Fast functions are timed over back-to-back calls lasting about this long,
# so that one wake-up of the BLAS threads after a quiet wait is amortized.
BATCH_S = 0.15

# Slow peers take several seconds per call: cap their total timed seconds.
PEER_BUDGET_S = 40.0

PEERS = [
    "torch.func",
    "jax",
    "neural-tangents:structured_derivatives",
    "neural-tangents:jacobian_contraction",
    "neural-tangents:ntk_vector_products",
    # Not the same object: NT's default traces over outputs, giving the
    # (N, N) kernel mean_q G[nq, mq]. Recorded for context only.
    "neural-tangents:structured_derivatives:traced",
]


# --------------------------------------------------------------------------
# Problem, operation count, timing
# --------------------------------------------------------------------------


def make_problem(widths, n_samples, seed=SEED):
    """He-initialized parameters and standard normal inputs, samples as rows."""
    from dlmin.core import network

    rng = np.random.default_rng(seed)
    params = network.init_params(widths, rng=rng, scheme="he", bias_scale=0.1)
    X = rng.standard_normal((n_samples, widths[0]))
    return params, X


def kernel_flops(widths, n_samples):
    """Floating-point operations of the layer-wise kernel, by part.

    With P = N*Q rows: per hidden layer the Gram ``S_l S_l^T`` needs
    ``P (P + 1) / 2`` dot products of length ``M_l`` (symmetry used), i.e.
    ``P (P + 1) M_l`` flops; the backward pass for ``S_l`` (l < L) is a
    ``(P, M_(l+1)) x (M_(l+1), M_l)`` product; the activation Grams
    ``A A^T`` take ``N (N + 1) M_(l-1)``; the forward pass ``2 N M_l M_(l-1)``.
    Elementwise work (O(P^2) per layer) is not counted.
    """
    n_outputs, hidden = widths[-1], widths[1:-1]
    rows = n_samples * n_outputs
    parts = {
        "sensitivity_grams": sum(rows * (rows + 1) * m for m in hidden),
        "backward_pass": sum(
            2 * rows * m_next * m for m, m_next in zip(hidden, hidden[1:])
        ),
        "activation_grams": sum(n_samples * (n_samples + 1) * m for m in widths[:-1]),
        "forward_pass": sum(
            2 * n_samples * m_in * m_out for m_in, m_out in zip(widths, widths[1:])
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def _busy_jiffies():
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    return sum(values) - values[3] - values[4]


def _own_jiffies():
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_for_quiet():
    """Wait until other processes leave the CPU alone; False on timeout."""
    if not os.path.exists("/proc/stat"):
        return True
    hertz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        busy, own = _busy_jiffies(), _own_jiffies()
        time.sleep(QUIET_WINDOW_S)
        others = (_busy_jiffies() - busy) - (_own_jiffies() - own)
        if others / hertz / QUIET_WINDOW_S < QUIET_CPU_FRACTION:
            return True
        if time.monotonic() > deadline:
            return False


def _others_jiffies(before):
    """CPU ticks used by other processes since ``before``, and a new mark."""
    now = (_busy_jiffies(), _own_jiffies())
    if before is None:
        return 0, now
    return (now[0] - before[0]) - (now[1] - before[1]), now


def timed_call(function, calls=1):
    """Seconds per call of ``calls`` back-to-back calls, run in quiet.

    Retries up to QUIET_ATTEMPTS times when another process used more than
    one clock tick (or QUIET_CPU_FRACTION of the elapsed time) meanwhile;
    returns the last result and whether it was quiet.
    """
    on_linux = os.path.exists("/proc/stat")
    hertz = os.sysconf("SC_CLK_TCK") if on_linux else 100
    for _ in range(QUIET_ATTEMPTS):
        wait_for_quiet()
        mark = _others_jiffies(None)[1] if on_linux else None
        start = time.perf_counter()
        for _ in range(calls):
            function()
        elapsed = time.perf_counter() - start
        if not on_linux:
            return elapsed / calls, True
        others, _ = _others_jiffies(mark)
        if others <= max(1.0, QUIET_CPU_FRACTION * elapsed * hertz):
            return elapsed / calls, True
    return elapsed / calls, False


def time_interleaved(functions, repeats, warm_each=True):
    """Median and minimum seconds of each function, repetitions interleaved.

    Each repetition times every function over back-to-back calls lasting
    about BATCH_S (one call for slow ones), as a loop over kernels would
    run them, in quiet (see :func:`timed_call`). With ``warm_each`` an
    untimed call comes first (warm caches, BLAS threads awake); slow peers
    skip it. Returns the summary and the number of timings not in quiet.
    """
    calls = {}
    for name, function in functions.items():
        durations = []
        for _ in range(2 if warm_each else 1):
            start = time.perf_counter()
            function()
            durations.append(time.perf_counter() - start)
        calls[name] = max(1, int(BATCH_S / max(min(durations), 1e-6)))
    samples = {name: [] for name in functions}
    noisy = 0
    for _ in range(repeats):
        for name, function in functions.items():
            if warm_each:
                function()
            seconds, quiet = timed_call(function, calls[name])
            samples[name].append(seconds)
            noisy += not quiet
    summary = {
        name: {
            "median_s": float(np.median(values)),
            "min_s": float(np.min(values)),
            "repeats": len(values),
            "calls_per_timing": calls[name],
        }
        for name, values in samples.items()
    }
    return summary, noisy


def square_gemm(flops):
    """A square dgemm of about ``flops`` operations, and its exact count."""
    n = max(64, round((flops / 2) ** (1 / 3)))
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    out = np.empty((n, n))
    return (lambda: np.matmul(a, b, out=out)), n, 2 * n**3


# --------------------------------------------------------------------------
# Child processes: peers and the memory check
# --------------------------------------------------------------------------


def peer_kernel(name, params, X):
    """Return (kernel function, versions) for a peer, or raise ImportError."""
    if name == "torch.func":
        return _torch_kernel(params, X)
    if name == "jax":
        return _jax_kernel(params, X)
    _, implementation, *traced = name.split(":")
    return _neural_tangents_kernel(params, X, implementation, bool(traced))


def _torch_kernel(params, X):
    import torch
    from torch.func import jacrev

    def tensor(array):
        return torch.tensor(array, dtype=torch.float64)

    theta = tuple((tensor(W), tensor(b)) for W, b in params)
    inputs = tensor(X)
    rows = X.shape[0] * params[-1][0].shape[0]

    def f(theta, inputs):
        a = inputs
        for W, b in theta[:-1]:
            a = torch.relu(a @ W.T + b)
        W, b = theta[-1]
        return (a @ W.T + b).reshape(-1)

    def kernel():
        jac = jacrev(f)(theta, inputs)
        blocks = [j.reshape(rows, -1) for pair in jac for j in pair]
        return sum(J @ J.T for J in blocks).numpy()

    versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    return kernel, versions


def _jax_setup(params, X):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    theta = [(jnp.asarray(W), jnp.asarray(b)) for W, b in params]

    def f(theta, inputs):
        a = inputs
        for W, b in theta[:-1]:
            a = jax.nn.relu(a @ W.T + b)
        W, b = theta[-1]
        return a @ W.T + b

    return jax, jnp, theta, jnp.asarray(X), f


def _jax_kernel(params, X):
    jax, jnp, theta, inputs, f = _jax_setup(params, X)
    rows = X.shape[0] * params[-1][0].shape[0]

    @jax.jit
    def compiled(theta, inputs):
        jac = jax.jacrev(lambda t: f(t, inputs).reshape(-1))(theta)
        blocks = [j.reshape(rows, -1) for j in jax.tree_util.tree_leaves(jac)]
        return sum(J @ J.T for J in blocks)

    def kernel():
        return np.asarray(compiled(theta, inputs).block_until_ready())

    return kernel, {"jax": jax.__version__, "backend": jax.default_backend()}


def _neural_tangents_kernel(params, X, implementation, traced):
    jax, jnp, theta, inputs, f = _jax_setup(params, X)
    import neural_tangents as nt

    choice = getattr(nt.NtkImplementation, implementation.upper())
    ntk_fn = nt.empirical_ntk_fn(
        f,
        trace_axes=(-1,) if traced else (),
        vmap_axes=0,
        implementation=choice,
    )
    rows = X.shape[0] * params[-1][0].shape[0]

    @jax.jit
    def compiled(theta, inputs):
        blocks = ntk_fn(inputs, None, theta)
        if traced:
            return blocks
        # (N, N, Q, Q) -> sample-major (N*Q, N*Q), as dlmin returns it.
        return jnp.transpose(blocks, (0, 2, 1, 3)).reshape(rows, rows)

    def kernel():
        return np.asarray(compiled(theta, inputs).block_until_ready())

    versions = {
        "neural_tangents": getattr(nt, "__version__", "unknown"),
        "jax": jax.__version__,
    }
    return kernel, versions


def run_peer(name, problem_path, repeats):
    """Child: time one peer on the stored problem; return a JSON-able dict."""
    with np.load(problem_path) as stored:
        n_layers = sum(1 for key in stored.files if key.startswith("W"))
        params = [(stored[f"W{l}"], stored[f"b{l}"]) for l in range(1, n_layers + 1)]
        X, reference = stored["X"], stored["G"]
    if name.endswith(":traced"):
        # neural-tangents averages over the traced output axis.
        n_samples, n_outputs = X.shape[0], params[-1][0].shape[0]
        blocks = reference.reshape(n_samples, n_outputs, n_samples, n_outputs)
        reference = np.einsum("nqmq->nm", blocks) / n_outputs
    try:
        kernel, versions = peer_kernel(name, params, X)
    except Exception as exc:  # any import or set-up failure means "absent"
        error = f"{type(exc).__name__}: {exc}"
        return {"status": "unavailable", "error": error}
    start = time.perf_counter()
    G = kernel()
    first = time.perf_counter() - start
    error = float(np.abs(G - reference).max() / np.abs(reference).max())
    repeats = max(3, min(repeats, int(PEER_BUDGET_S / max(first, 1e-3))))
    timing, noisy = time_interleaved({name: kernel}, repeats, warm_each=False)
    return {
        "status": "measured",
        **timing[name],
        "first_call_s": first,
        "max_rel_diff_vs_dlmin": error,
        "versions": versions,
        "python": sys.executable,
        "timed_calls_not_quiet": noisy,
    }


def run_big():
    """Child: one large kernel; time, traced peak and peak RSS."""
    from dlmin.core import network

    params, X = make_problem(BIG_WIDTHS, BIG_SAMPLES)
    rows = BIG_SAMPLES * BIG_WIDTHS[-1]
    n_params = network.param_count(BIG_WIDTHS)
    wait_for_quiet()
    tracemalloc.start()
    start = time.perf_counter()
    G = network.ntk(params, X)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    second, quiet = timed_call(lambda: network.ntk(params, X))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "widths": BIG_WIDTHS,
        "n_samples": BIG_SAMPLES,
        "kernel_shape": list(G.shape),
        "n_params": n_params,
        "explicit_jacobian_bytes": rows * n_params * 8,
        "kernel_bytes": G.nbytes,
        "seconds_first_call": seconds,
        "seconds_second_call": second,
        "second_call_quiet": quiet,
        "numpy_traced_peak_bytes": traced_peak,
        "process_peak_rss_bytes": rss,
        "flops": kernel_flops(BIG_WIDTHS, BIG_SAMPLES)["total"],
    }


def child(python, arguments, timeout=900):
    """Run this script in ``python`` with ``arguments``; parse its JSON."""
    command = [python, str(Path(__file__).resolve()), *arguments]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "error": " | ".join(tail)}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------
# Machine description and the record
# --------------------------------------------------------------------------


def machine_info():
    """CPU, thread settings and the BLAS numpy uses."""
    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip()
                for line in info
                if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    try:
        blas_build = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception as exc:  # older numpy: no dict mode
        blas_build = f"unavailable ({exc})"
    env = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threadpools": threadpool_info(),
        "numpy_blas_build": blas_build,
        "thread_env": {name: os.environ.get(name) for name in env},
    }


def previous_peers(path):
    """Peer records of an earlier run, to keep when a peer is absent now."""
    try:
        return json.loads(path.read_text()).get("peers", {})
    except (OSError, ValueError):
        return {}


def measure_peers(names, pythons, problem_path, repeats, old):
    """Each peer from the first interpreter that can run it."""
    results = {}
    for name in names:
        record = {"status": "unavailable", "error": "no interpreter tried"}
        arguments = ["--peer", name, str(problem_path), str(repeats)]
        for python in pythons:
            record = child(python, arguments)
            if record["status"] == "measured":
                break
        earlier = old.get(name, {})
        if record["status"] != "measured" and "median_s" in earlier:
            kept = dict(old[name])
            kept["status"] = "kept from an earlier run"
            kept["absent_now"] = record.get("error")
            record = kept
        results[name] = record
    return results


def print_table(record):
    ours = record["dlmin"]["median_s"]
    bound = record["dgemm_bound"]
    print(f"{'what':54s} {'median ms':>10s} {'min ms':>9s} {'vs dlmin':>9s}")
    print(
        f"{'dlmin.core.network.ntk':54s} {ours * 1e3:10.2f} "
        f"{record['dlmin']['min_s'] * 1e3:9.2f} {1:9.2f}"
    )
    print(
        f"{'dgemm bound (flops / dgemm rate)':54s} "
        f"{bound['bound_s'] * 1e3:10.2f} {'':9s} "
        f"{bound['bound_s'] / ours:9.2f}"
    )
    for name, peer in record["peers"].items():
        if "median_s" in peer:
            mark = "" if peer["status"] == "measured" else " (earlier run)"
            mark += " [N x N]" if name.endswith(":traced") else ""
            print(
                f"{name + mark:54s} {peer['median_s'] * 1e3:10.2f} "
                f"{peer['min_s'] * 1e3:9.2f} {peer['median_s'] / ours:9.2f}"
            )
        else:
            print(f"{name:54s} {'-':>10s}  {peer['status']}")
    print(
        f"ratio dlmin / dgemm bound: {bound['ratio_dlmin_to_bound']:.2f} "
        f"(flops {bound['flops']:.3e}, dgemm {bound['gflops']:.1f} GFLOP/s "
        f"on n = {bound['n']})"
    )
    grams = bound["blocked_grams"]
    print(
        f"ntk's Gram GEMMs alone: {grams['median_s'] * 1e3:.2f} ms "
        f"({grams['gflops']:.1f} GFLOP/s, "
        f"{grams['ratio_to_bound']:.2f} x bound)"
    )
    big = record.get("big_case")
    if big and "seconds_first_call" in big:
        print(
            f"big case N*Q = {big['kernel_shape'][0]}, "
            f"K = {big['n_params']}: "
            f"{big['seconds_second_call']:.2f} s, numpy peak "
            f"{big['numpy_traced_peak_bytes'] / 2**20:.0f} MiB, process peak "
            f"RSS {big['process_peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(explicit D: {big['explicit_jacobian_bytes'] / 2**30:.1f} GiB)"
        )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def blocked_grams(widths, n_samples, block_rows):
    """The GEMMs alone of ntk's blocked lower triangle, on random factors.

    A diagnostic: how fast this BLAS runs the kernel's products at their
    shapes (inner dimension M_l, block rows by all columns to the diagonal).
    """
    n_outputs = widths[-1]
    rows = n_samples * n_outputs
    rng = np.random.default_rng(2)
    factors = [rng.standard_normal((rows, m)) for m in widths[1:-1]]
    step = max(1, block_rows // n_outputs) * n_outputs
    buffer = np.empty(step * rows)
    executed = sum(
        2 * (min(rows, lo + step) - lo) * min(rows, lo + step) * S.shape[1]
        for S in factors
        for lo in range(0, rows, step)
    )

    def run():
        for S in factors:
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                out = buffer[: (hi - lo) * hi].reshape(hi - lo, hi)
                np.matmul(S[lo:hi], S[:hi].T, out=out)

    return run, executed


def measure_dlmin(repeats):
    """Time ntk, its GEMMs alone and the matching square dgemm, interleaved."""
    from dlmin.core import network

    params, X = make_problem(WIDTHS, N_SAMPLES)
    flops = kernel_flops(WIDTHS, N_SAMPLES)
    gemm, n, gemm_flops = square_gemm(flops["total"])
    grams, grams_flops = blocked_grams(WIDTHS, N_SAMPLES, network.NTK_BLOCK_ROWS)
    timing, noisy = time_interleaved(
        {
            "dlmin": lambda: network.ntk(params, X),
            "dgemm": gemm,
            "blocked_grams": grams,
        },
        repeats,
    )
    rate = gemm_flops / timing["dgemm"]["median_s"]
    bound = {
        "flops": flops["total"],
        "flops_by_part": flops,
        "n": n,
        "dgemm_median_s": timing["dgemm"]["median_s"],
        "gflops": rate / 1e9,
        "gflops_best": gemm_flops / timing["dgemm"]["min_s"] / 1e9,
        "bound_s": flops["total"] / rate,
    }
    ours = timing["dlmin"]["median_s"]
    bound["ratio_dlmin_to_bound"] = ours / bound["bound_s"]
    bound["blocked_grams"] = {
        "what": "ntk's Gram GEMMs alone at their block shapes, random factors",
        "flops_executed": grams_flops,
        "median_s": timing["blocked_grams"]["median_s"],
        "gflops": grams_flops / timing["blocked_grams"]["median_s"] / 1e9,
        "ratio_to_bound": (timing["blocked_grams"]["median_s"] / bound["bound_s"]),
    }
    dlmin = dict(timing["dlmin"], timed_calls_not_quiet=noisy)
    return params, X, network.ntk(params, X), dlmin, bound


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--skip-big", action="store_true", help="skip the N*Q = 4000 memory check"
    )
    parser.add_argument(
        "--peers-python",
        action="append",
        default=[],
        help="another interpreter to try peers in (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--peer", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--big-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        name, path, repeats = args.peer
        print(json.dumps(run_peer(name, path, int(repeats))))
        return
    if args.big_child:
        print(json.dumps(run_big()))
        return

    params, X, G, dlmin, bound = measure_dlmin(args.repeats)
    old = previous_peers(args.out)
    with tempfile.TemporaryDirectory() as folder:
        problem = Path(folder) / "problem.npz"
        arrays = {
            f"{k}{l}": a
            for l, (W, b) in enumerate(params, 1)
            for k, a in (("W", W), ("b", b))
        }
        np.savez(problem, X=X, G=G, **arrays)
        pythons = [sys.executable, *args.peers_python]
        peers = measure_peers(PEERS, pythons, problem, args.repeats, old)
    for name, peer in peers.items():
        if "median_s" in peer and not name.endswith(":traced"):
            peer["speedup_of_dlmin"] = peer["median_s"] / dlmin["median_s"]
    record = {
        "benchmark": "empirical NTK, sample-major (N*Q, N*Q), float64",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "problem": {
            "widths": WIDTHS,
            "n_samples": N_SAMPLES,
            "activation": "relu",
            "init": "he, bias_scale 0.1",
            "seed": SEED,
        },
        "dlmin": dlmin,
        "dgemm_bound": bound,
        "peers": peers,
        "machine": machine_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if not args.skip_big:
        record["big_case"] = child(sys.executable, ["--big-child"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print_table(record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
