"""The README's set-up commands, CI script and demo table cannot drift from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def test_own_data_commands_run(tmp_path: Path, monkeypatch: Any) -> None:
    """The "Your own data" section's commands run as written on tiny generated data: a
    folder-layout phantom with slice labels only and configs/own-data.yaml with its
    training sizes made tiny (its data, labels, search and run settings kept)."""
    import shlex

    import yaml
    from typer.testing import CliRunner

    from ensemblecam.cli import app
    from ensemblecam.config import SynthConfig, load_config
    from ensemblecam.synth import synth_dataset
    from nifti_factory import folder_from_brats

    section = README.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(blocks) == 1
    synth_dataset(
        SynthConfig(out=tmp_path / "phantom", n_cases=6, shape=(48, 48, 12), seed=3, workers=1)
    )
    folder_from_brats(tmp_path / "phantom", tmp_path / "mydata")
    cfg = load_config(ROOT / "configs" / "own-data.yaml").model_dump(mode="json")
    assert cfg["prepare"]["labels_csv"] == "mydata/labels.csv"
    assert cfg["prepare"]["layout"] == "folder" and not cfg["run"]["unet"]
    cfg["split"]["folds"] = 2
    cfg["train"].update(model_args={"width": 8}, epochs=1, batch_size=16, accelerator="cpu")
    cfg["cam"].update(batch_size=64, accelerator="cpu")
    cfg["unet"].update(epochs=1, channels=[4, 8], strides=[2], num_res_units=0, accelerator="cpu")
    cfg["run"]["models"] = ["simplecnn"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "own-data.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    for line in blocks[0].splitlines():
        args = shlex.split(line)
        assert args[0] == "ensemblecam"
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, (line, result.output)
    assert (tmp_path / "mystore" / "slices.csv").is_file()
    run = tmp_path / "runs" / "mine"
    assert len(list((run / "export").rglob("*.nii.gz"))) == 6
    assert (run / "report" / "report.html").is_file()
    assert json.loads((run / "results.json").read_text())["scored"] is False
