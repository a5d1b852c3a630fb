"""Patient-level splits: k-fold, holdout, user lists, stratification, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.errors import InputError
from ensemblecam.io.split import (
    holdout_split,
    kfold_split,
    list_split,
    read_splits,
    stratified_order,
)
from store_factory import build_store

POS = {f"c{i:02d}": i < 9 for i in range(30)}  # 9 lesion cases, 21 lesion-free


def test_kfold_partitions_and_stratifies() -> None:
    folds = kfold_split(POS, folds=3, val_fraction=0.2, seed=1)
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == set(POS) and sum(map(len, tests)) == len(POS)
    for f in folds:
        assert not (set(f.train) & set(f.val)) and not (set(f.train) & set(f.test))
        assert set(f.train) | set(f.val) | set(f.test) == set(POS)
        assert len(f.test) == 10 and sum(POS[c] for c in f.test) == 3  # 9 positives / 3
        assert len(f.val) == 4 and sum(POS[c] for c in f.val) in (1, 2)
    assert kfold_split(POS, 3, 0.2, seed=1) == folds  # deterministic
    assert kfold_split(POS, 3, 0.2, seed=2) != folds
    assert all(f.val == [] for f in kfold_split(POS, 3, 0.0, seed=1))


def test_holdout_fractions() -> None:
    (fold,) = holdout_split(POS, (0.6, 0.2, 0.2), seed=0)
    assert (len(fold.train), len(fold.val), len(fold.test)) == (18, 6, 6)
    assert [sum(POS[c] for c in p) for p in (fold.train, fold.val, fold.test)] in (
        [5, 2, 2],
        [6, 2, 1],
        [6, 1, 2],
        [5, 2, 2],
    )
    with pytest.raises(InputError, match="summing to 1"):
        holdout_split(POS, (0.5, 0.2, 0.2))


def test_stratified_order_prefixes_are_proportional() -> None:
    order = stratified_order(POS, seed=3)
    for n in (10, 20, 30):
        assert abs(sum(POS[c] for c in order[:n]) - 0.3 * n) <= 1
    assert sorted(stratified_order(POS, 3, stratify=False)) == sorted(POS)


def test_kfold_bad_values() -> None:
    with pytest.raises(InputError, match="folds 40"):
        kfold_split(POS, folds=40)


def test_list_file_json_and_csv(tmp_path: Path) -> None:
    known = list(POS)
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"train": known[:20], "val": known[20:25], "test": known[25:]}))
    (fold,) = list_split(f, known)
    assert fold.test == known[25:]
    f.write_text(
        json.dumps(
            [
                {"name": "a", "train": known[:2], "test": known[2:4]},
                {"train": known[2:4], "test": known[:2]},
            ]
        )
    )
    assert [x.name for x in list_split(f, known)] == ["a", "fold1"]
    f.write_text(json.dumps({"train": ["zz"], "test": []}))
    with pytest.raises(InputError, match="unknown case 'zz'"):
        list_split(f, known)
    f.write_text(json.dumps({"train": known[:2], "test": known[1:3]}))
    with pytest.raises(InputError, match="in both train and test"):
        list_split(f, known)
    c = tmp_path / "s.csv"
    c.write_text("case,part,fold\nc00,train,0\nc01,test,0\nc01,train,1\nc00,test,1\n")
    folds = list_split(c, known)
    assert [(x.name, x.train, x.test) for x in folds] == [
        ("fold0", ["c00"], ["c01"]),
        ("fold1", ["c01"], ["c00"]),
    ]
    c.write_text("case,part\nc00,dev\n")
    with pytest.raises(InputError, match="part 'dev'"):
        list_split(c, known)


def test_split_cli(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=9, slices_per_case=2, size=(8, 8))
    (store / "splits.json").unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["split", "--store", str(store), "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert "positive slices" in res.output
    folds = read_splits(store / "splits.json")
    assert len(folds) == 3 and all(len(f.test) == 3 for f in folds)
    res = runner.invoke(app, ["split", "--store", str(store)])
    assert res.exit_code == 2 and "use --force" in res.stderr
    res = runner.invoke(
        app,
        [
            "split",
            "--store",
            str(store),
            "--scheme",
            "holdout",
            "--force",
            "--fractions",
            "0.6,0.2,0.2",
        ],
    )
    assert res.exit_code == 0 and len(read_splits(store / "splits.json")) == 1
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps({"train": ["case_000"], "test": ["case_999"]}))
    res = runner.invoke(
        app,
        [
            "split",
            "--store",
            str(store),
            "--scheme",
            "list",
            "--list-file",
            str(lst),
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert res.exit_code == 2 and "unknown case 'case_999'" in res.stderr
    assert not (tmp_path / "x.json").exists()
