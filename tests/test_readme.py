"""The README's examples run as written."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_api_example_runs():
    block = re.search(r"## Python API.*?```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["net"].certified and namespace["result"].status == "ok"


def test_documented_commands_exist():
    from typer.testing import CliRunner

    from dlmin.cli.app import app

    names = set(re.findall(r"^### `dlmin (\w+)", README, re.M))
    assert {
        "construct",
        "flow",
        "collapse",
        "run",
        "validate",
        "show",
        "gather",
        "plot",
        "predict",
    } <= names
    for name in names:
        assert CliRunner().invoke(app, [name, "--help"]).exit_code == 0, name
