"""The U-Nets' decision threshold (``run.segmenter_threshold``).

A U-Net's mask is ``P(lesion) > t`` with P the softmax of the lesion channel (sigmoid of
one channel); ``t = 0.5`` is the argmax. With ``auto`` (the default) ``t`` is calibrated
per U-Net, as the ensemble's thresholds are, on the calibration data the search uses, the
annotated slices of the fold's ``run.calibration_part`` (the training part by default):
the value of ``run.segmenter_grid`` with the highest lesion Dice
``2 TP / (2 TP + FP + FN)``, pixels pooled over those slices, ties to the value nearest 0.5
(:func:`choose_segmenter_threshold`). Without annotated slices there is nothing to
calibrate with, and ``t`` is 0.5.

Why: a U-Net self-trained on pseudo-labels inherits their bias. Lesions grown too large
by the pseudo-labels come back too large, and a U-Net trained briefly on rare lesions
stays under-confident (P(lesion) at most ~0.6 inside lesions). 0.5 then suits one data set
and not the next. Held-out lesion Dice of the final self-trained U-Net, 0.5 -> calibrated
(``bench_quality.py`` fold 0):

- msd phantom: 0.809 -> 0.867 (t = 0.85);
- brats phantom: 0.760 -> 0.767 (t = 0.45);
- kits phantom: 0.549 -> 0.554 (t = 0.55).

The same calibration applies to every U-Net of a run, the supervised one included, so the
comparison stays fair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.io.runlayout import THRESHOLD_FILE
from ensemblecam.metrics import lesion_dice
from ensemblecam.stages.gate import best_row

#: the threshold without masks to calibrate with: the argmax
FALLBACK_THRESHOLD = 0.5


def threshold_counts(probs: np.ndarray, truth: np.ndarray, grid: Sequence[float]) -> np.ndarray:
    """int64 (len(grid), 3): pooled (TP, FP, FN) of ``probs > t`` against the bool masks
    ``truth`` (same shape as ``probs``) for each ``t`` of ``grid``."""
    p, g = np.asarray(probs).ravel(), np.asarray(truth, bool).ravel()
    lesion = int(np.count_nonzero(g))
    out = np.zeros((len(grid), 3), np.int64)
    for i, t in enumerate(grid):
        called = p > t
        tp = int(np.count_nonzero(called & g))
        out[i] = tp, int(np.count_nonzero(called)) - tp, lesion - tp
    return out


def choose_segmenter_threshold(counts: np.ndarray, grid: Sequence[float]) -> dict[str, Any]:
    """The calibrated threshold (module docstring) from :func:`threshold_counts`: the
    ``t`` of ``grid`` with the highest lesion Dice, ties to the one nearest 0.5;
    :data:`FALLBACK_THRESHOLD` when the slices hold no lesion pixel. Returns threshold,
    why, and the table."""
    counts = np.asarray(counts, np.int64).reshape(len(grid), 3)
    table = [
        {"threshold": float(t), "lesion_dice": float(d), "tp": tp, "fp": fp, "fn": fn}
        for t, d, (tp, fp, fn) in zip(grid, lesion_dice(*counts.T), counts.tolist(), strict=True)
    ]
    if not table or counts[0, 0] + counts[0, 2] == 0:
        why = "no lesion pixel in the annotated slices: the argmax"
        return {"threshold": FALLBACK_THRESHOLD, "chosen_by": why, "table": table}
    why = "lesion Dice on the calibration part's masks"
    return best_row(table, "lesion_dice", lambda t: -abs(t - 0.5), why)


def calibrate_segmenter(
    cfg: Any,
    checkpoint: Path,
    grid: Sequence[float],
    out: Path,
    force: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Calibrate U-Net ``checkpoint``'s threshold on the annotated slices of ``cfg``'s part
    (an :class:`~ensemblecam.config.EvaluateConfig`, run with the calibration part;
    :func:`choose_segmenter_threshold`); write ``<out>/threshold.json``."""
    from ensemblecam.io import fsutil
    from ensemblecam.stages.search import part_slices
    from ensemblecam.stages.unet import lesion_prob, logit_batches

    store, _, idx = part_slices(cfg.store, cfg.splits, cfg.fold, cfg.part)
    idx = idx[store.annotated(idx)]
    grid = sorted(float(t) for t in grid)
    counts = np.zeros((len(grid), 3), np.int64)
    if len(idx) == 0:
        result = choose_segmenter_threshold(counts, grid)
        result["chosen_by"] = f"no masks in the {cfg.part} part: the argmax"
    else:
        # one model load, batch by batch: memory bounded by the batch, not the part
        for rows, z in logit_batches(checkpoint, store, idx, progress=progress):
            truth = np.asarray(store.masks[idx[rows]]) > 0
            counts += threshold_counts(lesion_prob(z).numpy(), truth, grid)
        result = choose_segmenter_threshold(counts, grid)
    result.update(
        fold=cfg.fold, part=cfg.part, n_slices=len(idx), checkpoint=str(checkpoint),
        rule="mask where P(lesion) > threshold",
    )  # fmt: skip
    partial = fsutil.prepare_output_dir(out, force, THRESHOLD_FILE)
    fsutil.write_json(partial / THRESHOLD_FILE, result)
    fsutil.commit_output_dir(partial, out)
    return result
