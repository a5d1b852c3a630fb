"""Classifier gating of the self-trained segmenter's masks (``run.gate``).

Rule: the gate probability of slice ``s`` is ``p(s) = mean_c P_c(lesion | s)`` over the
run's classifiers ``c`` (``run.models``; softmax probability of the lesion class, the value
``train`` and ``cam`` record); the mask of ``s`` is emptied when ``p(s) < t``
(``run.gate_threshold``; a slice is called lesion when ``p >= t``). Only classifiers vote:
the MIL localisers (map-store members ``localiser__<name>``) are segmenters trained from
slice labels, not classifiers.

Where the probabilities come from: in ``run`` from the map sets of the fold's classifiers
(``probs.npy`` of ``maps/<model>__<first cam method>``, written for every slice of the
mapped parts); in ``predict`` from a forward pass of the same checkpoints over the new
scans (:func:`classifier_probs`; no maps are computed).

The threshold: ``run.gate_threshold: auto`` (the default) calibrates it per U-Net on the
val part's slice labels (:func:`choose_threshold`): the ``t`` among 0 and ``search.gate_grid``
whose gated masks call lesion slices best, by the slice F1 ``2 TP / (2 TP + FP + FN)`` of
"the gated mask is not empty" against the slice labels; ``t = 0`` gates nothing, so a gate
that only removes lesion slices is switched off. A slice-level rule judged at slice level
needs no masks, so the choice is the same with or without them. Why calibrated: the
classifiers' own decision threshold 0.5 (the earlier default, kept as a number) helped on
the brats phantom (demo run: the self-trained U-Net's lesion Dice 0.300 -> 0.317), but
classifiers trained on few lesion slices call almost none lesion at 0.5 (kits phantom
benchmark before augmentation: 8 of 76 held-out lesion slices kept, lesion Dice 0.231
ungated -> 0.041 gated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.io.runlayout import GATE_FILE

#: the values of ``run.gate`` (and ``predict --gate``)
GATES = ("none", "classifiers")
#: the threshold when the val part has no lesion slice to calibrate with (the classifiers'
#: own decision threshold)
FALLBACK_THRESHOLD = 0.5


def gate_masks(masks: np.ndarray, probs: np.ndarray, threshold: float) -> np.ndarray:
    """Copy of ``masks`` (S, H, W) with every slice ``s`` where ``probs[s] < threshold``
    set to 0 (other slices unchanged)."""
    probs = np.asarray(probs)
    if probs.shape != (len(masks),):
        raise ValueError(f"{probs.shape} gate probabilities for {len(masks)} slices")
    out = np.array(masks, copy=True)
    out[probs < threshold] = 0
    return out


def map_set_probs(sets: Sequence[Path], indices: np.ndarray) -> np.ndarray:
    """float64 mean over the map sets ``sets`` of their ``probs`` of the store slices
    ``indices`` (in that order); a slice a set lacks is one InputError line."""
    from ensemblecam.io.mapstore import MapSet

    per = []
    for path in sets:
        ms = MapSet.open(path)
        per.append(np.asarray(ms.probs, np.float64)[ms.rows_for(np.asarray(indices))])
    return np.mean(per, axis=0)


def classifier_probs(
    checkpoints: Sequence[Path],
    store: Any,
    indices: np.ndarray,
    batch_size: int = 64,
    progress: bool | None = None,
) -> np.ndarray:
    """float64 mean over the classifier ``checkpoints`` of P(lesion) of the store slices
    ``indices``: one forward pass each (:func:`ensemblecam.stages.train.predict`)."""
    from ensemblecam.models import load_checkpoint
    from ensemblecam.stages.train import predict
    from ensemblecam.training.data import StoreDataset

    per = []
    for ck in checkpoints:
        model, _ = load_checkpoint(ck)
        p, _ = predict(model, StoreDataset(store, indices), batch_size, progress=progress)
        per.append(np.asarray(p, np.float64))
    return np.mean(per, axis=0)


def gate_record(probs: np.ndarray, threshold: float, sources: Sequence[str]) -> dict[str, Any]:
    """What a gated result records (metrics.json ``gate``, index.json ``source.gate``)."""
    probs = np.asarray(probs)
    return {
        "gate": "classifiers",
        "threshold": threshold,
        "rule": "slice emptied where the mean of the classifiers' P(lesion) < threshold",
        "classifiers": list(sources),
        "n_slices": int(probs.size),
        "n_gated": int((probs < threshold).sum()),
    }


def choose_threshold(
    detected: np.ndarray, probs: np.ndarray, labels: np.ndarray, grid: Sequence[float]
) -> dict[str, Any]:
    """The calibrated gate (module docstring): the ``t`` among 0 and ``grid`` maximising the
    slice F1 ``2 TP / (2 TP + FP + FN)`` of ``detected & (probs >= t)`` (``detected``: the
    ungated mask is not empty) against ``labels`` (1 lesion, 0 lesion-free; other values
    left out). Ties: the lower ``t``. No lesion slice among the labelled ones: F1 says
    nothing, so :data:`FALLBACK_THRESHOLD`. Returns threshold, why, and the table."""
    labels = np.asarray(labels)
    known = (labels == 0) | (labels == 1)
    det, p, pos = np.asarray(detected, bool)[known], np.asarray(probs)[known], labels[known] == 1
    table = []
    for t in [0.0, *sorted(float(g) for g in grid if g > 0)]:
        called = det & (p >= t)
        tp, fp = int((called & pos).sum()), int((called & ~pos).sum())
        fn = int(pos.sum()) - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        table.append({"threshold": t, "f1": f1, "tp": tp, "fp": fp, "fn": fn})
    if not pos.any():
        why = "no lesion slice in the part: the classifiers' decision threshold"
        return {"threshold": FALLBACK_THRESHOLD, "chosen_by": why, "table": table}
    why = "slice F1 of the gated masks against the slice labels (0: no gating)"
    return best_row(table, "f1", lambda t: -t, why)


def best_row(
    table: list[dict[str, Any]], score: str, tie: Callable[[float], float], why: str
) -> dict[str, Any]:
    """A calibration's record ``{"threshold", "chosen_by": why, "table"}``: the threshold
    of the row of ``table`` with the highest ``score``, ties to the highest
    ``tie(threshold)``."""
    best = max(table, key=lambda r: (r[score], tie(r["threshold"])))
    return {"threshold": best["threshold"], "chosen_by": why, "table": table}


def calibrate_gate(
    cfg: Any,
    checkpoint: Path,
    sets: Sequence[Path],
    grid: Sequence[float],
    out: Path,
    force: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Calibrate the gate of U-Net ``checkpoint`` (masks: P(lesion) > ``threshold``, None:
    the argmax) on ``cfg``'s part (an :class:`~ensemblecam.config.EvaluateConfig`, run with
    the val part) with the classifier map sets ``sets`` (:func:`choose_threshold`); write
    ``<out>/gate.json``."""
    from ensemblecam.io import fsutil
    from ensemblecam.stages.search import part_slices
    from ensemblecam.stages.unet import predict_unet

    # run needs labelled val slices already (the classifiers validate on them)
    store, _, idx = part_slices(cfg.store, cfg.splits, cfg.fold, cfg.part, labelled=True)
    detected = predict_unet(checkpoint, store, idx, threshold=threshold).any(axis=(1, 2))
    result = choose_threshold(detected, map_set_probs(sets, idx), store.labels[idx], grid)
    result.update(
        fold=cfg.fold, part=cfg.part, n_slices=len(idx), checkpoint=str(checkpoint),
        classifiers=[str(s) for s in sets],
    )  # fmt: skip
    partial = fsutil.prepare_output_dir(out, force, GATE_FILE)
    fsutil.write_json(partial / GATE_FILE, result)
    fsutil.commit_output_dir(partial, out)
    return result
