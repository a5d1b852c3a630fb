"""``ensemblecam predict``: masks for new scans with a finished run's final method: the U-Net
self-trained on the ensemble's masks when the run has one, else the chosen ensemble
configuration (``method`` picks either)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.config import Config
from ensemblecam.ensemble.operators import CONFIG_KEYS
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import RunLayout
from ensemblecam.pipeline.results import describe_config
from ensemblecam.pipeline.run import METHOD_NAMES, final_method, load_run_config


def _best_fold(lay: RunLayout, results: dict[str, Any]) -> str:
    """The fold whose chosen configuration scored best on its calibration data."""
    best_name, best_val = results["folds"][0], -np.inf
    for fold in results["folds"]:
        b = fsutil.read_json(lay.fold(fold).best, "search result")
        val = b.get(b.get("objective", results["objective"]), -np.inf)
        if val is not None and val > best_val:
            best_name, best_val = fold, val
    return best_name


def predict(
    run_dir: str | Path,
    input_dir: str | Path,
    out: str | Path,
    layout: str | None = None,
    fold: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    method: str | None = None,
) -> Path:
    """Masks for new, unlabelled scans with a finished run's final method.

    The scans are prepared with the run's prepare settings (seg files ignored). ``method``
    "self_trained": segmented by the U-Net of ``fold`` self-trained on the ensemble's masks
    (``fold<k>/pseudo/best.pt``); "ensemble": mapped with the classifiers of ``fold`` and
    combined with that fold's chosen configuration. Default method: the run's final one
    (self_trained when the run trained it: ``run.pseudo_unet`` and ``fold<k>/pseudo/unet.json``
    present); default fold: the one whose
    ensemble configuration scored best on its calibration data. One line says which fold,
    method and configuration were used; index.json records them. Masks are exported as
    NIfTI in each scan's original geometry (``<out>/<case>.nii.gz``).

    Checked before any work: ``out`` apart from the run and the scans, and replaceable
    (see :func:`ensemblecam.io.fsutil.check_replaceable`); the scratch folder
    ``.<out>.work`` is removed however the call ends.
    """
    run_dir, out = Path(run_dir), Path(out)
    fsutil.check_not_input(out, [run_dir, input_dir])
    cfg = load_run_config(run_dir)
    lay = RunLayout(run_dir)
    results = fsutil.read_json(lay.results_json, "run results (is the run complete?)")
    fold = fold or _best_fold(lay, results)
    if fold not in results["folds"]:
        raise InputError(f"fold {fold!r}: the run has folds {', '.join(results['folds'])}")
    has_own = lay.fold(fold).unet_record("pseudo_unet").is_file()
    method = method or (final_method(cfg) if has_own else "ensemble")
    if method not in METHOD_NAMES:
        raise InputError(f"--method {method}: expected one of {', '.join(METHOD_NAMES)}")
    checkpoint = lay.fold(fold).unet_checkpoint("pseudo_unet")
    if method == "self_trained" and not has_own:
        raise InputError(
            f"{checkpoint.parent}: the run has no self-trained U-Net for {fold} "
            "(run.pseudo_unet was off); use --method ensemble"
        )
    chosen = fsutil.read_json(lay.fold(fold).best, "search result")
    if (out / "index.json").exists() and not force and fsutil.is_ours(out):
        raise InputError(f"{out}: already holds predicted masks; use --force to replace them")
    fsutil.check_replaceable(out, force, "index.json")
    if not Path(input_dir).is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    work = out.with_name(f".{out.name}.work")
    with fsutil.output_guard(out, [run_dir, input_dir]):
        try:
            return _predict_in(
                run_dir, input_dir, out, work, cfg, chosen, fold, method, layout, force, progress
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _predict_in(
    run_dir: Path,
    input_dir: str | Path,
    out: Path,
    work: Path,
    cfg: Config,
    chosen: dict[str, Any],
    fold: str,
    method: str,
    layout: str | None,
    force: bool,
    progress: bool | None,
) -> Path:
    """:func:`predict` once the checks are made: prepare, then segment (self-trained U-Net)
    or map and combine (ensemble), export."""
    from ensemblecam.io.export import export_cases
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.prepare import prepare_store

    shutil.rmtree(work, ignore_errors=True)  # a killed earlier attempt (ours by its name)
    pcfg = cfg.prepare.model_copy(
        update={
            "data": Path(input_dir),
            "out": work / "store",
            "masks": False,
            "labels_csv": None,
            **({"layout": layout} if layout else {}),
        }
    )
    prepare_store(pcfg, force=True)
    store = SliceStore.open(work / "store")
    conf = {k: chosen[k] for k in CONFIG_KEYS}
    source: dict[str, Any] = {
        "command": "ensemblecam predict",
        "run": str(run_dir),
        "scans": str(input_dir),
        "fold": fold,
        "method": method,
        "method_name": METHOD_NAMES[method],
        "configuration": conf,
        "description": describe_config(conf),
    }
    if method == "self_trained":
        from ensemblecam.models import read_checkpoint
        from ensemblecam.stages.unet import predict_unet

        checkpoint = RunLayout(run_dir).fold(fold).unet_checkpoint("pseudo_unet")
        _check_channels(input_dir, store, read_checkpoint(checkpoint)["info"]["channels"])
        source["checkpoint"] = str(checkpoint)
        print(
            f"predict: {fold}, {METHOD_NAMES[method]} ({checkpoint}), trained on the masks of "
            f"the configuration {describe_config(conf)}"
        )
        masks = predict_unet(
            checkpoint, store, np.arange(store.n_slices), cfg.unet.batch_size, progress=progress
        )
    else:
        print(f"predict: {fold}, {METHOD_NAMES[method]}: {describe_config(conf)}")
        masks = _ensemble_masks(run_dir, input_dir, work, cfg, chosen, fold, store, progress)
    export_cases(
        store,
        np.arange(store.n_slices),
        masks,
        out,
        kind="mask",
        force=force,
        source=source,
        progress=progress,
        temporary_store=True,
    )
    return out


def _check_channels(input_dir: str | Path, store: Any, channels: list[str]) -> None:
    """The prepared scans must have the modalities the run's models were trained on."""
    if list(channels) != store.channels:
        raise InputError(
            f"{input_dir}: scans have modalities {','.join(store.channels)} but the models "
            f"were trained on {','.join(channels)}"
        )


def _ensemble_masks(
    run_dir: Path,
    input_dir: str | Path,
    work: Path,
    cfg: Config,
    chosen: dict[str, Any],
    fold: str,
    store: Any,
    progress: bool | None,
) -> np.ndarray:
    """The chosen configuration's masks of every slice of the prepared ``store``: maps of
    the fold's classifiers (written under ``work``), combined."""
    from ensemblecam.io.mapstore import MapSet
    from ensemblecam.models import load_checkpoint
    from ensemblecam.stages.cam import run_cam
    from ensemblecam.stages.evaluate import config_masks

    tags = list(dict.fromkeys(m.split("__")[0] for m in chosen["members"]))
    methods = list(dict.fromkeys(m.split("__", 1)[1] for m in chosen["members"]))
    checkpoints = [RunLayout(run_dir).fold(fold).checkpoint(t) for t in tags]
    for ck in checkpoints:
        _check_channels(input_dir, store, load_checkpoint(ck)[1]["channels"])
    ccfg = cfg.cam.model_copy(
        update={
            "store": work / "store",
            "parts": ["all"],
            "checkpoints": checkpoints,
            "tags": tags,
            "methods": methods,
            "out": work / "maps",
            "force": True,
        }
    )
    run_cam(ccfg, progress=progress)
    sets = [MapSet.open(work / "maps" / m) for m in chosen["members"]]
    return config_masks([ms.maps for ms in sets], [ms.probs for ms in sets], chosen)
