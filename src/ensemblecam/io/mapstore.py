"""The map store: CAM maps of one (model, method) member, aligned with a slice store.

Layout of one member folder ``<maps_root>/<member>/`` (written by ``ensemblecam cam``)::

    meta.json   written last: its presence means the member is complete.
                {"format": "ensemblecam-map-store", "version": 1, "member": name,
                 "checkpoint": path, "model": name, "method": name, "layer": name,
                 "layers": [names] (fused layers; "layer" joins them with "+"),
                 "flip_tta": bool (horizontal-flip test-time augmentation),
                 "target": "lesion" | "predicted" | int, "dtype": "float16" | "uint8",
                 "normalised": true, "store": slice-store path, "n": N, "size": [H, W],
                 "store_id": identity of the slice store, "store_n_slices": its slices}
                (store_id/store_n_slices: since they were added; see check_store)
    index.npy   (N,) int64, ascending slice-store indices the maps belong to
    maps.npy    (N, H, W) maps in [0, 1]: float16 (max rounding error 2**-11 ~ 4.9e-4),
                or uint8 q = round(255 m) (max error 1/510 ~ 2.0e-3); raw (un-normalised)
                maps are always float16/float32
    probs.npy   (N,) float32 classifier probability of the lesion class (for gating)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.config import short_repr
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil

MAP_FORMAT = "ensemblecam-map-store"
MAP_VERSION = 1
MAP_META = "meta.json"


def member_name(model_tag: str, method: str) -> str:
    """Folder name of a member: ``<model_tag>__<method>``."""
    return f"{model_tag}__{method}"


LOCALISER_TAG = "localiser"  #: model tag of every MIL localiser's member


def localiser_member(name: str) -> str:
    """Member name of MIL localiser ``name``'s maps: ``localiser__<name>``."""
    return member_name(LOCALISER_TAG, name)


def quantise(maps: np.ndarray, dtype: str) -> np.ndarray:
    """Maps in [0, 1] to the stored dtype: float16, or uint8 ``round(255 m)``."""
    if dtype == "uint8":
        return np.rint(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)
    if dtype in ("float16", "float32"):
        return maps.astype(dtype)
    raise InputError(f"map dtype {dtype!r}: expected float16, float32 or uint8")


def dequantise(stored: np.ndarray) -> np.ndarray:
    """Stored maps to float32 in [0, 1] (uint8 divided by 255)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / 255.0
    return stored.astype(np.float32)


@dataclass
class MapSet:
    """One complete member of a map store, memory-mapped read-only."""

    path: Path
    meta: dict[str, Any]
    index: np.ndarray
    maps: np.ndarray
    probs: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> MapSet:
        """Open the member folder at ``path``; incomplete or inconsistent is an InputError."""
        path = Path(path)
        if not (path / MAP_META).is_file():
            raise InputError(f"{path}: not a complete map set (no {MAP_META}); run cam")
        meta = fsutil.read_json(path / MAP_META, "map metadata")
        if not isinstance(meta, dict) or meta.get("format") != MAP_FORMAT:
            raise InputError(f"{path / MAP_META}: not an ensemblecam map set")
        try:
            index = np.load(path / "index.npy", allow_pickle=False)
            maps = np.load(path / "maps.npy", mmap_mode="r", allow_pickle=False)
            probs = np.load(path / "probs.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable map set ({exc})") from exc
        n = len(index)
        if index.ndim != 1 or maps.ndim != 3 or maps.shape[0] != n or probs.shape != (n,):
            raise InputError(
                f"{path}: inconsistent map set: index {index.shape}, maps {maps.shape}, "
                f"probs {probs.shape}"
            )
        _check_meta(path / MAP_META, meta, index, maps)
        return cls(path, meta, index.astype(np.int64), maps, probs.astype(np.float32))

    def check_store(self, store: Any) -> None:
        """Refuse maps made from another slice store than ``store`` (a SliceStore).

        With ``store_id`` in the metadata the identities must match; older map sets are
        checked by slice size and by their indices lying within the store.
        """
        meta_file = self.path / MAP_META
        made_from = self.meta.get("store", "?")
        if "store_id" in self.meta:
            if self.meta["store_id"] != store.identity:
                raise InputError(
                    f"{meta_file}: maps were made from slice store {made_from} (id "
                    f"{self.meta['store_id']}), not from {store.path} (id {store.identity})"
                )
            return
        size = [int(v) for v in self.maps.shape[1:]]
        if size != list(store.size):
            raise InputError(
                f"{meta_file}: maps of shape {size} were made from another slice "
                f"store than {store.path} (slices of shape {list(store.size)})"
            )
        if len(self.index) and int(self.index[-1]) >= store.n_slices:
            raise InputError(
                f"{meta_file}: maps of store slice {int(self.index[-1])} were "
                f"made from another slice store than {store.path} "
                f"({store.n_slices} slices)"
            )

    @property
    def name(self) -> str:
        return str(self.meta.get("member", self.path.name))

    def rows_for(self, store_indices: np.ndarray) -> np.ndarray:
        """Row of each slice-store index in this set; a missing slice is an InputError."""
        pos = positions(self.index, store_indices)
        if pos is None:
            found = np.isin(store_indices, self.index)
            missing = np.asarray(store_indices)[~found]
            raise InputError(
                f"{self.path}: no maps for {len(missing)} requested slices "
                f"(first store indices: {missing[:5].tolist()})"
            )
        return pos


def positions(index: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """Position of each of ``wanted`` in the sorted ``index`` (binary search), or None if
    any of them is not in it."""
    index, wanted = np.asarray(index), np.asarray(wanted)
    if len(index) == 0:
        return None if len(wanted) else np.zeros(0, np.intp)
    pos = np.clip(np.searchsorted(index, wanted), 0, len(index) - 1)
    return pos if np.array_equal(index[pos], wanted) else None


def _check_meta(meta_file: Path, meta: dict[str, Any], index: np.ndarray, maps: np.ndarray) -> None:
    """Refuse metadata that disagrees with the arrays (count, size, dtype, index order)."""
    n, size = len(index), [int(v) for v in maps.shape[1:]]
    checks = [
        ("n", meta.get("n"), n),
        ("size", meta.get("size"), size),
        ("dtype", meta.get("dtype"), str(maps.dtype)),
    ]
    for key, said, found in checks:
        if said is not None and said != found:
            raise InputError(
                f"{meta_file}: says {key} {short_repr(said)} but the arrays hold "
                f"{found}; the map set is inconsistent"
            )
    if (
        index.dtype.kind not in "iu"
        or (n > 1 and not np.all(np.diff(index) > 0))
        or (n and int(index[0]) < 0)
    ):
        raise InputError(
            f"{meta_file.parent / 'index.npy'}: store indices must be "
            f"ascending, distinct, non-negative integers"
        )


def write_map_set(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    index: np.ndarray,
    maps: np.ndarray,
    probs: np.ndarray,
) -> None:
    """Write a complete member in one go (small sets, tests); meta.json last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    order = np.argsort(index, kind="stable")
    fsutil.save_npy(path / "index.npy", np.asarray(index, dtype=np.int64)[order])
    fsutil.save_npy(path / "maps.npy", np.asarray(maps)[order])
    fsutil.save_npy(path / "probs.npy", np.asarray(probs, dtype=np.float32)[order])
    full = {
        "format": MAP_FORMAT,
        "version": MAP_VERSION,
        "member": path.name,
        "n": len(index),
        "size": list(np.asarray(maps).shape[1:]),
        "dtype": str(np.asarray(maps).dtype),
        **meta,
    }
    fsutil.write_json(path / MAP_META, full)
