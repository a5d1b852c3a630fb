"""Benchmark: how good the weakly supervised masks are, per built-in phantom layout.

The demo-scale protocol (the packaged ``configs/demo.yaml``: phantom size, classifiers,
CAM methods, search, U-Net budget) on a phantom of each layout (brats, msd, kits; prepare
options from each layout's defaults; kits departs from the demo's scale as
:data:`LAYOUT_PROTOCOL` says, and why), on ``--folds`` (default: fold 0 only, to stay
within the time budget). For each layout it reports, on the held-out test part, lesion Dice and
case Dice of: Empty, the best single member (the single row with the highest held-out
lesion Dice: generous to the baseline), the ensemble (chosen on the training part), the
refined pseudo-labels (the training part: what self-training learns from, not held out),
the self-trained U-Net of the earlier round(s) (``run.rounds``; the best of them) and of the
last, the fully supervised U-Net (same epochs) and ``final``, the run's final method
(results.json ``final``: of the ensemble and each round's U-Net, the one with the highest
lesion Dice on the val part's masks, never the held-out part), plus
``weak_over_supervised`` = best weak method's lesion Dice / supervised's (weak methods:
single members, ensemble, self-trained U-Nets; goal >= 0.8), ``final_over_supervised``
(the same for the final method alone), the share of run time the refine stages took, and
``val_chain``: the chain ensemble -> refined pseudo-labels -> each round's U-Net on one set
of slices, the val part (the rows above compare the pseudo-labels of the training part with
held-out methods), and ``label_shares``: per seg label of the phantom, the share of its
held-out voxels that the final method's and the supervised U-Net's masks mark
(``ensemblecam score`` on their NIfTI export): which kinds of lesion each finds (brats:
core 1, oedema 2, enhancing rim 4; kits: tumour 2, cyst 3) and on which tissue the false
positives lie.

Usage: python benchmarks/bench_quality.py [--layouts brats,msd,kits] [--work DIR]
       [--folds 0] [--keep]
A ``--work`` folder kept from an earlier run is resumed: its phantoms are reused when they
were written with the same settings, and so is every stage whose inputs and options match
(``"resumed": true`` in the JSON; ``seconds`` then counts only what was recomputed).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from ensemblecam.config import Config, load_config
from ensemblecam.pipeline import run_pipeline
from ensemblecam.pipeline.results import final_unet
from ensemblecam.synth import same_phantom, synth_dataset

ROWS = {
    "empty": "Empty",
    "single": "best single member",
    "ensemble": "ensemble",
    "pseudo_labels": "refined pseudo-labels (train part)",
    "pseudo_round": "self-trained U-Net, earlier round",
    "pseudo_unet": "self-trained U-Net",
    "unet": "supervised U-Net",
}
METRICS = ("lesion_dice", "case_dice_mean")

#: Per-layout departures from the demo's phantom, prepare and U-Net settings. kits: the
#: demo's 96x96 slice squeezes a whole abdomen into 96 pixels, so a renal tumour is 2-7
#: pixels across and even the supervised U-Net scores lesion Dice ~0.003 (it memorises the
#: training slices: Dice 0.78 there, 0.006 held out), so nothing can be compared. Here a
#: 192x192 slice at the phantom's 1.5 mm (a 29 cm field of view, as an abdominal CT) with
#: the kidney thesis's own protocol, a window centred on each kidney, of 80x80 pixels (120
#: mm: the thesis's 150-pixel window at KiTS's typical 0.8 mm), keeps the networks' input
#: near the demo's size (2 x 80 x 80 against 96 x 96 per slice). The lesion is ~1% of such
#: a window and the supervised U-Net's validation Dice stays 0 for 6 epochs (it rises from
#: epoch 7), so both segmenters get 15 epochs: the same budget, one that lets the
#: reference learn.
LAYOUT_PROTOCOL: dict[str, dict[str, dict[str, Any]]] = {
    "kits": {
        "synth": {"shape": (192, 192, 48)},
        "prepare": {"crop": "kidney", "crop_size": (80, 80)},
        "unet": {"epochs": 15},
    },
}


def demo_config(layout: str, work: Path, folds: list[int]) -> Config:
    """The packaged demo config for a phantom of ``layout`` in ``work`` (no export/report)."""
    cfg = load_config(Path(str(files("ensemblecam") / "configs" / "demo.yaml")))
    cfg.synth.layout = layout
    cfg.synth.out = work / f"phantom_{layout}"
    cfg.prepare.layout = layout
    cfg.prepare.modalities = None if layout != "brats" else cfg.prepare.modalities
    cfg.prepare.data = cfg.synth.out
    cfg.run.out = work / f"run_{layout}"
    cfg.run.folds = folds
    cfg.run.export = False
    cfg.run.report = False
    for section, values in LAYOUT_PROTOCOL.get(layout, {}).items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _single_member(row: dict[str, Any]) -> str | None:
    """The member of a ``single`` results row (None for other rows)."""
    if row["kind"] != "single":
        return None
    confs = list((row.get("config") or {}).values())
    return (confs[0].get("members") or [None])[0] if confs else None


def best_rows(results: dict[str, Any], exclude_singles: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per row kind of :data:`ROWS`: the row with the highest held-out lesion Dice (the
    single-member rows of the members ``exclude_singles`` left out), as {metric: mean,
    "name": row name}."""
    out: dict[str, Any] = {}
    for kind in ROWS:
        rows = [
            r
            for r in results["rows"]
            if r["kind"] == kind
            and (_single_member(r) is None or _single_member(r) not in exclude_singles)
        ]
        if not rows:
            continue
        row = max(rows, key=lambda r: r["mean"].get("lesion_dice") or 0.0)
        out[kind] = {m: row["mean"].get(m) for m in METRICS} | {"name": row["name"]}
    return out


def final_slug(results: dict[str, Any]) -> str | None:
    """The U-Net kind whose masks are final (results.json ``final``), None for the ensemble."""
    own = (results.get("final") or {}).get("method") == "self_trained"
    return final_unet(results) if own else None


def final_row(results: dict[str, Any]) -> dict[str, Any]:
    """The held-out figures of the run's final method (results.json ``final``: the ensemble
    or the self-trained U-Net of the round chosen on the val part's masks)."""
    final = results.get("final") or {}
    slug = final_slug(results)
    row = next(
        r
        for r in results["rows"]
        if (r.get("slug", r["kind"]) == slug if slug else r["kind"] == "ensemble")
        and r["kind"] in ("ensemble", "pseudo_round", "pseudo_unet")
    )
    return {m: row["mean"].get(m) for m in METRICS} | {
        "name": row["name"],
        "method": final.get("method"),
        "round": final.get("round"),
    }


def val_chain(results: dict[str, Any]) -> dict[str, Any] | None:
    """The chain on one set of slices, the val part (results.json ``final``; calibration
    data, not held out): the ensemble, the refined pseudo-labels (which use the slices'
    labels), each self-training round's U-Net, in that order; None when the run did not
    score them (no masks in the val part, run.final not auto)."""
    final = results.get("final") or {}
    scores = dict(final.get("val_lesion_dice") or {})
    if not scores:
        return None
    chain = {"ensemble": scores.pop("ensemble")}
    if final.get("val_pseudo_labels") is not None:
        chain["pseudo_labels"] = final["val_pseudo_labels"]
    return chain | scores


def label_shares(cfg: Config, results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Per seg label of the phantom, the share of its held-out voxels marked by the final
    method's masks and by the supervised U-Net's: ``ensemblecam score`` on their NIfTI
    export (the evaluated cases of every fold pooled), so a multi-label reference shows
    which kinds of lesion each finds (kits: tumour 2, cyst 3) and the false positives on
    each tissue (kits: kidney 1)."""
    import numpy as np

    from ensemblecam.io.export import export_cases
    from ensemblecam.io.masks import read_masks
    from ensemblecam.io.runlayout import RunLayout
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.score import score_folder

    lay = RunLayout(cfg.run.out)
    store = SliceStore.open(lay.store)
    shares: dict[str, Any] = {}
    for name, slug in (("final", final_slug(results)), ("supervised", "unet")):
        files = [
            lay.fold(f).row_masks(slug) if slug else lay.fold(f).eval_masks
            for f in results["folds"]
        ]
        idx, masks = (np.concatenate(a) for a in zip(*map(read_masks, files), strict=True))
        export_cases(store, idx, masks, out / name, force=True)
        cases = sorted({str(c) for c in store.table["case"][idx]})
        summary = score_folder(out / name, cfg.prepare.data, cfg.prepare.layout,
                               out / f"{name}_score", cases=cases, force=True)  # fmt: skip
        shares[name] = {v: round(p["share"], 4) for v, p in summary["labels"].items()}
    shares["lesion_labels"] = [v for v, p in summary["labels"].items() if p["lesion"]]
    return shares


def run_layout(layout: str, work: Path, folds: list[int]) -> dict[str, Any]:
    """One demo-scale run of ``layout``; its table figures and timings."""
    cfg = demo_config(layout, work, folds)
    t0 = time.perf_counter()
    resumed = same_phantom(cfg.synth)  # a kept --work folder: its stages are reused
    if not resumed:
        synth_dataset(cfg.synth, force=True)
    run_pipeline(cfg, force=True, progress=False)
    seconds = time.perf_counter() - t0
    results = json.loads((cfg.run.out / "results.json").read_text())
    run = json.loads((cfg.run.out / "run.json").read_text())
    out = best_rows(results)
    weak = [
        out[k]["lesion_dice"] or 0.0
        for k in ("single", "ensemble", "pseudo_round", "pseudo_unet")
        if k in out
    ]
    out["final"] = final_row(results)
    sup = (out.get("unet") or {}).get("lesion_dice")
    timings = run.get("timings", {})
    refine_s = sum(v for k, v in timings.items() if k.endswith("/refine") or "/refine_round" in k)
    stages_s = sum(timings.values())
    return {
        "rows": out,
        "weak_over_supervised": (max(weak) / sup) if sup else None,
        "final_over_supervised": (out["final"]["lesion_dice"] or 0.0) / sup if sup else None,
        "best_weak": max(weak) if weak else None,
        "seconds": round(seconds, 1),
        "resumed": resumed,
        "refine_seconds": round(refine_s, 1),
        "refine_share": round(refine_s / stages_s, 4) if stages_s else None,
        "chosen": [
            json.loads((cfg.run.out / f / "search" / "best.json").read_text())["members"]
            for f in results["folds"]
        ],
        "val_chain": val_chain(results),
        "label_shares": label_shares(cfg, results, work / f"label_shares_{layout}"),
        "refiner": [
            json.loads((cfg.run.out / f / "refine" / "refine.json").read_text())["chosen"]
            for f in results["folds"]
            if (cfg.run.out / f / "refine" / "refine.json").is_file()
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="brats,msd,kits")
    ap.add_argument("--folds", default="0", help="fold positions, e.g. 0 or 0,1,2")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    folds = [int(f) for f in args.folds.split(",")]
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    try:
        for layout in args.layouts.split(","):
            figures[layout] = res = run_layout(layout, work, folds)
            print(f"\n## {layout} (folds {args.folds}, {res['seconds']:.0f} s)")
            print("| method | lesion Dice | case Dice |\n|---|---:|---:|")
            for kind, label in ROWS.items():
                if kind in res["rows"]:
                    r = res["rows"][kind]
                    cells = " | ".join("-" if r[m] is None else f"{r[m]:.3f}" for m in METRICS)
                    print(f"| {label} | {cells} |")
            fin = res["rows"]["final"]
            print(f"| final: {fin['name']} (chosen on the val part) | "
                  + " | ".join("-" if fin[m] is None else f"{fin[m]:.3f}" for m in METRICS)
                  + " |")  # fmt: skip
            ratio = res["weak_over_supervised"]
            share = 100 * (res["refine_share"] or 0)
            print(f"weak / supervised = {'-' if ratio is None else f'{ratio:.2f}'}; refine "
                  f"{res['refine_seconds']:.0f} s ({share:.1f}% of the stages); members "
                  f"chosen {res['chosen']}; refiner {res['refiner']}")  # fmt: skip
            if res["val_chain"]:
                print("the chain on the val part's slices (lesion Dice): " + " -> ".join(
                    f"{k} {v:.3f}" for k, v in res["val_chain"].items()))  # fmt: skip
            ls = res["label_shares"]
            print("held-out voxels marked per seg label (final / supervised): " + ", ".join(
                f"{v}{' (lesion)' if v in ls['lesion_labels'] else ''} "
                f"{100 * ls['final'][v]:.1f}% / {100 * ls['supervised'][v]:.1f}%"
                for v in ls["final"]))  # fmt: skip
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    summary = {
        "benchmark": "quality",
        "folds": folds,
        "total_seconds": round(total, 1),
        **{
            layout: {
                **res["rows"],
                "weak_over_supervised": res["weak_over_supervised"],
                "final_over_supervised": res["final_over_supervised"],
                "refine_share": res["refine_share"],
                "seconds": res["seconds"],
                "resumed": res["resumed"],
                "val_chain": res["val_chain"],
                "label_shares": res["label_shares"],
            }
            for layout, res in figures.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
