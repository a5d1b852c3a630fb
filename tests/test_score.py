"""Per-case 3-D scoring: ``ensemblecam score`` on NIfTI folders (hand-computed values,
geometry and missing-case refusals), evaluate's per-case tables, the case statistics in
results.json/results.csv and the report's CI / p-value tables read from those files."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemblecam import metrics
from ensemblecam.cli import app
from ensemblecam.config import EvaluateConfig
from ensemblecam.errors import InputError
from ensemblecam.metrics import conventions
from ensemblecam.report.html import Page
from ensemblecam.report.results import section_case_statistics
from ensemblecam.report.run import Run
from ensemblecam.stages import evaluate
from nifti_factory import write_nifti
from store_factory import build_store

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm voxels, x and y flipped as BraTS files are
SHAPE = (20, 20, 20)


def _cube(lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return m


def _strict(text: str) -> Any:
    def bad(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Folder layout, three cases; predictions beside it.

    two: reference L1 (4^3) + L2 (4^3) + small L3 (3^3, label 2); prediction L1 grown by
    one z layer, a far false-positive cube, L3 exactly -> hand values as in
    test_metrics_lesionwise. fp_only: empty reference, one predicted cube. empty: both
    empty."""
    data, pred = tmp_path / "data", tmp_path / "pred"
    gt_two = (
        _cube((2, 2, 2), (6, 6, 6))
        + _cube((12, 12, 12), (16, 16, 16))
        + 2 * _cube((2, 14, 14), (5, 17, 17))
    )
    pr_two = (
        _cube((2, 2, 2), (6, 6, 7))
        + _cube((12, 2, 2), (15, 5, 5))
        + _cube((2, 14, 14), (5, 17, 17))
    )
    cases = {
        "two": (gt_two, pr_two),
        "fp_only": (np.zeros(SHAPE, np.uint8), _cube((3, 3, 3), (6, 6, 6))),
        "empty": (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)),
    }
    for name, (gt, pr) in cases.items():
        write_nifti(data / "images" / f"{name}_t1.nii.gz", np.zeros(SHAPE, np.float32), LPS)
        write_nifti(data / "labels" / f"{name}.nii.gz", gt, LPS)
        write_nifti(pred / f"{name}.nii.gz", pr, LPS)
    (pred / "notes.txt").write_text("other files are ignored")
    return data, pred


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["score", *args])


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def test_score_hand_computed_every_convention(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, pred = dataset
    out = tmp_path / "scores"
    r = _invoke("--pred", str(pred), "--data", str(data), "--layout", "folder", "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = _rows(out / "per_case.csv")
    two = {k: float(v) for k, v in rows["two"].items() if k != "case"}
    tp = 64 + 27
    assert two["dice"] == pytest.approx(2 * tp / (64 + 64 + 27 + 80 + 27 + 27))
    assert two["lesionwise_dice"] == pytest.approx((8 / 9 + 0 + 0) / 3)
    assert two["lesionwise_hd95_mm"] == pytest.approx((1 + 374 + 374) / 3)
    assert (
        two["ref_lesions"],
        two["detected_lesions"],
        two["fp_lesions"],
        two["small_ref_lesions"],
        two["lesion_sensitivity"],
    ) == (2, 1, 1, 1, 0.5)
    fp = rows["fp_only"]
    assert (
        float(fp["dice"]),
        float(fp["nsd"]),
        float(fp["lesionwise_dice"]),
        float(fp["lesionwise_hd95_mm"]),
        int(fp["fp_lesions"]),
    ) == (0, 0, 0, 374, 1)
    assert math.isnan(float(fp["hd95_mm"])) and math.isnan(float(fp["lesion_sensitivity"]))
    empty = rows["empty"]
    assert (
        float(empty["dice"]),
        float(empty["hd95_mm"]),
        float(empty["nsd"]),
        float(empty["lesionwise_dice"]),
        float(empty["lesionwise_hd95_mm"]),
    ) == (1, 0, 1, 1, 0)
    # HD95 and NSD are MONAI's on the case's volumes (scan spacing 1 mm)
    gt = np.asarray(_load(data / "labels" / "two.nii.gz")) > 0
    pm = np.asarray(_load(pred / "two.nii.gz")) > 0
    assert two["hd95_mm"] == pytest.approx(metrics.hd95(pm, gt, (1, 1, 1)), rel=1e-6)
    assert two["nsd"] == pytest.approx(metrics.nsd(pm, gt, 1.0, (1, 1, 1)), rel=1e-6)
    summary = _strict((out / "summary.json").read_text())  # strict JSON: NaN -> null
    assert summary["format"] == "ensemblecam-score" and summary["cases"] == [
        "empty",
        "fp_only",
        "two",
    ]
    m = summary["metrics"]
    assert m["lesionwise_dice"]["mean"] == pytest.approx((8 / 27 + 0 + 1) / 3)
    assert m["hd95_mm"]["n"] == 2  # undefined for fp_only
    assert summary["pooled"]["lesions_fp"] == 2
    assert summary["conventions"]["lesionwise"]["min_volume_mm3"] == 50.0
    assert summary["slices"]["n_cases"] == 3 and summary["slices"]["tp"] == tp
    # per seg label: label 1 is L1 (found) and L2 (missed), label 2 is L3 (found); the
    # background holds L1's extra z layer (16) and the two false-positive cubes (27 each)
    lesion_voxels = 64 + 64 + 27
    assert summary["labels"] == {
        "0": {"lesion": False, "voxels": 3 * 8000 - lesion_voxels, "marked": 16 + 27 + 27,
              "share": pytest.approx(70 / (3 * 8000 - lesion_voxels))},
        "1": {"lesion": True, "voxels": 128, "marked": 64, "share": 0.5},
        "2": {"lesion": True, "voxels": 27, "marked": 27, "share": 1.0},
    }  # fmt: skip
    with open(out / "per_label.csv", newline="") as fh:
        per_label = {(r["case"], r["label"]): r for r in csv.DictReader(fh)}
    assert per_label["two", "1"]["marked"] == "64" and per_label["fp_only", "0"]["marked"] == "27"
    assert set(per_label) == {("two", "0"), ("two", "1"), ("two", "2"), ("fp_only", "0"),
                              ("empty", "0")}  # fmt: skip
    assert "1 (lesion) 64 of 128 (50.0%)" in r.output and "2 (lesion) 27 of 27 (100.0%)" in r.output
    # rerun refused without --force, replaced with it
    r = _invoke("--pred", str(pred), "--data", str(data), "--layout", "folder", "--out", str(out))
    assert r.exit_code == 2 and "--force" in r.output
    r = _invoke(
        "--pred",
        str(pred),
        "--data",
        str(data),
        "--layout",
        "folder",
        "--out",
        str(out),
        "--force",
        "--min-lesion-volume",
        "0",
        "--cases",
        "two",
    )
    assert r.exit_code == 0, r.output
    two = _rows(out / "per_case.csv")["two"]
    assert list(_rows(out / "per_case.csv")) == ["two"]
    assert float(two["lesionwise_dice"]) == pytest.approx((8 / 9 + 0 + 1) / 4)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def test_score_of_the_ground_truth_is_perfect(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = dataset
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for f in (data / "labels").iterdir():
        (perfect / f.name).write_bytes(f.read_bytes())
    r = _invoke("--pred", str(perfect), "--data", str(data), "--layout", "folder")
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "perfect_score" / "per_case.csv")  # default: <pred>_score
    for row in rows.values():
        assert (
            float(row["dice"]),
            float(row["hd95_mm"]),
            float(row["nsd"]),
            float(row["lesionwise_dice"]),
            float(row["lesionwise_hd95_mm"]),
            int(row["fp_lesions"]),
        ) == (1, 0, 1, 1, 0, 0)


def _refused(r: Any, *words: str) -> None:
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_score_refuses_mismatched_geometry(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, pred = dataset
    out = tmp_path / "o"
    args = ("--pred", str(pred), "--data", str(data), "--layout", "folder", "--out", str(out))
    before = {p: p.read_bytes() for p in pred.iterdir()}
    # another shape
    write_nifti(pred / "fp_only.nii.gz", np.zeros((20, 20, 19), np.uint8), LPS)
    _refused(_invoke(*args), str(pred / "fp_only.nii.gz"), "shape [20, 20, 19]", "[20, 20, 20]")
    assert not out.exists() and not (tmp_path / ".o.partial").exists()
    # same shape, another affine (0.5 mm shift)
    shifted = LPS.copy()
    shifted[0, 3] = 0.5
    write_nifti(pred / "fp_only.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    _refused(_invoke(*args), str(pred / "fp_only.nii.gz"), "affine")
    assert not out.exists()
    # a probability map is no mask: refused while scoring, nothing left behind
    write_nifti(pred / "fp_only.nii.gz", np.full(SHAPE, 0.3, np.float32), LPS)
    _refused(_invoke(*args), "fp_only.nii.gz", "non-integer")
    assert not out.exists() and not (tmp_path / ".o.partial").exists()
    assert (data / "labels" / "two.nii.gz").is_file()
    assert {p.name for p in pred.iterdir()} == {p.name for p in before}


def test_score_refuses_missing_cases_and_bad_options(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    data, pred = dataset
    out = tmp_path / "o"
    args = ("--pred", str(pred), "--data", str(data), "--layout", "folder", "--out", str(out))
    (pred / "two.nii.gz").unlink()
    _refused(_invoke(*args), str(pred / "two.nii.gz"), "missing prediction", "'two'")
    _refused(_invoke(*args, "--cases", "empty,nine"), "'nine'", "not in the folder data set")
    r = _invoke(*args, "--cases", "empty,fp_only")  # the subset that exists is fine
    assert r.exit_code == 0, r.output
    _refused(
        _invoke(
            "--pred",
            str(pred),
            "--data",
            str(data),
            "--layout",
            "folder",
            "--out",
            str(pred / "inside"),
        ),
        "input",
    )
    _refused(
        _invoke(
            "--pred",
            str(tmp_path / "nope"),
            "--data",
            str(data),
            "--layout",
            "folder",
            "--out",
            str(tmp_path / "o2"),
        ),
        "prediction folder not found",
    )
    _refused(_invoke(*args, "--force", "--connectivity", "5"), "connectivity 5")
    _refused(_invoke(*args, "--force", "--nsd-tolerance", "-1"), "NSD tolerance")
    _refused(_invoke(*args, "--force", "--layout", "nifti"), "layout 'nifti'")


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_per_case_3d_tables(tmp_path: Path) -> None:
    store_path = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, size=(16, 16))
    cfg = EvaluateConfig(store=store_path, fold="0", part="test", nsd_tolerance_mm=1.5)
    store, idx, gts = evaluate._part_with_masks(cfg)
    gt = gts.read(0, len(idx)).astype(bool)
    pred = np.roll(gt, 1, axis=2)  # one pixel off
    pred[::3, :2, :2] = True  # plus small false positives
    res = evaluate.evaluate_masks(cfg, pred.astype(np.uint8), tmp_path / "ev")
    rows = _rows(tmp_path / "ev" / "per_case.csv")
    empty = _rows(tmp_path / "ev" / "per_case_empty.csv")
    cases = store.table["case"][idx]
    assert list(rows) == list(dict.fromkeys(cases.tolist())) == list(empty)
    for case, row in rows.items():
        sel = cases == case
        # the store factory's geometry: identity affine, slices along axis 2 in order
        g, p = (np.moveaxis(a[sel], 0, 2) for a in (gt, pred))
        want = conventions.case_row(p, g, (1.0, 1.0, 1.0), 1.5)
        for k in conventions.CASE_COLUMNS:
            got, ref = float(row[k]), float(want[k])
            assert got == pytest.approx(ref, rel=1e-9, nan_ok=True), (case, k)
        e = conventions.case_row(np.zeros_like(g), g, (1.0, 1.0, 1.0), 1.5)
        assert float(empty[case]["lesionwise_dice"]) == e["lesionwise_dice"]
        assert float(empty[case]["dice"]) == (0.0 if g.any() else 1.0)
    lw = [float(r["lesionwise_dice"]) for r in rows.values()]
    assert res["metrics"]["case_lesionwise_dice_mean"] == pytest.approx(np.mean(lw))
    assert res["case_conventions"]["nsd_tolerance_mm"] == 1.5
    _strict((tmp_path / "ev" / "metrics.json").read_text())


# --------------------------------------------------------------------------- statistics


def _fake_run(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Two folds, rows ensemble / op_and / single a / single b / Empty with hand values."""
    run = tmp_path / "run"
    per = {  # fold -> slug -> [(case, dice, lesionwise_dice, hd95_mm)]
        "fold0": {
            "ensemble": [("c0", 0.9, 0.8, 2.0), ("c1", 0.7, 0.6, "nan")],
            "op_and": [("c0", 0.8, 0.8, 3.0), ("c1", 0.6, 0.5, 4.0)],
            "single_a": [("c0", 0.5, 0.4, 5.0), ("c1", 0.4, 0.3, 6.0)],
            "single_b": [("c0", 0.6, 0.5, 5.0), ("c1", 0.5, 0.4, 6.0)],
        },
        "fold1": {
            "ensemble": [("c2", 0.8, 0.9, 1.0), ("c3", 0.6, 0.7, 2.0)],
            "op_and": [("c2", 0.8, 0.8, 1.0), ("c3", 0.5, 0.6, 3.0)],
            "single_a": [("c2", 0.3, 0.2, 7.0), ("c3", 0.2, 0.1, 8.0)],
            "single_b": [("c2", 0.4, 0.3, 7.0), ("c3", 0.3, 0.2, 8.0)],
        },
    }
    rows = [
        ("ensemble (best configuration)", "ensemble", "ensemble"),
        ("and ensemble", "operator", "op_and"),
        ("a alone", "single", "single_a"),
        ("b alone", "single", "single_b"),
        ("Empty (all background)", "empty", "ensemble"),
    ]
    fold_results = {}
    for fold, slugs in per.items():
        for slug, vals in slugs.items():
            d = run / fold / "eval" / slug
            d.mkdir(parents=True)
            head = "case,dice,lesionwise_dice,hd95_mm\n"
            (d / "per_case.csv").write_text(
                head + "".join(f"{c},{a},{b},{h}\n" for c, a, b, h in vals)
            )
            (d / "per_case_empty.csv").write_text(
                head + "".join(f"{c},0.0,0.0,nan\n" for c, *_ in vals)
            )
        fold_results[fold] = {
            "dir": run / fold,
            "rows": [{"name": n, "kind": k, "slug": s} for n, k, s in rows],
        }
    means = {"ensemble": 0.8, "operator": 0.7, "a alone": 0.3, "b alone": 0.4, "empty": 0.0}
    results = {
        "format": "ensemblecam-results",
        "version": 1,
        "objective": "paper_miou",
        "folds": ["fold0", "fold1"],
        "metric_names": ["paper_miou"],
        "rows": [
            {
                "name": n,
                "kind": k,
                "config": {},
                "mean": {"paper_miou": means.get(n, means.get(k))},
                "std": {"paper_miou": 0.0},
                "per_fold": {},
            }
            for n, k, _ in rows
        ],
    }
    return run, results, fold_results


def test_case_statistics_hand_computed(tmp_path: Path) -> None:
    from ensemblecam.pipeline import results_csv

    run, results, fold_results = _fake_run(tmp_path)
    evaluate.add_case_statistics(results, fold_results, run)
    st = results["case_statistics"]
    assert (st["chosen"], st["best_single"]) == ("ensemble (best configuration)", "b alone")
    ens, op, _, b, empty = results["rows"]
    assert (
        ens["cases"]["n_cases"] == 4
        and ens["cases"]["files"]["fold1"] == "fold1/eval/ensemble/per_case.csv"
    )
    assert ens["cases"]["mean"]["dice"] == pytest.approx(0.75)
    assert ens["cases"]["n"]["hd95_mm"] == 3  # one undefined value left out
    assert ens["cases"]["mean"]["hd95_mm"] == pytest.approx(5 / 3)
    lo, hi = ens["cases"]["ci95"]["dice"]
    assert (lo, hi) == metrics.bootstrap_ci([0.9, 0.7, 0.8, 0.6])
    assert "vs_chosen" not in ens["cases"]
    # chosen - Empty on dice: 0.9, 0.7, 0.8, 0.6 all > 0 -> W = 0, exact p = 2/16
    vs = empty["cases"]["vs_chosen"]["dice"]
    assert (vs["n"], vs["p_value"]) == (4, 0.125)
    assert vs["mean_difference"] == pytest.approx(0.75)
    # chosen - "and": 0.1, 0.1, 0, 0.1 -> one zero dropped, 3 positive: p = 2/8
    vs = op["cases"]["vs_chosen"]["dice"]
    assert vs["p_value"] == pytest.approx(0.25) and vs["mean_difference"] == pytest.approx(0.075)
    # hd95: pairs with an undefined value are dropped
    assert b["cases"]["vs_chosen"]["hd95_mm"]["n"] == 3
    # results.csv: the statistics beside the fold means
    text = results_csv(results)
    table = list(csv.DictReader(text.splitlines()))
    assert float(table[4]["dice_p_vs_chosen"]) == 0.125
    assert float(table[0]["dice_case_mean"]) == 0.75 and table[0]["dice_p_vs_chosen"] == ""
    assert float(table[0]["dice_ci_low"]) == pytest.approx(lo, rel=1e-5)
    json.loads(json.dumps(results, allow_nan=False))  # no NaN anywhere


def test_report_reads_cis_and_p_values_from_files(tmp_path: Path) -> None:
    run, results, fold_results = _fake_run(tmp_path)
    evaluate.add_case_statistics(results, fold_results, run)
    results["rows"][0]["cases"]["mean"]["nsd"] = 0.4321  # shown as stored, not recomputed
    results["rows"][4]["cases"]["vs_chosen"]["dice"]["p_value"] = 0.0123
    out = tmp_path / "rep"
    out.mkdir()
    rep = Page(out)
    section_case_statistics(rep, Run(run, results, {}, None, None, None))
    page = "".join(rep.parts)
    assert "95% confidence" in page and "43.2 [" in page
    assert "p = 0.012" in page and "p = 0.250" in page and "[best single member]" in page
    assert (out / "cases_dice.png").read_bytes().startswith(b"\x89PNG")
    # every case of the chosen row as stored, lowest case Dice first (c3 0.6 ... c0 0.9)
    table = page[page.index("Every case of ensemble (best configuration) (4 cases") :]
    table = table[: table.index("</table>")]
    cells = re.findall(r"<tr><td>(fold\d)</td><td>(c\d)</td><td>([^<]*)</td>", table)
    assert cells == [
        ("fold1", "c3", "60.0"),
        ("fold0", "c1", "70.0"),
        ("fold1", "c2", "80.0"),
        ("fold0", "c0", "90.0"),
    ]
    assert (out / "cases_lesionwise_dice.png").is_file()
    (run / "fold1" / "eval" / "op_and" / "per_case.csv").unlink()
    with pytest.raises(InputError, match=r"op_and/per_case\.csv"):
        section_case_statistics(Page(out), Run(run, results, {}, None, None, None))
