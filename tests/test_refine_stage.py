"""The refine stage (pseudo-labels from a chosen ensemble), the MIL localiser's maps and
training, and the U-Net's handling of the ignore class; values hand-computed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensemblecam.config import MilConfig, RefineConfig, UNetConfig
from ensemblecam.ensemble.operators import EnsembleConfig
from ensemblecam.errors import InputError
from ensemblecam.io import mapstore
from ensemblecam.io.masks import read_masks, write_masks
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.refine import IGNORE
from ensemblecam.stages import unet
from ensemblecam.stages.mil import MIL_MEMBER, map_scale, mil_maps, write_mil_maps
from ensemblecam.stages.refine import refine_stage, slice_members
from ensemblecam.training.data import part_indices
from store_factory import build_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_with_maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store, two members' maps (the true mask blurred / shifted noise) and a best.json."""
    root = tmp_path_factory.mktemp("refine")
    store = build_store(root / "store", n_cases=6, slices_per_case=4, size=(24, 24), seed=3)
    st = SliceStore.open(store)
    assert st.masks is not None
    idx = np.arange(st.n_slices)
    rng = np.random.default_rng(0)
    truth = np.asarray(st.masks, np.float32)
    good = np.clip(0.8 * truth + 0.1 * rng.random(truth.shape), 0, 1)
    noisy = np.clip(0.5 * truth + 0.5 * rng.random(truth.shape), 0, 1)
    for name, maps in (("a__gradcam", good), ("b__gradcam", noisy)):
        meta = {"store_id": st.identity, "store": str(store)}
        mapstore.write_map_set(root / "maps" / name, meta, idx, maps.astype(np.float16),
                               np.full(len(idx), 0.5, np.float32))  # fmt: skip
    best = EnsembleConfig("and", ("a__gradcam", "b__gradcam"), (0.5, 0.3), None)
    (root / "best.json").write_text(json.dumps(best.to_dict()))
    return root


def _rcfg(root: Path, **kw: Any) -> RefineConfig:
    base = dict(store=root / "store", maps=root / "maps", config_file=root / "best.json",
                out=root / "out", fold="0")  # fmt: skip
    return RefineConfig(**{**base, **kw})


def test_slice_members_per_operator() -> None:
    a = np.zeros((4, 4), np.float32)
    a[0, :2] = 0.9  # 2 pixels > 0.5
    b = np.zeros((4, 4), np.float32)
    b[1:3, :] = 0.9  # 8 pixels > 0.5
    conf = lambda op, t=(0.5, 0.5): EnsembleConfig(op, ("a", "b"), t, None)  # noqa: E731
    m, thr, k = slice_members(conf("min"), [a, b])
    assert np.array_equal(m[0], a) and thr == [0.5] and k == 1
    m, thr, k = slice_members(conf("max", (0.5, 0.2)), [a, b])
    assert np.array_equal(m[0], b) and thr == [0.2] and k == 1
    assert slice_members(conf("and"), [a, b])[2] == 2
    assert slice_members(conf("or"), [a, b])[2] == 1
    m, thr, k = slice_members(EnsembleConfig("mean", ("a", "b"), (0.4,), None), [a, b])
    assert np.allclose(m[0], (a + b) / 2) and thr == [0.4] and k == 1


def test_refine_stage_labels_and_choice(store_with_maps: Path) -> None:
    root = store_with_maps
    out = refine_stage(_rcfg(root, refiners=["none", "random_walker"]))
    rec = json.loads((out / "refine.json").read_text())
    st = SliceStore.open(root / "store")
    fold = get_fold(root / "store" / "splits.json", 0)
    train = part_indices(st, root / "store" / "splits.json", fold, "train")
    index, labels = read_masks(out)
    assert set(np.unique(labels)) <= {0, 1, IGNORE}
    rows = np.searchsorted(index, train)
    lab = st.labels[train]
    assert (labels[rows][lab == 0] == 0).all()  # lesion-free slices: all background
    assert all((labels[r] == 1).any() for r in rows[lab == 1])  # lesion slices: never empty
    # the choice is the candidate with the highest train-part lesion Dice
    dice = {k: v["train_quality"]["lesion_dice"] for k, v in rec["candidates"].items()}
    assert rec["criterion"] == "masks" and rec["chosen"] == max(dice, key=dice.get)
    assert rec["n_annotated_slices"] == len(train)
    # "none" keeps the ensemble's decision: lesion exactly where both members say lesion
    none = refine_stage(_rcfg(root, refiners=["none"], out=root / "none", ignore=False))
    _, nl = read_masks(none)
    assert set(np.unique(nl)) == {0, 1}  # ignore off: uncertain pixels -> background
    sets = [mapstore.MapSet.open(root / "maps" / m) for m in ("a__gradcam", "b__gradcam")]
    both = (np.asarray(sets[0].maps[index], np.float32) > 0.5) & (
        np.asarray(sets[1].maps[index], np.float32) > 0.3
    )
    seeded = (st.labels[index] == 1) & both.any(axis=(1, 2))
    assert seeded.any() and np.array_equal(nl[seeded] == 1, both[seeded])


def test_refine_without_masks_uses_the_fallback(store_with_maps: Path, tmp_path: Path) -> None:
    root = tmp_path
    store = build_store(root / "store", n_cases=6, slices_per_case=4, size=(24, 24), seed=3)
    manifest = json.loads((store / "store.json").read_text())
    manifest["has_masks"] = False
    (store / "store.json").write_text(json.dumps(manifest))
    (store / "masks.npy").unlink()
    st = SliceStore.open(store)
    assert st.masks is None
    old = store_with_maps / "maps"
    for name in ("a__gradcam", "b__gradcam"):
        ms = mapstore.MapSet.open(old / name)
        meta = {"store_id": st.identity, "store": str(store)}
        mapstore.write_map_set(root / "maps" / name, meta, ms.index, np.asarray(ms.maps), ms.probs)
    (root / "best.json").write_text((store_with_maps / "best.json").read_text())
    out = refine_stage(_rcfg(root, fallback="none"))
    rec = json.loads((out / "refine.json").read_text())
    assert rec["criterion"] == "fallback" and rec["chosen"] == "none"
    assert (
        list(rec["candidates"]) == ["none"] and rec["candidates"]["none"]["train_quality"] is None
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"refiners": []}, "give at least one refiner"),
        ({"parts": ["val"]}, "must include train"),
        ({"options": {"nope": 1}}, "unknown option 'nope'"),
        ({"options": {"band": 0.7}}, r"refine.band 0.7"),
    ],
)
def test_bad_refine_options_are_one_line(store_with_maps: Path, kw: dict, match: str) -> None:
    with pytest.raises(InputError, match=match) as exc:
        refine_stage(_rcfg(store_with_maps, out=store_with_maps / "bad", **kw))
    assert "\n" not in str(exc.value)
    assert not (store_with_maps / "bad").exists()


def test_mil_maps_hand_computed() -> None:
    d = np.zeros((2, 2, 5), np.float32)
    d[0, 0, 0] = 4.0
    d[1] = -3.0
    maps, probs = mil_maps(d, 0.0, 0.1)  # k = ceil(0.1 * 10) = 1
    assert np.allclose(maps, 1 / (1 + np.exp(-d)), atol=1e-6)
    assert np.allclose(probs, [1 / (1 + math.exp(-4)), 1 / (1 + math.exp(3))], atol=1e-6)
    _, probs = mil_maps(d, 0.0, 0.2)  # k = 2: mean of the two largest logits
    assert np.isclose(probs[0], 1 / (1 + math.exp(-2)), atol=1e-6)
    smooth, _ = mil_maps(d, 1.0, 0.1)
    assert smooth[0, 0, 0] < maps[0, 0, 0] and smooth[0, 0, 1] > maps[0, 0, 1]


def test_masks_ignore_class_is_known_only() -> None:
    pred = np.array([[[1, 1, 0, 0]]], bool)
    target = np.array([[[1, IGNORE, IGNORE, 0]]], np.uint8)
    tp, fp, fn, tn = unet.known_counts(pred, target)
    assert (tp[0], fp[0], fn[0], tn[0]) == (1, 0, 0, 1)


def test_unet_trains_on_targets_with_ignore(store_with_maps: Path, tmp_path: Path) -> None:
    st = SliceStore.open(store_with_maps / "store")
    assert st.masks is not None
    idx = np.arange(st.n_slices)
    labels = np.asarray(st.masks, np.uint8).copy()
    labels[:, :, :4] = IGNORE
    npz = write_masks(tmp_path / "t.npz", idx, labels)
    cfg = UNetConfig(channels=[4, 8], strides=[2], num_res_units=0, epochs=1, batch_size=8,
                     accelerator="cpu")  # fmt: skip
    out = unet.train_unet(cfg, st.path, None, 0, tmp_path / "u", npz, progress=False)
    assert out is not None and (out / "best.pt").is_file()
    with pytest.raises(InputError, match="need a mil config"):
        unet.train_unet(cfg, st.path, None, 0, tmp_path / "v", "labels")


def test_mil_localiser_trains_from_labels_and_writes_a_member(
    store_with_maps: Path, tmp_path: Path
) -> None:
    st = SliceStore.open(store_with_maps / "store")
    cfg = MilConfig(channels=[4, 8], strides=[2], epochs=2, batch_size=8, accelerator="cpu")
    out = unet.train_unet(cfg, st.path, None, 0, tmp_path / "mil", "labels", progress=False)
    assert out is not None
    summary = json.loads((out / "unet.json").read_text())
    assert summary["targets"] == "labels" and summary["val_targets"] == "labels"
    assert "val_loss" in summary["best"] and "lesion_dice" not in summary["best"]
    member = write_mil_maps(cfg, out / "best.pt", st.path, np.arange(5), tmp_path / MIL_MEMBER)
    ms = mapstore.MapSet.open(member)
    assert ms.maps.shape == (5, 24, 24) and ms.meta["normalised"] is False
    assert cfg.sigma() == 2.0 and ms.meta["smooth_sigma"] == 2.0
    assert ((np.asarray(ms.maps) >= 0) & (np.asarray(ms.maps) <= 1)).all()
    # the symmetric loss with balanced draws trains through the same loop
    sym = cfg.model_copy(update={"negative_top": True, "oversample": 0.5})
    out = unet.train_unet(sym, st.path, None, 0, tmp_path / "sym", "labels", progress=False)
    assert out is not None
    kept = json.loads((out / "unet.json").read_text())["config"]
    assert kept["negative_top"] is True and kept["oversample"] == 0.5


def test_map_scale_hand_computed() -> None:
    maps = np.array([[[0.0, 0.1]], [[0.2, 0.3]], [[0.9, 1.0]]], np.float32)  # (3, 1, 2)
    # rows 0 and 1: pixels 0, 0.1, 0.2, 0.3; median (linear) 0.15, maximum 0.3
    assert map_scale(maps, np.array([0, 1]), 0.5) == pytest.approx(0.15)
    assert map_scale(maps, np.array([0, 1]), 1.0) == pytest.approx(0.3)
    assert map_scale(np.zeros((2, 1, 2), np.float32), np.array([0]), 1.0) == 1e-6
    with pytest.raises(InputError, match="no training-part slice"):
        map_scale(maps, np.array([], np.int64), 0.5)


def test_mil_maps_scaled_by_the_training_part(store_with_maps: Path, tmp_path: Path) -> None:
    st = SliceStore.open(store_with_maps / "store")
    cfg = MilConfig(channels=[4, 8], strides=[2], epochs=1, batch_size=8, accelerator="cpu")
    out = unet.train_unet(cfg, st.path, None, 0, tmp_path / "mil", "labels", progress=False)
    assert out is not None
    idx = np.arange(st.n_slices)
    splits = st.path / "splits.json"
    train = part_indices(st, splits, get_fold(splits, 0), "train")
    plain = mapstore.MapSet.open(
        write_mil_maps(cfg, out / "best.pt", st.path, idx, tmp_path / "m0", scale_from=train)
    )
    assert plain.meta["scale"] is None  # no scale_quantile: the option is off
    raw = np.asarray(plain.maps, np.float32)
    q = cfg.model_copy(update={"scale_quantile": 0.9})
    scaled = mapstore.MapSet.open(
        write_mil_maps(q, out / "best.pt", st.path, idx, tmp_path / "m1", scale_from=train)
    )
    s = scaled.meta["scale"]
    assert s == pytest.approx(np.quantile(raw[train], 0.9), rel=2e-3)  # maps stored float16
    np.testing.assert_allclose(np.asarray(scaled.maps, np.float32), np.minimum(raw / s, 1),
                               atol=2e-3)  # fmt: skip
    assert (np.asarray(scaled.maps) == 1).any() and scaled.probs.tolist() == plain.probs.tolist()
    # predict: the fold's scale is given, not recomputed from the new scans
    fixed = mapstore.MapSet.open(
        write_mil_maps(q, out / "best.pt", st.path, idx[:4], tmp_path / "m2", scale=s)
    )
    assert fixed.meta["scale"] == s
    np.testing.assert_array_equal(np.asarray(fixed.maps), np.asarray(scaled.maps)[:4])
    with pytest.raises(InputError, match="training part must be among the mapped slices"):
        write_mil_maps(q, out / "best.pt", st.path, idx[:4], tmp_path / "m3", scale_from=train)
    assert not (tmp_path / "m3").exists() and not list(tmp_path.glob(".m3*"))  # nothing written


def test_has_lesion_reads_masks_or_slice_labels(store_with_maps: Path) -> None:
    st = SliceStore.open(store_with_maps / "store")
    assert st.masks is not None
    idx = np.arange(st.n_slices)
    truth = np.asarray(st.masks).reshape(len(idx), -1).any(axis=1)
    labels_ds = unet._dataset(st, idx, "labels", None)  # the MIL localiser's samples
    np.testing.assert_array_equal(unet.has_lesion(labels_ds), st.labels == 1)
    np.testing.assert_array_equal(unet.has_lesion(unet._dataset(st, idx, "store", None)), truth)
    # a pseudo-label target without lesion pixels is lesion-free, whatever the slice label
    empty = np.zeros((len(idx), *st.size), np.uint8)
    pseudo_ds = unet._dataset(st, idx, "npz", (idx, empty))
    assert not unet.has_lesion(pseudo_ds).any() and (st.labels == 1).any()


def test_oversample_weights_hand_computed() -> None:
    lesion = np.array([True, False, False, False, False, False, False, False, False, False])
    w = unet.oversample_weights(lesion, 0.33)
    assert w is not None and np.isclose(w[0], 0.33 * 9 / 0.67) and (w[1:] == 1).all()
    assert np.isclose(w[0] / w.sum(), 0.33)  # P(lesion) = share
    assert unet.oversample_weights(np.array([True, False]), 0.33) is None  # 50% >= 33%
    assert unet.oversample_weights(lesion, 0.0) is None
    assert unet.oversample_weights(np.zeros(4, bool), 0.33) is None


def test_mil_and_refine_commands(store_with_maps: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ensemblecam.cli import app

    root = store_with_maps
    maps = tmp_path / "maps"
    mil = [
        "mil", "--store", str(root / "store"), "--out", str(tmp_path / "mil"), "--maps",
        str(maps), "--parts", "train", "--epochs", "1", "--channels", "4,8", "--strides", "2",
        "--batch-size", "8", "--accelerator", "cpu", "--progress", "quiet",
    ]  # fmt: skip
    r = CliRunner().invoke(app, mil)
    assert r.exit_code == 0, r.output
    assert mapstore.MapSet.open(maps / MIL_MEMBER).meta["method"] == "mil"
    # --name: the member localiser__<name>, as run names its variants; a name that cannot
    # name a member folder is one error line, before anything is written
    named = [*mil, "--out", str(tmp_path / "mil_b"), "--name", "mil_b", "--negative-top"]
    r = CliRunner().invoke(app, named)
    assert r.exit_code == 0 and (maps / "localiser__mil_b" / "meta.json").is_file(), r.output
    r = CliRunner().invoke(app, [*mil, "--out", str(tmp_path / "bad"), "--name", "b__c"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "'b__c'" in r.output, r.output
    assert not (tmp_path / "bad").exists()
    args = [
        "refine", "--store", str(root / "store"), "--maps", str(root / "maps"), "--best",
        str(root / "best.json"), "--refiners", "none", "--out", str(tmp_path / "ref"),
    ]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "refiner none (criterion masks)" in r.output, r.output
    r = CliRunner().invoke(app, args)  # a finished result is not replaced without --force
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(app, [*args[:-2], "--margins", "2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "margin" in r.output and not (tmp_path / "x").exists()


def test_candidates_are_refiners_times_margins() -> None:
    from ensemblecam.config import RefineConfig
    from ensemblecam.stages.refine import candidates, fallback

    cfg = RefineConfig(refiners=["none", "crf", "random_walker"], margins=[0.0, 0.5])
    assert candidates(cfg) == {
        "none": ("none", 0.0),
        "crf@0": ("crf", 0.0),
        "crf@0.5": ("crf", 0.5),
        "random_walker@0": ("random_walker", 0.0),
        "random_walker@0.5": ("random_walker", 0.5),
    }
    assert fallback(cfg) == ("none", 0.0)
    assert fallback(cfg.model_copy(update={"fallback": "crf", "margins": [0.25]})) == (
        "crf@0.25",
        0.25,
    )
