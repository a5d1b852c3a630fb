"""Write tiny NIfTI data sets in each supported layout (for prepare's tests).

Volumes are small (default 24x24x8): a bright ellipse "body" on a dark background, with
a lesion blob in some slices of most cases; the last case of each data set has no lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

#: A non-trivial default affine (LPS-like: x and y flipped), as BraTS files have.
DEFAULT_AFFINE = np.array([[-1.0, 0, 0, 23.0], [0, -1.0, 0, 23.0], [0, 0, 2.0, 0], [0, 0, 0, 1]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``data`` as NIfTI at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, DEFAULT_AFFINE if affine is None else affine), str(path))
    return path


def body_and_seg(
    shape: tuple[int, int, int], case: int, lesion: bool, labels: tuple[int, ...] = (1, 2, 4)
) -> tuple[np.ndarray, np.ndarray]:
    """Body mask (ellipse, bool) and seg (uint8) with a blob using ``labels`` in z 2..5."""
    x, y, z = np.indices(shape)
    cx, cy = shape[0] / 2 + case % 3 - 1, shape[1] / 2
    body = ((x - cx) / (0.4 * shape[0])) ** 2 + ((y - cy) / (0.35 * shape[1])) ** 2 <= 1
    seg = np.zeros(shape, np.uint8)
    if lesion:
        lx, ly = cx + 2 + case % 2, cy - 1
        r = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) + 0.5 * np.abs(z - 3.5)  # size varies in z
        zin = (z >= 2) & (z <= 5)
        seg[(r <= 3.5) & zin] = labels[-1]
        if len(labels) > 1:
            seg[(r <= 2.2) & zin] = labels[0]
        if len(labels) > 2:
            seg[(r <= 1.0) & zin] = labels[1]
    return body, seg


def image(body: np.ndarray, seg: np.ndarray, level: float, seed: int) -> np.ndarray:
    """float32 image: ``level`` in the body, brighter lesion, a little noise."""
    rng = np.random.default_rng(seed)
    img = body * level + (seg > 0) * 0.5 * level
    return (img + body * rng.normal(0, 0.05 * level, body.shape)).astype(np.float32)


def brats_dataset(
    root: Path,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (24, 24, 8),
    year: int = 2020,
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair"),
    affine: np.ndarray | None = None,
) -> list[str]:
    """BraTS 2020 (``BraTS20_Training_001``) or 2021 (``BraTS2021_00000``) names."""
    names = []
    for c in range(n_cases):
        name = f"BraTS20_Training_{c + 1:03d}" if year == 2020 else f"BraTS2021_{c:05d}"
        body, seg = body_and_seg(shape, c, lesion=c < n_cases - 1)
        for m, mod in enumerate(modalities):
            write_nifti(
                root / name / f"{name}_{mod}.nii.gz",
                image(body, seg, 100.0 * (m + 1), seed=10 * c + m),
                affine,
            )
        write_nifti(root / name / f"{name}_seg.nii.gz", seg, affine)
        names.append(name)
    return names


def msd_dataset(
    root: Path, n_cases: int = 3, shape: tuple[int, int, int] = (24, 24, 8)
) -> list[str]:
    """Decathlon prostate: 4-D imagesTr (T2, ADC), labelsTr, dataset.json."""
    names, training = [], []
    for c in range(n_cases):
        name = f"prostate_{c:02d}"
        body, seg = body_and_seg(shape, c, lesion=c < n_cases - 1, labels=(1, 2))
        t2 = image(body, seg, 300.0, seed=c)
        adc = image(body, seg, 1000.0, seed=100 + c) * 0.5 + 7.0  # distinguishable from T2
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", np.stack([t2, adc], axis=-1))
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", seg)
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
        names.append(name)
    meta = {
        "name": "Prostate",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return names


def kits_dataset(
    root: Path, n_cases: int = 3, shape: tuple[int, int, int] = (48, 24, 8), version: int = 21
) -> list[str]:
    """KiTS: ``case_XXXXX/imaging.nii.gz`` (HU) + seg (1 kidney, 2 tumour, 3 cyst in 21)."""
    names = []
    x, y, z = np.indices(shape)
    for c in range(n_cases):
        name = f"case_{c:05d}"
        body = ((x - shape[0] / 2) / (0.45 * shape[0])) ** 2 + (
            (y - shape[1] / 2) / (0.4 * shape[1])
        ) ** 2 <= 1
        seg = np.zeros(shape, np.uint8)
        for kx in (shape[0] * 0.3 + c, shape[0] * 0.7 - c):  # a kidney in each half
            seg[(np.hypot(x - kx, y - shape[1] / 2) <= 3) & (z >= 1) & (z <= 6)] = 1
        if c < n_cases - 1:
            kx = shape[0] * 0.3 + c
            seg[(np.hypot(x - kx, y - shape[1] / 2) <= 1.5) & (z >= 3) & (z <= 4)] = 2
            if version == 21:
                seg[(np.hypot(x - kx - 1, y - shape[1] / 2 - 2) <= 0.8) & (z == 5)] = 3
        ct = np.where(body, 40.0, -1000.0) + (seg > 0) * 60.0
        ct += np.random.default_rng(c).normal(0, 5, shape)
        write_nifti(root / name / "imaging.nii.gz", ct.astype(np.float32))
        seg_name = "segmentation.nii.gz"
        write_nifti(root / name / seg_name, seg)
        names.append(name)
    return names


def folder_dataset(
    root: Path,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (24, 24, 8),
    modalities: tuple[str, ...] = ("t1", "t2"),
    labels: bool = True,
    case_names: list[str] | None = None,
) -> list[str]:
    """Generic ``images/<case>_<modality>.nii.gz`` + ``labels/<case>.nii.gz``."""
    names = case_names or [f"case{c}" for c in range(n_cases)]
    for c, name in enumerate(names):
        body, seg = body_and_seg(shape, c, lesion=c < len(names) - 1, labels=(1,))
        for m, mod in enumerate(modalities):
            write_nifti(
                root / "images" / f"{name}_{mod}.nii.gz",
                image(body, seg, 50.0 * (m + 1), seed=c * 7 + m),
            )
        if labels:
            write_nifti(root / "labels" / f"{name}.nii.gz", seg)
    return names


def folder_from_brats(
    src: Path,
    dst: Path,
    with_masks: set[str] | frozenset[str] = frozenset(),
    modalities: tuple[str, ...] = ("flair", "t1ce", "t2"),
) -> Path:
    """Rewrite a BraTS-layout data set (e.g. a synth phantom) in the ``folder`` layout
    (``images/<case>_<modality>.nii.gz``; ``labels/<case>.nii.gz`` only for the cases in
    ``with_masks``) and write ``dst/labels.csv`` (case,slice,label: 1 if the slice of the
    RAS+ canonical volume along axis 2 has a lesion voxel); return the CSV path."""
    import shutil

    rows = ["case,slice,label"]
    for case_dir in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        case = case_dir.name
        for mod in modalities:
            target = dst / "images" / f"{case}_{mod}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(case_dir / f"{case}_{mod}.nii.gz", target)
        seg_file = case_dir / f"{case}_seg.nii.gz"
        if case in with_masks:
            (dst / "labels").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(seg_file, dst / "labels" / f"{case}.nii.gz")
        seg = np.asanyarray(nib.as_closest_canonical(nib.load(seg_file)).dataobj)
        for s in range(seg.shape[2]):
            rows.append(f"{case},{s},{int((seg[:, :, s] > 0).any())}")
    (dst / "labels.csv").write_text("\n".join(rows) + "\n")
    return dst / "labels.csv"
