"""``ensemblecam predict``: masks for new scans with a finished run's final method (results.json
``final``: the U-Net of the self-training round or the chosen ensemble configuration,
whichever scored highest on the val part's masks; ``method`` picks either),
by default with the models of every fold.

Fold ensemble (the default; ``fold`` picks one fold instead). Each fold ``k`` gives every
pixel a value ``v_k`` in [0, 1]: the self-trained U-Net's lesion probability (softmax of
the lesion channel), or for the ensemble method its fold configuration's 0/1 mask (the
configurations' combined maps are no probabilities: each fold has its own thresholds,
operator and members, so their votes are averaged, not their scores). The fold ensemble's
probability is ``p = mean_k v_k`` and its mask ``p > c``: for the U-Net ``c`` is the mean of
the folds' decision thresholds ``t_k`` (``run.segmenter_threshold``, or the ones the run
calibrated on each fold's training part when ``auto``, :mod:`ensemblecam.stages.threshold`),
for the ensemble ``c = 0.5``, a strict majority of the folds' masks (with two folds: both).
With one fold the mask is that fold's own (the U-Net's ``P > t_k``, the configuration's
mask), exactly what the run exported for it.

Classifier gating (self_trained, ``run.gate: classifiers`` of the run or ``gate``): each
fold's classifiers (``run.models``) classify each new slice in one forward pass; where
their mean P(lesion) is below that fold's threshold (``run.gate_threshold``, or the one the
run calibrated for the fold's U-Net on its val part when ``auto``), that fold's mask and
probability are emptied before the folds are averaged. With one fold this is the gate the
run applied to its evaluated masks (:mod:`ensemblecam.stages.gate`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam import progress as progress_out
from ensemblecam.config import Config
from ensemblecam.ensemble.operators import CONFIG_KEYS
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import RunLayout
from ensemblecam.pipeline.results import describe_config, final_unet
from ensemblecam.pipeline.run import METHOD_NAMES, final_method, load_run_config
from ensemblecam.stages.gate import GATES

#: how the folds' values are combined (index.json ``source.fold_ensemble``)
FOLD_RULE = {
    "self_trained": "mean of the folds' U-Net lesion probabilities; mask where > the mean of "
    "the folds' decision thresholds",
    "ensemble": "fraction of the folds' configuration masks marking the pixel; mask where > 0.5",
}


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
    all_folds: bool = True,
    probabilities: bool = False,
    gate: str | None = None,
) -> Path:
    """Masks for new, unlabelled scans with a finished run's final method.

    The scans are prepared with the run's prepare settings (seg files ignored). ``method``
    "self_trained": segmented by each fold's U-Net of the self-training round results.json
    ``final.round`` names (``fold<k>/pseudo/best.pt`` for the last round,
    ``fold<k>/pseudo_round<r>/best.pt`` for an earlier one); "ensemble": mapped with each
    fold's classifiers and combined with that fold's chosen configuration. Default method:
    the run's final one (results.json ``final``; ensemble when a fold has no such U-Net). Folds:
    ``fold`` if given, else every fold of the run
    (``all_folds``, combined as in the module docstring), else the one whose ensemble
    configuration scored best on its calibration data. One line says which folds, method
    and configurations were used; index.json records them. Masks are exported as NIfTI in
    each scan's original geometry (``<out>/<case>.nii.gz``); ``probabilities`` adds
    ``<case>_prob.nii.gz`` (float32 in [0, 1], same geometry). ``gate`` ("none" or
    "classifiers"; default the run's ``run.gate``): classifier gating of the self-trained
    U-Net's masks (module docstring; the ensemble method has its configuration's own).

    Checked before any work: ``out`` apart from the run and the scans, and replaceable
    (see :func:`ensemblecam.io.fsutil.check_replaceable`); the scratch folder
    ``.<out>.work`` is removed however the call ends.
    """
    run_dir, out = Path(run_dir), Path(out)
    fsutil.check_not_input(out, [run_dir, input_dir])
    cfg = load_run_config(run_dir)
    lay = RunLayout(run_dir)
    results = fsutil.read_json(lay.results_json, "run results (is the run complete?)")
    if fold is not None and fold not in results["folds"]:
        raise InputError(f"fold {fold!r}: the run has folds {', '.join(results['folds'])}")
    folds = [fold] if fold else list(results["folds"]) if all_folds else [_best_fold(lay, results)]
    kind = final_unet(results)  # the self-trained U-Net: the chosen round's
    has_own = all(lay.fold(f).unet_record(kind).is_file() for f in folds)
    method = method or (final_method(cfg, results) if has_own else "ensemble")
    if method not in METHOD_NAMES:
        raise InputError(f"--method {method}: expected one of {', '.join(METHOD_NAMES)}")
    if method == "self_trained" and not has_own:
        missing = next(f for f in folds if not lay.fold(f).unet_record(kind).is_file())
        raise InputError(
            f"{lay.fold(missing).unet_checkpoint(kind).parent}: the run has no "
            f"self-trained U-Net for {missing} (run.pseudo_unet was off); use --method ensemble"
        )
    gate = cfg.run.gate if gate is None else gate
    if gate not in GATES:
        raise InputError(f"--gate {gate}: expected one of {', '.join(GATES)}")
    chosen = {f: fsutil.read_json(lay.fold(f).best, "search result") for f in folds}
    if (out / "index.json").exists() and not force and fsutil.is_ours(out):
        raise InputError(f"{out}: already holds predicted masks; use --force to replace them")
    fsutil.check_replaceable(out, force, "index.json")
    if not Path(input_dir).is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    work = out.with_name(f".{out.name}.work")
    with fsutil.output_guard(out, [run_dir, input_dir]):
        try:
            return _predict_in(
                run_dir, input_dir, out, work, cfg, chosen, method, layout, force, progress,
                probabilities, gate, kind,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _predict_in(
    run_dir: Path,
    input_dir: str | Path,
    out: Path,
    work: Path,
    cfg: Config,
    chosen: dict[str, dict[str, Any]],
    method: str,
    layout: str | None,
    force: bool,
    progress: bool | None,
    probabilities: bool,
    gate: str = "none",
    kind: str = "pseudo_unet",
) -> Path:
    """:func:`predict` once the checks are made: prepare, then per fold segment
    (self-trained U-Net) or map and combine (ensemble), combine the folds, export."""
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
    folds = list(chosen)
    confs = {f: {k: chosen[f][k] for k in CONFIG_KEYS} for f in folds}
    lay = RunLayout(run_dir)
    source: dict[str, Any] = {
        "command": "ensemblecam predict",
        "run": str(run_dir),
        "scans": str(input_dir),
        "folds": folds,
        "method": method,
        "method_name": METHOD_NAMES[method],
        "fold_ensemble": FOLD_RULE[method] if len(folds) > 1 else None,
        "configurations": confs,
        "descriptions": {f: describe_config(c) for f, c in confs.items()},
    }
    if len(folds) == 1:
        source.update(
            fold=folds[0],
            configuration=confs[folds[0]],
            description=describe_config(confs[folds[0]]),
        )
    how = f"{folds[0]}" if len(folds) == 1 else f"folds {', '.join(folds)} ({FOLD_RULE[method]})"
    configs = "; ".join(f"{f}: {describe_config(c)}" for f, c in confs.items())
    masks, probs = [], []
    if method == "self_trained":
        from ensemblecam.models import read_checkpoint
        from ensemblecam.stages.unet import segment_unet

        checkpoints = {f: lay.fold(f).unet_checkpoint(kind) for f in folds}
        source["checkpoints"] = {f: str(c) for f, c in checkpoints.items()}
        source["unet"] = kind
        if len(folds) == 1:
            source["checkpoint"] = str(checkpoints[folds[0]])
        gated = gate == "classifiers"
        progress_out.info(
            f"predict: {how}, {METHOD_NAMES[method]} "
            f"({', '.join(map(str, checkpoints.values()))}), trained on the masks of the "
            f"configuration {configs}"
            + ("; slices the classifiers call lesion-free emptied (gate)" if gated else "")
        )
        thresholds = source["thresholds"] = {}
        for f, ck in checkpoints.items():
            _check_channels(input_dir, store, read_checkpoint(ck)["info"]["channels"])
            thresholds[f] = _segmenter_threshold(lay, f, cfg, kind)
            m, p = segment_unet(
                ck, store, np.arange(store.n_slices), cfg.unet.batch_size, progress=progress,
                threshold=thresholds[f],
            )  # fmt: skip
            masks.append(m)
            probs.append(p)
        source["gate"] = None
        if gated:
            source["gate"] = _gate(lay, folds, cfg, store, input_dir, masks, probs, progress, kind)
    else:
        progress_out.info(f"predict: {how}, {METHOD_NAMES[method]}: {configs}")
        for f in folds:
            m = _ensemble_masks(run_dir, input_dir, work / f, cfg, chosen[f], f, store, progress)
            masks.append(m)
            probs.append(m.astype(np.float32))
    prob = probs[0] if len(probs) == 1 else np.mean(probs, axis=0, dtype=np.float32)
    cut = np.mean(list(source["thresholds"].values())) if method == "self_trained" else 0.5
    mask = masks[0] if len(masks) == 1 else (prob > cut).astype(np.uint8)
    index = np.arange(store.n_slices)
    export_cases(
        store,
        index,
        mask,
        out,
        kind="mask",
        probs=(index, prob) if probabilities else None,
        force=force,
        source=source,
        progress=progress,
        temporary_store=True,
    )
    return out


def _segmenter_threshold(lay: RunLayout, fold: str, cfg: Config, kind: str) -> float:
    """The decision threshold of ``fold``'s self-trained U-Net ``kind``:
    ``run.segmenter_threshold``, or with auto the one the run calibrated
    (``threshold/<kind>/threshold.json``)."""
    thr = cfg.run.segmenter_threshold
    if thr == "auto":
        record = lay.fold(fold).threshold_record(kind)
        if not record.is_file():  # a run made before the threshold was calibrated
            raise InputError(
                f"{record}: threshold calibration not found; rerun `ensemblecam run` on "
                f"{lay.root} (it reuses the finished stages and calibrates the threshold)"
            )
        thr = fsutil.read_json(record, "threshold calibration")["threshold"]
    return float(thr)


def _gate(
    lay: RunLayout,
    folds: list[str],
    cfg: Config,
    store: Any,
    input_dir: str | Path,
    masks: list[np.ndarray],
    probs: list[np.ndarray],
    progress: bool | None,
    kind: str,
) -> dict[str, Any]:
    """Classifier gating in place (module docstring): each fold's masks and probabilities
    are emptied on the slices where that fold's classifiers' mean P(lesion) is below that
    fold's threshold (``run.gate_threshold``, or the one calibrated for U-Net ``kind`` in
    the run's ``gate/<kind>/gate.json`` when auto). Returns the index.json record."""
    from ensemblecam.models import read_checkpoint
    from ensemblecam.stages.gate import classifier_probs, gate_masks, gate_record

    records = {}
    for i, f in enumerate(folds):
        checkpoints = [lay.fold(f).checkpoint(m) for m in cfg.run.models]
        for ck in checkpoints:
            _check_channels(input_dir, store, read_checkpoint(ck)["info"]["channels"])
        g = classifier_probs(
            checkpoints, store, np.arange(store.n_slices), cfg.cam.batch_size, progress
        )
        thr = cfg.run.gate_threshold
        if thr == "auto":
            calibrated = lay.fold(f).gate_record(kind)
            thr = fsutil.read_json(calibrated, "gate calibration")["threshold"]
        masks[i] = gate_masks(masks[i], g, float(thr))
        probs[i] = gate_masks(probs[i], g, float(thr))
        records[f] = gate_record(g, float(thr), [str(c) for c in checkpoints])
    return {"gate": "classifiers", "folds": records}


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
    from ensemblecam.io.mapstore import MapSet, localiser_member
    from ensemblecam.models import load_checkpoint, read_checkpoint
    from ensemblecam.stages.cam import run_cam
    from ensemblecam.stages.evaluate import config_masks
    from ensemblecam.stages.mil import write_mil_maps

    work.mkdir(parents=True, exist_ok=True)
    lay = RunLayout(run_dir).fold(fold)
    localisers = {localiser_member(n): (n, m) for n, m in cfg.localisers().items()}
    cams = [m for m in chosen["members"] if m not in localisers]
    for member in [m for m in chosen["members"] if m in localisers]:  # localisers' maps
        name, mcfg = localisers[member]
        ckpt = lay.localiser(name) / "best.pt"
        _check_channels(input_dir, store, read_checkpoint(ckpt)["info"]["channels"])
        scale = None  # with scale_quantile: the constant the fold's training part gave
        if mcfg.scale_quantile is not None:
            scale = MapSet.open(lay.map_set(member)).meta.get("scale")
        write_mil_maps(
            mcfg, ckpt, store.path, np.arange(store.n_slices), work / "maps" / member,
            force=True, progress=progress, scale=scale,
        )  # fmt: skip
    if cams:
        tags = list(dict.fromkeys(m.split("__")[0] for m in cams))
        methods = list(dict.fromkeys(m.split("__", 1)[1] for m in cams))
        checkpoints = [lay.checkpoint(t) for t in tags]
        for ck in checkpoints:
            _check_channels(input_dir, store, load_checkpoint(ck)[1]["channels"])
        ccfg = cfg.cam.model_copy(
            update={
                "store": store.path,
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
