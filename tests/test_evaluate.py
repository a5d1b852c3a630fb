"""apply_config semantics, evaluate scoring, and the search/evaluate CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.ensemble.operators import apply_config
from ensemblecam.io.mapstore import write_map_set
from ensemblecam.io.store import SliceStore
from ensemblecam.stages.evaluate import evaluate_arrays


def test_apply_config_operators():
    a = np.array([[[0.9, 0.9], [0.1, 0.1]]], np.float32)  # 2 positives at t=0.5
    b = np.array([[[0.9, 0.1], [0.9, 0.9]]], np.float32)  # 3 positives
    cfg = {"thresholds": [0.5, 0.5], "gate": None}
    assert apply_config([a, b], {**cfg, "operator": "and"}).sum() == 1
    assert apply_config([a, b], {**cfg, "operator": "or"}).sum() == 4
    assert (apply_config([a, b], {**cfg, "operator": "min"}) == (a > 0.5)).all()
    assert (apply_config([a, b], {**cfg, "operator": "max"}) == (b > 0.5)).all()
    mean = apply_config([a, b], {"operator": "mean", "thresholds": [0.6], "gate": None})
    assert mean.sum() == 1  # only the pixel where both are 0.9
    gated = apply_config(
        [a, b], {**cfg, "operator": "or", "gate": 0.5}, [np.array([0.3]), np.array([0.6])]
    )
    assert gated.sum() == 0  # mean prob 0.45 < 0.5


def test_empty_baseline_anchor():
    # 2 slices of 2x2, 1 lesion pixel in slice 0. Empty prediction: TN=7, FN=1.
    # background IoU = 7/8, lesion IoU = 0 -> paper_miou = 7/16, paper_dsc = 2(7/16)/(23/16)
    masks = np.zeros((2, 2, 2), np.uint8)
    masks[0, 0, 0] = 1
    maps = [np.zeros((2, 2, 2), np.float32)]
    res, _ = evaluate_arrays(
        maps,
        masks,
        np.array([0, 0]),
        {"operator": "single", "thresholds": [0.5], "gate": None},
        progress=False,
    )
    for r in (res["metrics"], res["empty_baseline"]):
        assert r["paper_miou"] == pytest.approx(7 / 16)
        assert r["paper_dsc"] == pytest.approx(14 / 23)
        assert r["lesion_iou"] == 0.0


@pytest.fixture
def search_setup(tmp_path):
    from store_factory import build_store

    store_path = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, size=(16, 16))
    store = SliceStore.open(store_path)
    gt = np.asarray(store.masks, np.float32)
    rng = np.random.default_rng(0)
    idx = np.arange(store.n_slices)
    for name, sigma in (("a__gradcam", 1.0), ("b__gradcam", 2.0)):
        m = gaussian_filter(gt + 0.4 * rng.random(gt.shape), sigma=(0, sigma, sigma))
        m = (m - m.min()) / (m.max() - m.min())
        write_map_set(
            tmp_path / "maps" / name,
            {"method": "gradcam"},
            idx,
            m.astype(np.float16),
            (gt.reshape(len(gt), -1).max(1) * 0.8 + 0.1),
        )
    return tmp_path, store_path


def test_cli_round_trip(search_setup):
    tmp, store = search_setup
    runner = CliRunner()
    args = [
        "search",
        "--store",
        str(store),
        "--fold",
        "0",
        "--part",
        "train",
        "--maps",
        str(tmp / "maps"),
        "--members",
        "a__gradcam,b__gradcam",
        "--operators",
        "and,or,min,max",
        "--gate",
        "--out",
        str(tmp / "search"),
        "--calibration-cases",
        "2,all",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp / "search"
    for f in (
        "ranking.csv",
        "ranking.json",
        "best.json",
        "grid_and.npy",
        "grid_min.json",
        "calibration_curve.csv",
    ):
        assert (out / f).is_file(), f
    assert np.load(out / "grid_and.npy").shape == (10, 10)
    best = json.loads((out / "best.json").read_text())
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 2 and "--force" in r2.output
    # evaluating the best config on the calibration part reproduces the search's numbers
    ev = [
        "evaluate",
        "--best",
        str(out / "best.json"),
        "--store",
        str(store),
        "--fold",
        "0",
        "--maps",
        str(tmp / "maps"),
        "--hd95",
    ]
    r = runner.invoke(app, [*ev, "--part", "train", "--out", str(tmp / "ev_train")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp / "ev_train" / "metrics.json").read_text())["metrics"]
    for k in ("paper_miou", "lesion_dice", "slice_dice_mean", "case_dice_mean"):
        assert m[k] == pytest.approx(best[k], abs=1e-12)
    r = runner.invoke(app, [*ev, "--part", "test", "--out", str(tmp / "ev_test")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp / "ev_test" / "metrics.json").read_text())
    assert res["empty_baseline"]["lesion_iou"] == 0.0
    assert "classifier" in res["metrics"] and "hd95_voxels_mean" in res["metrics"]
    assert (tmp / "ev_test" / "per_case.csv").read_text().count("\n") == 3  # header + 2


def test_cli_bad_inputs(search_setup):
    tmp, store = search_setup
    runner = CliRunner()
    base = ["search", "--store", str(store), "--maps", str(tmp / "maps"), "--out", str(tmp / "o")]
    r = runner.invoke(app, [*base, "--members", "a__gradcam,zz"])
    assert r.exit_code == 2 and "member 'zz'" in r.output
    r = runner.invoke(app, [*base, "--members", "a__gradcam", "--operators", "xor"])
    assert r.exit_code == 2 and "operator 'xor'" in r.output
    r = runner.invoke(app, [*base, "--members", "a__gradcam", "--objective", "accuracy"])
    assert r.exit_code == 2 and "objective 'accuracy'" in r.output
    # a member missing maps for some slices: error naming the member folder and the count
    ms = tmp / "maps" / "short__gradcam"
    write_map_set(ms, {}, np.arange(5), np.zeros((5, 16, 16), np.float16), np.zeros(5))
    r = runner.invoke(app, [*base, "--members", "a__gradcam,short__gradcam"])
    assert r.exit_code == 2 and "short__gradcam" in r.output and "no maps for" in r.output
    # maps of another size
    write_map_set(
        tmp / "maps" / "big__x", {}, np.arange(24), np.zeros((24, 8, 8), np.float16), np.zeros(24)
    )
    r = runner.invoke(app, [*base, "--members", "big__x"])
    assert r.exit_code == 2 and "shape" in r.output
    # a store without masks
    (store / "store.json").write_text(
        (store / "store.json").read_text().replace('"has_masks": true', '"has_masks": false')
    )
    r = runner.invoke(app, [*base, "--members", "a__gradcam", "--criterion", "masks"])
    assert r.exit_code == 2 and "no annotated case" in r.output
    # ... auto: the slice labels choose (labels criterion)
    r = runner.invoke(app, [*base, "--members", "a__gradcam", "--fp-budget", "0.5"])
    assert r.exit_code == 0 and "label_score=" in r.output, r.output
    best = json.loads((tmp / "o" / "best.json").read_text())
    assert best["criterion"]["name"] == "labels" and "paper_miou" not in best
    # --label-members: the labels criterion combines only those; others are an error line
    both = [*base, "--members", "a__gradcam,b__gradcam", "--fp-budget", "0.5", "--force"]
    r = runner.invoke(app, [*both, "--label-members", "b__gradcam"])
    assert r.exit_code == 0, r.output
    ranking = json.loads((tmp / "o" / "ranking.json").read_text())
    assert {m for row in ranking["top"] for m in row["members"]} == {"b__gradcam"}
    before = (tmp / "o" / "best.json").read_bytes()
    r = runner.invoke(app, [*both, "--label-members", "b__gradcam,c__gradcam"])
    assert r.exit_code == 2 and "'c__gradcam': not among --members" in r.output, r.output
    assert r.output.count("\n") == 1 and (tmp / "o" / "best.json").read_bytes() == before
    assert not list(tmp.glob(".o*"))  # refused before any work: no partial folder


def test_cli_top_k_and_slice_objective(search_setup):
    import csv

    tmp, store = search_setup
    runner = CliRunner()
    base = [
        "search",
        "--store",
        str(store),
        "--fold",
        "0",
        "--part",
        "train",
        "--maps",
        str(tmp / "maps"),
        "--members",
        "a__gradcam,b__gradcam",
        "--operators",
        "and,min",
    ]
    r = runner.invoke(app, [*base, "--top-k", "3", "--out", str(tmp / "k3")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp / "k3" / "ranking.csv").open()))
    pair = [row for row in rows if "+" in row["members"]]
    assert all(row["paper_miou"] != "" for row in rows)  # data-set metrics: every row
    assert sum(row["slice_dice_mean"] != "" for row in pair) == 2 * 3  # top 3 per operator
    assert all(row["slice_dice_mean"] != "" for row in pair[:3])
    meta = json.loads((tmp / "k3" / "ranking.json").read_text())
    assert "top 3 rows" in meta["slice_case_metrics"]
    # a slice-level objective computes slice metrics for every row and ranks by them
    r = runner.invoke(app, [*base, "--objective", "slice_dice_mean", "--out", str(tmp / "sd")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp / "sd" / "ranking.csv").open()))
    vals = [float(row["slice_dice_mean"]) for row in rows]
    assert vals == sorted(vals, reverse=True)
    best = json.loads((tmp / "sd" / "best.json").read_text())
    assert best["slice_dice_mean"] == pytest.approx(vals[0])


def test_ensemble_config_and_masks_file(search_setup):
    """EnsembleConfig reads best.json's configuration keys (others ignored) and applies as
    the dict does; write_config_masks' masks.npz reads back (read_masks) as apply_config's
    masks of the part's annotated slices, in store order."""
    from ensemblecam.config import EvaluateConfig
    from ensemblecam.ensemble.operators import EnsembleConfig
    from ensemblecam.errors import InputError
    from ensemblecam.io.mapstore import MapSet
    from ensemblecam.io.masks import read_masks
    from ensemblecam.stages.evaluate import write_config_masks

    tmp, store = search_setup
    conf = {
        "operator": "min",
        "members": ["a__gradcam", "b__gradcam"],
        "thresholds": [0.4, 0.6],
        "gate": 0.3,
    }
    (tmp / "best.json").write_text(json.dumps({**conf, "paper_miou": 0.5, "search": {}}))
    ec = EnsembleConfig.read(tmp / "best.json")
    assert ec == EnsembleConfig("min", ("a__gradcam", "b__gradcam"), (0.4, 0.6), 0.3)
    assert ec.to_dict() == conf
    with pytest.raises(InputError, match=r"x\.json: configuration lacks members, gate"):
        EnsembleConfig.from_dict({"operator": "and", "thresholds": [0.5]}, "x.json")
    cfg = EvaluateConfig(store=store, fold="0", part="test", maps=tmp / "maps", chunk=3)
    index, masks = read_masks(write_config_masks(cfg, ec, tmp / "eval" / "masks.npz"))
    st = SliceStore.open(store)
    assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
    assert st.table["has_mask"][index].all() and masks.dtype == np.uint8
    sets = [MapSet.open(tmp / "maps" / m) for m in conf["members"]]
    rows = [s.rows_for(index) for s in sets]
    maps = [np.asarray(s.maps[r]) for s, r in zip(sets, rows, strict=True)]
    probs = [s.probs[r] for s, r in zip(sets, rows, strict=True)]
    want = apply_config(maps, conf, probs)
    assert want.any() and not want.all()
    assert np.array_equal(masks, want) and np.array_equal(apply_config(maps, ec, probs), want)


def test_foreground_is_the_otsu_body_with_holes_filled() -> None:
    from ensemblecam.stages.evaluate import foreground

    img = np.zeros((2, 2, 6, 6), np.float32)  # (n, C, H, W)
    img[0, 0, 1:5, 1:5] = 10.0  # a body of 4x4 ...
    img[0, 0, 2:4, 2:4] = 1.0  # ... enclosing dark tissue (below Otsu's threshold)
    img[0, 1, 0, 5] = 7.0  # channel 1 adds a bright pixel in a corner
    img[0, 0] += 0.01 * np.arange(36).reshape(6, 6) % 3  # background noise
    fg = foreground(img)
    want = np.zeros((6, 6), bool)
    want[1:5, 1:5] = True
    want[0, 5] = True
    np.testing.assert_array_equal(fg[0], want)
    assert not fg[1].any()  # a blank slice has no foreground
