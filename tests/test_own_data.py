"""``ensemblecam run`` on one's own data: slice labels only (no masks), and masks for a
subset of cases (the phantom's masks withheld from prepare)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensemblecam import pipeline
from ensemblecam.config import Config
from ensemblecam.errors import InputError
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from nifti_factory import folder_from_brats
from tiny_run import tiny_phantom, tiny_sections

TINY = tiny_sections(
    prepare={"layout": "folder"}, search={"operators": ["and", "or"]}, run={"unet": False}
)


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_phantom(tmp_path_factory.mktemp("phantom") / "brats")


def _config(tmp: Path, data: Path, csv: Path, **sections: dict[str, Any]) -> Config:
    cfg = json.loads(json.dumps(TINY))
    cfg["prepare"].update(data=str(data), labels_csv=str(csv))
    cfg["run"]["out"] = str(tmp / "run")
    for sec, values in sections.items():
        cfg[sec].update(values)
    return Config.model_validate(cfg)


def test_labels_only_run_gives_masks_and_a_report(brats: Path, tmp_path: Path) -> None:
    csv = folder_from_brats(brats, tmp_path / "own")
    root = pipeline.run_pipeline(_config(tmp_path, tmp_path / "own", csv), progress=False)
    store = SliceStore.open(root / "store")
    assert store.masks is None and set(store.labels.tolist()) == {0, 1}
    best = json.loads((root / "fold0" / "search" / "best.json").read_text())
    assert best["criterion"]["name"] == "labels"
    # without masks only the first MIL localiser is trained and searched
    assert best["search"]["members"][-1] == "localiser__mil"
    assert not (root / "fold0" / "mil_symmetric").exists()
    assert np.isfinite(best["label_score"]) and best["free_slice_area"] <= 0.01
    assert "paper_miou" not in best  # nothing scored against masks that do not exist
    res = json.loads((root / "results.json").read_text())
    assert res["scored"] is False
    assert [r["kind"] for r in res["rows"]] == ["ensemble", "pseudo_unet"]
    assert all(v is None for r in res["rows"] for v in r["mean"].values())
    assert "nothing is scored" in (root / "results.md").read_text()
    index = json.loads((root / "export" / "index.json").read_text())
    files = sorted((root / "export").rglob("*.nii.gz"))
    assert len(files) == 6 and index["source"]["method"] == "self_trained"
    assert (root / "export_ensemble").is_dir()
    html = (root / "report" / "report.html").read_text()
    assert "slice labels only" in html and "nothing is scored" in html


def test_masks_for_some_cases_calibrate_and_score(brats: Path, tmp_path: Path) -> None:
    cases = sorted(p.name for p in brats.iterdir() if p.is_dir())
    annotated = set(cases[::2]) | {cases[1]}  # 4 of 6
    csv = folder_from_brats(brats, tmp_path / "own", annotated)
    cfg = _config(tmp_path, tmp_path / "own", csv, run={"pseudo_unet": False, "final": "auto"})
    root = pipeline.run_pipeline(cfg, progress=False)
    store = SliceStore.open(root / "store")
    assert store.masks is not None
    assert {c for c, g in store.cases.items() if g["has_mask"]} == annotated
    has = store.table["has_mask"].astype(bool)
    assert set(store.table["case"][has].tolist()) == annotated
    assert not store.masks[~has].any()  # no mask, zeros
    res = json.loads((root / "results.json").read_text())
    for k, fold in enumerate(res["folds"]):
        best = json.loads((root / fold / "search" / "best.json").read_text())
        part = get_fold(root / "split" / "splits.json", k).part("train")
        n_ann = len(annotated & set(part))
        assert best["criterion"]["name"] == ("masks" if n_ann else "labels")
        if n_ann:
            assert best["criterion"]["n_annotated_cases"] == n_ann
            assert best["criterion"]["n_cases"] == len(part)
            lab = json.loads((root / fold / "search" / "best_labels.json").read_text())
            assert lab["criterion"]["name"] == "labels"
            assert lab["calibration_masks"]["paper_miou"] <= best["paper_miou"]
    assert res["scored"] is True
    kinds = [r["kind"] for r in res["rows"]]
    assert "labels" in kinds and "empty" in kinds
    assert res["rows"][0]["mean"]["paper_miou"] is not None
    md = (root / "results.md").read_text()
    assert "annotated" in md
    html = (root / "report" / "report.html").read_text()
    assert "Mask-free against mask-calibrated choice" in html and "annotated of" in html
    assert len(sorted((root / "export").rglob("*.nii.gz"))) == 6


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"run": {"unet": True}}, "run.unet (the fully supervised U-Net) needs masks"),
        ({"search": {"criterion": "masks"}}, "search.criterion masks needs masks"),
        ({"search": {"calibration_cases": "2"}}, "calibration_cases 2 counts annotated"),
        ({"prepare": {"masks": False, "labels_csv": None}}, "no labels to train on"),
    ],
)
def test_mask_options_without_masks_refused_before_any_work(
    brats: Path, tmp_path: Path, sections: dict[str, Any], message: str
) -> None:
    csv = folder_from_brats(brats, tmp_path / "own")
    cfg = _config(tmp_path, tmp_path / "own", csv, **sections)
    with pytest.raises(InputError, match=re.escape(message)):
        pipeline.run_pipeline(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_supervised_unet_refused_when_only_some_cases_have_masks(
    brats: Path, tmp_path: Path
) -> None:
    cases = sorted(p.name for p in brats.iterdir() if p.is_dir())
    csv = folder_from_brats(brats, tmp_path / "own", {cases[0]})
    cfg = _config(tmp_path, tmp_path / "own", csv, run={"unet": True})
    with pytest.raises(InputError, match="only some cases"):
        pipeline.run_pipeline(cfg, progress=False)


def test_label_gate_is_youden_optimal() -> None:
    from ensemblecam.ensemble.labels import youden_gate

    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0])
    # g=0.3: TPR 1, FPR 1/3 (J 2/3); g=0.7: TPR 2/3, FPR 0 (J 2/3): the lower gate wins
    assert youden_gate(p, y, np.array([0.3, 0.5, 0.7])) == 0.3
    assert youden_gate(p, y, np.array([0.95])) is None  # J = 0: no gating


def test_label_search_areas_and_budget_by_hand() -> None:
    """Two 2x2 slices, one member: lesion slice map [.9 .5; .1 .1], lesion-free slice
    map [.7 0; 0 0]. Threshold t calls m > t. t=0.6: lesion area 1/4, free area 1/4;
    t=0.8: 1/4 and 0; t=0.4: 2/4 and 1/4. With a budget of 0.25 the criterion takes the
    smallest threshold within it (0.4: score 1/4); with 0.1 only 0.8 (score 1/4) fits."""
    from ensemblecam.ensemble.labels import label_search
    from ensemblecam.ensemble.rows import Rows

    maps = [Rows(np.array([[[0.9, 0.5], [0.1, 0.1]], [[0.7, 0.0], [0.0, 0.0]]], np.float32))]
    args = (np.array([1, 0]), np.array([0, 1]), (2, 2), np.array([0.4, 0.6, 0.8], np.float32))
    rows = label_search(maps, *args, ["and"], [(0,)], ["m"], fp_budget=0.25).ranked("label_score")
    by_t = {r["thresholds"][0]: r for r in rows}
    assert by_t[0.4]["lesion_slice_area"] == 0.5 and by_t[0.4]["free_slice_area"] == 0.25
    assert by_t[0.6]["label_score"] == 0.0 and by_t[0.8]["label_score"] == 0.25
    assert rows[0]["thresholds"] == [0.4] and rows[0]["label_score"] == 0.25
    rows = label_search(maps, *args, ["and"], [(0,)], ["m"], fp_budget=0.1).ranked("label_score")
    assert rows[0]["thresholds"] == [0.8] and np.isnan(rows[1]["label_score"])  # over budget
    with pytest.raises(InputError, match="needs both"):
        label_search(maps, np.array([1, 1]), *args[1:], ["and"], [(0,)], ["m"])
