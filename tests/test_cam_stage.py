"""``ensemblecam cam`` stage, resume, sharding, CLI errors and ``ensemblecam sanity``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ensemblecam import models
from ensemblecam.cam import CamEngine
from ensemblecam.cli import app
from ensemblecam.config import CamConfig
from ensemblecam.io.mapstore import MapSet
from ensemblecam.io.store import SliceStore
from ensemblecam.stages.cam import run_cam


def _checkpoint(path: Path, channels: list[str], size: list[int], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    args = {"in_channels": len(channels), "num_classes": 2, "width": 4}
    model = models.build_model("simplecnn", **args)
    info = {"model": "simplecnn", "model_args": args, "channels": channels, "size": size,
            "cam_layer": models.cam_layer(model)}  # fmt: skip
    models.save_checkpoint(path, model, info)
    return path


@pytest.fixture
def ckpt(tiny_store: Path, tmp_path: Path) -> Path:
    return _checkpoint(tmp_path / "runs" / "s4" / "best.pt", ["flair"], [32, 32])


def _cfg(store: Path, ck: Path, out: Path, **kw) -> CamConfig:
    base = dict(store=store, checkpoints=[ck], out=out, methods=["gradcam", "layercam"],
                parts=["val", "test"], batch_size=8, accelerator="cpu")  # fmt: skip
    base.update(kw)
    return CamConfig(**base)


def test_stage_writes_members_matching_engine(tiny_store: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    res = run_cam(_cfg(tiny_store, ckpt, out))
    assert sorted(p.name for p in res["members"]) == ["s4__gradcam", "s4__layercam"]
    ms = MapSet.open(out / "s4__gradcam")
    store = SliceStore.open(tiny_store)
    assert np.all(np.diff(ms.index) > 0)
    assert ms.maps.shape == (len(ms.index), 32, 32) and ms.maps.dtype == np.float16
    assert ms.meta["method"] == "gradcam" and ms.meta["layer"] == "features"
    assert ms.meta["target"] == "lesion" and ms.meta["normalised"] is True
    model, _ = models.load_checkpoint(ckpt)
    x = torch.from_numpy(np.asarray(store.images[ms.index[:5]], dtype=np.float32))
    ref = CamEngine(model, ["gradcam"])(x)
    np.testing.assert_allclose(
        ms.maps[:5].astype(np.float32), ref.maps["gradcam"].numpy(), atol=1e-3
    )
    np.testing.assert_allclose(ms.probs[:5], ref.probs.numpy(), atol=1e-5)
    # refuses to overwrite, --force replaces
    with pytest.raises(Exception, match="already holds maps"):
        run_cam(_cfg(tiny_store, ckpt, out))
    run_cam(_cfg(tiny_store, ckpt, out, force=True, dtype="uint8"))
    assert MapSet.open(out / "s4__gradcam").maps.dtype == np.uint8


def test_resume_skips_finished_batches(tiny_store: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    cfg = _cfg(tiny_store, ckpt, out, parts=["all"])  # 96 slices, 12 batches
    first = run_cam(cfg, stop_after_batches=5)
    assert first["stopped"] and first["members"] == []
    assert not (out / "s4__gradcam").exists()
    second = run_cam(cfg)
    assert second["computed"] == 12 - 5
    full = run_cam(_cfg(tiny_store, ckpt, tmp_path / "ref", parts=["all"]))
    assert full["computed"] == 12
    a = MapSet.open(out / "s4__gradcam").maps
    b = MapSet.open(tmp_path / "ref" / "s4__gradcam").maps
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_two_processes_equal_one(tiny_store: Path, ckpt: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_cam(_cfg(tiny_store, ckpt, one, methods=["gradcam", "smoothgradcampp"], smooth_n=2))
    run_cam(_cfg(tiny_store, ckpt, two, methods=["gradcam", "smoothgradcampp"], smooth_n=2,
                 devices=2, strategy="ddp_spawn"))  # fmt: skip
    for m in ("gradcam", "smoothgradcampp"):
        a, b = MapSet.open(one / f"s4__{m}"), MapSet.open(two / f"s4__{m}")
        assert np.array_equal(a.index, b.index)
        assert np.abs(a.maps.astype(np.float32) - b.maps.astype(np.float32)).max() <= 1e-3
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_cli_errors(tiny_store: Path, ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["cam", "--store", str(tiny_store), "--out", str(tmp_path / "m"), "--accelerator", "cpu"]
    bad = _checkpoint(tmp_path / "runs" / "bad" / "best.pt", ["flair", "t1"], [32, 32])
    cases = [
        (["--checkpoints", str(bad)], "trained on channels"),
        (["--checkpoints", str(ckpt), "--layer", "nope"], "candidates"),
        (["--checkpoints", str(ckpt), "--methods", "gradcam,foo"], "--methods foo"),
        (["--checkpoints", str(ckpt), "--parts", "trian"], "--parts 'trian'"),
        (["--checkpoints", str(ckpt), "--target", "tumour"], "--target"),
        (["--checkpoints", str(tmp_path / "none.pt")], "checkpoint not found"),
        (["--checkpoints", str(ckpt), "--raw", "--dtype", "uint8"], "--raw"),
        (["--checkpoints", str(ckpt), "--score-precision", "fp16"], "--score-precision 'fp16'"),
        (["--checkpoints", str(ckpt), "--score-tol", "-1"], "--score-tol '-1'"),
    ]
    for extra, msg in cases:
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output and r.output.count("\n") == 1, r.output
        assert not (tmp_path / "m").exists(), extra  # refused before anything is written
    small = _checkpoint(tmp_path / "runs" / "small" / "best.pt", ["flair"], [16, 16])
    r = runner.invoke(app, [*base, "--checkpoints", str(small)])
    assert r.exit_code == 2 and "[16, 16] slices" in r.output
    assert not (tmp_path / "m").exists()
    r = runner.invoke(app, [*base, "--checkpoints", str(ckpt), "--methods", "cam,xgradcam"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "s4__xgradcam" / "meta.json").is_file()


def test_cli_scorecam_bf16_within_tolerance(tiny_store: Path, ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["cam", "--store", str(tiny_store), "--checkpoints", str(ckpt), "--accelerator", "cpu",
            "--methods", "scorecam", "--parts", "test", "--dtype", "float32"]  # fmt: skip
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--score-precision", "bf16",
                            "--score-tol", "1e-3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    exact, mixed = (
        MapSet.open(tmp_path / "a" / "s4__scorecam"),
        MapSet.open(tmp_path / "b" / "s4__scorecam"),
    )
    assert mixed.meta["score_precision"] == "bf16" and mixed.meta["score_tol"] == 1e-3
    assert exact.meta["score_precision"] == "fp32"
    assert np.abs(np.asarray(mixed.maps) - np.asarray(exact.maps)).max() <= 1e-3


def test_auto_marker_contrasts_with_corner(tmp_path: Path) -> None:
    from ensemblecam.errors import InputError
    from ensemblecam.stages.sanity import auto_marker_values, parse_marker_value, plant_markers
    from store_factory import build_store

    store = build_store(tmp_path / "store", n_cases=2, slices_per_case=4, size=(16, 16),
                        channels=("flair", "t2"))  # fmt: skip
    images = np.load(store / "images.npy").astype(np.float32)
    images[1, 1, :4, :4] = 0.9  # a bright corner in channel 1 of slice 1
    lo, hi = images.min(axis=(0, 2, 3)), images.max(axis=(0, 2, 3))
    vals = auto_marker_values(images, np.array([0, 1]), 4)
    # dark corners (texture < 0.2 < mid-range) get the channel's max, the bright one its min
    np.testing.assert_allclose(vals, [[hi[0], hi[1]], [hi[0], lo[1]]])
    assert parse_marker_value("auto") == "auto" and parse_marker_value("0.5") == 0.5
    with pytest.raises(InputError, match="--marker-value 'dark'"):
        parse_marker_value("dark")
    rows = np.array([2, 5])
    fill = plant_markers(store, tmp_path / "copy", rows, 4, 0.25)  # explicit value overrides
    marked = np.load(tmp_path / "copy" / "images.npy")
    assert np.all(fill == 0.25) and np.all(marked[rows, :, :4, :4] == np.float16(0.25))
    assert (tmp_path / "copy" / "store.json").is_file()


def test_sanity_passes_on_phantom(tmp_path: Path) -> None:
    from store_factory import build_store

    # blobs kept: the corners are dark texture, so the default (auto) marker is bright
    store = build_store(tmp_path / "store", n_cases=12, slices_per_case=8, size=(32, 32))
    before = np.load(store / "images.npy").copy()
    runner = CliRunner()
    r = runner.invoke(app, [
        "sanity", "--store", str(store), "--model", "simplecnn", "--model-args", '{"width": 8}',
        "--epochs", "6", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16",
        "--marker-size", "8", "--work", str(tmp_path / "work"),
    ])  # fmt: skip
    assert "sanity PASS" in r.output, r.output
    assert r.exit_code == 0
    assert np.array_equal(np.load(store / "images.npy"), before)  # the user's store untouched
    marked = np.load(tmp_path / "work" / "store" / "images.npy")
    pos = SliceStore.open(store).labels == 1
    top = np.float16(before.max())
    assert np.all(marked[pos, :, :8, :8] == top) and np.all(marked[~pos, :, :8, :8] < 0.25)
    # a value given explicitly overrides auto
    r = runner.invoke(app, [
        "sanity", "--store", str(store), "--model", "simplecnn", "--epochs", "1",
        "--marker-value", "nope", "--work", str(tmp_path / "w2"),
    ])  # fmt: skip
    assert r.exit_code == 2 and "--marker-value 'nope'" in r.output
