"""Supervised U-Net stage: learning, checkpoints, pseudo-label targets, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ensemblecam import metrics, models
from ensemblecam.cli import app
from ensemblecam.config import UNetConfig
from ensemblecam.errors import InputError
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.models.segmenters import build_unet, load_unet, logits_to_mask
from ensemblecam.stages import unet
from ensemblecam.training.data import MaskDataset
from store_factory import build_store

FAST = dict(channels=[8, 16, 32], strides=[2, 2], num_res_units=1, epochs=4, batch_size=4,
            lr=1e-2, accelerator="cpu")  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw: Any) -> UNetConfig:
    return UNetConfig(**{**FAST, **kw})


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    tp, fp, fn, _ = metrics.confusion(pred, gt)
    return float(metrics.lesion_dice(tp, fp, fn))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, finished run folder) of a U-Net trained on the store's masks, fold0."""
    root = tmp_path_factory.mktemp("unet")
    store = build_store(root / "store", n_cases=12, slices_per_case=8, size=(32, 32))
    out = unet.train_unet(_cfg(), store, None, 0, root / "run", progress=False)
    assert out == root / "run"
    return store, out


def test_unet_learns_blobs_on_held_out_slices(trained: tuple[Path, Path]) -> None:
    store_path, out = trained
    store = SliceStore.open(store_path)
    assert store.masks is not None
    test = store.indices_for_cases(get_fold(store_path / "splits.json", 0).test)
    pred = unet.predict_unet(out / "best.pt", store, test, batch_size=16)
    assert pred.dtype == np.uint8 and pred.shape == (len(test), 32, 32)
    assert set(np.unique(pred)) <= {0, 1}
    gt = store.masks[test]
    assert _dice(pred, gt) > 0.5  # Empty mask scores 0
    # paper mIoU clearly above the Empty baseline's (IoU_bg + 0) / 2
    tp, fp, fn, tn = metrics.confusion(pred, gt)
    empty = metrics.paper_miou(0, 0, tp + fn, tn + fp)
    assert metrics.paper_miou(tp, fp, fn, tn) > empty + 0.2


def test_run_folder_and_checkpoint_round_trip(trained: tuple[Path, Path]) -> None:
    store_path, out = trained
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "metrics.csv", "learning_curve.png", "unet.json"} <= names
    assert "last.pt" not in names  # resume state only while training runs
    assert not out.with_name(f".{out.name}.partial").exists()
    summary = json.loads((out / "unet.json").read_text())
    assert summary["format"] == unet.RUN_FORMAT and summary["epochs"] == 4
    assert summary["targets"] == "store" and summary["n_val"] == 8
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == unet.METRIC_COLUMNS and len(rows) == 5
    dice = [float(r.split(",")[3]) for r in rows[1:]]
    assert summary["best_epoch"] == int(np.argmax(dice)) + 1  # best val lesion Dice kept
    model, info = load_unet(out / "best.pt")
    assert info["model"] == "unet" and info["channels"] == ["flair"] and info["size"] == [32, 32]
    assert info["epoch"] == summary["best_epoch"]
    raw = models.read_checkpoint(out / "best.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, raw["state_dict"][k])
    store = SliceStore.open(store_path)
    x = torch.from_numpy(store.images[:4].astype(np.float32))
    with torch.inference_mode():
        expect = logits_to_mask(model(x)).numpy()
    np.testing.assert_array_equal(unet.predict_unet(out / "best.pt", store, np.arange(4)), expect)
    # refuse to overwrite a finished run without force
    with pytest.raises(InputError, match="already holds a finished U-Net run"):
        unet.train_unet(_cfg(), store_path, None, 0, out, progress=False)


def test_pseudo_labels_are_followed_and_only_listed_slices_used(tmp_path: Path) -> None:
    store_path = build_store(tmp_path / "store", n_cases=12, slices_per_case=8)
    store = SliceStore.open(store_path)
    fold = get_fold(store_path / "splits.json", 0)
    train = store.indices_for_cases(fold.train)
    listed = train[::2][::-1].copy()  # every other training slice, unsorted
    assert store.masks is not None
    wrong = 1 - store.masks[listed]  # deliberately wrong: everything but the lesion
    test = store.indices_for_cases(fold.test)
    listed = np.concatenate([listed, test[:3]])  # not training slices: ignored
    wrong = np.concatenate([wrong, np.zeros((3, 32, 32), np.uint8)])
    npz = tmp_path / "masks.npz"
    np.savez(npz, index=listed.astype(np.int64), masks=wrong)
    out = unet.train_unet(_cfg(), store_path, None, 0, tmp_path / "pseudo", npz,
                          progress=False)  # fmt: skip
    assert out is not None
    summary = json.loads((out / "unet.json").read_text())
    assert summary["n_train"] == len(train[::2])
    assert summary["n_val"] == 0 and summary["val_targets"] is None  # no val slice listed
    assert summary["targets"] == str(npz.resolve())
    pred = unet.predict_unet(out / "best.pt", store, test)
    assert _dice(pred, 1 - store.masks[test]) > 0.9  # follows the pseudo-labels ...
    assert _dice(pred, store.masks[test]) < 0.1  # ... not the store's masks


def test_pseudo_label_border_is_left_out_of_the_loss(tmp_path: Path) -> None:
    """``boundary_ignore``: the targets read from a masks.npz (training and val part) lose
    their lesion border to the ignore class, which the loss leaves out; the store's masks
    (the supervised U-Net's) keep every pixel."""
    from types import SimpleNamespace

    from ensemblecam.refine import IGNORE, ignore_lesion_border

    store_path = build_store(tmp_path / "store", n_cases=12, slices_per_case=8)
    store = SliceStore.open(store_path)
    assert store.masks is not None
    fold = get_fold(store_path / "splits.json", 0)
    idx = np.sort(store.indices_for_cases([*fold.train, *fold.val]))
    masks = np.asarray(store.masks[idx], np.uint8)
    np.savez(tmp_path / "masks.npz", index=idx, masks=masks)
    fabric = SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu"))
    for width in (0, 1, 2):
        plan = unet.plan_unet(_cfg(boundary_ignore=width), store_path, None, 0,
                              tmp_path / f"w{width}", tmp_path / "masks.npz")  # fmt: skip
        assert plan.source == plan.val_source == "npz"
        data = unet._data(fabric, plan)
        got = data.loader.dataset.mask_source
        np.testing.assert_array_equal(got, ignore_lesion_border(masks, width))
        assert (got == IGNORE).any() == (width > 0)
    plan = unet.plan_unet(_cfg(boundary_ignore=2), store_path, None, 0, tmp_path / "s", "store")
    got = unet._data(fabric, plan).loader.dataset.mask_source
    assert got is store.masks or np.array_equal(got, store.masks)


def test_mask_dataset_maps_npz_rows(tiny_store: Path) -> None:
    store = SliceStore.open(tiny_store)
    index = np.array([30, 5, 17], np.int64)
    masks = np.stack([np.full((32, 32), v, np.uint8) for v in (1, 0, 1)])
    masks[1, 0, 0] = 1
    idx = np.array([5, 17, 30, 40])
    kept, src, rows = unet._targets(store, idx, "npz", (index, masks))
    np.testing.assert_array_equal(kept, [5, 17, 30])
    ds = MaskDataset(store, kept, src, rows)
    x, y = ds[[2, 0]]
    np.testing.assert_array_equal(x.numpy(), store.images[[30, 5]].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), masks[[0, 1]])
    x1, y1 = ds[1]
    assert tuple(x1.shape) == (1, 32, 32) and int(y1.sum()) == 32 * 32


def test_killed_run_resumes(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, folds=2)
    cfg = _cfg(epochs=2, channels=[4, 8], strides=[2])
    out = tmp_path / "run"
    assert unet.train_unet(cfg, store, None, 0, out, progress=False, stop_after_epoch=1) is None
    partial = tmp_path / ".run.partial"
    assert (partial / "last.pt").is_file() and not out.exists()
    first = (partial / "metrics.csv").read_text().splitlines()
    assert unet.train_unet(cfg, store, None, 0, out, progress=False) == out
    summary = json.loads((out / "unet.json").read_text())
    assert summary["resumed"] is True and summary["epochs"] == 2
    assert (out / "metrics.csv").read_text().splitlines()[:2] == first
    # a different setting does not resume from a stale partial run
    unet.train_unet(cfg, store, None, 0, tmp_path / "b", progress=False, stop_after_epoch=1)
    out_b = unet.train_unet(cfg.model_copy(update={"lr": 0.05}), store, None, 0,
                            tmp_path / "b", progress=False)  # fmt: skip
    assert out_b is not None and json.loads((out_b / "unet.json").read_text())["resumed"] is False


def test_odd_slice_size_is_padded() -> None:
    model = build_unet(2, 2, channels=[4, 8, 8], strides=[2, 2], num_res_units=0)
    assert tuple(model(torch.zeros(3, 2, 30, 27)).shape) == (3, 2, 30, 27)
    one = build_unet(1, 1, channels=[4, 8], strides=[2])
    assert tuple(logits_to_mask(one(torch.zeros(2, 1, 9, 9))).shape) == (2, 9, 9)


def _maskless(path: Path) -> Path:
    store = build_store(path, n_cases=6, slices_per_case=4)
    manifest = json.loads((store / "store.json").read_text())
    manifest["has_masks"] = False
    (store / "store.json").write_text(json.dumps(manifest))
    (store / "masks.npy").unlink()
    return store


def test_bad_inputs_are_one_line_errors(tiny_store: Path, tmp_path: Path) -> None:
    def fails(match: str, targets: Any = "store", store: Path = tiny_store, **kw: Any) -> None:
        with pytest.raises(InputError, match=match) as exc:
            unet.train_unet(_cfg(**kw), store, None, 0, tmp_path / "out", targets)
        assert "\n" not in str(exc.value)

    fails("store has no masks", store=_maskless(tmp_path / "nomask"))
    npz = tmp_path / "m.npz"
    np.savez(npz, index=np.array([0, 10_000]), masks=np.zeros((2, 32, 32), np.uint8))
    fails("pseudo-labels: unknown store index 10000", npz)
    np.savez(npz, index=np.array([0, 1]), masks=np.zeros((2, 16, 16), np.uint8))
    fails(r"mask array shape \(2, 16, 16\) does not match", npz)
    np.savez(npz, index=np.array([0, 0]), masks=np.zeros((2, 32, 32), np.uint8))
    fails("store index 0 appears more than once", npz)
    np.savez(npz, idx=np.array([0]))
    fails("expected arrays 'index' and 'masks'", npz)
    fails("missing.npz: masks file not found", tmp_path / "missing.npz")
    np.savez(npz, index=np.array([0]), masks=np.full((1, 32, 32), 2, np.uint8))
    fails(r"pseudo-labels must be 0, 1 or 255 \(ignore\), found value 2", npz)
    test = SliceStore.open(tiny_store).indices_for_cases(
        get_fold(tiny_store / "splits.json", 0).test)  # fmt: skip
    np.savez(npz, index=test, masks=np.zeros((len(test), 32, 32), np.uint8))
    fails("no target masks", npz)
    fails("need 2 strides", channels=[4, 8, 16], strides=[2])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    fails("folder is not empty")
    with pytest.raises(InputError, match="not a U-Net checkpoint"):
        m = models.build_model("simplecnn", in_channels=1, width=4)
        models.save_checkpoint(tmp_path / "c.pt", m, {"model": "simplecnn"})
        unet.predict_unet(tmp_path / "c.pt", SliceStore.open(tiny_store), np.arange(2))


def test_cli_trains_and_evaluates(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["unet", "--store", str(tiny_store), "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--accelerator", "cpu", "--metrics-out",
            str(tmp_path / "m.json")]  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unet:\n  channels: [4, 8]\n  strides: [2]\n  num_res_units: 0\n")
    res = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert (out / "unet.json").is_file()
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["part"] == "test" and 0.0 <= m["metrics"]["lesion_dice"] <= 1.0
    assert m["metrics"]["n_slices"] == 32
    res = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert res.exit_code == 2 and "use --force" in res.output


def test_spatial_augmentation_moves_images_and_targets_together() -> None:
    from ensemblecam.training.data import EpochSpatial

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 12, 20, generator=g)  # non-square, two channels
    y = (torch.rand(64, 12, 20, generator=g) * 3).long()
    y[y == 2] = 255  # the ignore value
    # nothing drawn: the batch comes back exactly
    same = EpochSpatial(15.0, 0.1, 0.0, False, seed=0)(x, y)
    assert torch.equal(same[0], x) and torch.equal(same[1], y)
    # mirroring alone is exact: every sample is one of the four flips, image and target alike
    fx, fy = EpochSpatial(15.0, 0.1, 0.0, True, seed=0)(x, y)
    seen = set()
    for k in range(64):
        hits = [
            dims for dims in [(), (-1,), (-2,), (-2, -1)]
            if torch.equal(fx[k], x[k].flip(dims) if dims else x[k])
            and torch.equal(fy[k], y[k].flip(dims) if dims else y[k])
        ]  # fmt: skip
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 4
    # rotation and zoom: targets keep their values (nearest), images stay within range
    aug = EpochSpatial(30.0, 0.2, 1.0, True, seed=3)
    rx, ry = aug(x, y)
    assert set(ry.unique().tolist()) <= {0, 1, 255} and not torch.equal(rx, x)
    assert float(rx.min()) >= 0.0 and float(rx.max()) <= float(x.max()) + 1e-6
    # a 2-pixel square at the centre stays under its target after any draw
    sq_x = torch.zeros(8, 1, 16, 16)
    sq_x[:, :, 7:9, 7:9] = 1.0
    sq_y = sq_x[:, 0].long()
    ax, ay = aug(sq_x, sq_y)
    assert bool((ax[:, 0][ay == 1] > 0.2).all())
    # the draws depend on (seed, epoch) alone
    aug.set_epoch(5)
    a5 = aug(x, y)[0]
    aug.set_epoch(5)
    assert torch.equal(aug(x, y)[0], a5)
    aug.set_epoch(6)
    assert not torch.equal(aug(x, y)[0], a5)


@pytest.mark.parametrize("workers", [0, 1])
def test_augmented_unet_resumes_bit_identically(tmp_path: Path, workers: int) -> None:
    """A spatially augmented U-Net killed after epoch 1 and resumed ends with the weights
    of one that was never interrupted (with DataLoader workers too)."""
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, folds=2)
    cfg = _cfg(epochs=2, channels=[4, 8], strides=[2], augment="spatial", workers=workers)
    full = unet.train_unet(cfg, store, None, 0, tmp_path / "a", progress=False)
    out = tmp_path / "b"
    assert unet.train_unet(cfg, store, None, 0, out, progress=False, stop_after_epoch=1) is None
    assert unet.train_unet(cfg, store, None, 0, out, progress=False) == out
    assert json.loads((out / "unet.json").read_text())["resumed"] is True
    wa = models.read_checkpoint(full / "best.pt")["state_dict"]
    wb = models.read_checkpoint(out / "best.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the augmentation changes training: without it the weights differ
    plain = unet.train_unet(cfg.model_copy(update={"augment": "none"}), store, None, 0,
                            tmp_path / "c", progress=False)  # fmt: skip
    wc = models.read_checkpoint(plain / "best.pt")["state_dict"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_localiser_slices_are_augmented_and_their_labels_kept(tiny_store: Path) -> None:
    from ensemblecam.training.data import EpochSpatial, StoreDataset

    store = SliceStore.open(tiny_store)
    idx = np.arange(8)
    raw_x, raw_y = StoreDataset(store, idx)[list(range(8))]
    aug = StoreDataset(store, idx, EpochSpatial(20.0, 0.1, 1.0, True, seed=1))
    x, y = aug[list(range(8))]
    assert torch.equal(y, raw_y) and x.shape == raw_x.shape and not torch.equal(x, raw_x)
    # the localiser's config builds it; "none" builds nothing
    from ensemblecam.config import MilConfig

    assert isinstance(unet.make_augment(MilConfig(augment="spatial"), 0), EpochSpatial)
    assert unet.make_augment(MilConfig(augment="none"), 0) is None


def test_bad_augmentation_values_are_one_error_line(tmp_path: Path) -> None:
    import yaml

    from ensemblecam.config import load_config

    bad = tmp_path / "bad.yaml"
    for section, values, key in (
        ("unet", {"augment": "elastic"}, r"unet\.augment"),
        ("unet", {"zoom": 1.5}, r"unet\.zoom"),
        ("mil", {"rotate_deg": -5}, r"mil\.rotate_deg"),
        ("mil", {"augment_prob": 2}, r"mil\.augment_prob"),
    ):
        bad.write_text(yaml.safe_dump({section: values, "run": {"out": str(tmp_path / "r")}}))
        with pytest.raises(InputError, match=key):
            load_config(bad)
        result = CliRunner().invoke(app, ["run", str(bad)])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error:") and not (tmp_path / "r").exists()
