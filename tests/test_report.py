"""``ensemblecam report`` on a small but complete run folder built with the real stages'
search/evaluate functions and writers (the training part is written in train.py's format)."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from ensemblecam import report
from ensemblecam.cli import app
from ensemblecam.config import SearchConfig
from ensemblecam.ensemble.operators import apply_config
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import write_map_set
from ensemblecam.io.masks import read_masks, write_masks
from ensemblecam.io.runlayout import operator_slug
from ensemblecam.io.split import read_splits
from ensemblecam.io.store import SliceStore
from ensemblecam.metrics.classification import classifier_metrics
from ensemblecam.metrics.conventions import score
from ensemblecam.pipeline import SUMMARY_METRICS
from ensemblecam.report.figures import (
    GalleryRow,
    bar_limits,
    gallery_cell,
    gallery_figure,
    threshold_heatmap,
)
from ensemblecam.report.reference import (
    REFERENCE_FIGURES,
    is_phantom,
    reference_matches,
    reference_setting,
    row_identity,
)
from ensemblecam.report.sections import SECTIONS
from ensemblecam.stages.evaluate import evaluate_arrays
from ensemblecam.stages.search import open_inputs, run_search, write_search_outputs
from ensemblecam.stages.train import METRIC_COLUMNS
from ensemblecam.training.records import plot_confusion, plot_learning_curve, write_metrics_csv
from store_factory import build_store

MEMBERS = ["resnet34__gradcam", "resnet50__gradcam"]
ENSEMBLE = "ensemble (best configuration)"
EMPTY = "Empty (all background)"
UNET = "U-Net, fully supervised"
PNG = b"\x89PNG\r\n\x1a\n"


def _maps(masks: np.ndarray, sigma: float, shift: int, rng: np.random.Generator) -> np.ndarray:
    """CAM-like maps: blurred, shifted lesion + smooth noise, per-slice min-max."""
    m = ndimage.gaussian_filter(
        np.roll(masks.astype(np.float32), shift, axis=2), sigma=(0, sigma, sigma)
    )
    m += 0.15 * ndimage.gaussian_filter(rng.random(masks.shape, dtype=np.float32), sigma=(0, 3, 3))
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    return ((m - lo) / np.where(hi > lo, hi - lo, 1)).astype(np.float16)


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, float)}


def _write_train_run(d: Path, model: str, fold: str, rng: np.random.Generator, pngs: bool) -> None:
    history = []
    for epoch in range(1, 4):
        y = rng.integers(0, 2, 40)
        p = np.clip(y * 0.5 + rng.random(40) * 0.6, 0, 1)
        cm = classifier_metrics(y, p)
        history.append(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "val_loss": 1.1 / epoch,
                "lr": 1e-3,
                "images_per_s": 100.0,
                "time_s": 1.0,
                **{k: cm[k] for k in METRIC_COLUMNS if k in cm},
            }
        )
    best = max(history, key=lambda r: r["auroc"])
    d.mkdir(parents=True)
    write_metrics_csv(d / "metrics.csv", history, METRIC_COLUMNS)
    conf = [[best["tn"], best["fp"]], [best["fn"], best["tp"]]]
    if pngs:
        plot_learning_curve(d / "learning_curve.png", history, best["epoch"])
        plot_confusion(d / "confusion_matrix.png", conf, f"{model} {fold}")
    fsutil.write_json(
        d / "train.json",
        {
            "format": "ensemblecam-train-run",
            "version": 1,
            "model": model,
            "fold": fold,
            "epochs": 3,
            "monitor": "auroc",
            "best_epoch": best["epoch"],
            "best_value": best["auroc"],
            "best": {**best, "confusion": conf},
            "last": history[-1],
            "n_train": 40,
            "n_val": 40,
        },
    )


def build_run(root: Path) -> Path:
    """A 3-fold run folder in the pipeline's layout (see pipeline.py's docstring)."""
    run = root / "run"
    store_p = build_store(
        run / "store",
        n_cases=9,
        slices_per_case=6,
        size=(32, 32),
        channels=("flair", "t1ce", "t2"),
        folds=3,
        seed=3,
    )
    data = root / "BraTS2020"  # a real-looking data folder: no phantom.json
    data.mkdir()
    man = json.loads((store_p / "store.json").read_text())
    man["prepare"] = {
        "layout": "brats",
        "modalities": ["flair", "t1ce", "t2"],
        "data": str(data),
        "crop_size": [32, 32],
    }
    fsutil.write_json(store_p / "store.json", man)
    shutil.copy(store_p / "splits.json", run / "splits.json")
    (run / "config.yaml").write_text(
        "search:\n  operators: [and, or, min, max]\nnote: <b>escaped</b>\n"
    )
    fsutil.write_json(
        run / "run.json",
        {
            "config_hash": "abc123",
            "seeds": {"split": 0},
            "versions": {"numpy": np.__version__},
            "timings": {"fold0": {"search": 0.5}, "prepare": 1.25},
        },
    )
    store = SliceStore.open(store_p)
    assert store.masks is not None
    rng = np.random.default_rng(0)
    idx = np.arange(store.n_slices)
    masks = np.asarray(store.masks)
    maps = [_maps(masks, 1.5, 0, rng), _maps(masks, 2.5, 2, rng)]
    labels = store.labels
    rows: dict[str, dict[str, Any]] = {}
    folds = [f.name for f in read_splits(run / "splits.json")]
    for fold in folds:
        fdir = run / fold
        for j, m in enumerate(MEMBERS):
            probs = np.clip(labels * 0.6 + rng.random(len(labels)) * 0.5, 0, 1)
            write_map_set(
                fdir / "maps" / m,
                {"model": m.split("__")[0], "method": "gradcam"},
                idx,
                maps[j],
                probs,
            )
        cfg = SearchConfig(
            store=store_p,
            splits=run / "splits.json",
            fold=fold,
            part="train",
            maps=fdir / "maps",
            members=MEMBERS,
            out=fdir / "search",
        )
        res, ranked = run_search(cfg, None)
        (fdir / "search").mkdir(parents=True)
        write_search_outputs(
            fdir / "search", res, ranked, cfg.objective, cfg.model_dump(mode="json")
        )
        best = ranked[0]
        inp = open_inputs(
            store_p, run / "splits.json", fold, "test", fdir / "maps", MEMBERS, what="evaluation"
        )
        # row names and per-fold configs as pipeline.py writes them
        confs: dict[str, tuple[str, dict[str, Any]]] = {ENSEMBLE: ("ensemble", best)}
        for r in ranked:
            key = (
                f"{r['members'][0]} alone (best threshold)"
                if r["operator"] == "single"
                else f"{r['operator']} ensemble (best members and thresholds)"
            )
            confs.setdefault(key, ("single" if r["operator"] == "single" else "operator", r))
        for name, (kind, conf) in confs.items():
            sel = [MEMBERS.index(m) for m in conf["members"]]
            plain = {k2: conf[k2] for k2 in ("operator", "members", "thresholds", "gate")}
            out, per = evaluate_arrays(
                [inp.maps[i] for i in sel],
                inp.masks,
                inp.case_ids,
                plain,
                [inp.probs[i] for i in sel],
                inp.labels,
                0.02,
            )
            row = rows.setdefault(name, {"kind": kind, "per_fold": {}, "config": {}})
            row["per_fold"][fold] = _metrics(out["metrics"])
            row["config"][fold] = plain
            rows.setdefault(EMPTY, {"kind": "empty", "per_fold": {}, "config": {}})["per_fold"][
                fold
            ] = _metrics(out["empty_baseline"])
            sub = [inp.maps[i].read(0, len(inp.maps[i])) for i in sel]
            pred = apply_config(sub, conf, [inp.probs[i] for i in sel])
            if kind == "operator":  # the evaluation writes each operator row's masks
                write_masks(fdir / "eval" / operator_slug(conf["operator"]) / "masks.npz",
                            inp.indices, pred)  # fmt: skip
            if kind == "ensemble":
                (fdir / "eval" / "ensemble").mkdir(parents=True)
                # what the evaluation writes: the chosen masks and the per-case Dice
                np.savez(
                    fdir / "eval" / "masks.npz", index=inp.indices, masks=pred.astype(np.uint8)
                )
                lines = ["case,n_slices,tp,fp,fn,dice"]
                for c in dict.fromkeys(inp.case_ids.tolist()):
                    s = inp.case_ids == c
                    tp, fp, fn = (int(per[x][s].sum()) for x in ("tp", "fp", "fn"))
                    d = 2 * tp / max(2 * tp + fp + fn, 1)
                    lines.append(f"{c},{int(s.sum())},{tp},{fp},{fn},{d}")
                (fdir / "eval" / "ensemble" / "per_case.csv").write_text("\n".join(lines))
        gt = inp.masks.read(0, len(inp.masks)).astype(bool)
        unet = ndimage.binary_erosion(gt, structure=np.ones((1, 3, 3)))
        tp, fp, fn, tn = (
            np.sum(a, axis=(1, 2)) for a in (unet & gt, unet & ~gt, ~unet & gt, ~unet & ~gt)
        )
        rows.setdefault(UNET, {"kind": "unet", "per_fold": {}, "config": {}})["per_fold"][fold] = (
            _metrics(score(tp, fp, fn, tn, inp.case_ids, None, 0.02))
        )
        for m in ("resnet34", "resnet50"):
            _write_train_run(fdir / "models" / m, m, fold, rng, pngs=(m == "resnet34"))
    names = sorted(
        set.intersection(*(set(v) for r in rows.values() for v in r["per_fold"].values()))
    )
    out_rows = []
    for name, r in rows.items():
        vals = {m: [r["per_fold"][f][m] for f in folds] for m in names}
        cfg_ = {f: r["config"].get(f) for f in folds}
        out_rows.append(
            {
                "name": name,
                "kind": r["kind"],
                "config": cfg_,
                "per_fold": r["per_fold"],
                "mean": {m: float(np.mean(v)) for m, v in vals.items()},
                "std": {m: float(np.std(v)) for m, v in vals.items()},
            }
        )
    fsutil.write_json(
        run / "results.json",
        {
            "format": "ensemblecam-results",
            "version": 1,
            "objective": "paper_miou",
            "folds": folds,
            "metric_names": names,
            "rows": out_rows,
        },
    )
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def made(run_dir: Path) -> tuple[Path, str]:
    out = report.write_report(run_dir)
    return out, out.read_text()


def _row_html(doc: str, name: str, table: str = "results") -> str:
    """The row ``name`` of the first table with class ``table``."""
    start = doc.index(f'<table class="{table}">')
    start = doc.index(f"<tr><td>{html.escape(name)}</td>", start)
    return doc[start : doc.index("</tr>", start)]


def _section(doc: str, ident: str) -> str:
    """HTML of one section: from its h2 to the next h2."""
    start = doc.index(f'<h2 id="{ident}">')
    end = doc.find("<h2 ", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


def _headers(doc: str) -> list[str]:
    return [h.replace("<wbr>", "") for h in re.findall(r"<th>(.*?)</th>", doc)]


def test_report_is_self_contained(made: tuple[Path, str], run_dir: Path) -> None:
    out, doc = made
    assert out == run_dir / "report" / "report.html"
    for bad in ("http://", "https://", 'src="file', "<script ", "<link"):
        assert bad not in doc
    assert doc.count("<script>") == 1  # the inline table sorter, nothing fetched
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert len(images) >= 10
    for b64 in images:
        assert base64.b64decode(b64).startswith(PNG)
    pngs = sorted(out.parent.glob("*.png"))
    assert len(pngs) == len(images)
    for name in (
        "lesion_fraction_histogram.png",
        "threshold_heatmap_fold0.png",
        "threshold_heatmap_fold2.png",
        "gallery_best.png",
        "gallery_worst.png",
        "results_paper_miou.png",
        "fold0_resnet34_learning_curve.png",
        "fold2_resnet34_confusion_matrix.png",
    ):
        assert (out.parent / name).read_bytes().startswith(PNG), name


def test_figures_link_to_their_png(made: tuple[Path, str]) -> None:
    _, doc = made
    for name in ("gallery_best.png", "results_paper_miou.png", "threshold_heatmap_fold0.png"):
        assert f'<figure><a href="{name}"' in doc, name  # click: the full-size PNG beside


def test_bar_chart_axis_starts_at_zero() -> None:
    assert bar_limits(np.array([39.0, 52.0])) == (0.0, 57.0)
    assert bar_limits(np.array([np.nan, 98.0])) == (0.0, 100.0)
    assert bar_limits(np.array([np.nan])) == (0.0, 5.0)


def test_summary_names_rows_not_better_than_empty(made: tuple[Path, str], run_dir: Path) -> None:
    _, doc = made
    summary = _section(doc, "summary")
    res = json.loads((run_dir / "results.json").read_text())
    empty = next(r for r in res["rows"] if r["kind"] == "empty")
    ens = next(r for r in res["rows"] if r["kind"] == "ensemble")
    other = summary[summary.index("In the other headline metrics") :]
    other = other[: other.index("</p>")]
    for m in ("paper_dsc", "lesion_dice", "case_dice_mean"):
        assert (
            f"{m} {100 * ens['mean'][m]:.1f} ± {100 * ens['std'][m]:.1f} "
            f"(Empty: {100 * empty['mean'][m]:.1f})"
        ) in other, m
    for m in SUMMARY_METRICS:
        worse = [
            r["name"]
            for r in res["rows"]
            if r["kind"] != "empty" and r["mean"][m] <= empty["mean"][m]
        ]
        head = f"Not better than Empty (all background, {100 * empty['mean'][m]:.1f}) in {m}: "
        if worse:
            assert head + html.escape(", ".join(worse)) + "." in summary, m
        else:
            assert head not in summary, m


def test_missing_train_figures_are_named_not_redrawn(made: tuple[Path, str], run_dir: Path) -> None:
    out, doc = made
    note = _section(doc, "classifiers")
    note = note[note.index("Not written by the train stage") :]
    note = note[: note.index("</p>")]
    for fold in ("fold0", "fold1", "fold2"):
        for fname in ("learning_curve.png", "confusion_matrix.png"):
            src = run_dir / fold / "models" / "resnet50" / fname
            assert not src.exists()
            assert html.escape(str(src)) in note
            assert not (out.parent / f"{fold}_resnet50_{fname}").exists()
    assert "resnet34" not in note


def test_gallery_names_missing_evaluation_output(
    made: tuple[Path, str], run_dir: Path, tmp_path: Path
) -> None:
    npz = run_dir / "fold2" / "eval" / "masks.npz"
    kept = tmp_path / "masks.npz"
    shutil.move(npz, kept)
    try:
        doc = report.write_report(run_dir, tmp_path / "r.html").read_text()
    finally:
        shutil.move(kept, npz)
    gallery = _section(doc, "gallery")
    assert "Not in the gallery" in gallery and html.escape(str(npz)) in gallery
    per_case = (run_dir / "fold2" / "eval" / "ensemble" / "per_case.csv").read_text()
    n_fold2 = sum(int(r["tp"]) + int(r["fn"]) > 0 for r in csv.DictReader(per_case.splitlines()))
    assert n_fold2 > 0 and f"{9 - n_fold2} evaluated lesion cases" in gallery


def test_gallery_draws_the_stored_operator_masks(run_dir: Path, tmp_path: Path) -> None:
    """Operator columns are the masks the evaluation wrote (eval/op_*/masks.npz), read as
    they are; a missing file drops its column (the report never applies a configuration)."""
    from ensemblecam.report.gallery import _fold_case_scores
    from ensemblecam.report.run import open_run

    run = open_run(run_dir)
    ops = {r["config"]["fold1"]["operator"] for r in run.results["rows"] if r["kind"] == "operator"}
    assert len(ops) >= 2
    got = _fold_case_scores(run, "fold1", [])
    assert got is not None
    stored = got[1].stored
    assert set(stored) == ops | {"chosen ensemble"}
    for op in ops:
        index, masks = read_masks(run_dir / "fold1" / "eval" / operator_slug(op))
        np.testing.assert_array_equal(stored[op][0], index)
        np.testing.assert_array_equal(stored[op][1], masks)
    gone = sorted(ops)[0]
    npz = run_dir / "fold1" / "eval" / operator_slug(gone) / "masks.npz"
    kept = tmp_path / "masks.npz"
    shutil.move(npz, kept)
    try:
        got = _fold_case_scores(run, "fold1", [])
    finally:
        shutil.move(kept, npz)
    assert got is not None and set(got[1].stored) == (ops - {gone}) | {"chosen ensemble"}


def test_report_sections_and_text(made: tuple[Path, str]) -> None:
    _, doc = made
    for heading in (
        "Summary",
        "Configuration",
        "Data",
        "Classifiers",
        "Results",
        "Threshold search (the paper&#x27;s Fig. 4)",
        "Gallery (the paper&#x27;s Fig. 3)",
        "Every metric convention",
        "Metric conventions",
        "Split parts (splits.json)",
    ):
        assert f">{heading}</h" in doc, heading
    assert "&lt;b&gt;escaped&lt;/b&gt;" in doc and "<b>escaped</b>" not in doc
    assert "abc123" in doc and np.__version__ in doc
    assert "not a measured Dice" in doc
    assert "9 evaluated lesion cases" in doc
    headers = _headers(doc)
    for metric in (
        "paper_miou",
        "paper_dsc",
        "lesion_iou",
        "lesion_dice",
        "slice_dice_mean",
        "case_dice_mean",
    ):
        assert metric in headers, metric


def test_results_values_formatted(made: tuple[Path, str], run_dir: Path) -> None:
    _, doc = made
    res = json.loads((run_dir / "results.json").read_text())
    for row in res["rows"]:
        line = _row_html(doc, row["name"])
        for m in ("paper_miou", "lesion_dice", "case_dice_mean"):
            expect = f"{100 * row['mean'][m]:.1f} ± {100 * row['std'][m]:.1f}"
            assert f"<td>{expect}</td>" in line, (row["name"], m, expect)
    empty = next(r for r in res["rows"] if r["kind"] == "empty")
    folds = res["folds"]
    per = [empty["per_fold"][f]["paper_miou"] for f in folds]
    assert f"{100 * np.mean(per):.1f} ± {100 * np.std(per):.1f}" in _row_html(doc, EMPTY)


def test_published_figures_beside_matching_rows(made: tuple[Path, str]) -> None:
    _, doc = made
    assert "published paper_miou" in _headers(doc)
    assert "47.7 (Empty)" in _row_html(doc, EMPTY)
    assert "54.2 ± 0.8 (Ensemble ResNet-34x50 &#x27;and&#x27;)" in _row_html(
        doc, "and ensemble (best members and thresholds)"
    )
    assert "50.7 (ResNet-34 Grad-CAM)" in _row_html(doc, "resnet34__gradcam alone (best threshold)")
    assert "52.1 (ResNet-50 Grad-CAM)" in _row_html(doc, "resnet50__gradcam alone (best threshold)")
    assert "69.2 (Fully supervised (FSSS))" in _row_html(doc, UNET)
    # the published 'or' figure is not put beside the 'and' row, nor Grad-CAM beside Empty
    assert "&#x27;or&#x27;" not in _row_html(doc, "and ensemble (best members and thresholds)")
    assert "Grad-CAM" not in _row_html(doc, EMPTY)
    assert "Table 3" in doc


def test_existing_report_refused_then_forced(made: tuple[Path, str], run_dir: Path) -> None:
    with pytest.raises(InputError, match="use --force"):
        report.write_report(run_dir)
    runner = CliRunner()
    res = runner.invoke(app, ["report", "--run", str(run_dir)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--force" in lines[0]
    alt = run_dir.parent / "elsewhere" / "r.html"
    res = runner.invoke(
        app, ["report", "--run", str(run_dir), "--out", str(alt), "--cases", "1", "--force"]
    )
    assert res.exit_code == 0, res.output
    assert alt.is_file() and (alt.parent / "gallery_best.png").is_file()


def test_phantom_is_not_compared(run_dir: Path, tmp_path: Path) -> None:
    man_p = run_dir / "store" / "store.json"
    original = man_p.read_text()
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    (phantom / "phantom.json").write_text("{}")
    man = json.loads(original)
    man["prepare"]["data"] = str(phantom)
    try:
        fsutil.write_json(man_p, man)
        doc = report.write_report(run_dir, tmp_path / "p.html").read_text()
    finally:
        man_p.write_text(original)
    assert "NOT comparable" in doc
    assert "published paper_miou" not in _headers(doc)
    assert "for orientation only" in doc


def test_reference_setting_rules(tmp_path: Path) -> None:
    brats = {"layout": "brats", "modalities": ["flair", "t1ce", "t2"]}
    assert reference_setting(brats, False)[0] == "brats"
    assert reference_setting(brats, True)[0] is None
    assert reference_setting({**brats, "modalities": ["t1"]}, False)[0] is None
    assert reference_setting({"layout": "msd", "modalities": ["adc"]}, False)[0] == ("prostate")
    assert reference_setting({"layout": "kits", "modalities": ["ct"]}, False)[0] == "kits"
    (tmp_path / "phantom.json").write_text("{}")
    assert is_phantom({"data": str(tmp_path)}) is True
    assert is_phantom({"data": str(tmp_path / "missing")}) is None
    ident = row_identity(
        {
            "name": "ensemble (and: resnet34__gradcam 0.7 x resnet50__gradcam 0.6)",
            "kind": "ensemble",
        }
    )
    assert ident["operator"] == "and" and len(ident["members"]) == 2


def test_threshold_heatmap_shapes() -> None:
    t = [0.0, 0.5]
    assert threshold_heatmap(np.array([0.4, 0.6]), t, ["a"], "paper_miou", "single").startswith(PNG)
    v3 = np.arange(8, dtype=float).reshape(2, 2, 2) / 10
    assert threshold_heatmap(v3, t, ["a", "b", "c"], "paper_miou", "and").startswith(PNG)
    with pytest.raises(InputError, match="does not fit"):
        threshold_heatmap(np.zeros((3, 3)), t, ["a", "b"], "paper_miou", "and")


def test_bad_run_folders(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = {
        "missing": (tmp_path / "nope", "run folder not found"),
        "not a run": (tmp_path, "not an ensemblecam run folder"),
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    cases["no results"] = (run, "results.json not found")
    for what, (path, msg) in cases.items():
        res = runner.invoke(app, ["report", "--run", str(path)])
        assert res.exit_code == 2, what
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], what
    (run / "results.json").write_text('{"format": "other"}')
    res = runner.invoke(app, ["report", "--run", str(run)])
    assert res.exit_code == 2 and "not an ensemblecam results file" in res.stderr


def test_section_order_and_collapsed_config(made: tuple[Path, str]) -> None:
    _, doc = made
    ids = re.findall(r'<h2 id="(\w+)">', doc)
    assert ids == [k for k, _ in SECTIONS]
    assert ids[0] == "summary" and ids[-1] == "configuration"
    nav = re.findall(r'<a href="#(\w+)">', doc[doc.index("<nav>") : doc.index("</nav>")])
    assert nav == ids
    conf = _section(doc, "configuration")
    assert "<details>" in conf and "<details open" not in doc
    details = conf[conf.index("<details>") : conf.index("</details>")]
    assert "config.yaml" in details and "operators: [and, or, min, max]" in details
    # run.json timings: ONE table of (stage, seconds), nested keys joined, with a total
    assert conf.count("<table") == 2
    timings = conf[conf.index("<h3>Timings</h3>") :]
    assert "<td>fold0/search</td><td>0.5</td>" in timings
    assert "<td>total</td><td>1.8</td>" in timings


def test_summary_has_headline_numbers(made: tuple[Path, str], run_dir: Path) -> None:
    _, doc = made
    summary = _section(doc, "summary")
    res = json.loads((run_dir / "results.json").read_text())
    by_kind = {r["kind"]: r for r in res["rows"] if r["kind"] in ("ensemble", "empty", "unet")}
    assert set(by_kind) == {"ensemble", "empty", "unet"}
    for row in by_kind.values():
        line = _row_html(summary, row["name"], "headline")
        for m in SUMMARY_METRICS:
            expect = f"{100 * row['mean'][m]:.1f} ± {100 * row['std'][m]:.1f}"
            assert f"<td>{expect}</td>" in line, (row["name"], m)
    assert "single" not in _headers(summary)  # only the headline rows, no singles
    assert "<td>folds</td><td>3" in summary
    for text in ("9 cases", "resnet34, resnet50", "gradcam", str(run_dir.resolve())):
        assert html.escape(text) in summary, text
    # the chosen configuration of every fold, with members and thresholds
    for fold in res["folds"]:
        cfg = by_kind["ensemble"]["config"][fold]
        pairs = ", ".join(
            f"{m} &gt; {t:g}" for m, t in zip(cfg["members"], cfg["thresholds"], strict=True)
        )
        assert f"{fold}: {cfg['operator']}: {pairs}" in summary


def test_row_identity_per_fold_configs() -> None:
    row = {
        "name": "and ensemble (best members and thresholds)",
        "kind": "operator",
        "config": {
            "fold0": {"operator": "and", "members": ["a__gradcam", "b__gradcam"]},
            "fold1": {"operator": "and", "members": ["a__gradcam", "c__layercam"]},
        },
    }
    ident = row_identity(row)
    assert ident["operator"] == "and"
    assert [m["model"] for m in ident["members"]] == ["a", "b", "c"]
    mixed = {
        **row,
        "kind": "ensemble",
        "config": {
            **row["config"],
            "fold1": {"operator": "or", "members": ["a__gradcam", "b__gradcam"]},
        },
    }
    assert row_identity(mixed)["operator"] == "mixed"
    and_ref = next(r for r in REFERENCE_FIGURES["brats"] if r.match == {"operator": "and"})
    assert reference_matches(and_ref, ident)
    assert not reference_matches(and_ref, row_identity(mixed))
    single = {
        "name": "resnet50__gradcam alone (best threshold)",
        "kind": "single",
        "config": {"fold0": {"operator": "single", "members": ["resnet50__gradcam"]}},
    }
    r50 = next(r for r in REFERENCE_FIGURES["brats"] if r.method == "ResNet-50 Grad-CAM")
    r34 = next(r for r in REFERENCE_FIGURES["brats"] if r.method == "ResNet-34 Grad-CAM")
    assert reference_matches(r50, row_identity(single))
    assert not reference_matches(r34, row_identity(single))
    empty = {"name": "Empty (all background)", "kind": "empty", "config": {"fold0": None}}
    assert row_identity(empty)["members"] == []


def test_captions_name_fold_members_thresholds(made: tuple[Path, str], run_dir: Path) -> None:
    _, doc = made
    for fold in ("fold0", "fold1", "fold2"):
        best = json.loads((run_dir / fold / "search" / "best.json").read_text())
        caption = re.search(rf"<figcaption[^>]*>({fold}: [^<]*threshold_heatmap_{fold}\.png)", doc)
        assert caption is not None, fold
        pairs = ", ".join(
            f"{m} &gt; {t:g}" for m, t in zip(best["members"], best["thresholds"], strict=True)
        )
        assert f"chosen {best['operator']}: {pairs}" in caption.group(1)
    gallery = _section(doc, "gallery")
    best_cap = re.search(r"Best \d case\(s\) by case Dice: ([^<]*)", gallery)
    worst_cap = re.search(r"Worst \d case\(s\) by case Dice: ([^<]*)", gallery)
    assert best_cap and worst_cap
    dice = [float(x) for x in re.findall(r"case Dice (\d+\.\d)\)", best_cap.group(1))]
    worst = [float(x) for x in re.findall(r"case Dice (\d+\.\d)\)", worst_cap.group(1))]
    assert dice == sorted(dice, reverse=True) and worst == sorted(worst)
    assert min(dice) >= max(worst)


def test_classifier_figures_in_grid(made: tuple[Path, str]) -> None:
    _, doc = made
    cls = _section(doc, "classifiers")
    assert cls.count('<tr class="mean">') == 2  # one mean line per model
    # one grid per model with figures, one column per fold, with learning curve and
    # confusion matrix; resnet50's train stage wrote no PNG: no grid (named in a note)
    assert "<h3>resnet50</h3>" not in cls
    for model in ("resnet34",):
        block = cls[cls.index(f"<h3>{model}</h3>") :]
        block = block[: block.index("</div>\n</div>") + 1]
        assert block.count('<div class="fold">') == 3
        assert block.count("learning_curve.png)</figcaption>") == 3
        assert block.count("confusion_matrix.png)</figcaption>") == 3


def test_sortable_tables_work_without_script(made: tuple[Path, str]) -> None:
    """The per-case statistics table is marked sortable; the sorter is inline and only
    reorders rows, so without JavaScript the table stays as written."""
    _, doc = made
    from ensemblecam.report.html import SORT_SCRIPT, html_table

    assert f"<script>{SORT_SCRIPT}</script>" in doc
    assert "table.sortable" in SORT_SCRIPT and "appendChild" in SORT_SCRIPT
    table = html_table(["case", "dice"], [["b", "2.0"], ["a", "–"]], "percase sortable")
    assert table.startswith('<table class="percase sortable"><thead><tr><th>case</th>')
    assert table.index("<td>b</td>") < table.index("<td>a</td>")  # written order kept


def test_gallery_cell_hand_computed() -> None:
    """Gray image (1st-99th percentile to [0, 1]); colours laid at alpha 0.5; the ground
    truth's outline in yellow on maps and masks, never inside it or on the image."""
    img = np.zeros((5, 5), np.float32)
    img[:, 2:] = 1.0  # percentiles 1 and 99: 0 and 1, so gray = img
    gt = np.zeros((5, 5), bool)
    gt[1:4, 1:4] = True  # a 3x3 block: its centre (2, 2) is inside, the other 8 the outline
    plain = gallery_cell(img, gt)
    np.testing.assert_array_equal(plain, np.repeat(img[..., None], 3, axis=-1))
    lime = gallery_cell(img, gt, kind="gt")
    np.testing.assert_allclose(lime[2, 2], [0.5, 1.0, 0.5])  # 0.5 x gray 1 + 0.5 x (0, 1, 0)
    np.testing.assert_allclose(lime[1, 1], [0.0, 0.5, 0.0])  # gray 0
    np.testing.assert_array_equal(lime[0, 0], plain[0, 0])  # outside the ground truth
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = mask[0, 4] = True
    red = gallery_cell(img, gt, mask, "mask")
    np.testing.assert_allclose(red[2, 2], [1.0, 0.5, 0.5])  # inside gt: red, no outline
    np.testing.assert_allclose(red[0, 4], [1.0, 0.5, 0.5])
    outline = [(r, c) for r in range(1, 4) for c in range(1, 4) if (r, c) != (2, 2)]
    for r, c in outline:
        np.testing.assert_array_equal(red[r, c], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(red[0, 0], [0.0, 0.0, 0.0])
    heat = gallery_cell(img, gt, np.zeros((5, 5)), "map")  # jet(0) = (0, 0, 0.5)
    np.testing.assert_allclose(heat[0, 3], [0.5, 0.5, 0.75])
    np.testing.assert_array_equal(heat[1, 1], [1.0, 1.0, 0.0])
    # a whole figure: a PNG with a missing entry left blank
    rows = [GalleryRow("a", img, gt, {"m": np.ones((5, 5))}, {"k": mask}, {"k": "t > 0.5"}),
            GalleryRow("b", img, gt, {}, {"k": mask})]  # fmt: skip
    assert gallery_figure(rows, "cases").startswith(b"\x89PNG")
