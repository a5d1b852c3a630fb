"""Classifier gating of the self-trained segmenter's masks (``run.gate``).

Rule: the gate probability of slice ``s`` is ``p(s) = mean_c P_c(lesion | s)`` over the
run's classifiers ``c`` (``run.models``; softmax probability of the lesion class, the value
``train`` and ``cam`` record); the mask of ``s`` is emptied when ``p(s) < t``
(``run.gate_threshold``, default 0.5: the classifiers' own decision threshold, a slice is
called lesion when ``p >= t``). Only classifiers vote: the MIL localisers (map-store
members ``localiser__<name>``) are segmenters trained from slice labels, not classifiers.

Where the probabilities come from: in ``run`` from the map sets of the fold's classifiers
(``probs.npy`` of ``maps/<model>__<first cam method>``, written for every slice of the
mapped parts); in ``predict`` from a forward pass of the same checkpoints over the new
scans (:func:`classifier_probs`; no maps are computed).

Default on, by measurement (the 3-fold demo run, brats phantom, ResNet-18 + ResNet-34,
held-out test parts): gating at 0.5 raised the self-trained U-Net's lesion Dice from
0.300 to 0.317 and its case Dice from 0.229 to 0.238 (both up in every fold), and halved
the voxels predicted on lesion-free cases (29,605 to 14,942 over 5 held-out cases;
``predict`` with all folds on the 5 lesion-free scans: 5,012 to 2,962). The threshold is
the classifiers' decision threshold, not fitted to these data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the values of ``run.gate`` (and ``predict --gate``)
GATES = ("none", "classifiers")


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
