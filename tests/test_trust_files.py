"""Trust in files (issue 12, part A): no code runs from a checkpoint, ``--force`` never
touches data ensemblecam did not write, refusals leave nothing, a partial is resumed only
by its own stage key, one process per output folder, strict JSON.

Every refusal is checked the same way (:func:`refused`): exit code 2, exactly one line on
stderr (``error: ...``, naming the file or value), no traceback, inputs byte-identical,
nothing left behind (no output folder, no ``.partial``/``.work``/``.lock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from ensemblecam import models, pipeline
from ensemblecam.cli import app
from ensemblecam.config import Config, UNetConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.models.segmenters import load_unet
from ensemblecam.stages import unet
from nets import tiny_checkpoint
from nifti_factory import brats_dataset
from store_factory import build_store

REFUSED = "refused: loading it would need unpickling arbitrary objects"


pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs a shell command creating ``marker`` (an attacker's checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def payload_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A file that looks like our checkpoint but carries :class:`Payload`."""
    args = {"in_channels": 1, "num_classes": 2, "width": 4}
    model = models.build_model("simplecnn", **args)
    obj = {
        "format": models.CHECKPOINT_FORMAT,
        "version": models.CHECKPOINT_VERSION,
        "info": {
            "model": "simplecnn",
            "model_args": args,
            "channels": ["flair"],
            "size": [32, 32],
            "epoch": 1,
            "cam_layer": "features",
        },
        "state_dict": model.state_dict(),
        "train_state": {"rng": Payload(marker)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _dots(folders: Iterable[Path]) -> set[Path]:
    return {p for d in folders if d.is_dir() for p in d.iterdir() if p.name.startswith(".")}


def refused(
    args: list[Any],
    names: Iterable[Any],
    inputs: Iterable[Path] = (),
    absent: Iterable[Path] = (),
    clean: Iterable[Path] = (),
) -> str:
    """Invoke the CLI; check a clean refusal (see the module docstring); return the line."""
    inputs, clean = list(inputs), list(clean)
    before, dots = digest(inputs), _dots(clean)
    res = CliRunner().invoke(app, [str(a) for a in args])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert digest(inputs) == before
    for p in absent:
        assert not p.exists(), p
    assert _dots(clean) == dots, _dots(clean) - dots
    return lines[0]


def ok(args: list[Any]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _fake_run(root: Path, checkpoint_marker: Path | None = None) -> Path:
    """A finished-looking run folder (config, results, best.json) for ``predict``; its
    classifier is a payload checkpoint when ``checkpoint_marker`` is given."""
    cfg = Config.model_validate(
        {
            "prepare": {"layout": "brats", "workers": 1, "modalities": ["flair"]},
            "cam": {"methods": ["gradcam"], "accelerator": "cpu"},
        }
    )
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    fsutil.write_json(root / "results.json", {"folds": ["fold0"], "objective": "paper_miou"})
    fsutil.write_json(
        root / "fold0" / "search" / "best.json",
        {
            "operator": "and",
            "members": ["simplecnn__gradcam"],
            "thresholds": [0.5],
            "gate": None,
            "objective": "paper_miou",
            "paper_miou": 0.5,
        },
    )
    ck = root / "fold0" / "models" / "simplecnn" / "best.pt"
    if checkpoint_marker is not None:
        payload_checkpoint(ck, checkpoint_marker)
    return root


# --------------------------------------------------------------------------- 1 checkpoints


@pytest.mark.parametrize("legacy", [False, True])
def test_payload_is_live_and_every_loader_refuses_it(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "PWNED"
    bad = payload_checkpoint(tmp_path / "bad.pt", marker, legacy)
    # the payload is real: a full unpickling runs it (so the checks below can fail)
    live = tmp_path / "LIVE"
    torch.load(payload_checkpoint(tmp_path / "live.pt", live, legacy), weights_only=False)
    assert live.exists()
    for load in (
        models.read_checkpoint,
        models.load_checkpoint,
        load_unet,
        lambda p: models.load_pretrained(models.build_model("simplecnn", 1), p),
    ):
        with pytest.raises(InputError, match=REFUSED) as exc:
            load(bad)
        assert "\n" not in str(exc.value) and str(bad) in str(exc.value)
    assert not marker.exists()


def test_own_checkpoints_hold_plain_data_only(tmp_path: Path, tiny_store: Path) -> None:
    """last.pt (optimizer, scheduler, RNG states, history) loads with weights_only=True,
    and the RNG states round-trip exactly."""
    from ensemblecam.config import TrainConfig
    from ensemblecam.stages import train
    from ensemblecam.training.fabric import rng_state, set_rng_state

    cfg = TrainConfig(
        store=tiny_store,
        out=tmp_path / "r",
        model="simplecnn",
        model_args={"width": 4},
        epochs=2,
        batch_size=16,
        optimizer="sgd",
        scheduler="step",
        step_size=1,
        lr=1e-2,
        accelerator="cpu",
    )
    assert train.train_classifier(cfg, progress=False, stop_after_epoch=1) is None
    state = torch.load(tmp_path / ".r.partial" / "last.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 1 and state["scheduler"]["last_epoch"] == 1
    np.random.seed(5)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    saved = rng_state()
    a = (np.random.random(4), np.random.normal(), torch.rand(2))
    set_rng_state(saved)
    b = (np.random.random(4), np.random.normal(), torch.rand(2))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and torch.equal(a[2], b[2])


def test_cli_entry_points_refuse_a_payload(tmp_path: Path, tiny_store: Path) -> None:
    marker = tmp_path / "PWNED"
    bad = payload_checkpoint(tmp_path / "in" / "bad.pt", marker)
    common = ["--store", tiny_store]
    # cam --checkpoints
    refused(
        ["cam", *common, "--checkpoints", bad, "--parts", "val", "--out", tmp_path / "maps"],
        [bad, "unpickling arbitrary objects"],
        [tiny_store, bad],
        [tmp_path / "maps"],
        [tmp_path],
    )
    # train --weights, and train --resume from a planted last.pt
    train = [
        "train",
        *common,
        "--model",
        "simplecnn",
        "--model-args",
        '{"width": 4}',
        "--epochs",
        "1",
        "--accelerator",
        "cpu",
    ]
    refused(
        [*train, "--weights", bad, "--out", tmp_path / "t1"],
        [bad],
        [tiny_store, bad],
        [tmp_path / "t1"],
        [tmp_path],
    )
    last = payload_checkpoint(tmp_path / ".t2.partial" / "last.pt", marker)
    refused(
        [*train, "--resume", "--out", tmp_path / "t2"],
        [last],
        [tiny_store, last],
        [tmp_path / "t2"],
        [tmp_path],
    )
    # unet resuming from a planted last.pt; pseudo-labels carrying a pickled object
    last = payload_checkpoint(tmp_path / ".u.partial" / "last.pt", marker)
    unet_cmd = ["unet", *common, "--epochs", "1", "--accelerator", "cpu"]
    refused(
        [*unet_cmd, "--out", tmp_path / "u"],
        [last],
        [tiny_store, last],
        [tmp_path / "u"],
        [tmp_path],
    )
    pseudo = tmp_path / "in" / "pseudo.npz"
    np.savez(
        pseudo,
        index=np.array([Payload(marker)], dtype=object),
        masks=np.zeros((1, 32, 32), np.uint8),
    )
    refused(
        [*unet_cmd, "--targets", pseudo, "--out", tmp_path / "p"],
        [pseudo],
        [tiny_store, pseudo],
        [tmp_path / "p"],
        [tmp_path],
    )
    # sanity never trains into (nor loads from) a folder ensemblecam did not write
    work = tmp_path / "work"
    payload_checkpoint(work / "run" / "best.pt", marker)
    refused(
        ["sanity", *common, "--model", "simplecnn", "--epochs", "1", "--work", work],
        [work / "run", "not written by ensemblecam"],
        [tiny_store, work],
        [work / "store"],
        [tmp_path, work],
    )
    # predict --run with a run folder whose classifier is a payload
    run = _fake_run(tmp_path / "run", marker)
    scans = tmp_path / "scans"
    brats_dataset(scans, n_cases=1, modalities=("flair",))
    refused(
        ["predict", "--run", run, "--input", scans, "--out", tmp_path / "masks"],
        [run / "fold0" / "models" / "simplecnn" / "best.pt", "unpickling"],
        [run, scans],
        [tmp_path / "masks", tmp_path / ".masks.work"],
        [tmp_path],
    )
    # ... and whose self-trained U-Net (what predict uses by default) is a payload
    own = run / "fold0" / "pseudo" / "best.pt"
    payload_checkpoint(own, marker)
    fsutil.write_json(run / "fold0" / "pseudo" / "unet.json", {"format": "ensemblecam-unet-run"})
    refused(
        ["predict", "--run", run, "--input", scans, "--out", tmp_path / "masks"],
        [own, "unpickling"],
        [run, scans],
        [tmp_path / "masks", tmp_path / ".masks.work"],
        [tmp_path],
    )
    assert not marker.exists()


# --------------------------------------------------------------------------- 2 --force


def test_force_never_replaces_inputs_or_foreign_folders(tmp_path: Path, tiny_store: Path) -> None:
    proj = tmp_path / "proj"
    data = proj / "data"
    brats_dataset(data, n_cases=2, modalities=("flair",))
    keep = [data, tiny_store]
    prep = ["prepare", "--layout", "brats", "--workers", "1", "--force"]
    refused(
        [*prep, "--data", data, "--out", data],
        [data, "output folder is the input"],
        keep,
        clean=[proj],
    )
    refused(
        [*prep, "--data", data, "--out", proj],
        [proj, data, "holds the input"],
        keep,
        clean=[tmp_path],
    )
    refused(
        [*prep, "--data", data, "--out", data / "store"],
        ["lies inside the input"],
        keep,
        [data / "store"],
        [proj, data],
    )
    (tmp_path / "link").symlink_to(data)
    refused([*prep, "--data", data, "--out", tmp_path / "link"], [data], keep, clean=[tmp_path])
    refused(
        ["predict", "--run", tmp_path / "run", "--input", data, "--out", data, "--force"],
        [data],
        keep,
        clean=[proj],
    )
    refused(
        ["export", "--store", tiny_store, "--ground-truth", "--out", data, "--force"],
        [data, "not written by ensemblecam"],
        keep,
        clean=[proj],
    )
    refused(
        ["export", "--store", tiny_store, "--ground-truth", "--out", tiny_store, "--force"],
        [tiny_store, "is the input"],
        keep,
        clean=[tmp_path],
    )
    # a user's folder with files but no marker: never replaced by any stage, even --force
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "scan.nii.gz").write_bytes(b"\x1f\x8b not really")
    keep.append(user)
    msg = [user, "not written by ensemblecam"]
    refused(["synth", "--out", user, "--n-cases", "1", "--force"], msg, keep, clean=[tmp_path])
    refused([*prep, "--data", data, "--out", user], msg, keep, clean=[tmp_path])
    refused(
        ["export", "--store", tiny_store, "--ground-truth", "--out", user, "--force"],
        msg,
        keep,
        clean=[tmp_path],
    )
    refused(
        ["train", "--store", tiny_store, "--model", "simplecnn", "--out", user, "--force"],
        msg,
        keep,
        clean=[tmp_path],
    )
    refused(["unet", "--store", tiny_store, "--out", user, "--force"], msg, keep, clean=[tmp_path])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "prepare": {"data": str(data), "layout": "brats"},
                "run": {"out": str(user), "models": ["simplecnn"]},
            }
        )
    )
    refused(["run", cfg, "--force"], msg, keep, clean=[tmp_path])
    # what ensemblecam wrote is replaced with --force (the marker is what makes it ours)
    out = tmp_path / "ph"
    synth = ["synth", "--out", out, "--n-cases", "1", "--shape", "32,32,8", "--workers", "1"]
    ok(synth)
    assert fsutil.owner_stage(out) is not None
    refused(synth, [out, "--force"], [*keep, out], clean=[tmp_path])
    ok([*synth, "--force"])
    assert not _dots([tmp_path]) - {tmp_path / "link"}


# --------------------------------------------------------------------------- 6 leftovers


def test_refusals_leave_nothing(tmp_path: Path, tiny_store: Path) -> None:
    ck = tiny_checkpoint(tmp_path / "in" / "s4" / "best.pt", ["flair"], [32, 32])
    keep = [tiny_store, ck]
    refused(
        [
            "search",
            "--store",
            tiny_store,
            "--maps",
            tmp_path / "nomaps",
            "--members",
            "s4__gradcam",
            "--out",
            tmp_path / "se",
        ],
        [],
        keep,
        [tmp_path / "se", tmp_path / ".se.partial"],
        [tmp_path],
    )
    refused(
        [
            "cam",
            "--store",
            tiny_store,
            "--checkpoints",
            ck,
            "--target",
            "99",
            "--out",
            tmp_path / "maps",
        ],
        ["--target 99"],
        keep,
        [tmp_path / "maps"],
        [tmp_path],
    )
    # a truncated volume: refused, no store and no partial left
    data = tmp_path / "data"
    brats_dataset(data, n_cases=2, modalities=("flair",))
    vol = sorted(data.rglob("*_flair.nii.gz"))[-1]
    vol.write_bytes(vol.read_bytes()[: len(vol.read_bytes()) // 2])
    refused(
        [
            "prepare",
            "--data",
            data,
            "--layout",
            "brats",
            "--modalities",
            "flair",
            "--workers",
            "1",
            "--out",
            tmp_path / "deep" / "st",
        ],
        [vol.name],
        [data],
        [tmp_path / "deep"],
        [tmp_path],
    )
    # predict: a non-empty --out is refused before any work (no .work, no model loaded)
    marker = tmp_path / "PWNED"
    run = _fake_run(tmp_path / "run", marker)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    refused(
        ["predict", "--run", run, "--input", data, "--out", full, "--force"],
        [full],
        [run, data, full],
        [tmp_path / ".full.work"],
        [tmp_path],
    )
    assert not marker.exists()
    # a run config naming an unknown model or fold: refused before prepare
    for run_cfg, name in (
        ({"models": ["nonet"]}, "nonet"),
        ({"models": ["simplecnn"], "folds": [0, 5]}, "run.folds has 5"),
    ):
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "prepare": {"data": str(data), "layout": "brats"},
                    "split": {"folds": 2},
                    "run": {"out": str(tmp_path / "r"), **run_cfg},
                }
            )
        )
        refused(["run", cfg], [name], [data, cfg], [tmp_path / "r"], [tmp_path])


# --------------------------------------------------------------------------- 7 stage keys


def test_partial_is_resumed_only_by_its_stage_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, folds=2)
    root = tmp_path / "run"
    out = root / "fold0" / "unet"
    cfg = UNetConfig(
        channels=[4, 8],
        strides=[2],
        num_res_units=0,
        epochs=4,
        batch_size=8,
        lr=1e-2,
        accelerator="cpu",
    )
    runner = pipeline.Runner(root, progress=False)

    def killed(force: bool, c: UNetConfig = cfg) -> None:
        unet.train_unet(c, store, None, 0, out, force=force, progress=False, stop_after_epoch=1)
        raise KeyboardInterrupt  # the process dies after epoch 1

    def run(force: bool, c: UNetConfig) -> None:
        assert unet.train_unet(c, store, None, 0, out, force=force, progress=False) == out

    with pytest.raises(KeyboardInterrupt):
        runner.stage("fold0/unet", out, "key4", "unet.json", killed)
    partial = root / "fold0" / ".unet.partial"
    assert (partial / "last.pt").is_file()
    # same key: resumed (the control: this is what a changed key must not do)
    capsys.readouterr()
    runner.stage("fold0/unet", out, "key4", "unet.json", lambda f: run(f, cfg))
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "unet.json").read_text())["resumed"] is True
    # epochs 4 -> 2 after a kill: another key; the stale partial is removed, not resumed
    two = cfg.model_copy(update={"epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        runner.stage("fold0/unet", out, "key4b", "unet.json", killed)
    capsys.readouterr()
    runner.stage("fold0/unet", out, "key2", "unet.json", lambda f: run(f, two))
    text = capsys.readouterr().out
    assert "resuming" not in text
    notes = [ln for ln in text.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and str(partial) in notes[0] and "other settings" in notes[0]
    summary = json.loads((out / "unet.json").read_text())
    assert summary["resumed"] is False and summary["epochs"] == 2
    assert not partial.exists()
    # every JSON the stage wrote is strict
    for f in root.rglob("*.json"):
        strict_loads(f.read_text())


def test_finished_run_sweeps_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "run"
    left = [
        root / ".store.partial" / "images.npy",
        root / "fold0" / ".unet.pending.json",
        root / "fold0" / "maps" / ".a__gradcam.partial" / "maps.npy",
        root / "fold0" / ".search.old-123" / "best.json",
        root / ".x.json.tmp-9",
    ]
    kept = [
        root / "fold0" / "maps" / "a__gradcam" / "meta.json",
        root / fsutil.OWNER_MARKER,
        root / "fold0" / "stage.json",
    ]
    for f in left + kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    from ensemblecam.pipeline.run import _sweep

    removed = _sweep(root)
    assert len(removed) == 5
    assert not any(f.exists() for f in left) and all(f.exists() for f in kept)


# --------------------------------------------------------------------------- 8 locks


def test_lock_refuses_a_second_process_and_takes_over_a_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    lock = fsutil.lock_path(out)
    synth = ["synth", "--out", out, "--n-cases", "1", "--shape", "32,32,8", "--workers", "1"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        refused(
            synth, [out, f"pid {holder.pid}"], [lock], [out, fsutil.partial_dir(out)], [tmp_path]
        )
        cfg = tmp_path / "run.yaml"
        data = tmp_path / "data"
        data.mkdir()
        cfg.write_text(
            yaml.safe_dump(
                {
                    "prepare": {"data": str(data)},
                    "run": {"out": str(tmp_path / "r"), "models": ["simplecnn"]},
                }
            )
        )
        rlock = fsutil.lock_path(tmp_path / "r")
        rlock.write_text(lock.read_text())
        refused(
            ["run", cfg],
            [tmp_path / "r", f"pid {holder.pid}"],
            [rlock],
            [tmp_path / "r"],
            [tmp_path],
        )
        rlock.unlink()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a notice, released at the end
    res = CliRunner().invoke(app, [str(a) for a in synth])
    assert res.exit_code == 0, res.output
    assert f"taking over a stale lock of pid {holder.pid}" in res.stderr
    assert not lock.exists() and (out / "phantom.json").is_file()
    # the holding process may enter again (nested stages); the lock goes when it leaves
    with fsutil.folder_lock(out):
        with fsutil.folder_lock(out):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert lock.exists()
    assert not lock.exists()


# --------------------------------------------------------------------------- 9 strict JSON


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (as strict JSON parsers do)."""
    return json.loads(text, parse_constant=_no_constants)


def test_json_is_strict(tmp_path: Path) -> None:
    obj = {
        "a": float("nan"),
        "b": [float("inf"), -float("inf"), 1.5, np.float32(np.nan)],
        "c": np.array([1.0, np.nan]),
        "d": (np.int64(3), np.float64(2.5)),
        "e": True,
        "p": tmp_path,
    }
    fsutil.write_json(tmp_path / "x.json", obj)
    got = strict_loads((tmp_path / "x.json").read_text())
    assert got == {
        "a": None,
        "b": [None, None, 1.5, None],
        "c": [1.0, None],
        "d": [3, 2.5],
        "e": True,
        "p": str(tmp_path),
    }
    with pytest.raises(ValueError, match="non-standard"):
        strict_loads(json.dumps(float("nan")))  # the check itself can fail
    with pytest.raises(TypeError):
        fsutil.write_json(tmp_path / "y.json", {"x": object()})
    assert not (tmp_path / "y.json").exists()
    # results.json of a run whose metric is undefined in one fold (NaN) -> null there
    row = {"kind": "ensemble", "slug": "ensemble", "name": "e", "config": None}
    fold = {
        "fold0": {"rows": [{**row, "metrics": {"paper_miou": 0.5, "hd95": None}}]},
        "fold1": {"rows": [{**row, "metrics": {"paper_miou": float("nan")}}]},
    }
    res = pipeline.aggregate(fold, "paper_miou")
    fsutil.write_json(tmp_path / "results.json", res)
    got = strict_loads((tmp_path / "results.json").read_text())
    assert got["rows"][0]["per_fold"]["fold1"]["paper_miou"] is None
    assert got["rows"][0]["mean"]["paper_miou"] == 0.5
