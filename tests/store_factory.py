"""Build a small, complete slice store (and split file) without going through prepare.

Lesions are bright blobs (optionally with a faint random texture background), so a
small CNN can learn slice labels and its CAMs can localise them. Used by the tests of
every stage after prepare; prepare's own tests write real NIfTI volumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemblecam.io import fsutil
from ensemblecam.io.split import Fold, write_splits
from ensemblecam.io.store import MANIFEST, STORE_FORMAT, STORE_VERSION, write_slice_table


def build_store(
    path: Path,
    n_cases: int = 12,
    slices_per_case: int = 8,
    size: tuple[int, int] = (32, 32),
    channels: tuple[str, ...] = ("flair",),
    positive_fraction: float = 0.5,
    folds: int = 3,
    seed: int = 0,
) -> Path:
    """Write a store at ``path`` and ``path/splits.json``; return ``path``."""
    rng = np.random.default_rng(seed)
    h, w = size
    n = n_cases * slices_per_case
    images = np.zeros((n, len(channels), h, w), np.float32)
    masks = np.zeros((n, h, w), np.uint8)
    rows = []
    cases = {}
    yy, xx = np.mgrid[0:h, 0:w]
    i = 0
    for c in range(n_cases):
        name = f"case_{c:03d}"
        for s in range(slices_per_case):
            img = 0.2 * rng.random((h, w))
            if rng.random() < positive_fraction:
                r = rng.uniform(2.5, max(3.0, min(h, w) / 6))
                cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
                img[m] += 0.8
                masks[i] = m
            images[i, :] = img
            frac = float(masks[i].mean())
            rows.append(
                dict(
                    index=i,
                    case=name,
                    slice=s,
                    part="",
                    y0=0,
                    y1=h,
                    x0=0,
                    x1=w,
                    label=int(frac > 0),
                    lesion_fraction=frac,
                    has_mask=1,
                )
            )
            i += 1
        cases[name] = {
            "shape": [h, w, slices_per_case],
            "affine": np.eye(4).tolist(),
            "canonical_shape": [h, w, slices_per_case],
            "axis": 2,
            "ornt": [[0, 1], [1, 1], [2, 1]],
            "files": {},
            "has_mask": True,
        }
    path.mkdir(parents=True)
    np.save(path / "images.npy", images.astype(np.float16))
    np.save(path / "masks.npy", masks)
    write_slice_table(path / "slices.csv", rows)
    fsutil.write_json(path / "cases.json", cases)
    fsutil.write_json(
        path / MANIFEST,
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "n_slices": n,
            "channels": list(channels),
            "size": [h, w],
            "dtype": "float16",
            "has_masks": True,
            "prepare": {"layout": "test-factory"},
        },
    )
    names = list(cases)
    k_folds = []
    for k in range(folds):
        test = names[k::folds]
        rest = [c for c in names if c not in test]
        k_folds.append(Fold(f"fold{k}", train=rest[1:], val=rest[:1], test=test))
    write_splits(path / "splits.json", k_folds, "kfold", seed, str(path))
    return path
