"""Export 2-D slice results back to NIfTI volumes in each case's original scan geometry.

The inverse of prepare's geometry (see :mod:`ensemblecam.io.store`): a stored slice ``i`` of
a case is the window ``[y0:y1, x0:x1]`` of slice ``slice`` taken along ``axis`` of the
RAS+ canonical volume (``nibabel.as_closest_canonical``). Exporting

1. pastes the part of each window that lies inside the canonical slice back in place
   (window parts outside the slice were zero padding and are dropped); where two windows
   of one slice overlap (kidney crops "left"/"right") values are combined with ``max``
   (= logical OR for 0/1 masks); voxels covered by no stored window keep ``fill`` (0);
2. undoes the canonical reorientation with ``nibabel.orientations``:
   ``apply_orientation(canonical, ornt_transform(RAS, ornt))`` where ``ornt`` is
   ``io_orientation(original affine)`` recorded in ``cases.json``; the result has the
   original shape and is written with the original affine.

No resampling happens anywhere, so the ground-truth masks of a store exported this way
reproduce the (merged) seg files voxel for voxel inside the stored region.

Output folder (built as ``.<name>.partial`` and renamed when complete)::

    <case>.nii.gz       uint8 {0, 1} masks
    <case>_map.nii.gz   float32 maps (optional)
    <case>_prob.nii.gz  float32 lesion probabilities in [0, 1] (optional, predict)
    index.json          written last: {"format": "ensemblecam-nifti-export", "version": 1,
                        "store": path or null, "kinds": [...], "cases": {case: {"mask": file,
                        "map": file, "prob": file, "shape": [...], "n_slices": k,
                        "mask_voxels": v}},
                        "source": {...}}
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from ensemblecam import progress as progress_out
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.store import SliceStore

EXPORT_FORMAT = "ensemblecam-nifti-export"
EXPORT_VERSION = 1
EXPORT_INDEX = "index.json"

Kind = Literal["mask", "map", "prob"]
#: file name suffix of each kind: ``<case><suffix>.nii.gz``
SUFFIX = {"mask": "", "map": "_map", "prob": "_prob"}
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
_GEOMETRY_KEYS = ("shape", "affine", "canonical_shape", "axis", "ornt")


def _geometry(case_geometry: Mapping[str, Any], name: str = "case") -> dict[str, Any]:
    """Validated geometry: 3-D shapes, 4x4 affine, axis, (3, 2) ornt."""
    missing = [k for k in _GEOMETRY_KEYS if k not in case_geometry]
    if missing:
        raise InputError(f"{name}: case geometry lacks {', '.join(missing)}")
    try:
        shape = tuple(int(v) for v in case_geometry["shape"])[:3]
        canonical = tuple(int(v) for v in case_geometry["canonical_shape"])[:3]
        affine = np.asarray(case_geometry["affine"], dtype=np.float64)
        axis = int(case_geometry["axis"])
        ornt = np.asarray(case_geometry["ornt"], dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: malformed case geometry ({exc})") from exc
    if len(shape) != 3 or len(canonical) != 3 or affine.shape != (4, 4):
        raise InputError(f"{name}: case geometry needs 3-D shapes and a 4x4 affine")
    if axis not in (0, 1, 2) or ornt.shape != (3, 2):
        raise InputError(f"{name}: bad slice axis {axis} or orientation {ornt.tolist()}")
    if nio.apply_orientation(np.empty(shape, dtype=np.uint8), ornt).shape != canonical:
        raise InputError(
            f"{name}: original shape {list(shape)} with orientation {ornt.tolist()} does not "
            f"give the recorded canonical shape {list(canonical)}"
        )
    return {
        "shape": shape,
        "canonical_shape": canonical,
        "affine": affine,
        "axis": axis,
        "ornt": ornt,
    }


def slices_to_volume(
    case_geometry: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    slice_arrays: np.ndarray,
    fill: float = 0,
    dtype: np.dtype | type | str | None = None,
) -> np.ndarray:
    """Put a case's stored 2-D slices back into a volume in ORIGINAL voxel order.

    ``rows[i]`` (keys ``slice, y0, y1, x0, x1``; ``part`` ignored) describes
    ``slice_arrays[i]`` of shape ``(y1 - y0, x1 - x0)``. Canonical volume
    ``V[..., s, ...][y0:y1, x0:x1] = max(V, window)`` over the in-slice part of each
    window, then ``apply_orientation(V, ornt_transform(RAS, ornt))``. ``dtype`` defaults
    to the arrays' dtype (bool -> uint8).
    """
    geo = _geometry(case_geometry)
    arrays = np.asarray(slice_arrays)
    if arrays.ndim != 3 or len(arrays) != len(rows):
        raise InputError(
            f"slice arrays of shape {arrays.shape}: expected ({len(rows)}, H, W), one per row"
        )
    if dtype is None:
        dtype = np.uint8 if arrays.dtype == bool else arrays.dtype
    canonical = np.full(geo["canonical_shape"], fill, dtype=dtype)
    covered = np.zeros(geo["canonical_shape"], dtype=bool)
    axis = geo["axis"]
    # View with the slice axis first: vol[s] is the canonical slice (remaining axes in order).
    vol_s = np.moveaxis(canonical, axis, 0)
    cov_s = np.moveaxis(covered, axis, 0)
    n_s, h, w = vol_s.shape
    for row, arr in zip(rows, arrays, strict=True):
        s, y0, y1, x0, x1 = (int(row[k]) for k in ("slice", "y0", "y1", "x0", "x1"))
        if arr.shape != (y1 - y0, x1 - x0):
            raise InputError(
                f"slice {s}: array shape {arr.shape} does not match its crop box "
                f"[{y0}:{y1}, {x0}:{x1}]"
            )
        if not 0 <= s < n_s:
            raise InputError(f"slice {s}: outside the volume's {n_s} slices along axis {axis}")
        sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if sy0 >= sy1 or sx0 >= sx1:
            continue  # window lies entirely in the zero padding
        src = arr[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0].astype(dtype, copy=False)
        dst = vol_s[s, sy0:sy1, sx0:sx1]
        cov = cov_s[s, sy0:sy1, sx0:sx1]
        dst[...] = np.where(cov, np.maximum(dst, src), src)
        cov[...] = True
    transform = nio.ornt_transform(_RAS, geo["ornt"])
    volume = nio.apply_orientation(canonical, transform)
    if volume.shape != geo["shape"]:  # pragma: no cover - guarded by _geometry
        raise InputError(f"reoriented shape {volume.shape} != original {geo['shape']}")
    return np.ascontiguousarray(volume)


def nifti_image(
    volume: np.ndarray, case_geometry: Mapping[str, Any], kind: Kind = "mask"
) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``volume`` with the case's original affine (qform = sform, code 1).

    Masks are stored as uint8 {0, 1} (``volume != 0``), maps and probabilities as float32
    (probabilities with display range [0, 1]).
    """
    geo = _geometry(case_geometry)
    if volume.shape[:3] != geo["shape"]:
        raise InputError(
            f"volume shape {volume.shape} does not match the case's shape {list(geo['shape'])}"
        )
    if kind == "mask":
        data = (np.asarray(volume) != 0).astype(np.uint8)
    elif kind in ("map", "prob"):
        data = np.asarray(volume, dtype=np.float32)
    else:
        raise InputError(f"export kind {kind!r}: expected 'mask', 'map' or 'prob'")
    affine = geo["affine"]
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    if kind == "mask":
        hdr["cal_min"], hdr["cal_max"] = 0, 1
        hdr["descrip"] = b"ensemblecam mask"
    elif kind == "prob":
        hdr["cal_min"], hdr["cal_max"] = 0.0, 1.0
        hdr["descrip"] = b"ensemblecam lesion probability"
    else:
        finite = data[np.isfinite(data)]
        hdr["cal_min"] = float(finite.min()) if finite.size else 0.0
        hdr["cal_max"] = float(finite.max()) if finite.size else 0.0
        hdr["descrip"] = b"ensemblecam map"
    return img


def write_case_nifti(
    path: str | os.PathLike[str],
    volume: np.ndarray,
    case_geometry: Mapping[str, Any],
    kind: Kind = "mask",
) -> Path:
    """Write ``volume`` (original voxel order) as NIfTI at ``path`` atomically.

    ``.nii.gz`` is gzip-compressed, ``.nii`` raw; see :func:`nifti_image` for the header.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError(f"{path}: NIfTI output must end in .nii or .nii.gz")
    data = nifti_image(volume, case_geometry, kind).to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with fsutil.atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def check_slice_arrays(
    store: SliceStore, slice_indices: np.ndarray, arrays: np.ndarray, kind: Kind, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(indices, arrays)`` against ``store``; return them as int64 / ndarray.

    Indices must be unique and in ``[0, N)``; arrays ``(n, H, W)`` with ``(H, W)`` the
    store's slice size; masks must hold only 0 and 1.
    """
    idx = np.asarray(slice_indices)
    arr = np.asarray(arrays)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InputError(f"{what}: index must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    n = store.n_slices
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise InputError(
            f"{what}: unknown store index {int(bad[0])} (store {store.path} has {n} slices)"
        )
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{what}: store index {int(uniq[counts > 1][0])} appears more than once")
    h, w = store.size
    if arr.ndim != 3 or arr.shape != (len(idx), h, w):
        raise InputError(
            f"{what}: {kind} array shape {arr.shape} does not match {len(idx)} indices of "
            f"store slices {h}x{w} (expected {(len(idx), h, w)})"
        )
    return idx, arr


def check_binary(masks: np.ndarray, what: str) -> None:
    """Masks must hold only 0 and 1 (checked per case, so large stores stay memory-mapped)."""
    if masks.dtype == bool:
        return
    bad = masks[(masks != 0) & (masks != 1)]
    if bad.size:
        raise InputError(f"{what}: masks must be 0/1, found value {bad.flat[0]}")


def _case_rows(store: SliceStore, idx: np.ndarray) -> list[dict[str, Any]]:
    t = store.table
    return [{k: t[k][i] for k in ("slice", "part", "y0", "y1", "x0", "x1")} for i in idx]


def export_cases(
    store: SliceStore,
    slice_indices: np.ndarray,
    arrays: np.ndarray,
    out_dir: str | os.PathLike[str],
    kind: Kind = "mask",
    *,
    maps: tuple[np.ndarray, np.ndarray] | None = None,
    probs: tuple[np.ndarray, np.ndarray] | None = None,
    force: bool = False,
    source: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    temporary_store: bool = False,
) -> dict[str, Any]:
    """Write one NIfTI per case of ``slice_indices`` to ``out_dir``; return the index dict.

    ``arrays[i]`` belongs to store slice ``slice_indices[i]``; files are ``<case>.nii.gz``
    (kind "mask") or ``<case>_map.nii.gz`` (kind "map"). ``maps=(indices, maps)`` adds map
    files beside masks in the same folder, ``probs=(indices, probabilities)`` probability
    files ``<case>_prob.nii.gz`` (values must lie in [0, 1]). Store slices of a case that
    are not given stay 0. An existing export is refused unless ``force``; ``force`` never
    replaces a folder ensemblecam did not write, nor the store; ``index.json`` is written
    last. Its ``store`` names the slice store the geometry came from, or is null for a
    ``temporary_store`` (predict's scratch store), so that the index names only files that
    exist.
    """
    if kind not in ("mask", "map"):
        raise InputError(f"export kind {kind!r}: expected 'mask' or 'map'")
    jobs: list[tuple[Kind, np.ndarray, np.ndarray]] = [
        (kind, *check_slice_arrays(store, slice_indices, arrays, kind, f"{kind}s"))
    ]
    if maps is not None:
        if kind == "map":
            raise InputError("maps given twice: kind is 'map' and maps= is set")
        jobs.append(("map", *check_slice_arrays(store, maps[0], maps[1], "map", "maps")))
    if probs is not None:
        p_idx, p_arr = check_slice_arrays(store, probs[0], probs[1], "prob", "probabilities")
        ok = not p_arr.size or (np.isfinite(p_arr).all() and p_arr.min() >= 0 and p_arr.max() <= 1)
        if not ok:
            raise InputError("probabilities: values must be finite and lie in [0, 1]")
        jobs.append(("prob", p_idx, p_arr))
    case_of = store.table["case"]
    names = list(dict.fromkeys(case_of[np.concatenate([j[1] for j in jobs])].tolist()))
    for name in names:
        if name not in store.cases:
            raise InputError(f"{store.path / 'cases.json'}: no geometry for case {name!r}")
        _geometry(store.cases[name], f"{store.path / 'cases.json'}: case {name!r}")

    out_dir = Path(out_dir)
    fsutil.check_not_input(out_dir, [store.path])
    partial = fsutil.prepare_output_dir(out_dir, force, EXPORT_INDEX, stage="export")
    try:
        entries = _write_volumes(store, jobs, names, partial, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    index = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "store": None if temporary_store else str(store.path.resolve()),
        "kinds": [j[0] for j in jobs],
        "cases": entries,
        "source": dict(source or {}),
    }
    fsutil.write_json(partial / EXPORT_INDEX, index)
    fsutil.commit_output_dir(partial, out_dir, stage="export")
    return index


def _write_volumes(
    store: SliceStore,
    jobs: list[tuple[Kind, np.ndarray, np.ndarray]],
    names: list[str],
    folder: Path,
    progress: bool | None,
) -> dict[str, dict[str, Any]]:
    """Write every job's per-case volumes into ``folder``; return the index entries."""
    for stale in folder.iterdir():  # a killed earlier run: start clean
        if stale.is_file():
            stale.unlink()
    case_of = store.table["case"]
    entries: dict[str, dict[str, Any]] = {name: {} for name in names}
    for job_kind, idx, arr in jobs:
        cases_here = case_of[idx]
        bar = progress_out.bar(
            names, desc=f"{job_kind}s", unit="cases", label="export", enabled=progress
        )
        for name in bar:
            sel = np.flatnonzero(cases_here == name)
            if sel.size == 0:
                continue
            order = sel[np.argsort(idx[sel], kind="stable")]
            values = np.asarray(arr[order])
            if job_kind == "mask":
                check_binary(values, f"masks of case {name!r}")
            geometry = store.cases[name]
            volume = slices_to_volume(
                geometry,
                _case_rows(store, idx[order]),
                values,
                dtype=np.uint8 if job_kind == "mask" else np.float32,
            )
            fname = f"{name}{SUFFIX[job_kind]}.nii.gz"
            write_case_nifti(folder / fname, volume, geometry, job_kind)
            entry = entries[name]
            entry[job_kind] = fname
            entry["shape"] = list(volume.shape)
            entry["n_slices"] = max(entry.get("n_slices", 0), int(sel.size))
            if job_kind == "mask":
                entry["mask_voxels"] = int(np.count_nonzero(volume))
    return entries


def load_slice_arrays(path: str | os.PathLike[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(index, arrays)`` from an ``.npz`` (arrays ``index`` and ``key``), a folder
    holding ``<key>.npz``, or (for ``key="maps"``) a map-store member folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file() and key == "maps":
            from ensemblecam.io.mapstore import MapSet, dequantise

            ms = MapSet.open(path)
            return ms.index, dequantise(np.asarray(ms.maps))
        if not (path / f"{key}.npz").is_file():
            raise InputError(f"{path}: folder holds no {key}.npz")
        path = path / f"{key}.npz"
    if not path.is_file():
        raise InputError(f"{path}: {key} file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if not {"index", key} <= files:
                raise InputError(
                    f"{path}: expected arrays 'index' and {key!r}, found {sorted(files)}"
                )
            return np.asarray(npz["index"]), np.asarray(npz[key])
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable .npz ({exc})") from exc


def ground_truth(store: SliceStore) -> tuple[np.ndarray, np.ndarray]:
    """``(index, masks)`` of every store slice that has a ground-truth mask."""
    if store.masks is None:
        raise InputError(f"{store.path}: store has no masks (has_masks is false)")
    idx = np.flatnonzero(store.annotated(np.arange(store.n_slices)))
    if idx.size == 0:
        raise InputError(f"{store.path}: no slice of the store has a ground-truth mask")
    if idx.size == store.n_slices:  # keep it memory-mapped
        return idx.astype(np.int64), store.masks
    return idx.astype(np.int64), np.asarray(store.masks[idx])
