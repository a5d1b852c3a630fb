"""``ensemblecam run`` / ``predict``: end to end on a tiny phantom, caching, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ensemblecam import pipeline
from ensemblecam.cli import app
from ensemblecam.config import MIL_EPOCH_FACTOR, Config, load_config
from ensemblecam.errors import InputError
from ensemblecam.io.runlayout import operator_slug
from tiny_run import tiny_phantom, tiny_sections

TINY = tiny_sections()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_phantom(tmp_path_factory.mktemp("phantom") / "brats")


def _config(tmp: Path, phantom: Path, **changes: Any) -> Config:
    data = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        sec, key = dotted.split("__")
        data[sec][key] = value
    data["prepare"]["data"] = str(phantom)
    data["run"]["out"] = str(tmp / "run")
    return Config.model_validate(data)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, phantom: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    return pipeline.run_pipeline(_config(tmp, phantom), progress=False)


def test_end_to_end_results_export_report(finished_run: Path, phantom: Path) -> None:
    res = json.loads((finished_run / "results.json").read_text())
    assert res["folds"] == ["fold0", "fold1"]
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds[0] == "ensemble"
    for kind in ("operator", "single", "empty", "unet", "pseudo_unet"):
        assert kind in kinds
    for row in res["rows"]:
        assert set(row["per_fold"]) == {"fold0", "fold1"}
        for m in ("paper_miou", "paper_dsc", "lesion_dice", "case_dice_mean"):
            vals = [row["per_fold"][f][m] for f in res["folds"]]
            assert row["mean"][m] == pytest.approx(np.mean(vals))
            assert row["std"][m] == pytest.approx(np.std(vals))
        miou = row["mean"]["paper_miou"]
        assert 0.0 <= miou <= 1.0
    # the Empty row: lesion IoU 0, so paper mIoU = background IoU / 2
    empty = next(r for r in res["rows"] if r["kind"] == "empty")
    for f in res["folds"]:
        m = empty["per_fold"][f]
        assert m["lesion_iou"] == 0.0
        assert m["paper_miou"] == pytest.approx(m["background_iou"] / 2)
    # the chosen ensemble is the best configuration on calibration data, per fold
    for f in res["folds"]:
        best = json.loads((finished_run / f / "search" / "best.json").read_text())
        ens = next(r for r in res["rows"] if r["kind"] == "ensemble")
        assert ens["config"][f]["thresholds"] == best["thresholds"]
        # the self-training labels come from the pseudo-label search's configuration: the
        # same members, judged on the calibration part's lesion slices by lesion Dice
        pseudo = json.loads((finished_run / f / "pseudo_search" / "best.json").read_text())
        assert pseudo["criterion"]["slices"] == "lesion" and pseudo["objective"] == "lesion_dice"
        assert pseudo["search"]["members"] == best["search"]["members"]
        assert pseudo["n_slices"] < best["n_slices"]
        refined = json.loads((finished_run / f / "refine" / "refine.json").read_text())
        assert refined["config"]["members"] == pseudo["members"]
        assert refined["config"]["thresholds"] == pseudo["thresholds"]
    # every case is evaluated once (k-fold test parts) and exported in its scan geometry:
    # export/ the self-trained U-Net's masks (the final method), export_ensemble/ the ensemble's
    cases = sorted(p.name for p in phantom.iterdir() if p.is_dir())
    own = next(r for r in res["rows"] if r["kind"] == "pseudo_unet")
    assert own["name"] == "U-Net self-trained on ensemble pseudo-labels"
    for folder, method, masks in (
        ("export", "self_trained", "pseudo_unet/masks.npz"),
        ("export_ensemble", "ensemble", "masks.npz"),
    ):
        index = json.loads((finished_run / folder / "index.json").read_text())
        assert index["source"]["method"] == method
        assert sorted(index["cases"]) == cases
        # the files hold exactly the evaluated masks of that method (no crop: voxel counts add)
        total = 0
        for f in res["folds"]:
            with np.load(finished_run / f / "eval" / masks, allow_pickle=False) as npz:
                total += int(npz["masks"].sum())
        assert sum(c["mask_voxels"] for c in index["cases"].values()) == total
        for case in cases:
            src = nib.load(phantom / case / f"{case}_flair.nii.gz")
            out = nib.load(finished_run / folder / f"{case}.nii.gz")
            assert out.shape == src.shape
            np.testing.assert_allclose(out.affine, src.affine)
            assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    # the self-trained U-Net's and each operator row's kept masks (the report's gallery
    # draws them) are the ones its row scored (per-slice tp + fp)
    ops = [operator_slug(r["config"]["fold0"]["operator"]) for r in res["rows"]
           if r["kind"] == "operator"]  # fmt: skip
    assert ops
    for f in res["folds"]:
        for slug in ("pseudo_unet", *ops):
            with np.load(finished_run / f / "eval" / slug / "masks.npz") as npz:
                index, masks = npz["index"], npz["masks"]
            with open(finished_run / f / "eval" / slug / "per_slice.csv") as fh:
                rows = list(csv.DictReader(fh))
            assert [int(r["index"]) for r in rows] == index.tolist()
            assert [int(r["tp"]) + int(r["fp"]) for r in rows] == masks.sum(axis=(1, 2)).tolist()
    html = (finished_run / "report" / "report.html").read_text()
    assert "paper_miou" in html and "data:image/png;base64," in html
    assert 'class="percase sortable"' in html and html.count("<script>") == 1
    # predicted lesion pixels outside the scan's foreground: counted by evaluate, quoted
    # by the report (summed over the folds)
    for kind, slug in (("ensemble", "ensemble"), ("pseudo_unet", "pseudo_unet")):
        counts = []
        for f in res["folds"]:
            m = json.loads((finished_run / f / "eval" / slug / "metrics.json").read_text())
            m = m["metrics"]
            assert 0 <= m["predicted_outside_foreground"] <= m["predicted_pixels"]
            counts.append((m["predicted_pixels"], m["predicted_outside_foreground"]))
        total, outside = map(sum, zip(*counts, strict=True))
        name = next(r["name"] for r in res["rows"] if r["kind"] == kind)
        assert f"<td>{name}</td><td>{total:,}</td><td>{outside:,}</td>" in html
    run = json.loads((finished_run / "run.json").read_text())
    assert run["status"] == "complete" and run["config_hash"]
    assert "fold0/train/simplecnn" in run["timings"]


def test_choose_final_hand_computed() -> None:
    from ensemblecam.pipeline.results import final_text
    from ensemblecam.pipeline.run import choose_final

    cfg = Config.model_validate(tiny_sections(run={"final": "auto"}))
    sel = {"fold0": {"ensemble": 0.6, "self_trained": 0.5},
           "fold1": {"ensemble": 0.2, "self_trained": 0.4}}  # fmt: skip
    got = choose_final(cfg, {f: {"select": s} for f, s in sel.items()})
    assert got["method"] == "self_trained"  # means: ensemble 0.40 < self-trained 0.45
    assert got["val_lesion_dice"] == pytest.approx({"ensemble": 0.4, "self_trained": 0.45})
    sel["fold1"]["ensemble"] = 0.4  # 0.50 > 0.45
    assert choose_final(cfg, {f: {"select": s} for f, s in sel.items()})["method"] == "ensemble"
    sel["fold1"]["ensemble"] = 0.3  # a tie (0.45 each): the self-trained U-Net
    assert choose_final(cfg, {f: {"select": s} for f, s in sel.items()})["method"] == (
        "self_trained"
    )
    # a fold whose val part has no masks: nothing to choose with, the default
    no_masks = choose_final(cfg, {"fold0": {"select": sel["fold0"]}, "fold1": {"select": None}})
    assert no_masks["method"] == "self_trained" and "no masks" in no_masks["chosen_by"]
    fixed = cfg.model_copy(update={"run": cfg.run.model_copy(update={"final": "ensemble"})})
    assert choose_final(fixed, {"fold0": {"select": sel["fold0"]}})["method"] == "ensemble"
    off = cfg.model_copy(update={"run": cfg.run.model_copy(update={"pseudo_unet": False})})
    assert choose_final(off, {})["method"] == "ensemble"
    # two rounds: the first round's U-Net can be the final one
    two = cfg.model_copy(update={"run": cfg.run.model_copy(update={"rounds": 2})})
    sel = {"fold0": {"ensemble": 0.3, "self_trained_round1": 0.7, "self_trained": 0.6},
           "fold1": {"ensemble": 0.5, "self_trained_round1": 0.5, "self_trained": 0.5}}  # fmt: skip
    got = choose_final(two, {f: {"select": s} for f, s in sel.items()})
    assert (got["method"], got["round"], got["unet"]) == ("self_trained", 1, "pseudo_round1")
    assert got["val_lesion_dice"] == pytest.approx(
        {"ensemble": 0.4, "self_trained_round1": 0.6, "self_trained": 0.55}
    )
    sel["fold0"]["self_trained"] = 0.7  # a tie of the rounds (0.6 each): the later one
    got = choose_final(two, {f: {"select": s} for f, s in sel.items()})
    assert (got["round"], got["unet"]) == (2, "pseudo_unet")
    assert (
        "ensemble 40.0%, self-trained round 1 60.0%, self-trained (last round) 60.0%"
        in final_text({"final": got})
    )
    # the val part's pseudo-labels are reported beside the candidates, never chosen
    sel["fold0"]["pseudo_labels"], sel["fold1"]["pseudo_labels"] = 0.9, 0.6
    got = choose_final(two, {f: {"select": s} for f, s in sel.items()})
    assert (got["round"], got["val_pseudo_labels"]) == (2, pytest.approx(0.75))
    assert "pseudo_labels" not in got["val_lesion_dice"]
    assert "the first round learnt from score 75.0%" in final_text({"final": got})
    del sel["fold1"]["pseudo_labels"]  # not scored in every fold: no mean
    assert "val_pseudo_labels" not in choose_final(two, {f: {"select": s} for f, s in sel.items()})


def test_final_self_trained_without_self_training_is_refused(phantom: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, phantom, run__pseudo_unet=False, run__final="self_trained")
    with pytest.raises(InputError, match=r"^config: run.final self_trained needs run.pseudo_unet"):
        pipeline.run_pipeline(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_second_self_training_round(finished_run: Path, phantom: Path, tmp_path: Path) -> None:
    """run.rounds 2 (the default): round 1's U-Net (pseudo_round1/) maps the refined parts,
    those maps at threshold 0.5 are refined into round 2's labels, and pseudo/ is round 2's
    U-Net; run.final auto picks one of the ensemble and the two U-Nets on the val part, and
    export/ and predict use the one it picked."""
    from ensemblecam.io.masks import read_masks
    from ensemblecam.io.store import SliceStore

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = load_config(run / "config.yaml")
    cfg.run.out, cfg.run.rounds, cfg.run.final = run, 2, "auto"
    pipeline.run_pipeline(cfg, force=True, progress=False)
    ran = json.loads((run / "run.json").read_text())["ran_this_time"]
    for f in ("fold0", "fold1"):
        for stage in ("pseudo_round1", "pseudo_round1/maps", "refine_round2", "pseudo_unet"):
            assert f"{f}/{stage}" in ran
    assert not any("/train/" in r or r.endswith(("/cam", "/search", "/refine")) for r in ran)
    res = json.loads((run / "results.json").read_text())
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds.count("pseudo_round") == 1 and kinds.count("pseudo_unet") == 1
    fold = run / "fold0"
    conf = json.loads((fold / "round2.json").read_text())
    assert conf == {"operator": "single", "members": ["selftrain__round1"],
                    "thresholds": [0.5], "gate": None}  # fmt: skip
    meta = json.loads((fold / "maps" / "selftrain__round1" / "meta.json").read_text())
    assert meta["checkpoint"] == str((fold / "pseudo_round1" / "best.pt").resolve())
    # round 2's labels follow the slice labels: lesion-free slices all background, lesion
    # slices never empty
    index, labels = read_masks(fold / "refine_round2" / "masks.npz")
    slice_labels = SliceStore.open(run / "store").labels[index]
    lab = np.asarray(labels)
    assert (lab[slice_labels == 0] == 0).all()
    assert ((lab[slice_labels == 1] == 1).sum(axis=(1, 2)) > 0).all()
    rec = json.loads((fold / "pseudo" / "unet.json").read_text())
    assert str(fold / "refine_round2" / "masks.npz") in json.dumps(rec)
    # run.final auto chooses among the ensemble and both rounds' U-Nets on the val part
    final = res["final"]
    names = ("ensemble", "self_trained_round1", "self_trained")
    means = {
        m: float(np.mean([json.loads((run / f / "select" / m / "metrics.json").read_text())
                          ["metrics"]["lesion_dice"] or 0.0 for f in res["folds"]]))
        for m in names
    }  # fmt: skip
    assert final["val_lesion_dice"] == pytest.approx(means)
    best = max(reversed(names), key=means.__getitem__)  # a tie: the later round
    kinds = {"self_trained_round1": "pseudo_round1", "self_trained": "pseudo_unet"}
    assert final.get("unet", "ensemble") == kinds.get(best, best)
    assert {"fold0/select", "fold1/select"} <= set(ran)
    # the refined pseudo-labels scored on the same val slices: lesion Dice of their lesion
    # class (ignore as background) against the masks, by hand
    from ensemblecam.stages.search import annotated_part

    dice = []
    for f in res["folds"]:
        _, _, idx = annotated_part(run / "store", run / "split" / "splits.json", f, "val")
        index, labels = read_masks(run / f / "refine" / "masks.npz")
        pred = np.asarray(labels)[np.searchsorted(index, idx)] == 1
        truth = np.asarray(SliceStore.open(run / "store").masks[idx]) > 0
        dice.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
        got = json.loads((run / f / "select" / "pseudo_labels" / "metrics.json").read_text())
        assert got["part"] == "val"
        assert got["metrics"]["lesion_dice"] == pytest.approx(dice[-1])
    assert final["val_pseudo_labels"] == pytest.approx(np.mean(dice))
    for f in res["folds"]:
        assert (
            json.loads((run / f / "select" / "ensemble" / "metrics.json").read_text())["part"]
            == "val"
        )  # calibration data, never the held-out part
    source = json.loads((run / "export" / "index.json").read_text())["source"]
    own = ("eval", final["unet"]) if final["method"] == "self_trained" else ("eval",)
    assert source["method"] == final["method"]
    assert source["masks"] == [str(run.joinpath(f, *own, "masks.npz")) for f in res["folds"]]
    assert (run / "export_ensemble").is_dir() == (final["method"] == "self_trained")
    assert "Final masks (export/, predict):" in (run / "results.md").read_text()
    default = pipeline.predict(run, phantom, tmp_path / "default", progress=False, fold="fold0")
    assert json.loads((default / "index.json").read_text())["source"]["method"] == final["method"]
    # predict segments with the U-Net the run chose (here an earlier round's, as if chosen)
    res["final"] = {"method": "self_trained", "round": 1, "unet": "pseudo_round1"}
    (run / "results.json").write_text(json.dumps(res))
    pred = pipeline.predict(run, phantom, tmp_path / "pred", progress=False, fold="fold0")
    src = json.loads((pred / "index.json").read_text())["source"]
    assert src["unet"] == "pseudo_round1" and src["checkpoint"] == str(
        run / "fold0" / "pseudo_round1" / "best.pt"
    )
    assert (
        src["thresholds"]["fold0"]
        == json.loads(
            (run / "fold0" / "threshold" / "pseudo_round1" / "threshold.json").read_text()
        )["threshold"]
    )
    # refine.round_options reach round 2 alone: with uncertain_bg, round 2's labels are the
    # same but for the background where round 1's map has r > -0.8 (ignore now)
    from ensemblecam.io.mapstore import MapSet, dequantise
    from ensemblecam.refine import IGNORE, relative_scores

    before = {f: read_masks(run / f / "refine_round2" / "masks.npz") for f in res["folds"]}
    cfg.refine.round_options = {"uncertain_bg": 0.8}
    pipeline.run_pipeline(cfg, force=True, progress=False)
    ran = json.loads((run / "run.json").read_text())["ran_this_time"]
    assert {"fold0/refine_round2", "fold0/pseudo_unet"} <= set(ran)
    assert not any(r.endswith(("/refine", "/pseudo_round1", "/pseudo_round1/maps")) for r in ran)
    for f, (index, old) in before.items():
        ms = MapSet.open(run / f / "maps" / "selftrain__round1")
        maps = np.stack([dequantise(np.asarray(ms.maps[i])) for i in ms.rows_for(index)])
        uncertain = relative_scores(maps[None], [0.5])[0] > -0.8
        lesion_slice = SliceStore.open(run / "store").labels[index][:, None, None] == 1
        want = np.where((np.asarray(old) == 0) & uncertain & lesion_slice, IGNORE, old)
        got_index, got = read_masks(run / f / "refine_round2" / "masks.npz")
        np.testing.assert_array_equal(got_index, index)
        np.testing.assert_array_equal(got, want)
        assert (want == IGNORE).sum() > (np.asarray(old) == IGNORE).sum()


def test_predict_on_scans_without_seg(
    finished_run: Path, phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new"
    shutil.copytree(phantom, new, ignore=shutil.ignore_patterns("*_seg.nii.gz"))
    folds = ["fold0", "fold1"]
    # default: every fold's self-trained U-Net, lesion probabilities averaged
    out = pipeline.predict(finished_run, new, tmp_path / "masks", progress=False,
                           probabilities=True)  # fmt: skip
    index = json.loads((out / "index.json").read_text())
    src = index["source"]
    assert src["method"] == "self_trained"  # the run's final method by default
    assert src["folds"] == folds and "fold" not in src and "mean" in src["fold_ensemble"]
    # the index names only files that exist (predict's scratch store is gone)
    assert index["store"] is None and src["scans"] == str(new)
    named = [f for c in index["cases"].values() for f in c.values()
             if isinstance(f, str) and f.endswith(".nii.gz")]  # fmt: skip
    assert named and all((out / f).is_file() for f in named)
    said = capsys.readouterr().out
    assert "predict: folds fold0, fold1 (mean of the folds' U-Net lesion probabilities" in said
    assert all(d in said for d in src["descriptions"].values())
    # one fold alone, with probability maps: the fold ensemble's probability is the mean of
    # the folds' probabilities and its mask is where that mean exceeds the mean of the
    # thresholds each fold's run calibrated on its training part
    thr = {f: json.loads((finished_run / f / "threshold" / "pseudo_unet" / "threshold.json")
                         .read_text())["threshold"] for f in folds}  # fmt: skip
    assert src["thresholds"] == thr
    # a run made before the threshold was calibrated: one error line saying what to do
    record = finished_run / "fold0" / "threshold" / "pseudo_unet" / "threshold.json"
    kept = record.read_bytes()
    record.unlink()
    try:
        with pytest.raises(InputError, match=r"threshold\.json: .*rerun `ensemblecam run`"):
            pipeline.predict(finished_run, new, tmp_path / "old", progress=False)
    finally:
        record.write_bytes(kept)
    assert not (tmp_path / "old").exists() and not (tmp_path / ".old.work").exists()
    one = {}
    for fold in folds:
        one[fold] = pipeline.predict(finished_run, new, tmp_path / fold, progress=False,
                                     fold=fold, probabilities=True)  # fmt: skip
        assert json.loads((one[fold] / "index.json").read_text())["source"]["fold"] == fold
        assert f"predict: {fold}, U-Net self-trained on ensemble pseudo-labels" in (
            capsys.readouterr().out
        )
    cases = sorted(p.name for p in new.iterdir() if p.is_dir())
    for case in cases:
        src_img = nib.load(new / case / f"{case}_flair.nii.gz")
        prob = nib.load(out / f"{case}_prob.nii.gz")
        assert prob.get_data_dtype() == np.float32 and prob.shape == src_img.shape
        np.testing.assert_allclose(prob.affine, src_img.affine)
        p = np.asarray(prob.dataobj)
        assert p.min() >= 0 and p.max() <= 1
        per = [np.asarray(nib.load(one[f] / f"{case}_prob.nii.gz").dataobj) for f in folds]
        np.testing.assert_allclose(p, np.mean(per, axis=0), atol=1e-6)
        mask = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, (p > np.mean(list(thr.values()))).astype(np.uint8))
        # a fold's own mask: its probability above its threshold
        own = np.asarray(nib.load(one["fold0"] / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(own, (per[0] > thr["fold0"]).astype(np.uint8))
    assert index["cases"][cases[0]]["prob"] == f"{cases[0]}_prob.nii.gz"
    fold = folds[0]
    ens = pipeline.predict(
        finished_run, new, tmp_path / "ens", progress=False, method="ensemble", fold=fold
    )
    assert json.loads((ens / "index.json").read_text())["source"]["method"] == "ensemble"
    assert "predict: " + fold + ", ensemble (best configuration)" in capsys.readouterr().out
    # the cases the fold evaluated: each method's masks are the run's exported ones
    splits = json.loads((finished_run / "split" / "splits.json").read_text())
    test_cases = next(f for f in splits["folds"] if f["name"] == fold)["test"]
    assert test_cases
    for folder, got in (("export", one[fold]), ("export_ensemble", ens)):
        for case in test_cases:
            want = np.asarray(nib.load(finished_run / folder / f"{case}.nii.gz").dataobj)
            np.testing.assert_array_equal(
                np.asarray(nib.load(got / f"{case}.nii.gz").dataobj), want
            )
    # the ensemble method over both folds: a strict majority of the folds' masks (two
    # folds: both), and its probability map is the fraction of folds marking the voxel
    both = pipeline.predict(finished_run, new, tmp_path / "both", progress=False,
                            method="ensemble", probabilities=True)  # fmt: skip
    ens1 = pipeline.predict(finished_run, new, tmp_path / "ens1", progress=False,
                            method="ensemble", fold="fold1")  # fmt: skip
    for case in cases:
        a = np.asarray(nib.load(ens / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(ens1 / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asarray(nib.load(both / f"{case}.nii.gz").dataobj), a & b)
        np.testing.assert_allclose(
            np.asarray(nib.load(both / f"{case}_prob.nii.gz").dataobj), (a + b.astype(float)) / 2
        )
    for case in cases:
        src_img = nib.load(new / case / f"{case}_flair.nii.gz")
        m = nib.load(out / f"{case}.nii.gz")
        assert m.shape == src_img.shape
        np.testing.assert_allclose(m.affine, src_img.affine)
    assert not (tmp_path / ".masks.work").exists()
    with pytest.raises(InputError, match="--method best: expected one of self_trained, ensemble"):
        pipeline.predict(finished_run, new, tmp_path / "m2", progress=False, method="best")
    with pytest.raises(InputError, match="already holds"):
        pipeline.predict(finished_run, new, out, progress=False)
    # a case lacking a modality the models were trained on
    bad = tmp_path / "bad"
    shutil.copytree(new, bad, ignore=shutil.ignore_patterns("*_t1ce.nii.gz"))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--run",
            str(finished_run),
            "--input",
            str(bad),
            "--out",
            str(tmp_path / "bad_out"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "t1ce" in result.output
    assert not (tmp_path / "bad_out").exists()


def test_run_calibrates_each_unet_on_the_training_part(finished_run: Path) -> None:
    """threshold.json of every U-Net equals a brute-force recomputation: the lesion Dice of
    P(lesion) > t on the annotated slices of the fold's training part, for each t."""
    from ensemblecam.io.runlayout import RunLayout
    from ensemblecam.io.split import get_fold
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.unet import segment_unet

    store = SliceStore.open(finished_run / "store")
    lay = RunLayout(finished_run).fold("fold0")
    train = store.indices_for_cases(get_fold(finished_run / "split" / "splits.json", 0).train)
    train = train[store.annotated(train)]
    truth = np.asarray(store.masks[train]) > 0
    for kind in ("unet", "pseudo_unet"):
        rec = json.loads(lay.threshold_record(kind).read_text())
        assert rec["part"] == "train" and rec["n_slices"] == len(train)
        _, probs = segment_unet(lay.unet_checkpoint(kind), store, train)
        assert len(rec["table"]) == 19  # 0.05 ... 0.95
        best = (-1.0, 0.0)
        for row in rec["table"]:
            t = row["threshold"]
            tp = fp = fn = 0
            for p, g in zip(probs.ravel(), truth.ravel(), strict=True):
                tp += bool(p > t and g)
                fp += bool(p > t and not g)
                fn += bool(not p > t and g)
            assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn)
            dice = 2 * tp / (2 * tp + fp + fn)
            if dice > best[0] or (dice == best[0] and abs(t - 0.5) < abs(best[1] - 0.5)):
                best = (dice, t)
        assert rec["threshold"] == best[1]
        # the evaluated masks use it
        metrics = json.loads(lay.eval_metrics(kind).read_text())
        assert metrics["threshold"] == rec["threshold"]
    # the report says it (from the stored records)
    t = json.loads(lay.threshold_record("pseudo_unet").read_text())["threshold"]
    html = RunLayout(finished_run).report.read_text()
    assert f"fold0: P(lesion) &gt; {t:g}, calibrated on the train part" in html


def test_classifier_gate_in_run_and_predict(
    finished_run: Path, phantom: Path, tmp_path: Path
) -> None:
    from ensemblecam.io.masks import read_masks
    from ensemblecam.io.runlayout import RunLayout
    from ensemblecam.io.store import SliceStore
    from ensemblecam.pipeline.run import load_run_config
    from ensemblecam.stages.gate import classifier_probs
    from ensemblecam.stages.unet import predict_unet

    lay = RunLayout(finished_run).fold("fold0")
    store = SliceStore.open(finished_run / "store")
    member = lay.map_set("simplecnn__gradcam")
    idx = read_masks(lay.row_masks("pseudo_unet"))[0]
    p = np.load(member / "probs.npy")[np.searchsorted(np.load(member / "index.npy"), idx)]
    # the U-Net's masks: P(lesion) above the threshold calibrated on the training part
    t_seg = json.loads(lay.threshold_record("pseudo_unet").read_text())["threshold"]
    assert json.loads(lay.eval_metrics("pseudo_unet").read_text())["threshold"] == t_seg
    raw = predict_unet(lay.unet_checkpoint("pseudo_unet"), store, idx, threshold=t_seg)
    assert raw.any()
    # predict's forward pass gives the probabilities the run's maps hold
    ck = [lay.checkpoint("simplecnn")]
    np.testing.assert_allclose(classifier_probs(ck, store, idx), p, atol=1e-5)

    def gated_as_said(threshold: float) -> np.ndarray:
        """The evaluated (and exported) masks are the U-Net's, emptied where the
        classifier's P(lesion) (probs.npy of its maps) is below the threshold."""
        gate = json.loads(lay.eval_metrics("pseudo_unet").read_text())["gate"]
        assert gate["threshold"] == threshold and gate["classifiers"] == [str(member)]
        got = read_masks(lay.row_masks("pseudo_unet"))[1]
        low = p < threshold
        assert gate["n_gated"] == int(low.sum())
        assert not got[low].any()
        np.testing.assert_array_equal(got[~low], raw[~low])
        return low

    # the default threshold is calibrated on the val part: the F1 of the gated U-Net's
    # slice calls against the slice labels, recomputed here from the val part's slices
    from ensemblecam.io.split import get_fold
    from ensemblecam.stages.gate import choose_threshold

    calibrated = json.loads(lay.gate_record("pseudo_unet").read_text())
    val = store.indices_for_cases(get_fold(finished_run / "split" / "splits.json", 0).val)
    pv = np.load(member / "probs.npy")[np.searchsorted(np.load(member / "index.npy"), val)]
    called = predict_unet(lay.unet_checkpoint("pseudo_unet"), store, val, threshold=t_seg)
    called = called.any(axis=(1, 2))
    grid = [i / 10 for i in range(1, 10)]
    assert calibrated["table"] == choose_threshold(called, pv, store.labels[val], grid)["table"]
    assert calibrated["part"] == "val" and len(calibrated["table"]) == 10
    gated_as_said(calibrated["threshold"])
    # the report says which threshold gated each fold and why (from the stored records)
    html = RunLayout(finished_run).report.read_text()
    t0 = calibrated["threshold"]
    assert f"fold0: threshold {t0:g}{' (no gating)' if t0 == 0 else ''}, calibrated" in html
    # a threshold inside the tiny classifier's range (the middle of its widest gap), so
    # slices on both sides; only the self-trained rows' evaluation and the export rerun
    u = np.unique(p)
    k = int(np.argmax(np.diff(u)))
    assert u[k + 1] - u[k] > 1e-5  # far from the recomputation tolerance above
    run = tmp_path / "run"  # a copy: the module's later tests see the run as it was made
    shutil.copytree(finished_run, run)
    lay = RunLayout(run).fold("fold0")  # gated_as_said reads the copy from here on
    member, ck = lay.map_set("simplecnn__gradcam"), [lay.checkpoint("simplecnn")]
    cfg = load_run_config(run)
    cfg.run.out, cfg.run.gate_threshold = run, float((u[k] + u[k + 1]) / 2)
    cfg.run.report = False  # read above; seconds
    pipeline.run_pipeline(cfg, force=True, progress=False)
    ran = set(json.loads((run / "run.json").read_text())["ran_this_time"])
    assert {"fold0/pseudo_unet/evaluate", "fold1/pseudo_unet/evaluate", "export"} <= ran
    assert not any(r.endswith(("/cam", "/pseudo_unet", "/unet/evaluate")) for r in ran)
    low = gated_as_said(cfg.run.gate_threshold)
    assert low.any() and (~low).any()
    # predict: the run's gate by default, --gate none keeps the U-Net's masks
    new = tmp_path / "new"
    shutil.copytree(phantom, new, ignore=shutil.ignore_patterns("*_seg.nii.gz"))
    on = pipeline.predict(run, new, tmp_path / "on", progress=False, fold="fold0",
                          probabilities=True)  # fmt: skip
    off = pipeline.predict(run, new, tmp_path / "off", progress=False, fold="fold0",
                           gate="none")  # fmt: skip
    rec = json.loads((on / "index.json").read_text())["source"]["gate"]["folds"]["fold0"]
    assert rec["classifiers"] == [str(ck[0])] and rec["threshold"] == cfg.run.gate_threshold
    assert json.loads((off / "index.json").read_text())["source"]["gate"] is None
    emptied = kept = 0
    for case in sorted(c.name for c in new.iterdir() if c.is_dir()):
        a = np.asarray(nib.load(on / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(off / f"{case}.nii.gz").dataobj)
        pr = np.asarray(nib.load(on / f"{case}_prob.nii.gz").dataobj)
        for z in range(a.shape[2]):  # axial slices: kept whole or emptied whole
            if np.array_equal(a[..., z], b[..., z]):
                kept += int(a[..., z].any())
            else:
                assert not a[..., z].any() and not pr[..., z].any()
                emptied += 1
    assert 0 < emptied <= rec["n_gated"] and kept > 0
    result = CliRunner().invoke(
        app,
        ["predict", "--run", str(run), "--input", str(new), "--out",
         str(tmp_path / "x"), "--gate", "yes"],
    )  # fmt: skip
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--gate yes: expected one of none, classifiers" in result.output
    assert not (tmp_path / "x").exists()
    # gate off: the masks are the U-Net's
    cfg.run.gate = "none"
    pipeline.run_pipeline(cfg, force=True, progress=False)
    assert "gate" not in json.loads(lay.eval_metrics("pseudo_unet").read_text())
    np.testing.assert_array_equal(read_masks(lay.row_masks("pseudo_unet"))[1], raw)


def test_kill_and_resume(phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(
        tmp_path,
        phantom,
        run__unet=False,
        run__pseudo_unet=False,
        run__mil=False,  # seconds: resume is the stages' common code, localisers or not
        run__final="auto",
        run__report=False,
        run__export=False,
    )
    import ensemblecam.stages.cam as cam_stage

    real = cam_stage.run_cam

    def killed(*args: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt  # the process dies while the maps are computed

    monkeypatch.setattr(cam_stage, "run_cam", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, progress=False)
    root = tmp_path / "run"
    assert (root / "fold0" / "models" / "simplecnn" / "stage.json").is_file()
    assert not (root / "results.json").exists()
    assert json.loads((root / "run.json").read_text())["status"] == "running"
    monkeypatch.setattr(cam_stage, "run_cam", real)
    pipeline.run_pipeline(cfg, progress=False)
    ran = json.loads((root / "run.json").read_text())["ran_this_time"]
    assert "fold0/cam" in ran and "fold0/train/simplecnn" not in ran  # trained before the kill
    assert "fold1/train/simplecnn" in ran
    assert (root / "results.json").is_file()


def test_keys_follow_the_data_not_its_path(phantom: Path, tmp_path: Path) -> None:
    """A scan rewritten in place prepares the store again and reruns what follows (the key
    once held only the data folder's path, so the old results were kept); the same data
    moved, time stamps and all, reruns nothing."""
    data = tmp_path / "data"
    shutil.copytree(phantom, data)  # copy2: time stamps kept
    cheap = dict(run__unet=False, run__pseudo_unet=False, run__mil=False, run__final="auto",
                 run__report=False, run__export=False)  # fmt: skip
    pipeline.run_pipeline(_config(tmp_path, data, **cheap), progress=False)
    root = tmp_path / "run"
    first = np.load(root / "store" / "images.npy")

    def ran() -> list[str]:
        return json.loads((root / "run.json").read_text())["ran_this_time"]

    flair = sorted(data.rglob("*_flair.nii.gz"))[0]
    img = nib.load(flair)
    vox = np.asarray(img.dataobj, dtype=np.float32)
    vox[: vox.shape[0] // 2] = vox.max()  # the same name, other voxels
    nib.save(nib.Nifti1Image(vox, img.affine, img.header), flair)
    pipeline.run_pipeline(_config(tmp_path, data, **cheap), progress=False)
    assert {"prepare", "split", "fold0/train/simplecnn", "fold0/search"} <= set(ran())
    assert not np.array_equal(np.load(root / "store" / "images.npy"), first)

    moved = tmp_path / "moved"
    shutil.move(data, moved)  # a rename: time stamps kept
    with pytest.raises(InputError, match="another configuration"):  # the path is config
        pipeline.run_pipeline(_config(tmp_path, moved, **cheap), progress=False)
    pipeline.run_pipeline(_config(tmp_path, moved, **cheap), force=True, progress=False)
    assert ran() == []


def test_input_files_are_keyed_by_content(phantom: Path, tmp_path: Path) -> None:
    from ensemblecam.config import PrepareConfig, SplitConfig
    from ensemblecam.pipeline.run import _options
    from ensemblecam.stages.prepare import input_fingerprint

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"train": ["x"]}')
    b.write_text('{"train": ["x"]}')
    key = _options(SplitConfig(scheme="list", list_file=a))
    assert key == _options(SplitConfig(scheme="list", list_file=b))  # the name is not keyed
    b.write_text('{"train": ["y"]}')
    assert key != _options(SplitConfig(scheme="list", list_file=b))
    cases, metadata = input_fingerprint(PrepareConfig(data=phantom, modalities=["flair"]))
    name, files = cases[0]
    seg = next(phantom.rglob(f"{name}_seg.nii.gz"))
    assert files[-1] == [seg.relative_to(phantom).as_posix(), seg.stat().st_size,
                         seg.stat().st_mtime_ns]  # fmt: skip
    assert len(files) == 2 and metadata == []


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    with pytest.raises(InputError, match=r"unknown key 'train\.epochz'"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"search": {"grid": [1, 2]}}))
    with pytest.raises(InputError, match=r"search\.grid"):
        load_config(bad)
    result = CliRunner().invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "search.grid" in result.output
    # MIL localiser variants: a name that cannot name folders, a field the mil section
    # lacks or a wrong type in it, none at all
    for variants, match in (
        ({"unet": {}}, r"run\.mil_variants': localiser name 'unet': expected mil"),
        ({"mil__x": {}}, r"localiser name 'mil__x'"),
        ({"mil_b": {"topp": 1}}, r"run\.mil_variants': mil_b: unknown key 'topp'"),
        ({"mil_b": {"negative_top": "maybe"}}, r"mil_b: key 'negative_top': .*boolean"),
        ({}, r"run\.mil_variants': .*at least 1 item"),
    ):
        bad.write_text(yaml.safe_dump({"run": {"mil_variants": variants}}))
        with pytest.raises(InputError, match=match):
            load_config(bad)
    # a missing data folder is refused before anything is written
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"run": {"out": str(tmp_path / "run")}}))
    result = CliRunner().invoke(app, ["run", str(good), "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "data folder not found" in result.output
    assert not (tmp_path / "run").exists()


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == [
        "demo.yaml",
        "own-data.yaml",
        "paper-brats.yaml",
        "paper-prostate.yaml",
        "thesis-kits.yaml",
    ]
    brats = load_config(root / "paper-brats.yaml")
    assert brats.split.folds == 3 and brats.run.models == ["resnet34", "resnet50"]
    assert brats.prepare.crop_box == (56, 184, 56, 184)
    assert brats.cam.methods == ["gradcam"] and brats.search.grid == "0:0.9:0.1"
    assert brats.search.operators == ["and", "or", "min", "max"]
    kits = load_config(root / "thesis-kits.yaml")
    assert kits.split.fractions == (0.6, 0.2, 0.2) and kits.run.calibration_part == "val"
    # the self-trained segmenter is on by default and in the demo, off in the published
    # protocols (they stay as published)
    assert Config().run.pseudo_unet and load_config(root / "demo.yaml").run.pseudo_unet
    for name in ("paper-brats.yaml", "paper-prostate.yaml", "thesis-kits.yaml"):
        assert load_config(root / name).run.pseudo_unet is False
        # ... and their U-Net trains on the slices as stored (the default augments them)
        assert load_config(root / name).unet.augment == "none"
        # ... and take their U-Net's argmax (the default calibrates the threshold)
        assert load_config(root / name).run.segmenter_threshold == 0.5
    assert Config().run.segmenter_threshold == "auto"
    assert Config().unet.augment == "spatial" and Config().mil.augment == "spatial"


def test_keys_cover_only_non_default_options() -> None:
    # a new option added with its default leaves existing keys (and results) valid
    from ensemblecam.config import CamConfig
    from ensemblecam.pipeline.run import _options

    assert _options(CamConfig(out=Path("elsewhere"), force=True)) == {}
    assert _options(CamConfig(score_precision="bf16")) == {"score_precision": "bf16"}
    base = Config()
    assert pipeline.config_hash(base) == pipeline.config_hash(Config(cam={"score_tol": 1e-3}))
    assert pipeline.config_hash(base) != pipeline.config_hash(Config(cam={"score_tol": 1e-2}))


def test_localiser_variants_and_predict_reuses_their_scale(
    finished_run: Path, phantom: Path, tmp_path: Path
) -> None:
    """run trains every run.mil_variants localiser (default: the plain one, the
    symmetric one with scaled maps and the denoising autoencoder) as a search member;
    predict divides a scaled
    localiser's maps of new scans by the scale the fold's training part gave (meta.json of
    its member), not by one of its own."""
    from ensemblecam.io.mapstore import MapSet, localiser_member
    from ensemblecam.io.store import SliceStore
    from ensemblecam.pipeline.predict import _ensemble_masks
    from ensemblecam.stages.cam import split_indices
    from ensemblecam.stages.evaluate import config_masks
    from ensemblecam.stages.mil import map_scale, write_mil_maps

    cfg = load_config(finished_run / "config.yaml")
    variants = cfg.localisers()
    assert list(variants) == ["mil", "mil_symmetric", "mil_dae"]
    assert variants["mil_dae"].objective == "denoise"
    assert not variants["mil"].negative_top and variants["mil"].scale_quantile is None
    assert variants["mil_symmetric"].negative_top and variants["mil_symmetric"].scale_quantile
    # mil.epochs unset: each localiser trains MIL_EPOCH_FACTOR x the segmenter's epochs
    assert cfg.mil.epochs is None and variants["mil"].run_epochs(7) == MIL_EPOCH_FACTOR * 7
    assert variants["mil"].model_copy(update={"epochs": 3}).run_epochs(7) == 3
    for name in variants:
        record = json.loads((finished_run / "fold0" / name / "unet.json").read_text())
        assert record["epochs"] == MIL_EPOCH_FACTOR * cfg.unet.epochs
    store = SliceStore.open(finished_run / "store")  # stands in for the new scans' store
    every = np.arange(store.n_slices)
    sym, dae = localiser_member("mil_symmetric"), localiser_member("mil_dae")
    for f in ("fold0", "fold1"):
        ranking = json.loads((finished_run / f / "search" / "ranking.json").read_text())
        searched = {m for row in ranking["top"] for m in row["members"]}
        assert {localiser_member("mil"), sym, dae} <= searched
        # the slice-label criterion (best_labels.json) sees only the first localiser
        labels = json.loads((finished_run / f / "search" / "best_labels.json").read_text())
        assert sym not in labels["members"] and dae not in labels["members"]
        settings = json.loads((finished_run / f / "search" / "best.json").read_text())["search"]
        assert settings["label_members"] == [m for m in settings["members"] if m not in (sym, dae)]
        assert MapSet.open(finished_run / f / "maps" / dae).meta["method"] == "denoise"
        assert (
            MapSet.open(finished_run / f / "maps" / localiser_member("mil")).meta["scale"] is None
        )
        # the symmetric localiser's scale: the quantile of its unscaled training-part maps
        ckpt = finished_run / f / "mil_symmetric" / "best.pt"
        unscaled_cfg = variants["mil_symmetric"].model_copy(update={"scale_quantile": None})
        raw = MapSet.open(write_mil_maps(unscaled_cfg, ckpt, store.path, every, tmp_path / f))
        train = split_indices(store, finished_run / "split" / "splits.json", f, ["train"])
        want = map_scale(np.asarray(raw.maps, np.float32), train, 0.999)
        assert MapSet.open(finished_run / f / "maps" / sym).meta["scale"] == pytest.approx(
            want, rel=1e-3
        )
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    member_meta = run / "fold0" / "maps" / sym / "meta.json"
    meta = json.loads(member_meta.read_text())
    meta["scale"] = 0.25
    member_meta.write_text(json.dumps(meta))
    chosen = {"operator": "and", "members": [sym], "thresholds": [0.6], "gate": None}
    got = _ensemble_masks(run, phantom, tmp_path / "w", cfg, chosen, "fold0", store, False)
    ckpt = run / "fold0" / "mil_symmetric" / "best.pt"
    plain = MapSet.open(write_mil_maps(unscaled_cfg, ckpt, store.path, every, tmp_path / "plain"))
    raw = np.asarray(plain.maps, np.float32)
    want = config_masks([np.minimum(raw / 0.25, 1).astype(np.float16)], [plain.probs], chosen)
    assert MapSet.open(tmp_path / "w" / "maps" / sym).meta["scale"] == 0.25
    assert np.mean(got == want) > 0.999 and got.any()  # float16 rounding at the threshold
    unscaled = config_masks([plain.maps], [plain.probs], chosen)
    assert got.sum() > unscaled.sum()  # the scale made a difference


def test_rerun_skips_everything_and_changed_option_reruns_dependents(
    finished_run: Path, phantom: Path
) -> None:
    """Kept last in the module: it changes the shared run's configuration."""
    cfg = _config(finished_run.parent, phantom)
    stamps = {p: p.stat().st_mtime_ns for p in finished_run.rglob("stage.json")}
    before = (finished_run / "results.json").read_text()
    pipeline.run_pipeline(cfg, progress=False)
    run = json.loads((finished_run / "run.json").read_text())
    assert run["ran_this_time"] == []
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("stage.json")} == stamps
    assert (finished_run / "results.json").read_text() == before
    # another grid: refused without force; with force only search and what follows rerun
    # (no report from here on: seconds, and the last test of the module, so nothing reads it)
    changed = _config(finished_run.parent, phantom, search__grid="0:0.9:0.3", run__report=False)
    with pytest.raises(InputError, match="another configuration"):
        pipeline.run_pipeline(changed, progress=False)
    pipeline.run_pipeline(changed, force=True, progress=False)
    ran = json.loads((finished_run / "run.json").read_text())["ran_this_time"]
    assert "fold0/search" in ran and "fold1/evaluate" in ran
    assert not any("/train/" in r or r.endswith("/cam") or r in ("prepare", "split") for r in ran)
    assert not any(r.endswith("/unet") for r in ran)  # the supervised U-Net does not depend on it
    # with the ensemble as the final method, export/ holds its masks and its own export
    # folder goes; only the export reruns (a run without self-training: test_determinism)
    fixed = _config(
        finished_run.parent,
        phantom,
        search__grid="0:0.9:0.3",
        run__final="ensemble",
        run__report=False,
    )
    pipeline.run_pipeline(fixed, force=True, progress=False)
    ran = json.loads((finished_run / "run.json").read_text())["ran_this_time"]
    assert ran == ["export"]
    index = json.loads((finished_run / "export" / "index.json").read_text())
    assert index["source"]["method"] == "ensemble"
    assert not (finished_run / "export_ensemble").exists()
    final = json.loads((finished_run / "results.json").read_text())["final"]
    assert final == {"method": "ensemble", "chosen_by": "run.final"}
    pipeline.run_pipeline(changed, force=True, progress=False)  # back: both exports again
    assert json.loads((finished_run / "run.json").read_text())["ran_this_time"] == [
        "export",
        "export_ensemble",
    ]
    index = json.loads((finished_run / "export" / "index.json").read_text())
    assert index["source"]["method"] == "self_trained"
    assert (finished_run / "export_ensemble" / "index.json").is_file()
