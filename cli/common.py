"""What every command shares: stderr console, errors, output rows, progress.

stdout carries data only (one line or one JSON object per run); progress,
warnings and errors go to stderr and progress stays off when stderr is not
a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager

import typer
from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

err_console = Console(stderr=True, highlight=False)


def fail_usage(message):
    """Report bad usage on stderr and exit 2."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def report_spec_errors(errors):
    """Print every spec error, one per line, and exit 2."""
    for e in errors.errors:
        err_console.print(f"[bold red]error:[/] {_escape(str(e))}", soft_wrap=True)
    n = len(errors.errors)
    err_console.print(f"{n} problem{'s' * (n != 1)} found; nothing was run or written.")
    raise typer.Exit(EXIT_USAGE)


def _escape(text):
    from rich.markup import escape

    return escape(text)


def load_and_plan(spec_path, out_dir, names, kinds=None):
    """Load a spec and expand it, turning spec problems into exit 2."""
    from dlmin.core.spec import SpecErrors, load_spec, plan

    try:
        spec = load_spec(spec_path)
        return spec, plan(spec, out_dir, names or None, kinds)
    except SpecErrors as errors:
        report_spec_errors(errors)


def json_safe(value):
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    return value


def emit_row(summary, as_json):
    """One line per run on stdout: JSON, or path, status, run and cost."""
    if as_json:
        sys.stdout.write(json.dumps(json_safe(summary)) + "\n")
    else:
        cost, kind = summary.get("cost"), summary.get("cost_kind", "cost")
        if cost is None and summary.get("nc1") is not None:
            cost, kind = summary["nc1"], "nc1"
        cost_text = f"{kind}={cost:.3e}" if cost is not None else "-"
        fields = [
            summary["path"],
            summary["status"],
            f"{summary['experiment']}/{summary['run_id']}",
            cost_text,
        ]
        sys.stdout.write("\t".join(fields) + "\n")
    sys.stdout.flush()


def show_progress(quiet):
    return not quiet and err_console.is_terminal


@contextmanager
def run_progress(total, quiet):
    """A rich progress bar on stderr, or a no-op when quiet or not a terminal.

    Yields ``(start, advance, inner)``: ``start(text)`` names the current run,
    ``advance()`` counts it done and ``inner(done, total)`` is the progress
    callback handed to the core.
    """
    if not show_progress(quiet):
        yield (lambda text: None), (lambda: None), None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    with progress:
        runs = progress.add_task("runs", total=total)
        step = progress.add_task("", total=1, visible=False)

        def start(text):
            progress.update(step, description=f"  {text}", completed=0, visible=True)

        def inner(done, n):
            progress.update(step, completed=done, total=n)

        yield start, lambda: progress.advance(runs), inner
