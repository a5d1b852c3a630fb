"""Patient-level splits, written as a JSON file.

Format of a split file (default ``<store>/splits.json``)::

    {"format": "ensemblecam-splits", "version": 1, "scheme": "kfold" | "holdout" | "list",
     "seed": 0, "store": "<store path>",
     "folds": [{"name": "fold0", "train": [case, ...], "val": [...], "test": [...]}, ...]}

A case appears in at most one part of a fold and in the test part of at most one fold
(checked when a split file is written and when it is read). For k-fold, ``test`` is the
held-out fold (where results are reported) and ``val`` a share of the remaining cases for
checkpoint selection; a holdout split has one fold.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.config import SplitConfig, one_line, short_repr
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.store import SliceStore

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


def check_folds(folds: list[Fold], source: str = "split") -> None:
    """Refuse a case listed twice in one fold (two parts, or twice in a part) or in the
    test parts of two folds; the message names ``source``, the case, the parts and folds."""
    names: set[str] = set()
    test_fold: dict[str, str] = {}
    for fold in folds:
        if fold.name in names:
            raise InputError(f"{source}: fold name {short_repr(fold.name)} is used twice")
        names.add(fold.name)
        seen: dict[str, str] = {}
        for part in PARTS:
            for case in fold.part(part):
                if case in seen:
                    twice = "twice in" if seen[case] == part else f"in both {seen[case]} and"
                    raise InputError(
                        f"{source}: case {short_repr(case)} is {twice} {part} of {fold.name}"
                    )
                seen[case] = part
        for case in fold.test:
            if case in test_fold:
                raise InputError(
                    f"{source}: case {short_repr(case)} is in the test part of "
                    f"both {test_fold[case]} and {fold.name}"
                )
            test_fold[case] = fold.name


def write_splits(
    path: str | os.PathLike[str], folds: list[Fold], scheme: str, seed: int, store: str
) -> None:
    """Write a split file atomically after :func:`check_folds`."""
    check_folds(folds)
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
        folds = [Fold(**f) for f in data["folds"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed split file ({one_line(str(exc))})") from exc
    for fold in folds:
        parts = [fold.name, *(getattr(fold, p) for p in PARTS)]
        if not isinstance(fold.name, str) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in parts[1:]
        ):
            raise InputError(
                f"{path}: malformed split file (fold {short_repr(fold.name)}: "
                f"name must be a string, parts lists of case names)"
            )
    check_folds(folds, str(path))
    return folds


def get_fold(path: str | os.PathLike[str], fold: int | str) -> Fold:
    """Fold ``fold`` (name, or position: an int or a digit string naming no fold)."""
    folds = read_splits(path)
    for f in folds:
        if f.name == str(fold):
            return f
    pos = fold if isinstance(fold, int) else int(fold) if str(fold).isdigit() else None
    if pos is not None and 0 <= pos < len(folds):
        return folds[pos]
    names = ", ".join(f.name for f in folds)
    raise InputError(f"{path}: no fold {fold!r} (folds: {names})")


# ----------------------------------------------------------------------------- algorithms
#
# Stratification: cases are split into those with at least one positive slice and those
# without; each group is shuffled with the seed and case j of a group of n gets the rank
# key (j + 0.5) / n. Sorting all cases by that key interleaves the groups so that every
# prefix and every round-robin fold holds them in proportion. Without stratification
# the order is a plain seeded shuffle.


def stratified_order(positive: dict[str, bool], seed: int, stratify: bool = True) -> list[str]:
    """Seeded case order in which each prefix holds positive/negative cases in proportion."""
    rng = np.random.default_rng(seed)
    names = sorted(positive)
    if not stratify:
        return [names[i] for i in rng.permutation(len(names))]
    keyed: list[tuple[float, float, str]] = []
    for group in (True, False):
        members = [c for c in names if positive[c] == group]
        order = rng.permutation(len(members))
        ties = rng.random(len(members))
        for j, i in enumerate(order):
            keyed.append(((j + 0.5) / len(members), float(ties[j]), members[i]))
    return [c for _, _, c in sorted(keyed)]


def _counts(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` (sums to ``n``)."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    rest = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in rest[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _take_val(rest: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split ``rest`` (already in stratified order) into train and val."""
    n_val = round(val_fraction * len(rest))
    if val_fraction > 0 and n_val == 0 and len(rest) >= 2:
        n_val = 1
    return sorted(rest[n_val:]), sorted(rest[:n_val])


def kfold_split(
    positive: dict[str, bool],
    folds: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> list[Fold]:
    """k-fold, stratified: each group (lesion / lesion-free cases), shuffled with the seed,
    is dealt round-robin over the folds, the second group continuing where the first
    stopped (fold sizes differ by at most one, each group's share by at most one).

    Fold ``k``: test = cases dealt to ``k``; val = ``round(val_fraction * n_rest)`` of the
    other cases (taken from the stratified order, at least one if ``val_fraction > 0``);
    train = the rest.
    """
    n = len(positive)
    if folds < 2 or folds > n:
        raise InputError(f"folds {folds}: need 2 <= folds <= number of cases ({n})")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val fraction {val_fraction}: need 0 <= value < 1")
    rng = np.random.default_rng(seed)
    names = sorted(positive)
    groups = [[c for c in names if positive[c]], [c for c in names if not positive[c]]]
    if not stratify:
        groups = [names]
    fold_of: dict[str, int] = {}
    i = 0
    for members in groups:
        for j in rng.permutation(len(members)):
            fold_of[members[j]] = i % folds
            i += 1
    order = stratified_order(positive, seed + 1, stratify)
    result = []
    for k in range(folds):
        test = [c for c in order if fold_of[c] == k]
        train, val = _take_val([c for c in order if fold_of[c] != k], val_fraction)
        result.append(Fold(f"fold{k}", train=train, val=val, test=sorted(test)))
    return result


def holdout_split(
    positive: dict[str, bool],
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stratify: bool = True,
) -> list[Fold]:
    """One fold: consecutive runs of the stratified order sized by largest remainder."""
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1) > 1e-6 or fr[0] <= 0:
        raise InputError(
            f"fractions {','.join(map(str, fr))}: need three train,val,test shares >= 0 "
            "summing to 1, train > 0"
        )
    order = stratified_order(positive, seed, stratify)
    n_train, n_val, _ = _counts(len(order), fr)
    return [
        Fold(
            "holdout",
            train=sorted(order[:n_train]),
            val=sorted(order[n_train : n_train + n_val]),
            test=sorted(order[n_train + n_val :]),
        )
    ]


def list_split(path: str | os.PathLike[str], known: list[str]) -> list[Fold]:
    """Read a user split: JSON ``{"train": [...], "val": [...], "test": [...]}`` (or a list
    of them, each optionally with ``"name"``) or CSV ``case,part[,fold]``; cases must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: split list not found")
    folds: list[Fold] = []
    if path.suffix.lower() == ".csv":
        with (
            fsutil.reading_text(path, "split list"),
            open(path, newline="", encoding="utf-8-sig") as fh,
        ):
            reader = csv.DictReader(fh)
            if not {"case", "part"} <= set(reader.fieldnames or []):
                raise InputError(f"{path}: needs columns case,part[,fold]")
            by_fold: dict[str, Fold] = {}
            for line, row in enumerate(reader, start=2):
                name = (row.get("fold") or "").strip() or "fold0"
                if name.isdigit():
                    name = f"fold{name}"
                part = (row["part"] or "").strip()
                if part not in PARTS:
                    raise InputError(
                        f"{path}: line {line}: part {short_repr(part)} is "
                        f"not one of {', '.join(PARTS)}"
                    )
                fold = by_fold.setdefault(name, Fold(name))
                getattr(fold, part).append((row["case"] or "").strip())
            folds = list(by_fold.values())
    else:
        data = fsutil.read_json(path, "split list")
        if isinstance(data, dict) and "folds" in data:
            data = data["folds"]
        entries = data if isinstance(data, list) else [data]
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not set(entry) <= {*PARTS, "name"}:
                raise InputError(
                    f"{path}: fold {i} must be an object with keys "
                    f"train, val, test (and optional name)"
                )
            lists = {p: entry.get(p, []) for p in PARTS}
            if not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in lists.values()
            ):
                raise InputError(f"{path}: fold {i}: parts must be lists of case names")
            folds.append(Fold(str(entry.get("name", f"fold{i}")), **lists))
    if not folds:
        raise InputError(f"{path}: split list holds no fold")
    known_set = set(known)
    for fold in folds:
        for part in PARTS:
            for case in fold.part(part):
                if case not in known_set:
                    raise InputError(f"{path}: {fold.name} {part}: unknown case {short_repr(case)}")
        if not fold.train and not fold.test:
            raise InputError(f"{path}: {fold.name} has neither train nor test cases")
    check_folds(folds, str(path))
    return folds


# ----------------------------------------------------------------------------- stage


def case_positive(store: SliceStore) -> dict[str, bool]:
    """``{case: True if any slice of the case is labelled lesion}`` for every store case."""
    labels = store.labels
    case_col = store.table["case"]
    positive = {c: False for c in sorted(store.cases)}
    for c in np.unique(case_col[labels > 0]).tolist():
        positive[c] = True
    return positive


def make_splits(cfg: SplitConfig, force: bool = False) -> tuple[Path, list[Fold]]:
    """Split ``cfg.store`` by ``cfg.scheme`` and write the split file; return (path, folds)."""
    store = SliceStore.open(cfg.store)
    target = Path(cfg.out) if cfg.out is not None else Path(cfg.store) / "splits.json"
    if target.exists() and not force:
        raise InputError(f"{target}: split file exists; use --force to replace it")
    positive = case_positive(store)
    if cfg.scheme == "kfold":
        folds = kfold_split(positive, cfg.folds, cfg.val_fraction, cfg.seed, cfg.stratify)
    elif cfg.scheme == "holdout":
        folds = holdout_split(positive, cfg.fractions, cfg.seed, cfg.stratify)
    else:
        if cfg.list_file is None:
            raise InputError("split scheme 'list' needs a list file (--list-file)")
        folds = list_split(cfg.list_file, sorted(positive))
    write_splits(target, folds, cfg.scheme, cfg.seed, str(cfg.store))
    return target, folds


def split_summary(store: SliceStore, folds: list[Fold]) -> list[dict[str, Any]]:
    """Per fold and part: cases, lesion cases, slices, positive slices."""
    positive = case_positive(store)
    labels = store.labels
    case_col = store.table["case"]
    rows = []
    for fold in folds:
        for part in PARTS:
            cases = fold.part(part)
            mask = np.isin(case_col, cases)
            rows.append(
                {
                    "fold": fold.name,
                    "part": part,
                    "cases": len(cases),
                    "lesion cases": sum(positive[c] for c in cases),
                    "slices": int(mask.sum()),
                    "positive slices": int(labels[mask].sum()),
                }
            )
    return rows
