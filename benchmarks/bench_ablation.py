"""Benchmark: ablation of the sharper-CAM options on the demo-scale protocol.

The demo-scale protocol of ``bench_quality.py`` (the packaged ``configs/demo.yaml``: its
phantom, classifiers resnet18/resnet34, Grad-CAM + LayerCAM at ``layer3``, search, U-Net
budget) on a phantom of each of ``--layouts`` (default brats,msd), fold 0, run once per
variant:

- ``baseline``: the demo config as it is (maps at layer3: 6x6 for 96x96 slices);
- ``os16``: ``train.output_stride: 16`` (layer4 dilated) and maps at ``layer4``, which
  then has layer3's resolution (6x6) with the last stage's features;
- ``flip_tta``: ``cam.flip_tta: true``;
- ``fusion``: ``cam.layers: [layer2, layer3]`` (12x12 and 6x6 maps fused);
- ``os8`` (not in the default list): ``train.output_stride: 8``, maps at ``layer4`` (12x12).

Variants that train the same classifiers share one run folder under ``--work``: the
pipeline's stage cache reuses the trained classifiers, the MIL localiser and the
supervised U-Net, and recomputes only the maps and what follows them. For each layout it
prints a markdown table of held-out (test part) lesion Dice and case Dice of the best
single CAM member (kind ``single``, the MIL localiser excluded), of the ensemble and of
the self-trained U-Net; the last line printed is one JSON object with the figures.

``--tiny`` shrinks everything (9-case 48x48x16 phantom, one narrow resnet10, 1 epoch,
small U-Nets) to check that the script works in a few minutes; its figures mean nothing.

Usage: python benchmarks/bench_ablation.py [--layouts brats,msd] [--variants
       baseline,os16,flip_tta,fusion] [--work DIR] [--keep] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import METRICS, best_rows, demo_config
from ensemblecam.config import Config
from ensemblecam.pipeline import run_pipeline
from ensemblecam.synth import synth_dataset

#: variant -> (train section changes, cam section changes)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": ({}, {}),
    "os16": ({"output_stride": 16}, {"layer": "layer4"}),
    "os8": ({"output_stride": 8}, {"layer": "layer4"}),
    "flip_tta": ({}, {"flip_tta": True}),
    "fusion": ({}, {"layer": None, "layers": ["layer2", "layer3"]}),
}
DEFAULT_VARIANTS = "baseline,os16,flip_tta,fusion"
#: reported row kinds: results-row kind -> column label
KINDS = {"single": "best single CAM", "ensemble": "ensemble", "pseudo_unet": "self-trained U-Net"}
#: the MIL localiser's single row is not a CAM member
EXCLUDE = ("localiser__mil",)


def shrink(cfg: Config) -> None:
    """The ``--tiny`` configuration: minutes instead of hours, meaningless figures."""
    cfg.synth.n_cases, cfg.synth.shape, cfg.synth.workers = 9, (48, 48, 16), 1
    cfg.prepare.workers = 1
    cfg.train.epochs, cfg.train.batch_size = 1, 16
    cfg.train.model_args = {"widen_factor": 0.25}
    cfg.run.models = ["resnet10"]
    cfg.unet.epochs, cfg.unet.channels, cfg.unet.strides = 1, [4, 8], [2]
    cfg.unet.num_res_units = 0
    cfg.mil.epochs, cfg.mil.channels = 1, [4, 8]


def variant_config(base: Config, name: str, work: Path, layout: str) -> Config:
    """``base`` with variant ``name``'s changes; its run folder is shared by the variants
    with the same training changes."""
    train, cam = VARIANTS[name]
    cfg = base.model_copy(deep=True)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    for key, value in cam.items():
        setattr(cfg.cam, key, value)
    group = "_".join(f"{k}{v}" for k, v in sorted(train.items())) or "base"
    cfg.run.out = work / f"run_{layout}_{group}"
    return cfg


def run_layout(layout: str, work: Path, variants: list[str], tiny: bool) -> dict[str, Any]:
    """Every variant on one phantom of ``layout`` (fold 0): figures and seconds per variant."""
    base = demo_config(layout, work, [0])
    if tiny:
        shrink(base)
    synth_dataset(base.synth, force=True)
    out: dict[str, Any] = {}
    for name in variants:
        cfg = variant_config(base, name, work, layout)
        t0 = time.perf_counter()
        run_pipeline(cfg, force=True, progress=False)
        seconds = time.perf_counter() - t0
        results = json.loads((cfg.run.out / "results.json").read_text())
        rows = best_rows(results, exclude_singles=EXCLUDE)
        out[name] = {k: rows.get(k) for k in KINDS} | {"seconds": round(seconds, 1)}
    return out


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    value = None if row is None else row.get(metric)
    return "-" if value is None else f"{value:.3f}"


def markdown(layout: str, figures: dict[str, Any]) -> str:
    """One layout's table: lesion Dice / case Dice of each reported row kind per variant."""
    head = " | ".join(f"{label} {m}" for label in KINDS.values() for m in ("lesion", "case"))
    lines = [
        f"## {layout} (fold 0)",
        f"| variant | {head} | seconds |",
        "|---|" + "---:|" * (2 * len(KINDS) + 1),
    ]
    for name, res in figures.items():
        cells = " | ".join(_cell(res[k], m) for k in KINDS for m in METRICS)
        lines.append(f"| {name} | {cells} | {res['seconds']:.0f} |")
    single = {n: (r["single"] or {}).get("name") for n, r in figures.items()}
    lines.append(f"best single member per variant: {single}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="brats,msd")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--tiny", action="store_true", help="tiny data and models: a smoke test")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants {','.join(bad) or '(none)'}: expected any of {', '.join(VARIANTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    try:
        for layout in args.layouts.split(","):
            figures[layout] = run_layout(layout, work, variants, args.tiny)
            print("\n" + markdown(layout, figures[layout]))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "benchmark": "ablation",
        "folds": [0],
        "tiny": args.tiny,
        "variants": {v: {"train": VARIANTS[v][0], "cam": VARIANTS[v][1]} for v in variants},
        "total_seconds": round(time.perf_counter() - t0, 1),
        **figures,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
