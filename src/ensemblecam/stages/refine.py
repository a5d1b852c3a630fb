"""``ensemblecam refine``: three-class pseudo-labels of a fold's training part from the chosen
ensemble, its searched thresholds, the images and the slice labels.

For every slice of ``cfg.parts`` (:mod:`ensemblecam.refine` gives the chain):

- a slice labelled lesion-free is background at every pixel; a slice of unknown label
  (-1) is ignore at every pixel; a lesion slice never ends empty;
- the chosen configuration decides which member maps seed a slice: ``and``/``or``/``vote:k``
  all members with agreement M / 1 / k, ``mean`` the mean map, ``min``/``max`` the member
  whose mask the operator picks on that slice, ``single`` its member;
- the candidates (:func:`candidates`): ``none`` = the ensemble's own decision (seeds at
  margin 0: lesion where the operator says lesion, background where every member says
  background, the rest ignore); ``crf@m`` / ``random_walker@m`` for each margin ``m`` of
  ``cfg.margins`` = seeds beyond +-m (relative scores) grown on the image (m = 0: the
  ensemble's decision refined; larger m: only its confident core, the rest decided by the
  image).

Choice (``criterion`` in refine.json): ``masks`` when cases of the training part have masks:
the candidate with the highest lesion Dice against them on those cases (ignore counted as
background), ties to the earlier candidate; ``fallback`` otherwise (no masks to choose
with: the report says so).

With ``cfg.ignore`` off the uncertain pixels of labelled slices are then written as
background (slices of unknown label stay ignore); on (the default) they stay 255.

Outputs (an atomic folder ``cfg.out``): ``masks.npz`` (``index`` int64 store indices,
``masks`` uint8 in {0, 1, 255}; what the U-Net stage trains on), ``refine.json`` (written
last: criterion, chosen refiner, each candidate's quality on the training part, seconds).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.config import RefineConfig
from ensemblecam.ensemble.operators import EnsembleConfig, parse_operator
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import MapSet, dequantise
from ensemblecam.io.masks import write_masks
from ensemblecam.io.runlayout import REFINE_FILE
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.refine import IGNORE, RefineOptions, pseudo_label_batch, pseudo_label_quality
from ensemblecam.training.data import part_indices

REFINE_FORMAT = "ensemblecam-refine"


def candidates(cfg: RefineConfig) -> dict[str, tuple[str, float]]:
    """Candidate name -> (refiner, seed margin): ``none`` once, every other refiner of
    ``cfg.refiners`` at every margin of ``cfg.margins`` (named ``<refiner>@<margin>``)."""
    out: dict[str, tuple[str, float]] = {}
    for refiner in cfg.refiners:
        for m in [0.0] if refiner == "none" else cfg.margins:
            out[_candidate_name(refiner, m)] = (refiner, float(m))
    return out


def _candidate_name(refiner: str, margin: float) -> str:
    """``none``, or ``<refiner>@<margin>`` (e.g. ``crf@0.5``)."""
    return "none" if refiner == "none" else f"{refiner}@{margin:g}"


def fallback(cfg: RefineConfig) -> tuple[str, float]:
    """(name, margin) of the refiner used without masks to choose with: ``cfg.fallback``
    at the first margin, named as a candidate."""
    margin = 0.0 if cfg.fallback == "none" else float(cfg.margins[0])
    return _candidate_name(cfg.fallback, margin), margin


def refine_options(
    cfg: RefineConfig, refiner: str, agreement: int, margin: float = 0.0
) -> RefineOptions:
    """The :class:`RefineOptions` of one candidate (module docstring); ``cfg.options`` last."""
    values: dict[str, Any] = {
        "refiner": refiner,
        "fg_margin": margin,
        "bg_margin": margin,
        "agreement": agreement,
        **cfg.options,
    }
    return RefineOptions.from_dict(values)


def check_refine_options(cfg: RefineConfig, n_members: int) -> None:
    """Every candidate's and the fallback's options are valid (one error line if not)."""
    for refiner, margin in [*candidates(cfg).values(), (cfg.fallback, fallback(cfg)[1])]:
        refine_options(cfg, refiner, n_members, margin)


def slice_members(
    conf: EnsembleConfig, maps: list[np.ndarray]
) -> tuple[np.ndarray, list[float], int]:
    """(member maps (K, H, W), thresholds, agreement) that seed one slice under ``conf``;
    ``maps`` the configuration's member maps of the slice, in its order."""
    kind, k = (
        parse_operator(conf.operator, len(conf.members))
        if conf.operator != "single"
        else ("single", 1)
    )
    thr = [float(t) for t in conf.thresholds]
    if kind == "mean":
        return np.mean(np.stack(maps), axis=0, dtype=np.float32)[None], thr[:1], 1
    if kind in ("min", "max"):
        counts = [int(np.sum(m > np.float32(t))) for m, t in zip(maps, thr, strict=True)]
        j = int(np.argmin(counts) if kind == "min" else np.argmax(counts))
        return maps[j][None], [thr[j]], 1
    if kind == "single":
        return maps[0][None], thr[:1], 1
    agreement = {"and": len(maps), "or": 1}.get(kind, k)
    return np.stack(maps), thr, agreement


def _labels_of(
    store: SliceStore,
    idx: np.ndarray,
    conf: EnsembleConfig,
    sets: list[MapSet],
    options: RefineOptions,
) -> np.ndarray:
    """uint8 (n, H, W) pseudo-labels of store slices ``idx`` with one candidate's options."""
    rows = [ms.rows_for(idx) for ms in sets]
    labels = store.labels[idx]
    out = np.zeros((len(idx), *store.size), np.uint8)
    out[labels < 0] = IGNORE
    lesion = np.flatnonzero(labels > 0)
    images, maps, thresholds, opts = [], [], [], []
    for j in lesion:
        member_maps = [
            dequantise(np.asarray(ms.maps[r[j]])) for ms, r in zip(sets, rows, strict=True)
        ]
        m, thr, agreement = slice_members(conf, member_maps)
        images.append(np.asarray(store.images[idx[j]], dtype=np.float32))
        maps.append(m)
        thresholds.append(thr)
        opts.append(replace(options, agreement=min(agreement, len(m))))
    labelled = pseudo_label_batch(images, maps, thresholds, [1] * len(lesion), opts)
    for j, lab in zip(lesion, labelled, strict=True):
        out[j] = lab
    return out


def _choose(
    cfg: RefineConfig,
    store: SliceStore,
    train: np.ndarray,
    annotated: np.ndarray,
    conf: EnsembleConfig,
    sets: list[MapSet],
) -> tuple[str, dict[str, dict[str, Any]], np.ndarray]:
    """(chosen refiner, each candidate's record, the chosen labels of ``train``): every
    candidate scored on the annotated slices, or only the fallback without any."""
    truth = bool(annotated.any())
    fb_name, fb_margin = fallback(cfg)
    todo = candidates(cfg) if truth else {fb_name: (cfg.fallback, fb_margin)}
    names = list(todo)
    records: dict[str, dict[str, Any]] = {}
    labels: dict[str, np.ndarray] = {}
    for name, (refiner, margin) in todo.items():
        t1 = time.perf_counter()
        opt = refine_options(cfg, refiner, len(conf.members), margin)
        labels[name] = _labels_of(store, train, conf, sets, opt)
        quality = None
        if truth:
            assert store.masks is not None
            quality = pseudo_label_quality(
                labels[name][annotated], np.asarray(store.masks[train[annotated]])
            )
        records[name] = {
            "options": opt.as_dict(),
            "train_quality": quality,
            "seconds": round(time.perf_counter() - t1, 2),
        }
    chosen = max(
        names,
        key=lambda n: (
            (records[n]["train_quality"] or {}).get("lesion_dice", 0.0),
            -names.index(n),
        ),
    )
    return chosen, records, labels[chosen]


def refine_stage(cfg: RefineConfig, force: bool = False) -> Path:
    """Write ``cfg.out`` (module docstring); return it."""
    store = SliceStore.open(cfg.store)
    splits = Path(cfg.splits) if cfg.splits is not None else Path(cfg.store) / "splits.json"
    fold = get_fold(splits, cfg.fold)
    conf = EnsembleConfig.read(cfg.config_file, "chosen configuration")
    if not cfg.refiners:
        raise InputError("refine.refiners: give at least one refiner (none, crf, random_walker)")
    if not cfg.parts or "train" not in cfg.parts:
        raise InputError(f"refine.parts {cfg.parts}: must include train (the part to label)")
    check_refine_options(cfg, len(conf.members))  # bad options fail here, before any work
    sets = [MapSet.open(Path(cfg.maps) / m) for m in conf.members]
    for ms in sets:
        ms.check_store(store)
    idx = {p: part_indices(store, splits, fold, p) for p in dict.fromkeys(cfg.parts)}
    out = Path(cfg.out)
    fsutil.check_not_input(out, [cfg.store, splits, cfg.maps, cfg.config_file])
    partial = fsutil.prepare_output_dir(out, force, REFINE_FILE, stage="refine")
    t0 = time.perf_counter()
    train = idx["train"]
    annotated = store.annotated(train)
    chosen, records, train_labels = _choose(cfg, store, train, annotated, conf, sets)
    opt = RefineOptions.from_dict(records[chosen]["options"])
    index = np.unique(np.concatenate(list(idx.values())))
    masks = np.zeros((len(index), *store.size), np.uint8)
    in_train = np.isin(index, train)
    masks[in_train] = train_labels
    rest = index[~in_train]
    if len(rest):
        masks[~in_train] = _labels_of(store, rest, conf, sets, opt)
    if not cfg.ignore:  # uncertain pixels of labelled slices become background
        known = masks[store.labels[index] >= 0]
        known[known == IGNORE] = 0
        masks[store.labels[index] >= 0] = known
    write_masks(partial / "masks.npz", index, masks)
    fsutil.write_json(
        partial / REFINE_FILE,
        {
            "format": REFINE_FORMAT,
            "version": 1,
            "fold": fold.name,
            "parts": list(idx),
            "config": conf.to_dict(),
            "criterion": "masks" if annotated.any() else "fallback",
            "chosen": chosen,
            "candidates": records,
            "n_slices": {p: len(v) for p, v in idx.items()},
            "n_annotated_slices": int(annotated.sum()),
            "ignored_fraction": float(np.mean(masks == IGNORE)) if masks.size else 0.0,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    fsutil.commit_output_dir(partial, out, "refine")
    return out
