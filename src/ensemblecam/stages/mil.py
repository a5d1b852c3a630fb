"""The MIL localiser: a shallow U-Net trained from slice labels alone, its maps one more
member of the map store (``localiser__<name>``) that the ensemble search may pick. ``run``
trains one per ``run.mil_variants`` entry (default: ``mil``, the plain loss, and
``mil_symmetric``, the symmetric term with scaled maps), so the search, on calibration
data, keeps whichever localises on the data at hand.

Why: a classifier's CAM shows where the classifier looks, which need not be the lesion (a
classifier can tell lesion slices from global cues; its maps then miss the lesion however
they are thresholded). The localiser is trained on the question the masks answer: with
the multiple-instance loss (:func:`ensemblecam.training.losses.mil_loss`) a lesion-free
slice is background at every pixel, and a lesion slice must hold some lesion pixels. Its
few levels keep each pixel's receptive field small, so slice-wide cues cannot satisfy the
loss. Training: :func:`ensemblecam.stages.unet.train_unet` with ``targets="labels"`` (the
one training loop).

Member maps (:func:`write_mil_maps`), for every slice of the requested parts:

    m = G_sigma * sigmoid(d)            (d the lesion logit, G_sigma a Gaussian in-plane)
    p = sigmoid(mean of the ceil(top_fraction * H * W) largest d)   (slice probability)

The denoising autoencoder (``objective: denoise``; run's ``mil_dae``; Kascenas et al.,
"Denoising autoencoders for unsupervised anomaly detection in brain MRI", MIDL 2022) asks
the other question the labels answer: what does a lesion-free slice look like? Trained to
remove coarse noise from the lesion-free slices only, it restores healthy tissue and
leaves what it has never seen, so its residual is high on a lesion, whatever its contrast
(a dark cyst that no MIL localiser marks included). Its member maps::

    m = min(G_sigma * r / s, 1),   r = sum_c |x_c - f(x)_c|   (f the autoencoder)
    p = mean of the ceil(top_fraction * H * W) largest m      (slice score)

with s the ``scale_quantile`` of G_sigma * r over the fold's training part (required: r is
unbounded).

``m`` is not normalised per slice: a lesion-free slice keeps low values, so the searched
thresholds mean the same on every slice. ``p`` is the slice score the MIL loss trains
(stored as the member's ``probs``, used for gating). With ``scale_quantile`` q the maps are
divided by one constant, s = the q-quantile of ``m`` over the fold's training part, and
clipped to 1: maps whose P(lesion) stays low then span the searched thresholds. s is kept
in the member's meta.json and new scans (predict) reuse it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ensemblecam import __version__
from ensemblecam.config import MilConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil, mapstore
from ensemblecam.io.store import SliceStore

#: map-store member name of the plain localiser's maps
MIL_MEMBER = mapstore.localiser_member("mil")


def mil_maps(
    logits: np.ndarray, sigma: float, top_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, H, W) in [0, 1], slice probabilities float32 (n,)) of lesion logits
    ``logits`` (n, H, W) (module docstring)."""
    d = np.asarray(logits, dtype=np.float64)
    prob = _smooth(1.0 / (1.0 + np.exp(-d)), sigma)
    top = top_mean(d, top_fraction)
    return prob.astype(np.float32), (1.0 / (1.0 + np.exp(-top))).astype(np.float32)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """G_sigma * x in-plane, per slice of (n, H, W) (sigma 0: x)."""
    return ndimage.gaussian_filter(x, (0, sigma, sigma), mode="nearest") if sigma > 0 else x


def top_mean(x: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) mean of the ceil(fraction * H * W) largest values of each slice of x (n, H, W)."""
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return -np.sort(-flat, axis=1)[:, :k].mean(axis=1) if len(flat) else np.zeros(0)


def map_scale(maps: np.ndarray, rows: np.ndarray, quantile: float) -> float:
    """s = the ``quantile`` of ``maps[rows]`` (every pixel), at least 1e-6 (module
    docstring)."""
    if len(rows) == 0:
        raise InputError("mil scale_quantile: no training-part slice to take the scale from")
    return max(float(np.quantile(np.asarray(maps[rows], np.float64), quantile)), 1e-6)


def write_mil_maps(
    cfg: MilConfig,
    checkpoint: str | Path,
    store_path: str | Path,
    indices: np.ndarray,
    out: str | Path,
    force: bool = False,
    progress: bool | None = None,
    scale_from: np.ndarray | None = None,
    scale: float | None = None,
) -> Path:
    """Write the localiser's member (``out``, a map-store member folder) for the store
    slices ``indices``. With ``cfg.scale_quantile`` the maps are divided by ``scale``, or
    by :func:`map_scale` of the slices ``scale_from`` (store indices among ``indices``: the
    training part)."""
    rows = None
    if cfg.scale_quantile is not None and scale is None:
        rows = None if scale_from is None else mapstore.positions(indices, scale_from)
        if rows is None:
            raise InputError(
                "mil scale_quantile: the training part must be among the mapped slices"
            )
    return write_unet_maps(
        checkpoint,
        store_path,
        indices,
        out,
        cfg.objective,
        cfg.sigma(),
        cfg.top_fraction,
        cfg.batch_size,
        force,
        progress,
        scale if cfg.scale_quantile is not None else None,
        rows,
        cfg.scale_quantile or 1.0,
    )


def write_unet_maps(
    checkpoint: str | Path,
    store_path: str | Path,
    indices: np.ndarray,
    out: str | Path,
    method: str,
    sigma: float,
    top_fraction: float,
    batch_size: int = 32,
    force: bool = False,
    progress: bool | None = None,
    scale: float | None = None,
    scale_rows: np.ndarray | None = None,
    quantile: float = 1.0,
) -> Path:
    """Write a U-Net's lesion maps as a map-store member (``out``) for the store slices
    ``indices``: :func:`mil_maps` of its lesion logits (sigma 0: its softmax P(lesion)),
    divided by ``scale`` (or by :func:`map_scale` of the rows ``scale_rows`` of
    ``indices`` at ``quantile``) and clipped to 1; neither: unscaled. ``method``
    "denoise" (a denoising autoencoder f): the map is m = min(G_sigma * r / scale, 1) of
    the residual r = sum_c |x_c - f(x)_c| (:func:`ensemblecam.stages.unet.predict_residuals`),
    the slice score the mean of its ceil(top_fraction * H * W) largest m."""
    from ensemblecam.stages.unet import predict_lesion_logits, predict_residuals

    store = SliceStore.open(store_path)
    idx = np.asarray(indices, dtype=np.int64)
    out = Path(out)
    partial = fsutil.prepare_output_dir(out, force, mapstore.MAP_META, stage=method)
    if method == "denoise":
        res = predict_residuals(checkpoint, store, idx, batch_size=batch_size, progress=progress)
        maps = _smooth(res.astype(np.float64), sigma).astype(np.float32)
    else:
        logits = predict_lesion_logits(checkpoint, store, idx, batch_size, progress=progress)
        maps, probs = mil_maps(logits, sigma, top_fraction)
    if scale is None and scale_rows is not None:
        scale = map_scale(maps, scale_rows, quantile)
    if scale is not None:
        maps = np.minimum(maps / np.float32(scale), np.float32(1.0))
    if method == "denoise":
        probs = top_mean(maps, top_fraction).astype(np.float32)
    meta: dict[str, Any] = {
        "member": out.name,
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": "unet",
        "method": method,
        "layer": None,
        "target": "lesion",
        "normalised": False,
        "smooth_sigma": sigma,
        "top_fraction": top_fraction,
        "scale": scale,
        "store": str(Path(store_path).resolve()),
        "store_id": store.identity,
        "store_n_slices": store.n_slices,
        "ensemblecam_version": __version__,
    }
    mapstore.write_map_set(partial, meta, idx, maps.astype(np.float16), probs)
    fsutil.commit_output_dir(partial, out, method)
    return out
