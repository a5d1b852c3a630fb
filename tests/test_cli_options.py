"""CLI flags generated from the config models: every field a flag, flags over the YAML,
help a person can read at 80-120 columns."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.cli.options import config_command
from ensemblecam.config import PRESETS, Config

#: config section -> command; every stage section has one
STAGES = (
    "synth", "prepare", "split", "train", "search", "evaluate", "cam", "run", "unet", "mil",
    "refine",
)  # fmt: skip
#: the one flag not named after its field: evaluate's chosen configuration (best.json),
#: since --config is the YAML in every command
RENAMED = {("evaluate", "config_file"): "--best", ("refine", "config_file"): "--best"}


def _commands() -> dict:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _model(section: str) -> type[BaseModel]:
    return type(getattr(Config(), section))


def _flags(command) -> tuple[set[str], set[str]]:
    opts = {o for p in command.params for o in p.opts}
    secondary = {o for p in command.params for o in getattr(p, "secondary_opts", [])}
    return opts, secondary


def _help(args: list[str], columns: int) -> str:
    """``ensemblecam ARGS --help`` in a terminal of ``columns`` (CliRunner forces 80)."""
    out = io.StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": str(columns)}), redirect_stdout(out):
        typer.main.get_command(app).main(
            [*args, "--help"], prog_name="ensemblecam", standalone_mode=False
        )
    return out.getvalue()


def _squash(text: str) -> str:
    return "".join(text.split())


def test_every_config_field_is_a_flag() -> None:
    assert set(STAGES) == set(Config.model_fields)  # a new section needs a command here
    commands = _commands()
    for section in STAGES:
        opts, secondary = _flags(commands[section])
        assert "--config" in opts or section == "run", section  # run takes CONFIG
        for name, info in _model(section).model_fields.items():
            flag = RENAMED.get((section, name), "--" + name.replace("_", "-"))
            assert flag in opts, (section, name)
            if info.annotation is bool:
                assert "--no-" + flag[2:] in secondary, (section, name)


def test_evaluate_has_one_name_per_concept() -> None:
    opts, _ = _flags(_commands()["evaluate"])
    assert {"--best", "--config"} <= opts and "--config-file" not in opts
    r = CliRunner().invoke(app, ["evaluate", "--config-file", "x.json"])
    assert r.exit_code == 2


def _recorder(section: str) -> tuple[typer.Typer, list]:
    """A one-command app whose command records the config it is given."""
    rec_app = typer.Typer(rich_markup_mode=None)
    seen: list = []

    @config_command(rec_app, "go", section)
    def go(cfg) -> None:
        seen.append(cfg)

    @rec_app.command("other")  # two commands, so `go` is a subcommand as in the real app
    def other() -> None:
        pass

    return rec_app, seen


def test_flags_override_yaml_and_unset_flags_keep_it(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "train:\n  epochs: 7\n  lr: 0.5\n  devices: 2\n  model_args: {a: 1}\n"
        "  resume: true\n  blur_sigma: [0.3, 0.4]\n"
    )
    rec_app, seen = _recorder("train")
    r = CliRunner().invoke(rec_app, [
        "go", "--config", str(cfg_file), "--lr", "0.1", "--devices", "auto", "--fold", "fold-a",
        "--model-args", '{"b": 2}', "--no-resume", "--optimizer", "adam", "--blur-sigma",
        "0.1,0.2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert cfg.epochs == 7 and cfg.lr == 0.1 and cfg.devices == "auto" and cfg.fold == "fold-a"
    assert cfg.model_args == {"b": 2} and cfg.resume is False and cfg.optimizer == "adam"
    assert cfg.blur_sigma == (0.1, 0.2) and cfg.seed == 0 and cfg.preset == "paper"
    # no flags: the YAML as it is; digits give an int for int|str fields
    r = CliRunner().invoke(rec_app, ["go", "-c", str(cfg_file), "--fold", "2"])
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert cfg.lr == 0.5 and cfg.devices == 2 and cfg.resume is True and cfg.fold == 2
    assert cfg.model_args == {"a": 1} and cfg.blur_sigma == (0.3, 0.4)
    # without --config: the model's defaults
    assert CliRunner().invoke(rec_app, ["go"]).exit_code == 0
    assert seen[-1] == Config().train


def test_list_literal_and_str_fold_flags(tmp_path: Path) -> None:
    rec_app, seen = _recorder("cam")
    r = CliRunner().invoke(rec_app, [
        "go", "--methods", "gradcam, scorecam", "--methods", "layercam", "--checkpoints",
        "a.pt,b.pt", "--parts", "test", "--raw", "--score-precision", "bf16"])  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert cfg.methods == ["gradcam", "scorecam", "layercam"]
    assert cfg.checkpoints == [Path("a.pt"), Path("b.pt")] and cfg.parts == ["test"]
    assert cfg.raw is True and cfg.score_precision == "bf16" and cfg.tags is None
    rec_app, seen = _recorder("unet")
    r = CliRunner().invoke(rec_app, ["go", "--out-channels", "1", "--channels", "8,16"])
    assert r.exit_code == 0, r.output
    assert seen[-1].out_channels == 1 and seen[-1].channels == [8, 16]
    rec_app, seen = _recorder("search")
    assert CliRunner().invoke(rec_app, ["go", "--fold", "1"]).exit_code == 0
    assert seen[-1].fold == "1"  # search's fold is a string


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "error: --epochs '0': Input should be greater than or equal to 1"),
    (["--optimizer", "rmsprop"], "error: --optimizer 'rmsprop': Input should be 'sgd', "),
    (["--blur-sigma", "0.1"], "error: --blur-sigma '0.1': expected 2 comma-separated values"),
    (["--model-args", "[1]"], "error: --model-args '[1]': not a JSON object"),
    (["--lr", "fast"], "error: --lr 'fast': Input should be a valid number"),
])  # fmt: skip
def test_bad_flag_value_is_one_line_before_any_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["train", "--store", str(tmp_path / "none"), "--out", str(out), *args]
    )
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message) and r.output.count("\n") == 1, r.output
    assert not out.exists()


def test_synth_flag_over_yaml_end_to_end(tmp_path: Path) -> None:
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("synth:\n  n_cases: 3\n  seed: 5\n  layout: msd\n")
    out = tmp_path / "ph"
    r = CliRunner().invoke(
        app,
        [
            "synth",
            "-c",
            str(cfg_file),
            "--n-cases",
            "1",
            "--shape",
            "32,32,8",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "wrote 1 msd phantom cases (32x32x8)" in r.output
    record = json.loads(next(out.rglob("phantom.json")).read_text())
    assert record["seed"] == 5 and record["n_cases"] == 1 and record["layout"] == "msd"


def _default(value) -> str | None:
    if value is None or value in ([], {}, ()):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_help_is_readable(columns: int) -> None:
    for name in ["", *_commands()]:
        text = _help([name] if name else [], columns)
        for leak in ("<bool>", "list[", "Path]", "…", "NoneType", "typing."):
            assert leak not in text, (name, leak)
        assert max(map(len, text.splitlines())) <= columns, name
        if name not in STAGES:
            continue
        flat = _squash(text)
        for field, info in _model(name).model_fields.items():
            assert _squash(info.description or "") in flat, (name, field)  # nothing cut
            default = _default(info.get_default(call_default_factory=True))
            if default is not None:
                assert _squash(f"[default: {default}]") in flat, (name, field)


def test_help_snapshots() -> None:
    cam = _help(["cam"], 100)
    assert re.search(
        r"--methods <str,\.\.\.>\s+cam, gradcam, gradcampp, smoothgradcampp, "
        r"xgradcam, layercam,\s+scorecam \[default: gradcam\]",
        cam,
    ), cam
    assert re.search(r"--raw / --no-raw\s+store un-normalised maps .*\[default: off\]", cam)
    assert "--score-precision <fp32|bf16>" in cam and "--fold <int|str>" in cam
    assert "--checkpoints <path,...>" in cam and "[default: train,val,test]" in cam
    train = _squash(_help(["train"], 100))
    for preset, recipe in PRESETS.items():  # --preset says what it sets
        assert _squash(f"{preset} = " + ", ".join(f"{k} {v}" for k, v in recipe.items())) in train
    assert _squash("--model-args <json>") in train and _squash("--devices <int|str>") in train
    run = _help(["run"], 100)
    assert re.search(r"--unet / --no-unet\s+fully supervised .*\[default: on\]", run)
    assert "--folds <int,...>" in run
    assert "--shape <int,int,int>" in _help(["synth"], 100)
    assert "--best <path>" in _help(["evaluate"], 100)


def test_console_script_help_at_100_columns() -> None:
    """The real entry point (a subprocess, COLUMNS=100) wraps at 100 columns, cuts nothing."""
    code = "from ensemblecam.cli import main; main()"
    r = subprocess.run(
        [sys.executable, "-c", code, "cam", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 100 and max(map(len, lines)) > 90
    assert r.stdout == _help(["cam"], 100).replace("Usage: ensemblecam", "Usage: -c")
