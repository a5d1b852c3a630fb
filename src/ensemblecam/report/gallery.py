"""The gallery (the paper's Fig. 3): the best and worst evaluated lesion cases.

Cases of every fold's evaluated (held-out) part are pooled and ranked by the case Dice the
evaluation stored for the fold's chosen configuration (``eval/ensemble/per_case.csv``: 3-D
Dice over the case's evaluated slices, cases without lesion left out). Each shown case is
represented by its slice with the largest ground-truth lesion; the chosen ensemble's mask
is the one the evaluation wrote (``eval/masks.npz``), and so are each operator's best
configuration's (``eval/op_<operator>/masks.npz``) and the final self-trained U-Net's
(``eval/pseudo_unet/masks.npz``, or the chosen earlier round's ``eval/pseudo_round<r>/``),
when the run has them: the report draws stored masks and
never applies a configuration itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemblecam.io.runlayout import CHOSEN_SLUG, operator_slug
from ensemblecam.pipeline.results import final_unet
from ensemblecam.report.figures import GalleryRow, gallery_figure
from ensemblecam.report.html import Page
from ensemblecam.report.run import Run, best_json, chosen_case_dice, eval_masks
from ensemblecam.report.text import describe_config


@dataclass
class _CaseScore:
    fold: str
    case: str
    dice: float
    indices: np.ndarray  # store indices of the case's evaluated slices


@dataclass
class _FoldGallery:
    best: dict[str, Any]  # search/best.json
    # mask column, in drawing order -> (store indices, masks, note) of eval/op_*/masks.npz,
    # eval/masks.npz (the chosen ensemble) and the final U-Net's eval/<kind>/masks.npz
    stored: dict[str, tuple[np.ndarray, np.ndarray, str]] = field(default_factory=dict)


def _fold_case_scores(
    run: Run, fold: str, missing: list[str]
) -> tuple[list[_CaseScore], _FoldGallery] | None:
    """Stored case Dice of the fold's chosen configuration on its evaluated lesion cases;
    None (the missing file named in ``missing``) when an output is absent."""
    store = run.store
    best = best_json(run, fold)
    if store is None or store.masks is None or best is None:
        return None
    f = run.layout.fold(fold)
    chosen = eval_masks(run, fold)
    listed = chosen_case_dice(run, fold, best)
    if chosen is None or listed is None:
        missing.append(str(f.eval_masks if chosen is None else f.per_case(CHOSEN_SLUG)))
        return None
    idx = chosen[0]
    cases = store.table["case"][idx]
    out = [
        _CaseScore(fold, str(c), listed[c], idx[cases == c])
        for c in dict.fromkeys(cases.tolist())
        if c in listed
    ]
    from ensemblecam.io.masks import read_masks

    confs = [
        r["config"][fold]
        for r in run.results.get("rows", [])
        if r.get("kind") == "operator" and fold in (r.get("config") or {})
    ]
    columns = [(c["operator"], operator_slug(c["operator"]), _config_note(c)) for c in confs]
    columns += [
        ("chosen ensemble", None, f"{best.get('operator')}:\n{_config_note(best)}"),
        ("self-trained U-Net", final_unet(run.results), ""),
    ]
    stored: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for column, slug, note in columns:  # slug None: eval/masks.npz, read above
        if slug is None:
            stored[column] = (*chosen, note)
        elif f.row_masks(slug).is_file():
            index, masks = read_masks(f.row_masks(slug))
            stored[column] = (np.asarray(index), np.asarray(masks), note)
    return out, _FoldGallery(best, stored)


def _gallery_row(run: Run, score: _CaseScore, fg: _FoldGallery) -> GalleryRow:
    from ensemblecam.io.mapstore import MAP_META, MapSet, dequantise

    store = run.store
    assert store is not None and store.masks is not None
    f = run.layout.fold(score.fold)
    best = fg.best
    gt_all = np.asarray(store.masks[score.indices]).astype(bool)
    k = int(np.argmax(gt_all.reshape(len(gt_all), -1).sum(axis=1)))
    i = int(score.indices[k])
    all_members = (best.get("search") or {}).get("members") or best["members"]
    maps = {}
    for m in all_members:
        if (f.map_set(m) / MAP_META).is_file():
            s = MapSet.open(f.map_set(m))
            maps[m] = np.asarray(s.maps[s.rows_for(np.array([i]))])
    masks: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    for column, (index, stored, note) in fg.stored.items():
        if (index == i).any():
            masks[column] = stored[int(np.flatnonzero(index == i)[0])]
            if note:
                notes[column] = note
    return GalleryRow(
        title=f"{score.case} s{int(store.table['slice'][i])}\n{score.fold}, "
        f"case Dice {100 * score.dice:.1f}",
        image=np.asarray(store.images[i, 0], np.float32),
        gt=gt_all[k],
        maps={m: dequantise(v[0]) for m, v in maps.items()},
        masks=masks,
        notes=notes,
    )


def _config_note(cfg: dict[str, Any]) -> str:
    """One line per member, 'resnet18__gradcam > 0.7' (+ gate), for a gallery cell."""
    lines = [
        f"{m} > {float(t):g}"
        for m, t in zip(cfg.get("members", []), cfg.get("thresholds", []), strict=False)
    ]
    if cfg.get("gate") is not None:
        lines.append(f"gate {float(cfg['gate']):g}")
    return "\n".join(lines)


def section_gallery(rep: Page, run: Run, folds: list[str], n_cases: int) -> None:
    rep.h2("gallery", "Gallery (the paper's Fig. 3)")
    scores: list[_CaseScore] = []
    chosen: dict[str, _FoldGallery] = {}
    missing: list[str] = []
    for fold in folds:
        got = _fold_case_scores(run, fold, missing)
        if got is None:
            continue
        scores += got[0]
        chosen[fold] = got[1]
    if missing:
        rep.p(
            "Not in the gallery (the evaluation's output is missing, and the report does "
            "not recompute it): " + ", ".join(missing) + ".",
            "note",
        )
    if not scores:
        rep.p(
            "No evaluated lesion case found (needs the store with masks, "
            "fold*/search/best.json, fold*/eval/masks.npz and "
            "fold*/eval/ensemble/per_case.csv).",
            "note",
        )
        return
    order = sorted(scores, key=lambda s: (-s.dice, s.fold, s.case))
    n_best = min(n_cases, math.ceil(len(order) / 2))
    best_cases = order[:n_best]
    worst_cases = [s for s in order[::-1][:n_cases] if s not in best_cases]
    rep.p(
        f"{len(order)} evaluated lesion cases ranked by the case Dice of their fold's "
        "chosen configuration (as the evaluation stored it); each case is shown at its "
        "slice with the largest lesion. "
        "Columns: image (first channel), ground truth (green), each member's map (jet, "
        "0 to 1), then in red each operator's best configuration in that case's fold "
        "(chosen on the calibration part) and the fold's chosen ensemble, each the mask "
        "the evaluation wrote; yellow line: "
        "ground truth. Under each mask: its members and thresholds, which differ per "
        "fold. Row label: case, slice, fold and the case Dice (all evaluated slices of "
        "the case, chosen ensemble)."
    )
    rep.p(
        "Chosen ensemble per fold: "
        + "; ".join(f"{f}: {describe_config(g.best)}" for f, g in chosen.items())
        + "."
    )
    for label, sel in (("best", best_cases), ("worst", worst_cases)):
        if not sel:
            continue
        rows = [_gallery_row(run, s, chosen[s.fold]) for s in sel]
        cases = ", ".join(f"{s.case} ({s.fold}, case Dice {100 * s.dice:.1f})" for s in sel)
        rep.figure(
            f"gallery_{label}.png",
            gallery_figure(rows, f"{label} cases"),
            f"{label.capitalize()} {len(rows)} case(s) by case Dice: {cases}",
        )
