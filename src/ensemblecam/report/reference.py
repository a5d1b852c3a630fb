"""Published figures of the seed papers and how a result row is matched to one.

Also which setting (if any) a run's store is comparable to: :func:`reference_setting`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Reference:
    """One published figure: method label, which of our rows it matches, values in %.

    ``match``: {"kind": ..., "model": ..., "method": ..., "operator": ...}, each optional;
    a row matches when every given key agrees (None: shown in the reference table only).
    ``values``: metric -> (mean, std or None), in percent.
    """

    method: str
    match: dict[str, str] | None
    values: dict[str, tuple[float, float | None]]


def _pm(
    miou: float, dsc: float, miou_sd: float | None = None, dsc_sd: float | None = None
) -> dict[str, tuple[float, float | None]]:
    return {"paper_miou": (miou, miou_sd), "paper_dsc": (dsc, dsc_sd)}


#: Where each reference table comes from.
REFERENCE_SOURCES: dict[str, str] = {
    "brats": "EnsembleCAM paper (Ostrowski, Prabakaran, Shafique), BraTS 2020, FLAIR/T1ce/T2: "
    "Table 1 (means) and Table 3 (+- std over the 3 validation samples)",
    "prostate": "EnsembleCAM paper (Ostrowski, Prabakaran, Shafique), MSD prostate (ADC): "
    "Table 2 (means) and Table 4 (+- std over the 3 validation samples)",
    "kits": "Thesis on weakly supervised kidney-tumour segmentation (KiTS21): Tables 4.3 "
    "and 4.5, lesion IoU on correctly classified tumour slices of the test split",
}

#: Metrics the published figures are given in, per setting.
REFERENCE_METRICS: dict[str, tuple[str, ...]] = {
    "brats": ("paper_miou", "paper_dsc"),
    "prostate": ("paper_miou", "paper_dsc"),
    "kits": ("slice_iou_correct_mean",),
}

_GC = "gradcam"
#: The seeds' published figures (percent), per setting (sources: :data:`REFERENCE_SOURCES`).
REFERENCE_FIGURES: dict[str, list[Reference]] = {
    "brats": [
        Reference("Empty", {"kind": "empty"}, _pm(47.7, 64.6)),
        Reference("SEAM", None, _pm(39.0, 56.1, 6.3, 11.9)),
        Reference("WSS-CMER", None, _pm(42.6, 59.7, 6.3, 11.8)),
        Reference(
            "ResNet-34 Grad-CAM",
            {"kind": "single", "model": "resnet34", "method": _GC},
            _pm(50.7, 67.3),
        ),
        Reference(
            "ResNet-50 Grad-CAM",
            {"kind": "single", "model": "resnet50", "method": _GC},
            _pm(52.1, 68.5),
        ),
        Reference("Ensemble ResNet-34x50 'or'", {"operator": "or"}, _pm(51.3, 67.8)),
        Reference("Ensemble ResNet-34x50 '<'", {"operator": "min"}, _pm(51.9, 68.3)),
        Reference("Ensemble ResNet-34x50 '>'", {"operator": "max"}, _pm(52.2, 68.6)),
        Reference("Ensemble ResNet-34x50 'and'", {"operator": "and"}, _pm(54.2, 70.3, 0.8, 1.5)),
        Reference("Fully supervised (FSSS)", {"kind": "unet"}, _pm(69.2, 81.8)),
    ],
    "prostate": [
        Reference("Empty", {"kind": "empty"}, _pm(48.7, 65.5)),
        Reference("SEAM", None, _pm(49.1, 65.9, 7.2, 13.35)),
        Reference("WSS-CMER", None, _pm(55.4, 71.3, 7.9, 14.6)),
        Reference(
            "ResNet-34 Grad-CAM",
            {"kind": "single", "model": "resnet34", "method": _GC},
            _pm(63.8, 78.0),
        ),
        Reference(
            "ResNet-50 Grad-CAM",
            {"kind": "single", "model": "resnet50", "method": _GC},
            _pm(61.4, 76.1),
        ),
        Reference("Ensemble ResNet-34x50 'or'", {"operator": "or"}, _pm(63.0, 77.3)),
        Reference("Ensemble ResNet-34x50 '<'", {"operator": "min"}, _pm(63.5, 77.7)),
        Reference("Ensemble ResNet-34x50 '>'", {"operator": "max"}, _pm(64.4, 78.4)),
        Reference("Ensemble ResNet-34x50 'and'", {"operator": "and"}, _pm(65.7, 79.3, 1.6, 3.1)),
        Reference("Fully supervised (FSSS)", {"kind": "unet"}, _pm(76.7, 86.8)),
    ],
    "kits": [
        Reference(
            "Grad-CAM (ResNet-101)",
            {"kind": "single", "method": "gradcam"},
            {"slice_iou_correct_mean": (31.6, None)},
        ),
        Reference(
            "Grad-CAM++",
            {"kind": "single", "method": "gradcampp"},
            {"slice_iou_correct_mean": (25.1, None)},
        ),
        Reference(
            "Smooth Grad-CAM++",
            {"kind": "single", "method": "smoothgradcampp"},
            {"slice_iou_correct_mean": (25.1, None)},
        ),
        Reference(
            "Score-CAM",
            {"kind": "single", "method": "scorecam"},
            {"slice_iou_correct_mean": (32.3, None)},
        ),
        Reference("U-Net (supervised)", {"kind": "unet"}, {"slice_iou_correct_mean": (54.2, None)}),
    ],
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def reference_matches(ref: Reference, identity: dict[str, Any]) -> bool:
    """Whether a result row (``row_identity``) is the row a published figure refers to."""
    if ref.match is None:
        return False
    for key, want in ref.match.items():
        if key == "kind":
            if identity["kind"] != want:
                return False
        elif key == "operator":
            if identity["kind"] not in ("operator", "ensemble") or identity["operator"] != want:
                return False
        else:  # model / method of a single member
            got = [m[key] for m in identity["members"]]
            if len(got) != 1 or _norm(want) not in _norm(got[0]):
                return False
            if key == "method" and _norm(got[0]) != _norm(want):
                return False
    return True


def fold_configs(cfg: Any) -> list[dict[str, Any]]:
    """The configuration(s) of a row's ``config``: one dict, or {fold: dict} per fold."""
    if isinstance(cfg, dict) and "operator" in cfg:
        return [cfg]
    if isinstance(cfg, dict):
        return [v for v in cfg.values() if isinstance(v, dict) and "operator" in v]
    return []


def row_identity(row: dict[str, Any]) -> dict[str, Any]:
    """kind, operator and members (model tag, method) of a results.json row.

    From ``config`` ({"operator", "members"}, or {fold: {...}} per fold: the operator is
    kept when every fold agrees, else "mixed"; members are the union over folds, in
    order) or else parsed from the row's name (``"ensemble (and: a__gradcam 0.7 x ...)"``).
    """
    kind = str(row.get("kind", ""))
    configs = fold_configs(row.get("config"))
    name = str(row.get("name", ""))
    if configs:
        ops = list(dict.fromkeys(str(c.get("operator")) for c in configs))
        op: str | None = ops[0] if len(ops) == 1 else "mixed"
        members = list(dict.fromkeys(str(m) for c in configs for m in c.get("members", [])))
    else:
        found = re.search(r"\b(and|or|min|max|mean|single|vote(?::\d+)?)\b", name)
        op = found.group(1) if found else None
        members = re.findall(r"[\w.\-]+__[\w.\-]+", name)
    parsed = []
    for m in members:
        model, _, method = m.partition("__")
        parsed.append({"model": model, "method": method})
    if kind == "single" and op is None:
        op = "single"
    return {"kind": kind, "operator": op, "members": parsed}


def is_phantom(prepare: dict[str, Any], run_json: dict[str, Any] | None = None) -> bool | None:
    """True if the store was prepared from a synth phantom (``phantom.json`` in the data
    root, or the run records ``phantom``); None if the data folder cannot be checked."""
    if run_json and isinstance(run_json.get("phantom"), bool):
        return bool(run_json["phantom"])
    data = prepare.get("data")
    if not data:
        return None
    root = Path(str(data))
    if (root / "phantom.json").is_file():
        return True
    return False if root.is_dir() else None


def reference_setting(prepare: dict[str, Any], phantom: bool | None) -> tuple[str | None, str]:
    """(key of REFERENCE_FIGURES or None, one-sentence reason) from the store's settings.

    brats + flair,t1ce,t2 -> "brats"; msd + adc -> "prostate"; kits -> "kits"; a phantom
    is never comparable.
    """
    layout = str(prepare.get("layout", ""))
    mods = [str(m).lower() for m in prepare.get("modalities", []) or []]
    key = None
    if layout == "brats" and mods == ["flair", "t1ce", "t2"]:
        key = "brats"
    elif layout == "msd" and mods == ["adc"]:
        key = "prostate"
    elif layout == "kits":
        key = "kits"
    if key is None:
        return None, (
            f"layout {layout or '?'} with channels {','.join(mods) or '?'} matches "
            "none of the seeds' settings, so no published figure is comparable."
        )
    if phantom:
        return None, (
            "The data is the synthetic phantom (ensemblecam synth), not the real "
            f"{key} data: its numbers are NOT comparable to the seeds' published "
            "figures, which are listed below for orientation only."
        )
    note = (
        ""
        if phantom is False
        else (
            " (the data folder could not be checked; the comparison assumes it holds the real data)"
        )
    )
    return key, (
        f"The store's settings (layout {layout}, channels {','.join(mods)}) match "
        f"the seeds' setting for {key}: published figures are shown beside ours{note}."
    )
