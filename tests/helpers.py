"""Small spec files for CLI and spec tests."""

import textwrap
from pathlib import Path

SMALL = """\
defaults:
  seed: 3
experiments:
  - name: small
    kind: construct
    data: {source: clusters, classes: 3, dim: 3, points: [20, 25, 30], radius: 0.05}
    network: {hidden: [3, 3, 3]}
    construct: {heldout: 20}
  - name: sweep
    kind: construct
    data: {source: clusters, classes: 2, dim: 3, points: 15, radius: 0.05}
    sweep:
      data.radius: [0.02, 0.6]
      seed: [0, 1]
"""


def write_spec(tmp_path, text=SMALL, name="spec.yaml"):
    path = Path(tmp_path) / name
    path.write_text(textwrap.dedent(text))
    return path
