"""`dlmin gather`: one table row per run of a results folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import err_console, fail_usage


def register(app):
    @app.command()
    def gather(
        folder: Path = typer.Argument(Path("results"), help="A results folder."),
        out: Optional[Path] = typer.Option(
            None,
            "--out",
            "-o",
            help="Table file: .csv, or .parquet (pyarrow); default CSV on stdout.",
        ),
    ):
        """One row per run (sweep values, status, summary scalars): CSV or Parquet."""
        from dlmin.core.gather import gather as collect
        from dlmin.core.gather import write_csv, write_table

        if not folder.is_dir():
            fail_usage(f"{folder}: not a folder")
        rows, columns = collect(folder)
        if out is None:
            write_csv(rows, columns, sys.stdout)
            return
        try:
            write_table(rows, columns, out)
        except RuntimeError as exc:
            fail_usage(str(exc))
        print(out)
        err_console.print(f"{len(rows)} runs, {len(columns)} columns")
