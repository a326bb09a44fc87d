"""`dlmin validate` and `dlmin plan`: check a spec, list its runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from .common import fail_usage, load_and_plan
from .runcmd import JsonOpt, NamesOpt, OutOpt, ShardOpt, SpecArg


def register(app):
    @app.command()
    def validate(spec: Path = SpecArg, as_json: bool = JsonOpt):
        """Check a spec without running or writing anything (exit 2 on any problem)."""
        parsed, runs = load_and_plan(spec, Path("results"), None)
        n_exp = len(parsed.experiments)
        if as_json:
            print(
                json.dumps({
                    "spec": str(spec),
                    "valid": True,
                    "experiments": n_exp,
                    "runs": len(runs),
                })
            )
        else:
            print(f"{spec}: valid, {n_exp} experiments, {len(runs)} runs")

    @app.command()
    def plan(
        spec: Path = SpecArg,
        names: Optional[List[str]] = NamesOpt,
        out: Path = OutOpt,
        as_json: bool = JsonOpt,
        shard: Optional[str] = ShardOpt,
    ):
        """List the runs a spec expands to, with run ids and output files."""
        from dlmin.core.executors import parse_shard, select_shard
        from dlmin.core.store import is_done

        _, runs = load_and_plan(spec, out, names)
        try:
            runs = select_shard(runs, parse_shard(shard) if shard else None)
        except ValueError as exc:
            fail_usage(str(exc))
        for run in runs:
            done = is_done(run.path, run.spec_hash)
            if as_json:
                row = {
                    "experiment": run.experiment,
                    "run_id": run.run_id,
                    "kind": run.kind,
                    "path": str(run.path),
                    "seed": run.seed,
                    "point": run.point,
                    "spec_hash": run.spec_hash,
                    "done": done,
                }
                sys.stdout.write(json.dumps(row) + "\n")
            else:
                state = "done" if done else "todo"
                sys.stdout.write(
                    f"{run.path}\t{run.experiment}/{run.run_id}\t{state}\n"
                )
