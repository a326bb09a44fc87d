"""`dlmin run` and the per-kind commands (`dlmin construct`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    emit_row,
    err_console,
    fail_usage,
    load_and_plan,
    run_progress,
)

SpecArg = typer.Argument(
    Path("experiments.yaml"), help="YAML spec of the experiments.", show_default=True
)
NamesOpt = typer.Option(
    None, "--experiment", "-e", help="Only this experiment (repeat for several)."
)
OutOpt = typer.Option(Path("results"), "--out", "-o", help="Folder for result files.")
ForceOpt = typer.Option(
    False, "--force", help="Redo runs whose complete result exists."
)
JsonOpt = typer.Option(False, "--json", help="One JSON object per run on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr.")


WorkersOpt = typer.Option(
    None,
    "--workers",
    "-j",
    min=1,
    help="Worker processes (default: the cores; 1 runs in this process).",
)
DaskOpt = typer.Option(
    False, "--dask", help="Run on a local Dask cluster (needs dlmin\\[dask])."
)
SchedulerOpt = typer.Option(None, "--scheduler", help="Address of a Dask scheduler.")
SchedulerFileOpt = typer.Option(None, "--scheduler-file", help="A Dask scheduler file.")
ShardOpt = typer.Option(
    None,
    "--shard",
    metavar="I/N",
    help="Only shard I of N (0 <= I < N), e.g. for job arrays.",
)


class Execution:
    """How to execute: executor choice and the shard, from the command line."""

    def __init__(
        self, workers=None, dask=False, scheduler=None, scheduler_file=None, shard=None
    ):
        from dlmin.core.executors import parse_shard

        self.workers, self.dask = workers, dask
        self.scheduler = scheduler
        self.scheduler_file = str(scheduler_file) if scheduler_file else None
        try:
            self.shard = parse_shard(shard) if shard else None
        except ValueError as exc:
            fail_usage(str(exc))

    def summaries(self, runs, force, start, inner):
        from dlmin.core import executors as ex

        ex.clean_partials(runs)
        done, runs = ex.split_done(runs, force)
        yield from done
        if not runs:
            return
        if self.dask or self.scheduler or self.scheduler_file:
            yield from ex.run_dask(
                runs, self.scheduler, self.scheduler_file, self.workers, force
            )
            return
        workers = min(self.workers or ex.default_workers(), len(runs))
        if workers <= 1:
            yield from ex.run_serial(
                runs,
                force,
                progress=inner,
                on_start=lambda r: start(f"{r.experiment}/{r.run_id}"),
            )
        else:
            yield from ex.run_pool(runs, workers, force)


def execute_runs(runs, force, as_json, quiet, execution=None):
    """Run the planned runs with the chosen executor; return the exit code."""
    from dlmin.core.executors import select_shard

    execution = execution or Execution(workers=1)
    runs = select_shard(runs, execution.shard)
    failed = 0
    with run_progress(len(runs), quiet) as (start, advance, inner):
        for summary in _guarded(execution.summaries(runs, force, start, inner)):
            advance()
            emit_row(summary, as_json)
            if summary["status"] == "failed":
                failed += 1
                if not quiet:
                    err_console.print(
                        f"[red]failed[/] {summary['experiment']}/"
                        f"{summary['run_id']}: {summary['message']}",
                        soft_wrap=True,
                        markup=True,
                    )
    if not quiet and not runs:
        err_console.print("no runs selected")
    if not quiet and failed:
        err_console.print(f"{failed} of {len(runs)} runs failed")
    return EXIT_FAILED if failed else EXIT_OK


def _guarded(summaries):
    """Turn an executor that cannot start (Dask missing) into a usage error."""
    try:
        yield from summaries
    except RuntimeError as exc:
        fail_usage(str(exc))


def run_kind(kind, spec, names, out, force, as_json, quiet, execution):
    _, runs = load_and_plan(spec, out, names, kinds=[kind] if kind else None)
    raise typer.Exit(execute_runs(runs, force, as_json, quiet, execution))


def _kind_command(app, kind, doc):
    def command(
        spec: Path = SpecArg,
        names: Optional[List[str]] = NamesOpt,
        out: Path = OutOpt,
        force: bool = ForceOpt,
        as_json: bool = JsonOpt,
        quiet: bool = QuietOpt,
        workers: Optional[int] = WorkersOpt,
        dask: bool = DaskOpt,
        scheduler: Optional[str] = SchedulerOpt,
        scheduler_file: Optional[Path] = SchedulerFileOpt,
        shard: Optional[str] = ShardOpt,
    ):
        execution = Execution(
            workers,
            dask,
            scheduler,
            scheduler_file,
            shard,
        )
        run_kind(kind, spec, names, out, force, as_json, quiet, execution)

    command.__doc__ = doc
    app.command(name=kind or "run")(command)


KIND_COMMANDS = {
    None: "Run every experiment of a spec, each by its kind.",
    "construct": "Build explicit zero-loss ReLU minimizers (kind: construct) and "
    "certify them.",
    "flow": "Integrate standard, adapted and homotopy gradient flows, or train by "
    "SGD (kind: flow).",
    "trap": "Find trapped stretches of standard-flow orbits and check the trapping "
    "bound (kind: trap).",
    "landscape": "Map the cost around a minimizer: slices, a plane and perturbed, "
    "trained trials (kind: landscape).",
}


def register(app):
    for kind, doc in KIND_COMMANDS.items():
        _kind_command(app, kind, doc)
