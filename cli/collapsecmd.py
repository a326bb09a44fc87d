"""`dlmin collapse`: neural-collapse metrics from a spec, or of a features file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .common import err_console, fail_usage, json_safe
from .runcmd import (
    DaskOpt,
    Execution,
    ForceOpt,
    JsonOpt,
    NamesOpt,
    OutOpt,
    QuietOpt,
    SchedulerFileOpt,
    SchedulerOpt,
    ShardOpt,
    SpecArg,
    WorkersOpt,
    run_kind,
)

FeaturesOpt = typer.Option(
    None,
    "--features",
    help="Measure this .npz (features (N, D), labels (N,), optional W, "
    "b, predictions, heldout_features, heldout_labels) instead of "
    "running a spec; streamed in two passes.",
)


def register(app):
    @app.command()
    def collapse(
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
        features: Optional[Path] = FeaturesOpt,
        weighting: str = typer.Option(
            "balanced", help="balanced | sample (with --features)."
        ),
        ddof: int = typer.Option(0, min=0, max=1, help="0 or 1 (with --features)."),
        rank_tol: Optional[float] = typer.Option(
            None, help="Relative rank tolerance (with --features)."
        ),
        center_classifier: bool = typer.Option(
            False, help="Centre W's rows before NC2/NC3 (with --features)."
        ),
    ):
        """Neural-collapse metrics per layer and over time, and the effective flow
        (kind: collapse); or, with --features, of features from any framework."""
        if features is None:
            execution = Execution(
                workers,
                dask,
                scheduler,
                scheduler_file,
                shard,
            )
            run_kind("collapse", spec, names, out, force, as_json, quiet, execution)
        if weighting not in ("balanced", "sample"):
            fail_usage(f"--weighting: found {weighting!r}; allowed: balanced, sample")
        _features(
            features,
            as_json,
            quiet,
            {
                "weighting": weighting,
                "ddof": ddof,
                "rank_tol": rank_tol,
                "center_classifier": center_classifier,
            },
        )


def _features(path, as_json, quiet, options):
    from dlmin.core.collapse_run import features_file_metrics
    from dlmin.core.runs import RunFailure

    start = time.perf_counter()
    try:
        result = features_file_metrics(path, options)
    except (RunFailure, ValueError, OSError) as exc:
        fail_usage(str(exc))
    row = dict(result.as_dict(), path=str(path), wall_time=time.perf_counter() - start)
    if as_json:
        sys.stdout.write(json.dumps(json_safe(row)) + "\n")
        return
    keys = (
        "nc1",
        "nc1_quotient",
        "cdnv",
        "equinorm_means",
        "equiangular_means",
        "maxangle_means",
        "self_duality",
        "ncc_mismatch",
        "rank",
    )
    sys.stdout.write(
        "\t".join([str(path)] + [f"{k}={_fmt(row.get(k))}" for k in keys]) + "\n"
    )
    if not quiet and row.get("warnings"):
        err_console.print(f"note: {row['warnings']}", soft_wrap=True)


def _fmt(value):
    return (
        "-"
        if value is None
        else (f"{value:.4g}" if isinstance(value, float) else value)
    )
