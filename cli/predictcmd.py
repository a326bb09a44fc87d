"""`dlmin predict`: apply a stored network to new inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import fail_usage, json_safe
from .runcmd import JsonOpt


def register(app):
    @app.command()
    def predict(
        result: Path = typer.Argument(..., help="A result file holding a network."),
        inputs: Path = typer.Argument(..., help="Inputs: .npz with X, or .csv."),
        out: Optional[Path] = typer.Option(
            None,
            "--out",
            "-o",
            help="Write outputs and classes to .npz or .csv instead of stdout.",
        ),
        as_json: bool = JsonOpt,
    ):
        """Apply a stored network to new inputs: outputs, classes, truncation rule."""
        import numpy as np
        from dlmin.core.predict import load_inputs, load_network
        from dlmin.core.predict import predict as apply

        try:
            net = load_network(result)
            X, labels = load_inputs(inputs)
            pred = apply(net, X)
        except (ValueError, OSError) as exc:
            fail_usage(str(exc))
        summary = {
            "result": str(result),
            "inputs": str(inputs),
            "n": int(X.shape[0]),
            "agreement": pred.agreement,
        }
        if labels is not None and pred.classes is not None:
            summary["accuracy"] = float(np.mean(pred.classes == labels))
        if out is not None:
            _write(out, pred)
            summary["out"] = str(out)
        if as_json:
            print(json.dumps(json_safe(summary)))
        elif out is None:
            _print_rows(pred)
        if not as_json:
            _note(summary)


def _columns(pred):
    import numpy as np

    cols = {"class": pred.classes, "metric_class": pred.metric_classes}
    names = [k for k, v in cols.items() if v is not None]
    table = [cols[k][:, None] for k in names] + [pred.outputs]
    names += [f"out{q}" for q in range(pred.outputs.shape[1])]
    return names, np.hstack(table)


def _print_rows(pred):
    names, table = _columns(pred)
    sys.stdout.write(",".join(names) + "\n")
    n_int = len(names) - pred.outputs.shape[1]
    for row in table:
        ints = [str(int(v)) for v in row[:n_int]]
        sys.stdout.write(",".join(ints + [repr(float(v)) for v in row[n_int:]]) + "\n")


def _write(path, pred):
    import numpy as np

    if path.suffix == ".npz":
        arrays = {"outputs": pred.outputs}
        if pred.classes is not None:
            arrays["classes"] = pred.classes
        if pred.metric_classes is not None:
            arrays["metric_classes"] = pred.metric_classes
        np.savez(path, **arrays)
    elif path.suffix == ".csv":
        names, table = _columns(pred)
        np.savetxt(path, table, delimiter=",", header=",".join(names), comments="")
    else:
        fail_usage(f"{path}: unknown output type {path.suffix!r}; allowed: .npz, .csv")


def _note(summary):
    from .common import err_console

    parts = [f"{summary['n']} inputs"]
    if summary.get("accuracy") is not None:
        parts.append(f"accuracy {summary['accuracy']:.4f} against the given labels")
    if summary.get("agreement") is not None:
        parts.append(
            f"output rule and truncation rule agree on {summary['agreement']:.2%}"
        )
    err_console.print("; ".join(parts))
