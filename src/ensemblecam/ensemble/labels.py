"""Mask-free calibration: choose an ensemble configuration from slice labels alone.

Every pixel of a slice labelled lesion-free is background, so the pixel false-positive
rate of a configuration on those slices is known exactly without any mask. The search
(:func:`ensemblecam.ensemble.search.search`, exact, every operator x thresholds x member
subset) is run with a ground truth made of the slice labels (every pixel of a lesion slice
1, of a lesion-free slice 0); its data-set counts are then

- ``tp`` = pixels called lesion on lesion-labelled slices, ``lesion_slice_area`` =
  tp / (lesion slices x pixels per slice);
- ``fp`` = pixels called lesion on lesion-free slices, ``free_slice_area`` =
  fp / (lesion-free slices x pixels per slice): the exact pixel false-positive rate.

Criterion (a Neyman-Pearson choice): among the configurations with ``free_slice_area <=
fp_budget`` (default 1% of the pixels of a lesion-free slice), the one with the largest
``label_score = lesion_slice_area - free_slice_area``, the called area on lesion slices
beyond the rate at which lesion-free slices are called (both as fractions of a slice).
For one member this is the smallest grid threshold within the budget. Configurations
over the budget have no score (NaN). CAMs are min-max normalised per slice (maximum 1 on
every slice), so on lesion-free slices too the hottest pixels are called: the budget
bounds that.

Classifier gating: the gate is a slice-level decision, and an area criterion would use it
to empty the lesion-free slices and then call whole lesion slices; so configurations are
ranked ungated and the gate (when searched) is chosen afterwards, on the same calibration
slices, as the gate-grid value maximising Youden's J = TPR - FPR of "mean member
probability >= gate" against the slice labels (ties: the lower gate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ensemblecam.ensemble.rows import Rows
from ensemblecam.ensemble.search import Candidate, SearchResult, search
from ensemblecam.errors import InputError

#: the label criterion's columns of ranking.csv (every other metric needs masks)
LABEL_METRICS = ("label_score", "lesion_slice_area", "free_slice_area")
#: default largest share of a lesion-free slice's pixels called lesion
DEFAULT_FP_BUDGET = 0.01


def label_truth(labels: np.ndarray, size: tuple[int, int]) -> Rows:
    """Slice labels as a read-only (N, H, W) uint8 ground truth (every pixel = the label)."""
    lab = (np.asarray(labels) == 1).astype(np.uint8)
    return Rows(np.broadcast_to(lab[:, None, None], (lab.size, *size)))


def label_search(
    maps: Sequence[Rows],
    labels: np.ndarray,
    case_ids: np.ndarray,
    size: tuple[int, int],
    grid: np.ndarray,
    operators: Sequence[str],
    subsets: Sequence[tuple[int, ...]],
    member_names: Sequence[str],
    fp_budget: float = DEFAULT_FP_BUDGET,
    chunk: int = 128,
    progress: bool | None = None,
) -> SearchResult:
    """Every configuration (ungated) scored by the label criterion (module docstring);
    its candidates' metrics are :data:`LABEL_METRICS` (shape (1, L, ..., L))."""
    labels = np.asarray(labels)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"labels criterion: the calibration part has {n_pos} lesion and {n_neg} "
            "lesion-free slices; it needs both"
        )
    res = search(
        maps,
        label_truth(labels, size),
        case_ids,
        grid,
        operators,
        subsets,
        member_names=member_names,
        chunk=chunk,
        progress=progress,
        objective="tp",
        top_k=1,  # only data-set counts are used
    )
    npix = size[0] * size[1]
    candidates = []
    for cand in res.candidates:
        pos = cand.metrics["tp"] / (n_pos * npix)
        neg = cand.metrics["fp"] / (n_neg * npix)
        score = np.where(neg <= fp_budget, pos - neg, np.nan)
        metrics = {"label_score": score, "lesion_slice_area": pos, "free_slice_area": neg}
        candidates.append(Candidate(cand.operator, cand.members, metrics))
    if not any(np.isfinite(c.metrics["label_score"]).any() for c in candidates):
        raise InputError(
            f"labels criterion: no configuration keeps the lesion-free slices' called area "
            f"within search.fp_budget {fp_budget:g}; raise it or extend search.grid upwards"
        )
    return SearchResult(res.grid, res.gates, res.member_names, candidates, res.n_slices, n_pos)


def youden_gate(probs: np.ndarray, labels: np.ndarray, gates: np.ndarray) -> float | None:
    """The gate g of ``gates`` maximising TPR - FPR of ``probs >= g`` against ``labels``
    (1 lesion, 0 free); None (no gating) when no gate has J > 0. Ties: the lower gate."""
    probs, labels = np.asarray(probs, float), np.asarray(labels)
    pos, neg = labels == 1, labels == 0
    best, best_j = None, 0.0
    for g in np.sort(np.asarray(gates, float)):
        j = (probs[pos] >= g).mean() - (probs[neg] >= g).mean()
        if j > best_j + 1e-12:
            best, best_j = float(g), float(j)
    return best


def label_settings(fp_budget: float, n_pos: int, n_neg: int) -> dict[str, Any]:
    """What best.json records about the label criterion."""
    return {
        "name": "labels",
        "fp_budget": fp_budget,
        "score": "label_score = lesion_slice_area - free_slice_area, among configurations "
        "with free_slice_area <= fp_budget (ungated); gate by Youden's J on slice labels",
        "n_lesion_slices": n_pos,
        "n_free_slices": n_neg,
    }
