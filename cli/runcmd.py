"""`dlmin run` and the per-kind commands (`dlmin construct`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (EXIT_FAILED, EXIT_OK, emit_row, err_console, load_and_plan,
                     run_progress)

SpecArg = typer.Argument(Path("experiments.yaml"), help="YAML spec of the experiments.",
                         show_default=True)
NamesOpt = typer.Option(None, "--experiment", "-e",
                        help="Only this experiment (repeat for several).")
OutOpt = typer.Option(Path("results"), "--out", "-o", help="Folder for result files.")
ForceOpt = typer.Option(False, "--force", help="Redo runs whose complete result exists.")
JsonOpt = typer.Option(False, "--json", help="One JSON object per run on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr.")


def execute_runs(runs, force, as_json, quiet):
    """Run every planned run in turn; return the exit code."""
    from dlmin.core.runs import execute

    failed = 0
    with run_progress(len(runs), quiet) as (start, advance, inner):
        for run in runs:
            start(f"{run.experiment}/{run.run_id}")
            summary = execute(run, force=force, progress=inner)
            advance()
            emit_row(summary, as_json)
            if summary["status"] == "failed":
                failed += 1
                if not quiet:
                    err_console.print(f"[red]failed[/] {run.experiment}/{run.run_id}: "
                                      f"{summary['message']}", soft_wrap=True, markup=True)
    if not quiet and not runs:
        err_console.print("no runs selected")
    if not quiet and failed:
        err_console.print(f"{failed} of {len(runs)} runs failed")
    return EXIT_FAILED if failed else EXIT_OK


def run_kind(kind, spec, names, out, force, as_json, quiet):
    _, runs = load_and_plan(spec, out, names, kinds=[kind] if kind else None)
    raise typer.Exit(execute_runs(runs, force, as_json, quiet))


def register(app):
    @app.command()
    def run(spec: Path = SpecArg, names: Optional[List[str]] = NamesOpt, out: Path = OutOpt,
            force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt):
        """Run every experiment of a spec, each by its kind."""
        run_kind(None, spec, names, out, force, as_json, quiet)

    @app.command()
    def construct(spec: Path = SpecArg, names: Optional[List[str]] = NamesOpt,
                  out: Path = OutOpt, force: bool = ForceOpt, as_json: bool = JsonOpt,
                  quiet: bool = QuietOpt):
        """Build explicit zero-loss ReLU minimizers (kind: construct) and certify them."""
        run_kind("construct", spec, names, out, force, as_json, quiet)

    @app.command()
    def flow(spec: Path = SpecArg, names: Optional[List[str]] = NamesOpt, out: Path = OutOpt,
             force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt):
        """Integrate standard, adapted and homotopy gradient flows (kind: flow)."""
        run_kind("flow", spec, names, out, force, as_json, quiet)
