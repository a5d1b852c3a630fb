"""Case discovery for the supported on-disk data set layouts.

Every layout yields a list of :class:`Case` (sorted by case name), each holding
``{modality: path}`` and the segmentation path. Files are paired **by case name and
modality** parsed from the file names (or, for MSD, from ``dataset.json``), never by
their sorted position in a folder listing.

Layouts:

- ``brats``: ``<root>/**/<case>/<case>_<modality>.nii[.gz]`` with modalities
  t1, t1ce, t2, flair and seg (BraTS 2020 ``BraTS20_Training_001``, 2021
  ``BraTS2021_00000``); seg labels {0, 1, 2, 4}.
- ``msd``: a Decathlon task folder with ``dataset.json``; ``imagesTr/<case>.nii.gz``
  (4-D, the last axis indexed by dataset.json's ``"modality"`` map such as
  ``{"0": "T2", "1": "ADC"}``) and ``labelsTr/<case>.nii.gz``; labels from
  dataset.json's ``"labels"`` map.
- ``kits``: ``<root>/**/case_XXXXX/imaging.nii.gz`` (CT, modality ``ct``) with
  ``segmentation.nii.gz`` (KiTS19/23) or ``aggregated_MAJ_seg.nii.gz`` (KiTS21);
  labels {0, 1, 2, 3} (KiTS19 uses the subset {0, 1, 2}).
- ``folder``: ``<root>/images/<case>_<modality>.nii[.gz]`` (modality = text after the
  last underscore) and optional ``<root>/labels/<case>.nii[.gz]``; any non-negative
  integer label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ensemblecam.errors import InputError

LAYOUTS = ("brats", "msd", "kits", "folder")

#: Default channels (in order) per layout; ``None`` = every modality found, sorted.
DEFAULT_MODALITIES: dict[str, list[str] | None] = {
    "brats": ["flair", "t1ce", "t2"],
    "msd": ["adc"],
    "kits": ["ct"],
    "folder": None,
}
#: Default seg labels merged into the lesion class; ``None`` = any non-zero label.
DEFAULT_LESION_LABELS: dict[str, list[int] | None] = {
    "brats": [1, 2, 4],
    "msd": [1, 2],
    "kits": [2, 3],
    "folder": None,
}
#: Default intensity normalisation per layout (``prepare.normalise``): per volume, not per
#: slice. MRI: clipped to the volume's 0.5..99.5 percentiles and scaled to 0..1, so a voxel
#: keeps its value whatever else its slice holds (the paper's per-slice min-max lets a
#: bright lesion rescale its own slice: a slice-wide cue that classifiers and the MIL
#: localiser learn instead of the lesion; the paper configs keep it). Measured on the
#: phantoms (fold 0, held-out lesion Dice of the self-trained / supervised U-Net): brats
#: 0.54 / 0.91 with per-slice min-max, 0.76 / 0.91 with percentiles, 0.70 / 0.88 with a
#: per-volume z-score, which left the msd U-Nets near background for most of a short
#: budget. CT (Hounsfield units, air -1000 and bone up to ~+1000 in every slice): the
#: abdominal soft-tissue window, so that the ~50 HU contrasts between kidney, tumour and
#: cyst are not squeezed into a few percent of the range.
DEFAULT_NORMALISE: dict[str, str] = {
    "brats": "percentile",
    "msd": "percentile",
    "kits": "ct_window",
    "folder": "percentile",
}
#: Seg label values a layout allows; ``None`` = any non-negative integer.
ALLOWED_LABELS: dict[str, set[int] | None] = {
    "brats": {0, 1, 2, 4},
    "msd": {0, 1, 2},
    "kits": {0, 1, 2, 3},
    "folder": None,
}
#: Seg label of the kidney in the KiTS layouts (for the thesis's kidney crops).
KIDNEY_LABEL = 1

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
_NII = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$")
_BRATS = re.compile(r"^(?P<case>.+)_(?P<mod>t1|t1ce|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class Case:
    """One case: image file per modality, optional seg file, optional 4-D volume index."""

    name: str
    images: dict[str, Path]
    seg: Path | None = None
    #: for 4-D images (MSD): modality -> index along the 4th axis
    volume_index: dict[str, int] = field(default_factory=dict)


@dataclass
class Discovery:
    """Cases found in a data set plus layout facts read from its metadata."""

    cases: list[Case]
    modalities: list[str]
    allowed_labels: set[int] | None
    #: files besides the cases' that discovery read (MSD: dataset.json)
    metadata: list[Path] = field(default_factory=list)


def _nii_stem(path: Path) -> str | None:
    m = _NII.match(path.name)
    return m.group("stem") if m and not path.name.startswith(".") else None


def discover(
    layout: str,
    root: Path,
    modalities: list[str] | None = None,
    require_seg: bool = True,
    keep_seg: bool = False,
) -> Discovery:
    """Find the cases of data set ``root`` in ``layout``.

    ``modalities`` (lower case) selects and orders the channels (default per layout).
    With ``require_seg`` every case needs its seg file; otherwise seg files are ignored,
    or, with ``keep_seg``, kept for the cases that have one (masks for a subset).
    A missing modality or seg file, an unknown modality or an empty data set raises
    :class:`InputError` naming the file or folder.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found")
    mods = [m.lower() for m in modalities] if modalities else None
    if mods is not None and len(set(mods)) != len(mods):
        raise InputError(f"modalities {','.join(mods)}: a modality is listed twice")
    finder = {"brats": _brats, "msd": _msd, "kits": _kits, "folder": _folder}[layout]
    found: Discovery = finder(root, mods, require_seg)
    if not found.cases:
        raise InputError(f"{root}: empty data set (no {layout} cases found)")
    for case in found.cases:
        if not (require_seg or keep_seg) or (case.seg is not None and not case.seg.is_file()):
            case.seg = None
    return found


def _check_modalities(root: Path, wanted: list[str], available: set[str]) -> None:
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise InputError(
            f"{root}: modality {unknown[0]!r} not in this data set "
            f"(available: {', '.join(sorted(available)) or 'none'})"
        )


def _brats(root: Path, mods: list[str] | None, require_seg: bool) -> Discovery:
    wanted = mods or list(DEFAULT_MODALITIES["brats"] or [])
    _check_modalities(root, wanted, set(BRATS_MODALITIES))
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(root.rglob("*.nii*")):
        m = _BRATS.match(path.name)
        if not m or path.name.startswith("."):
            continue
        case, mod = m.group("case"), m.group("mod").lower()
        if path.parent.name != case and path.parent != root:
            raise InputError(f"{path}: file of case {case!r} in folder of {path.parent.name!r}")
        per_case = files.setdefault(case, {})
        if mod in per_case:
            raise InputError(f"{path}: second {mod} file for case {case!r} ({per_case[mod]})")
        per_case[mod] = path
    cases = []
    for name in sorted(files):
        per_case = files[name]
        where = per_case[next(iter(per_case))].parent
        for mod in wanted + (["seg"] if require_seg else []):
            if mod not in per_case:
                raise InputError(f"{where / f'{name}_{mod}.nii.gz'}: missing {mod} file")
        cases.append(Case(name, {m: per_case[m] for m in wanted}, per_case.get("seg")))
    return Discovery(cases, wanted, ALLOWED_LABELS["brats"])


def _msd(root: Path, mods: list[str] | None, require_seg: bool) -> Discovery:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: missing (an MSD task folder holds dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
        modality_map = {str(v).lower(): int(k) for k, v in meta["modality"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise InputError(f"{meta_path}: unreadable dataset.json ({exc})") from exc
    wanted = mods or list(DEFAULT_MODALITIES["msd"] or [])
    _check_modalities(meta_path, wanted, set(modality_map))
    allowed: set[int] | None = ALLOWED_LABELS["msd"]
    if isinstance(meta.get("labels"), dict):
        try:
            allowed = {int(k) for k in meta["labels"]}
        except ValueError as exc:
            raise InputError(f"{meta_path}: label keys must be integers ({exc})") from exc
    pairs: list[tuple[Path, Path | None]] = []
    if isinstance(meta.get("training"), list) and meta["training"]:
        for entry in meta["training"]:
            try:
                img, lab = root / entry["image"], root / entry["label"]
            except (KeyError, TypeError) as exc:
                raise InputError(f"{meta_path}: bad training entry {entry!r}") from exc
            pairs.append((img, lab))
    else:
        for img in sorted((root / "imagesTr").glob("*.nii*")):
            if _nii_stem(img) is not None:
                pairs.append((img, root / "labelsTr" / img.name))
    cases = []
    for img, lab in pairs:
        stem = _nii_stem(img)
        if stem is None:
            continue
        if not img.is_file():
            raise InputError(f"{img}: missing image file (listed in {meta_path.name})")
        if require_seg and (lab is None or not lab.is_file()):
            raise InputError(f"{lab}: missing seg file for case {stem!r}")
        cases.append(
            Case(stem, {m: img for m in wanted}, lab, {m: modality_map[m] for m in wanted})
        )
    cases.sort(key=lambda c: c.name)
    return Discovery(cases, wanted, allowed, [meta_path])


def _kits(root: Path, mods: list[str] | None, require_seg: bool) -> Discovery:
    wanted = mods or ["ct"]
    _check_modalities(root, wanted, {"ct"})
    cases = []
    for img in sorted(root.rglob("imaging.nii*")):
        if _nii_stem(img) is None:
            continue
        seg = None
        for name in ("segmentation.nii.gz", "segmentation.nii", "aggregated_MAJ_seg.nii.gz"):
            if (img.parent / name).is_file():
                seg = img.parent / name
                break
        if require_seg and seg is None:
            raise InputError(f"{img.parent / 'segmentation.nii.gz'}: missing seg file")
        cases.append(Case(img.parent.name, {"ct": img}, seg))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{root}: case folder {dup!r} found twice")
    cases.sort(key=lambda c: c.name)
    return Discovery(cases, wanted, ALLOWED_LABELS["kits"])


def _folder(root: Path, mods: list[str] | None, require_seg: bool) -> Discovery:
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: missing (the folder layout needs images/)")
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(img_dir.iterdir()):
        stem = _nii_stem(path)
        if stem is None:
            continue
        if "_" not in stem:
            raise InputError(f"{path}: name is not <case>_<modality>.nii.gz")
        case, mod = stem.rsplit("_", 1)
        per_case = files.setdefault(case, {})
        if mod.lower() in per_case:
            raise InputError(f"{path}: second {mod} file for case {case!r}")
        per_case[mod.lower()] = path
    available = set().union(*files.values()) if files else set()
    wanted = mods or sorted(available)
    _check_modalities(img_dir, wanted, available)
    cases = []
    for name in sorted(files):
        for mod in wanted:
            if mod not in files[name]:
                raise InputError(f"{img_dir / f'{name}_{mod}.nii.gz'}: missing {mod} file")
        seg = None
        for ext in (".nii.gz", ".nii"):
            if (lab_dir / f"{name}{ext}").is_file():
                seg = lab_dir / f"{name}{ext}"
        if require_seg and seg is None:
            raise InputError(f"{lab_dir / f'{name}.nii.gz'}: missing seg file")
        cases.append(Case(name, {m: files[name][m] for m in wanted}, seg))
    if lab_dir.is_dir():
        for path in sorted(lab_dir.iterdir()):
            stem = _nii_stem(path)
            if stem is not None and stem not in files:
                raise InputError(f"{path}: label file of unknown case {stem!r} (no images)")
    return Discovery(cases, wanted, ALLOWED_LABELS["folder"])
