"""The search as the self-training labels see a configuration (``search.slices: lesion``):
only the annotated slices labelled lesion are scored, since refine empties every
lesion-free slice whatever the maps say; checked against a brute-force count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ensemblecam.config import SearchConfig
from ensemblecam.errors import InputError
from ensemblecam.io.mapstore import write_map_set
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.stages.search import run_search_stage
from ensemblecam.training.data import part_indices
from store_factory import build_store


@pytest.fixture(scope="module")
def two_members(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Member a: the true mask on lesion slices, every pixel of a lesion-free slice lit;
    member b: the true mask shifted by one pixel, dark on lesion-free slices."""
    root = tmp_path_factory.mktemp("pseudo_search")
    store = build_store(root / "store", n_cases=6, slices_per_case=4, size=(16, 16), seed=2)
    st = SliceStore.open(store)
    assert st.masks is not None
    truth = np.asarray(st.masks, np.float32)
    a = truth.copy()
    a[st.labels == 0] = 1.0
    b = np.roll(truth, 1, axis=2)
    idx = np.arange(st.n_slices)
    for name, maps in (("a__gradcam", a), ("b__gradcam", b)):
        write_map_set(root / "maps" / name, {"store_id": st.identity}, idx,
                      maps.astype(np.float16), np.full(len(idx), 0.5, np.float32))  # fmt: skip
    return root


def _cfg(root: Path, slices: str, **kw: object) -> SearchConfig:
    return SearchConfig(store=root / "store", maps=root / "maps", slices=slices,
                        members=["a__gradcam", "b__gradcam"], operators=["and"], grid="0.5",
                        objective="lesion_dice", out=root / f"s_{slices}", **kw)  # fmt: skip


def test_lesion_slices_judge_what_a_member_adds_where_lesions_are(two_members: Path) -> None:
    root = two_members
    every = run_search_stage(_cfg(root, "all"))
    lesion = run_search_stage(_cfg(root, "lesion"))
    # on every slice a's lit lesion-free slices cost it; on lesion slices it is exact
    assert every["members"] != ["a__gradcam"]
    assert lesion["members"] == ["a__gradcam"] and lesion["lesion_dice"] == pytest.approx(1.0)
    best = json.loads((root / "s_lesion" / "best.json").read_text())
    assert best["criterion"]["slices"] == "lesion"
    st = SliceStore.open(root / "store")
    assert st.masks is not None
    splits = st.path / "splits.json"
    train = part_indices(st, splits, get_fold(splits, 0), "train")
    pos = train[st.labels[train] == 1]
    assert best["n_slices"] == len(pos)
    # member b alone, brute force over the lesion slices of the part
    truth = np.asarray(st.masks, bool)[pos]
    pred = np.roll(truth, 1, axis=2)
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    ranking = json.loads((root / "s_lesion" / "ranking.json").read_text())["top"]
    row_b = next(r for r in ranking if r["members"] == ["b__gradcam"])
    assert row_b["lesion_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_lesion_slices_need_masks(two_members: Path, tmp_path: Path) -> None:
    cfg = _cfg(two_members, "lesion", criterion="labels").model_copy(update={"out": tmp_path / "q"})
    with pytest.raises(InputError, match="slices lesion") as err:
        run_search_stage(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "q").exists()
