"""``ensemblecam cam``: maps of every slice of a split for each (checkpoint, method).

For each checkpoint, every requested method is computed from the same batches (gradient
methods share one forward/backward pass) on exactly the classifier's training input
(:class:`ensemblecam.training.data.StoreDataset`: the store's images as float32, no
augmentation), and written as one map-store member ``<out>/<model_tag>__<method>``
(format: :mod:`ensemblecam.io.mapstore`).

Resume and sharding: a member is built in ``.<member>.partial``; ``maps.npy`` and
``probs.npy`` are ``open_memmap`` files there, and each finished batch is recorded as
``done/<batch>`` after its rows are flushed. Under Lightning Fabric, rank r takes batches
r, r + world, ... and writes its rows into the shared memmaps (a shared filesystem is
needed across nodes); rank 0 then writes index.npy, meta.json (last) and renames the
folder. An interrupted run resumes with the finished batches skipped, as long as its
settings (``plan.json``) are unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ensemblecam import models
from ensemblecam import progress as progress_out
from ensemblecam.cam.engine import CamEngine, find_target_layer, spatial_layers
from ensemblecam.cam.methods import METHODS
from ensemblecam.config import CamConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil, mapstore
from ensemblecam.io.split import PARTS, get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.training.data import StoreDataset, part_indices
from ensemblecam.training.fabric import make_fabric

PLAN_FILE = "plan.json"


@dataclass
class CamPlan:
    """Everything checked before any process starts (picklable for ddp_spawn)."""

    cfg: CamConfig
    indices: np.ndarray
    tags: list[str]
    layers: list[list[str]]  # per checkpoint: its target layer(s)
    members: list[list[Path]] = field(default_factory=list)  # per checkpoint, per method
    store_id: str = ""  # SliceStore.identity of cfg.store


def model_tag(checkpoint: Path) -> str:
    """Default model tag: the checkpoint's folder name (``runs/r34/best.pt`` -> ``r34``)."""
    return checkpoint.resolve().parent.name


def _target(value: str) -> str | int:
    if value in ("lesion", "predicted"):
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(
            f"--target {value!r}: expected lesion, predicted or a class index"
        ) from None


def check_fit(checkpoint: Path, info: dict[str, Any], store: SliceStore) -> None:
    """A checkpoint whose channels or slice size differ from the store's is an InputError."""
    chans = info.get("channels")
    if chans is not None and list(chans) != store.channels:
        raise InputError(
            f"{checkpoint}: trained on channels {list(chans)}, the store {store.path} has "
            f"{store.channels}"
        )
    size = info.get("size")
    if size is not None and [int(s) for s in size] != list(store.size):
        raise InputError(
            f"{checkpoint}: trained on {list(size)} slices, the store {store.path} has "
            f"{list(store.size)}"
        )


def target_layers(cfg: CamConfig) -> list[str] | None:
    """The configured target layers: ``layers`` if given (``layer`` may then only be None
    or one of them), else ``[layer]``, else None (automatic)."""
    if cfg.layers is None:
        return None if cfg.layer is None else [cfg.layer]
    names = list(dict.fromkeys(n.strip() for n in cfg.layers))
    if not names or not all(names):
        raise InputError(f"cam.layers {cfg.layers}: give at least one layer name, none empty")
    if cfg.layer is not None and cfg.layer not in names:
        raise InputError(
            f"cam.layer {cfg.layer!r} is not one of cam.layers {names}: set one of them "
            "(layers replaces layer)"
        )
    return names


def choose_layers(
    model: torch.nn.Module, info: dict[str, Any], shape: tuple, layers: list[str] | None
) -> list[str]:
    """Every one of ``layers`` (checked), or the single layer of :func:`choose_layer`."""
    if layers is None:
        return [choose_layer(model, info, shape, None)]
    return [find_target_layer(model, shape, name) for name in layers]


def choose_layer(
    model: torch.nn.Module, info: dict[str, Any], shape: tuple, layer: str | None
) -> str:
    """``layer`` if given (checked); else the model's recorded ``cam_layer`` if it is spatial
    (> 1 in every spatial dim) for this input; else the automatic choice."""
    if layer is not None:
        return find_target_layer(model, shape, layer)
    preferred = info.get("cam_layer") or models.cam_layer(model)
    if preferred and preferred in spatial_layers(model, shape):
        return str(preferred)
    return find_target_layer(model, shape)


def split_indices(
    store: SliceStore, splits: str | Path | None, fold_key: int | str, part_names: list[str]
) -> np.ndarray:
    """Ascending store indices of the split parts ``part_names`` of fold ``fold_key``
    (``all``: every slice); ``splits`` None: the store's splits.json."""
    parts = [p.strip() for p in part_names if p.strip()]
    if not parts:
        raise InputError("--parts: no split part given")
    if parts == ["all"]:
        return np.arange(store.n_slices, dtype=np.int64)
    splits = Path(splits) if splits is not None else store.path / "splits.json"
    fold = get_fold(splits, fold_key)
    idx: list[np.ndarray] = []
    for part in parts:
        if part not in PARTS:
            raise InputError(f"--parts {part!r}: expected {', '.join(PARTS)} or all")
        idx.append(part_indices(store, Path(splits), fold, part))
    out = np.unique(np.concatenate(idx)).astype(np.int64)
    if out.size == 0:
        raise InputError(f"{splits}: {fold.name} parts {','.join(parts)} hold no slices")
    return out


def plan_cam(cfg: CamConfig) -> CamPlan:
    """Check store, split, checkpoints, layers, methods and output folders; write nothing."""
    store = SliceStore.open(cfg.store)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise InputError(
            f"--methods {','.join(bad) or '(none)'}: expected any of {', '.join(METHODS)}"
        )
    if not cfg.checkpoints:
        raise InputError("--checkpoints: give at least one classifier checkpoint")
    if cfg.raw and cfg.dtype == "uint8":
        raise InputError("--raw maps are not in [0, 1]: use --dtype float16 or float32")
    _target(cfg.target)
    wanted = target_layers(cfg)
    indices = split_indices(store, cfg.splits, cfg.fold, cfg.parts)
    tags = list(cfg.tags) if cfg.tags else [model_tag(Path(c)) for c in cfg.checkpoints]
    if len(tags) != len(cfg.checkpoints):
        raise InputError(f"--tags: {len(tags)} tags for {len(cfg.checkpoints)} checkpoints")
    if len(set(tags)) != len(tags):
        raise InputError(f"model tags {tags} are not unique; pass --tags, one per checkpoint")
    shape = (len(store.channels), *store.size)
    layers, members = [], []
    for ck, tag in zip(cfg.checkpoints, tags, strict=True):
        model, info = models.load_checkpoint(ck)
        check_fit(Path(ck), info, store)
        target, n_cls = _target(cfg.target), int(info["model_args"].get("num_classes", 2))
        if isinstance(target, int) and not 0 <= target < n_cls:
            raise InputError(
                f"--target {cfg.target}: {ck} has {n_cls} classes (indices 0..{n_cls - 1})"
            )
        layers.append(choose_layers(model, info, shape, wanted))
        paths = []
        for method in dict.fromkeys(cfg.methods):
            path = Path(cfg.out) / mapstore.member_name(tag, method)
            if path.exists() and not path.is_dir():
                raise InputError(f"{path}: exists and is not a folder")
            if (path / mapstore.MAP_META).exists() and not cfg.force:
                raise InputError(f"{path}: already holds maps; use --force to replace them")
            fsutil.check_replaceable(path, cfg.force, mapstore.MAP_META)  # ours only
            paths.append(path)
        members.append(paths)
    return CamPlan(cfg, indices, tags, layers, members, store.identity)


def run_cam(
    cfg: CamConfig, progress: bool | None = None, stop_after_batches: int | None = None
) -> dict[str, Any]:
    """Write every member of ``cfg``; return ``{"members": [paths], "computed": n_batches}``.

    ``stop_after_batches`` stops (per process) after that many computed batches as if
    killed, leaving the partial folders for a resume (tests).
    """
    plan = plan_cam(cfg)
    return make_fabric(cfg).launch(_run, plan, progress, stop_after_batches)


def _layer_record(layers: list[str]) -> str | list[str]:
    """A member's ``layer`` record: the name of its one layer, or the list of its layers."""
    return layers[0] if len(layers) == 1 else list(layers)


def _plan_record(plan: CamPlan, k: int, method: str) -> dict[str, Any]:
    cfg = plan.cfg
    return {
        "checkpoint": str(Path(cfg.checkpoints[k]).resolve()),
        "method": method,
        "layer": _layer_record(plan.layers[k]),
        "flip_tta": cfg.flip_tta,
        "target": cfg.target,
        "dtype": cfg.dtype,
        "raw": cfg.raw,
        "batch_size": cfg.batch_size,
        "n": len(plan.indices),
        "index_sum": int(plan.indices.sum()),
        "smooth": [cfg.smooth_n, cfg.smooth_sigma, cfg.seed],
        "top_k": cfg.top_k,
        "score_precision": [cfg.score_precision, cfg.score_tol] if method == "scorecam" else None,
        "store": str(Path(cfg.store).resolve()),
        "store_id": plan.store_id,
    }


def _open_partial(
    path: Path, record: dict[str, Any], shape: tuple, dtype: str, force: bool
) -> Path:
    """Create or reuse ``.<member>.partial`` with memmaps; a stale partial is wiped."""
    partial = fsutil.prepare_output_dir(path, force, mapstore.MAP_META, stage="cam")
    plan_file = partial / PLAN_FILE
    try:
        old = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    except (OSError, ValueError):  # a torn plan record: start the member over
        old = None
    if old != record:
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
        open_memmap(partial / "maps.npy", mode="w+", dtype=dtype, shape=shape).flush()
        open_memmap(partial / "probs.npy", mode="w+", dtype=np.float32, shape=shape[:1]).flush()
        (partial / "done").mkdir()
        fsutil.write_json(plan_file, record)
    return partial


def _run(fabric: Any, plan: CamPlan, progress: bool | None, stop_after: int | None) -> Any:
    """One process: rank r computes batches r, r + world, ... of every member (skipping
    batches already done); rank 0 then commits each complete member."""
    cfg = plan.cfg
    rank, world = fabric.global_rank, fabric.world_size
    store = SliceStore.open(cfg.store)
    n = len(plan.indices)
    bs = cfg.batch_size
    batches = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    mine = list(range(rank, len(batches), world))
    map_dtype = "float32" if cfg.raw and cfg.dtype == "float32" else cfg.dtype
    computed = 0
    stopped = False
    done_paths: list[Path] = []
    for k, ck in enumerate(cfg.checkpoints):
        methods = list(dict.fromkeys(cfg.methods))
        partials = [p.with_name(f".{p.name}.partial") for p in plan.members[k]]
        records = [_plan_record(plan, k, m) for m in methods]
        if rank == 0:
            for p, rec in zip(plan.members[k], records, strict=True):
                _open_partial(p, rec, (n, *store.size), map_dtype, cfg.force)
        fabric.barrier()
        model, info = models.load_checkpoint(ck)
        model = model.to(fabric.device)
        engine = CamEngine(
            model, methods, plan.layers[k], _target(cfg.target), cfg.smooth_n, cfg.smooth_sigma,
            cfg.seed, cfg.score_batch, cfg.top_k, score_precision=cfg.score_precision,
            score_tol=cfg.score_tol, flip_tta=cfg.flip_tta,
        )  # fmt: skip
        maps = [np.load(p / "maps.npy", mmap_mode="r+") for p in partials]
        probs = [np.load(p / "probs.npy", mmap_mode="r+") for p in partials]
        bar = progress_out.bar(
            mine, desc=f"{plan.tags[k]} ({', '.join(methods)})", unit="batches",
            label="cam", enabled=progress is not False and rank == 0,
        )  # fmt: skip
        for b in bar:
            if stopped:
                break
            todo = [i for i, p in enumerate(partials) if not (p / "done" / str(b)).exists()]
            if not todo:
                continue
            lo, hi = batches[b]
            idx = plan.indices[lo:hi]
            x, _ = StoreDataset(store, idx)[np.arange(len(idx))]  # one batch read
            engine.methods = [methods[i] for i in todo]
            res = engine(x.to(fabric.device), keys=idx.tolist(), raw=cfg.raw)
            for i in todo:
                m = res.maps[methods[i]].cpu().numpy()
                maps[i][lo:hi] = m if cfg.raw else mapstore.quantise(m, cfg.dtype)
                probs[i][lo:hi] = res.probs.cpu().numpy()
                maps[i].flush()
                probs[i].flush()
                fsutil.write_text(partials[i] / "done" / str(b), "")
            computed += 1
            if stop_after is not None and computed >= stop_after:
                stopped = True
        del maps, probs
        fabric.barrier()
        if rank == 0 and not stopped:
            for p, method, rec in zip(plan.members[k], methods, records, strict=True):
                _commit_member(plan, k, p, method, rec, info, store, len(batches), map_dtype)
                done_paths.append(p)
        fabric.barrier()
    return {"members": done_paths, "computed": computed, "stopped": stopped}


def _commit_member(
    plan: CamPlan,
    k: int,
    path: Path,
    method: str,
    rec: dict[str, Any],
    info: dict[str, Any],
    store: SliceStore,
    n_batches: int,
    map_dtype: str,
) -> None:
    """Rank 0: check every batch of member ``path`` is written, add index.npy and
    meta.json (last), rename ``.<member>.partial`` to the member."""
    cfg = plan.cfg
    partial = path.with_name(f".{path.name}.partial")
    missing = [b for b in range(n_batches) if not (partial / "done" / str(b)).exists()]
    if missing:
        raise InputError(f"{partial}: batches {missing[:5]} were not written")
    fsutil.save_npy(partial / "index.npy", plan.indices)
    meta = {
        "format": mapstore.MAP_FORMAT, "version": mapstore.MAP_VERSION,
        "member": path.name, "checkpoint": rec["checkpoint"], "model": info.get("model"),
        "method": method, "layer": "+".join(plan.layers[k]), "layers": plan.layers[k],
        "flip_tta": cfg.flip_tta, "target": _target(cfg.target),
        "dtype": map_dtype, "normalised": not cfg.raw, "store": rec["store"],
        "store_id": store.identity, "store_n_slices": store.n_slices,
        "n": len(plan.indices), "size": list(store.size), "parts": list(cfg.parts),
        "fold": cfg.fold, "splits": None if cfg.splits is None else str(cfg.splits),
        "smooth_n": cfg.smooth_n, "smooth_sigma": cfg.smooth_sigma,
        "top_k": cfg.top_k, "score": "logit" if method == "scorecam" else None,
        "score_precision": cfg.score_precision if method == "scorecam" else None,
        "score_tol": cfg.score_tol if method == "scorecam" else None,
    }  # fmt: skip
    shutil.rmtree(partial / "done")
    (partial / PLAN_FILE).unlink()
    fsutil.write_json(partial / mapstore.MAP_META, meta)
    fsutil.commit_output_dir(partial, path, stage="cam")
