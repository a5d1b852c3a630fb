"""The README's set-up commands, CI script and demo table cannot drift from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ensemblecam.pipeline import demo_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(name: str) -> str:
    m = re.search(f"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert m, name
    return m.group(1)


def test_demo_table_equals_committed_demo_output() -> None:
    """``docs/demo/`` holds results.json and run.json of a real ``ensemblecam demo`` run;
    the README quotes exactly the demo.md the demo writes from them."""
    results = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())
    record = json.loads((ROOT / "docs" / "demo" / "run.json").read_text())
    assert record["status"] == "complete"
    assert _block("demo-table") == demo_markdown(results, record)


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    assert commands[0].endswith("ensemblecam demo") and "constraints.txt" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_python_api_examples_run() -> None:
    """Every ``python`` block of the README's "Python API" section runs, in order, as is."""
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["pred"].shape == namespace["masks"].shape


def test_public_api_names_resolve() -> None:
    import ensemblecam

    for name in ensemblecam.__all__:
        assert getattr(ensemblecam, name) is not None, name
    assert issubclass(ensemblecam.InputError, ValueError)
