"""Run a list of planned runs: serially, in a process pool, or on Dask.

Every executor yields one summary dict per run as runs finish. Workers write
their own result files; only summaries travel back. Shards split a run list
deterministically, so job arrays and Makefiles can each take a share.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from . import store
from .runs import base_summary, execute

MAX_ATTEMPTS = 3  # a run whose worker dies this often is reported failed
BLAS_THREADS = 1  # per worker, so N workers use N cores and no more
# Forked workers start at once with the driver's modules loaded (the driver
# holds no open HDF5 file when the pool starts); elsewhere a fresh interpreter.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


# ------------------------------------------------------------------ shards


def parse_shard(text):
    """Read ``I/N`` (0 <= I < N) into ``(I, N)``; raise ValueError otherwise."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(
            f"--shard must look like I/N with integers, got {text!r}"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return index, count


def shard_of(run, count):
    """Shard of a run: a hash of its experiment and run id, modulo ``count``.

    It depends on nothing but the run itself, so adding sweep values never
    moves another run to a different shard.
    """
    digest = hashlib.sha256(f"{run.experiment}/{run.run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(runs, shard):
    """The runs of shard ``(I, N)``, in their original order (all when None)."""
    if shard is None:
        return list(runs)
    index, count = shard
    return [r for r in runs if shard_of(r, count) == index]


def clean_partials(runs):
    """Remove leftover ``.partial`` files of these runs (from a killed sweep)."""
    removed = 0
    for run in runs:
        partial = store.partial_path(run.path)
        if partial.exists():
            partial.unlink()
            removed += 1
    return removed


def split_done(runs, force=False):
    """Skip summaries of runs already complete, and the runs still to do.

    Checking here, before any worker starts, makes a rerun of a finished
    sweep cost one attribute read per file.
    """
    from .runs import skipped_summary

    if force:
        return [], list(runs)
    done, todo = [], []
    for run in runs:
        if store.is_done(run.path, run.spec_hash):
            done.append(skipped_summary(run))
        else:
            todo.append(run)
    return done, todo


# --------------------------------------------------------------- executors


def run_serial(runs, force=False, progress=None, on_start=None):
    """Run one after another in this process; yields summaries."""
    for run in runs:
        if on_start is not None:
            on_start(run)
        yield execute(run, force=force, progress=progress)


def _limit_threads():
    from threadpoolctl import threadpool_limits

    global _LIMITS  # kept alive for the worker's lifetime
    _LIMITS = threadpool_limits(BLAS_THREADS)


def _execute_in_worker(run, force):
    return execute(run, force=force)


def run_pool(runs, workers, force=False):
    """Run in a local process pool with one BLAS thread per worker.

    A worker that dies (killed, out of memory) breaks the pool; the pool is
    rebuilt and the unfinished runs are submitted again, so the sweep still
    finishes. A run whose worker dies ``MAX_ATTEMPTS`` times is reported
    failed.
    """
    import multiprocessing

    pending = list(runs)
    attempts = {id(r): 0 for r in pending}
    ctx = multiprocessing.get_context(START_METHOD)
    while pending:
        pool, futures = _start_pool(ctx, workers, pending, force)
        pending = []
        try:
            for summary, run in _drain(futures):
                if summary is not None:
                    yield summary
                    continue
                attempts[id(run)] += 1
                if attempts[id(run)] >= MAX_ATTEMPTS:
                    yield _worker_died(run)
                else:
                    pending.append(run)
        finally:
            pool.shutdown(wait=not pending, cancel_futures=True)


def _start_pool(ctx, workers, runs, force):
    """A pool with every run submitted, its workers limited to one BLAS thread.

    Forked workers inherit the BLAS thread count the driver has while they
    start, so the limit is set around the start instead of in every worker.
    """
    from threadpoolctl import threadpool_limits

    initializer = None if ctx.get_start_method() == "fork" else _limit_threads
    with threadpool_limits(BLAS_THREADS):
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=initializer
        )
        futures = {pool.submit(_execute_in_worker, run, force): run for run in runs}
    return pool, futures


def _drain(futures):
    """Yield ``(summary, run)``; ``summary`` None when the worker died."""
    waiting = set(futures)
    while waiting:
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        for future in done:
            try:
                yield future.result(), futures[future]
            except BrokenProcessPool:
                yield None, futures[future]


def _worker_died(run):
    clean_partials([run])
    summary = base_summary(run, "failed")
    summary["message"] = (
        f"the worker process died {MAX_ATTEMPTS} times while running "
        "this run (killed or out of memory?); run it alone to see why"
    )
    summary["wall_time"] = None
    return summary


def run_dask(runs, address=None, scheduler_file=None, workers=None, force=False):
    """Run on a Dask cluster: an existing one, or a local one started here.

    Parameters
    ----------
    address : str, optional
        Scheduler address, e.g. ``tcp://127.0.0.1:8786``.
    scheduler_file : str, optional
        Scheduler file written by ``dask scheduler --scheduler-file``.
    workers : int, optional
        Workers of the local cluster when neither is given.

    Dask retries a task whose worker died (``retries=MAX_ATTEMPTS - 1``).
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise RuntimeError("Dask is not installed: pip install 'dlmin[dask]'") from exc

    cluster = None
    if address is None and scheduler_file is None:
        cluster = LocalCluster(
            n_workers=workers or os.cpu_count(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        client = Client(cluster)
    else:
        client = Client(address, scheduler_file=scheduler_file, timeout="30s")
    try:
        client.run(_limit_threads)
        futures = {
            client.submit(
                _execute_in_worker,
                run,
                force,
                pure=False,
                retries=MAX_ATTEMPTS - 1,
                key=f"dlmin-{i}-{run.experiment}-{run.run_id}",
            ): run
            for i, run in enumerate(runs)
        }
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # KilledWorker and friends: report, go on
                run = futures[future]
                clean_partials([run])
                summary = base_summary(run, "failed")
                summary["message"] = (
                    f"dask could not run it: {type(exc).__name__}: {exc}"
                )
                summary["wall_time"] = None
                yield summary
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def default_workers():
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
