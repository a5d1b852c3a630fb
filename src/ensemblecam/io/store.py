"""The slice store: prepared 2-D slices on disk, memory-mapped by later stages.

Layout of a store folder (written by ``ensemblecam prepare``)::

    store.json    manifest, written last: its presence means the store is complete.
                  {"format": "ensemblecam-slice-store", "version": 1, "n_slices": N,
                   "channels": ["flair", "t1ce", "t2"], "size": [H, W],
                   "dtype": "float16", "has_masks": true, "prepare": {...settings...}}
    images.npy    (N, C, H, W) float16 or float32, channel-first
    masks.npy     (N, H, W) uint8 in {0, 1}: merged lesion mask (only if has_masks)
    slices.csv    one row per slice, in store order (see SLICE_COLUMNS)
    cases.json    per case: geometry to put any 2-D result back into the original
                  volume, and the source files

Geometry convention. A case's volume is reoriented to RAS+ canonical
(``nibabel.as_closest_canonical``), slice ``s`` is taken along ``axis`` of the
canonical array, and the crop box ``[y0:y1, x0:x1]`` (in canonical slice coordinates;
parts outside the slice are zero padding) is the stored slice. No resampling is done
anywhere, so a stored slice maps back to voxels exactly. ``cases.json`` holds, per case:
``shape`` (original), ``affine`` (original, 4x4), ``canonical_shape``, ``axis``,
``ornt`` (``nibabel.orientations.io_orientation`` of the original affine), ``files``
({modality or "seg": path}) and ``has_mask``. ``part`` is "" or, for the thesis's
kidney crops, "left"/"right" (the half of the body the window was centred on).

Identity: :attr:`SliceStore.identity` is the SHA-256 (first 16 hex digits) of the bytes
of ``store.json`` then ``slices.csv``. Stages that combine a store with results made
from a store (map stores, search outputs) record it and refuse a different store; a
store prepared again with the same settings from the same files keeps its identity.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil

STORE_FORMAT = "ensemblecam-slice-store"
STORE_VERSION = 1
MANIFEST = "store.json"
#: slice label of unlabelled scans (no masks, no labels CSV: ``prepare`` with masks off)
UNKNOWN_LABEL = -1

#: slices.csv columns and their dtypes.
SLICE_COLUMNS: dict[str, type] = {
    "index": int,
    "case": str,
    "slice": int,
    "part": str,
    "y0": int,
    "y1": int,
    "x0": int,
    "x1": int,
    "label": int,
    "lesion_fraction": float,
    "has_mask": int,
}


def write_slice_table(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write ``slices.csv`` atomically; ``rows`` in store order, keys = SLICE_COLUMNS."""
    with fsutil.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SLICE_COLUMNS))
        writer.writeheader()
        for i, row in enumerate(rows):
            if row.get("index", i) != i:
                raise ValueError(f"slice table row {i} has index {row['index']}")
            writer.writerow({k: row.get(k, i if k == "index" else "") for k in SLICE_COLUMNS})


def read_slice_table(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read ``slices.csv`` into one numpy array per column."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"{path}: cannot read slice table ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: malformed slice table ({exc})") from exc
    table: dict[str, np.ndarray] = {}
    for col, typ in SLICE_COLUMNS.items():
        try:
            values = [typ(r[col]) for r in rows]
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: bad or missing column {col!r} ({exc})") from exc
        table[col] = np.asarray(values, dtype=object if typ is str else None)
        if typ is str:
            table[col] = table[col].astype(str) if rows else np.zeros(0, dtype=str)
    return table


@dataclass
class SliceStore:
    """A complete slice store opened read-only; arrays are memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    images: np.ndarray
    masks: np.ndarray | None
    table: dict[str, np.ndarray]
    cases: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SliceStore:
        """Open the store at ``path``; an incomplete or foreign folder is an InputError."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: slice store not found")
        if not (path / MANIFEST).is_file():
            raise InputError(f"{path}: not a complete slice store (no {MANIFEST}); run prepare")
        manifest = fsutil.read_json(path / MANIFEST, "store manifest")
        if manifest.get("format") != STORE_FORMAT:
            raise InputError(f"{path / MANIFEST}: not an ensemblecam slice store")
        if manifest.get("version") != STORE_VERSION:
            raise InputError(
                f"{path / MANIFEST}: store version {manifest.get('version')} "
                f"is not supported (expected {STORE_VERSION})"
            )
        images = _load_npy(path / "images.npy")
        masks = _load_npy(path / "masks.npy") if manifest.get("has_masks") else None
        table = read_slice_table(path / "slices.csv")
        cases = fsutil.read_json(path / "cases.json", "case table")
        n = int(manifest["n_slices"])
        if images.shape[0] != n or len(table["index"]) != n:
            raise InputError(
                f"{path}: store is inconsistent: manifest says {n} slices, images.npy has "
                f"{images.shape[0]}, slices.csv has {len(table['index'])}"
            )
        if masks is not None and masks.shape != (n, *images.shape[2:]):
            raise InputError(f"{path}: masks.npy shape {masks.shape} does not match images")
        return cls(path, manifest, images, masks, table, cases)

    @property
    def n_slices(self) -> int:
        return int(self.manifest["n_slices"])

    @functools.cached_property
    def identity(self) -> str:
        """SHA-256 (16 hex digits) of ``store.json`` + ``slices.csv`` (module docstring)."""
        return store_identity(self.path)

    @property
    def channels(self) -> list[str]:
        return list(self.manifest["channels"])

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.manifest["size"]
        return int(h), int(w)

    @property
    def labels(self) -> np.ndarray:
        """Image-level slice labels (1 = lesion), shape (N,)."""
        return self.table["label"].astype(np.int64)

    @property
    def case_names(self) -> list[str]:
        """Case names in store order, each once."""
        return list(dict.fromkeys(self.table["case"].tolist()))

    def annotated(self, indices: np.ndarray) -> np.ndarray:
        """Bool per store index in ``indices``: the slice has a ground-truth mask (the
        table's ``has_mask``; False everywhere in a store without masks)."""
        if self.masks is None:
            return np.zeros(len(indices), bool)
        return self.table["has_mask"][np.asarray(indices)].astype(bool)

    def indices_for_cases(self, cases: list[str]) -> np.ndarray:
        """Store indices of every slice of ``cases`` (in store order)."""
        unknown = sorted(set(cases) - set(self.cases))
        if unknown:
            raise InputError(f"{self.path}: unknown cases {', '.join(unknown[:5])}")
        return np.flatnonzero(np.isin(self.table["case"], list(cases)))


def store_identity(path: str | os.PathLike[str]) -> str:
    """SHA-256 (first 16 hex digits) of the bytes of ``store.json`` then ``slices.csv``."""
    digest = hashlib.sha256()
    for name in (MANIFEST, "slices.csv"):
        fsutil.file_sha256(Path(path) / name, digest)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: missing from the store")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable array ({exc})") from exc
