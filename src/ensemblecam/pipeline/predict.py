"""``ensemblecam predict``: masks for new scans with a finished run's chosen configuration."""

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
from ensemblecam.pipeline.run import load_run_config


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
) -> Path:
    """Masks for new, unlabelled scans with a finished run's chosen configuration.

    The scans are prepared with the run's prepare settings (seg files ignored), mapped with
    the classifiers of ``fold`` (default: the fold whose configuration scored best on its
    calibration data), combined with that fold's chosen configuration, and exported as
    NIfTI masks in each scan's original geometry (``<out>/<case>.nii.gz``).

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
                run_dir, input_dir, out, work, cfg, chosen, fold, layout, force, progress
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
    layout: str | None,
    force: bool,
    progress: bool | None,
) -> Path:
    """:func:`predict` once the checks are made: prepare, map, combine, export."""
    from ensemblecam.io.export import export_cases
    from ensemblecam.io.mapstore import MapSet
    from ensemblecam.io.store import SliceStore
    from ensemblecam.models import load_checkpoint
    from ensemblecam.stages.cam import run_cam
    from ensemblecam.stages.evaluate import config_masks
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
    tags = list(dict.fromkeys(m.split("__")[0] for m in chosen["members"]))
    methods = list(dict.fromkeys(m.split("__", 1)[1] for m in chosen["members"]))
    checkpoints = [RunLayout(run_dir).fold(fold).checkpoint(t) for t in tags]
    for ck in checkpoints:
        _, info = load_checkpoint(ck)
        if list(info["channels"]) != store.channels:
            raise InputError(
                f"{input_dir}: scans have modalities {','.join(store.channels)} but the models "
                f"were trained on {','.join(info['channels'])}"
            )
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
    masks = config_masks([ms.maps for ms in sets], [ms.probs for ms in sets], chosen)
    conf = {k: chosen[k] for k in CONFIG_KEYS}
    export_cases(
        store,
        np.arange(store.n_slices),
        masks,
        out,
        kind="mask",
        force=force,
        source={
            "command": "ensemblecam predict",
            "run": str(run_dir),
            "fold": fold,
            "configuration": conf,
            "description": describe_config(conf),
        },
        progress=progress,
    )
    return out
