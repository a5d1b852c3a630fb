"""Case discovery per layout: pairing by case name and modality, missing files, defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ensemblecam.errors import InputError
from ensemblecam.io.layouts import discover
from nifti_factory import (
    brats_dataset,
    folder_dataset,
    kits_dataset,
    msd_dataset,
    write_nifti,
)


@pytest.mark.parametrize("year", [2020, 2021])
def test_brats_names_and_default_modalities(tmp_path: Path, year: int) -> None:
    names = brats_dataset(tmp_path, n_cases=2, year=year)
    found = discover("brats", tmp_path)
    assert found.modalities == ["flair", "t1ce", "t2"]
    assert [c.name for c in found.cases] == names
    for case in found.cases:
        assert list(case.images) == ["flair", "t1ce", "t2"]
        for mod, path in case.images.items():
            assert path.name.startswith(case.name + "_") and f"_{mod}.nii" in path.name
        assert case.seg is not None and case.seg.name == f"{case.name}_seg.nii.gz"


def test_brats_missing_modality_and_seg(tmp_path: Path) -> None:
    names = brats_dataset(tmp_path, n_cases=2)
    (tmp_path / names[1] / f"{names[1]}_t2.nii.gz").unlink()
    with pytest.raises(InputError, match=rf"{names[1]}_t2\.nii\.gz: missing t2 file"):
        discover("brats", tmp_path)
    # t2 is not asked for: fine
    assert len(discover("brats", tmp_path, ["flair", "t1"]).cases) == 2
    (tmp_path / names[0] / f"{names[0]}_seg.nii.gz").unlink()
    with pytest.raises(InputError, match="missing seg file"):
        discover("brats", tmp_path, ["flair"])
    # without masks (labels CSV) the seg is not needed
    assert all(
        c.seg is None for c in discover("brats", tmp_path, ["flair"], require_seg=False).cases
    )


def test_brats_file_in_wrong_case_folder(tmp_path: Path) -> None:
    names = brats_dataset(tmp_path, n_cases=2)
    src = tmp_path / names[0] / f"{names[0]}_t1.nii.gz"
    src.rename(tmp_path / names[1] / src.name)
    with pytest.raises(InputError, match="in folder of"):
        discover("brats", tmp_path)


def test_msd_modality_map_and_labels(tmp_path: Path) -> None:
    msd_dataset(tmp_path, n_cases=2)
    (tmp_path / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"junk")  # macOS debris
    found = discover("msd", tmp_path)
    assert found.modalities == ["adc"] and found.allowed_labels == {0, 1, 2}
    assert [c.volume_index for c in found.cases] == [{"adc": 1}, {"adc": 1}]
    both = discover("msd", tmp_path, ["ADC", "T2"])
    assert both.cases[0].volume_index == {"adc": 1, "t2": 0}
    assert both.cases[1].seg == tmp_path / "./labelsTr/prostate_01.nii.gz"
    with pytest.raises(InputError, match="modality 'dwi' not in this data set"):
        discover("msd", tmp_path, ["dwi"])
    (tmp_path / "labelsTr" / "prostate_01.nii.gz").unlink()
    with pytest.raises(InputError, match=r"prostate_01\.nii\.gz: missing seg file"):
        discover("msd", tmp_path)


def test_msd_without_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dataset\.json: missing"):
        discover("msd", tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"unreadable dataset\.json"):
        discover("msd", tmp_path)


@pytest.mark.parametrize("version", [19, 21])
def test_kits_layouts(tmp_path: Path, version: int) -> None:
    root = tmp_path / "data"  # KiTS19 keeps cases under data/
    kits_dataset(root, n_cases=2, version=version, shape=(16, 12, 4))
    if version == 21:  # KiTS21's majority-vote seg name
        for case in root.iterdir():
            (case / "segmentation.nii.gz").rename(case / "aggregated_MAJ_seg.nii.gz")
    found = discover("kits", tmp_path)
    assert found.modalities == ["ct"] and [c.name for c in found.cases] == [
        "case_00000",
        "case_00001",
    ]
    assert all(c.seg is not None and c.seg.parent.name == c.name for c in found.cases)
    for case in root.iterdir():
        for f in case.glob("*seg*"):
            f.unlink()
    with pytest.raises(InputError, match="missing seg file"):
        discover("kits", tmp_path)


def test_folder_pairs_by_name_not_sorted_position(tmp_path: Path) -> None:
    """Sorted listing interleaves 'a_b_t1' between 'a_t1' and 'a_t2': names must decide."""
    shape = (4, 4, 2)
    for case, mods in (("a", ("t2", "t1")), ("a_b", ("t1", "t2")), ("B", ("t1", "t2"))):
        for mod in mods:
            write_nifti(tmp_path / "images" / f"{case}_{mod}.nii.gz", np.zeros(shape, np.float32))
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", np.zeros(shape, np.uint8))
    found = discover("folder", tmp_path)
    assert found.modalities == ["t1", "t2"] and found.allowed_labels is None
    for case in found.cases:
        assert case.images == {
            m: tmp_path / "images" / f"{case.name}_{m}.nii.gz" for m in ("t1", "t2")
        }
        assert case.seg == tmp_path / "labels" / f"{case.name}.nii.gz"
    assert discover("folder", tmp_path, ["T2"]).cases[0].images == {
        "t2": tmp_path / "images" / "B_t2.nii.gz"
    }


def test_folder_missing_files(tmp_path: Path) -> None:
    folder_dataset(tmp_path, n_cases=2, shape=(4, 4, 2))
    (tmp_path / "images" / "case1_t2.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case1_t2\.nii\.gz: missing t2 file"):
        discover("folder", tmp_path)
    (tmp_path / "labels" / "case0.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case0\.nii\.gz: missing seg file"):
        discover("folder", tmp_path, ["t1"])
    write_nifti(tmp_path / "labels" / "ghost.nii.gz", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match="unknown case 'ghost'"):
        discover("folder", tmp_path, ["t1"], require_seg=False)


def test_empty_data_sets(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for layout in ("brats", "kits", "folder"):
        with pytest.raises(InputError, match="empty data set"):
            discover(layout, tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "training": []}))
    with pytest.raises(InputError, match="empty data set"):
        discover("msd", tmp_path, ["ct"])
    with pytest.raises(InputError, match="data folder not found"):
        discover("brats", tmp_path / "nope")
