"""Progress output (ensemblecam.progress): stage summary lines in plain mode, nothing in
quiet mode, bars only in rich mode, the --progress flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemblecam import progress
from ensemblecam.cli import app
from ensemblecam.pipeline.run import Runner


def _stage_twice(root: Path) -> None:
    """One stage that runs (with a bar and a log line), then the same stage cached."""
    runner = Runner(root)
    folder = root / "fold0" / "train" / "m"

    def work(force: bool) -> None:
        for _ in progress.bar(range(3), desc="epochs", unit="epochs"):
            pass
        progress.info("train m fold0 epoch 1/1: train_loss 0.5000")
        folder.mkdir(parents=True, exist_ok=True)

    assert runner.stage("fold0/train/m", folder, "k1", None, work)
    assert not runner.stage("fold0/train/m", folder, "k1", None, work)


def test_plain_mode_prints_one_line_per_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with progress.configure("plain"):
        _stage_twice(tmp_path)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "train m fold0 epoch 1/1: train_loss 0.5000"
    assert lines[1].startswith("✓ fold0/train/m  ") and lines[1].endswith("s")
    assert lines[2] == "· fold0/train/m  cached"
    assert len(lines) == 3 and err == ""  # no bars


def test_quiet_mode_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with progress.configure("quiet"):
        _stage_twice(tmp_path)
    assert capsys.readouterr() == ("", "")


def test_rich_mode_shows_bars_and_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with progress.configure("rich"):
        _stage_twice(tmp_path)
        assert progress._display is None  # the stage's display is closed again
    out = capsys.readouterr().out
    assert "✓ fold0/train/m  " in out and "· fold0/train/m  cached" in out


def test_disabled_bar_and_mode_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    with progress.configure("rich"):
        bar = progress.bar(total=2, enabled=False)  # a loop's progress=False: no bar
        assert bar.task is None
        bar.update()
        bar.close()
        assert progress.mode() == "rich"
    assert progress.ENV not in __import__("os").environ
    assert progress.mode() == "plain"  # auto: stderr is not a terminal under pytest


def test_duration() -> None:
    assert progress.duration(0.44) == "0.4s"
    assert progress.duration(72.9) == "1m12s"
    assert progress.duration(7505) == "2h05m"


def test_bad_progress_flag(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["split", "--progress", "loud", "--store", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "error: --progress 'loud': expected one of auto, rich, plain, quiet"
    )
