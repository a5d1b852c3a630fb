"""Patient-level splits, written as a JSON file.

Format of a split file (default ``<store>/splits.json``)::

    {"format": "ensemblecam-splits", "version": 1, "scheme": "kfold" | "holdout" | "list",
     "seed": 0, "store": "<store path>",
     "folds": [{"name": "fold0", "train": [case, ...], "val": [...], "test": [...]}, ...]}

A case appears in at most one part of a fold. For k-fold, ``test`` is the held-out fold
(where results are reported) and ``val`` a share of the remaining cases for checkpoint
selection; a holdout split has one fold.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ensemblecam import fsutil
from ensemblecam.errors import InputError

SPLIT_FORMAT = "ensemblecam-splits"
SPLIT_VERSION = 1
PARTS = ("train", "val", "test")


@dataclass
class Fold:
    """One fold: patient-level case lists per part."""

    name: str
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def part(self, name: str) -> list[str]:
        """Cases of part ``name`` (train, val or test)."""
        if name not in PARTS:
            raise InputError(f"split part {name!r}: expected one of {', '.join(PARTS)}")
        return list(getattr(self, name))


def write_splits(
    path: str | os.PathLike[str], folds: list[Fold], scheme: str, seed: int, store: str
) -> None:
    """Write a split file atomically after checking no case is in two parts of a fold."""
    for fold in folds:
        seen: dict[str, str] = {}
        for part in PARTS:
            for case in fold.part(part):
                if case in seen:
                    raise InputError(
                        f"case {case!r} is in both {seen[case]} and {part} of {fold.name}"
                    )
                seen[case] = part
    fsutil.write_json(
        path,
        {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "scheme": scheme,
            "seed": seed,
            "store": str(store),
            "folds": [asdict(f) for f in folds],
        },
    )


def read_splits(path: str | os.PathLike[str]) -> list[Fold]:
    """Read a split file written by :func:`write_splits`."""
    path = Path(path)
    data: Any = fsutil.read_json(path, "split file")
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise InputError(f"{path}: not an ensemblecam split file")
    try:
        return [Fold(**f) for f in data["folds"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed split file ({exc})") from exc


def get_fold(path: str | os.PathLike[str], fold: int | str) -> Fold:
    """Fold ``fold`` (position or name) of the split file at ``path``."""
    folds = read_splits(path)
    for i, f in enumerate(folds):
        if f.name == str(fold) or (isinstance(fold, int) and i == fold):
            return f
    names = ", ".join(f.name for f in folds)
    raise InputError(f"{path}: no fold {fold!r} (folds: {names})")
