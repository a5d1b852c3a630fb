"""``ensemblecam synth``: layouts, determinism, contrasts, lesion variety, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.config import SynthConfig
from ensemblecam.errors import InputError
from ensemblecam.synth import (
    case_rng,
    make_brats_case,
    make_kits_case,
    make_msd_case,
    same_phantom,
    synth_dataset,
)

SMALL = (48, 48, 16)


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "brats"
    return synth_dataset(
        SynthConfig(out=out, n_cases=5, shape=SMALL, seed=1, workers=2, tumour_free_fraction=0.2)
    )


def test_brats_layout_names_shapes_labels(brats: Path) -> None:
    cases = sorted(p.name for p in brats.iterdir() if p.is_dir())
    assert cases == [f"BraTS20_Training_{i:03d}" for i in range(1, 6)]
    assert (brats / "name_mapping.csv").is_file() and (brats / "phantom.json").is_file()
    for case in cases:
        files = sorted(p.name for p in (brats / case).iterdir())
        assert files == sorted(f"{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        seg, img = _load(brats / case / f"{case}_seg.nii.gz")
        assert seg.shape == SMALL
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # stored LPS, as BraTS is
        for mod in ("t1", "t1ce", "t2", "flair"):
            vol, im = _load(brats / case / f"{case}_{mod}.nii.gz")
            assert vol.shape == SMALL and vol.dtype == np.int16
            np.testing.assert_allclose(im.affine, img.affine)
    info = json.loads((brats / "phantom.json").read_text())
    free = [c for c in info["cases"] if c["lesion_free"]]
    assert len(free) == 1 and free[0]["lesion_voxels"] == 0  # round(0.2 * 5) lesion-free case


def test_deterministic_and_seed_dependent(tmp_path: Path, brats: Path) -> None:
    again = synth_dataset(
        SynthConfig(
            out=tmp_path / "a", n_cases=2, shape=SMALL, seed=1, workers=1, tumour_free_fraction=0.2
        )
    )
    other = synth_dataset(
        SynthConfig(
            out=tmp_path / "b", n_cases=2, shape=SMALL, seed=2, workers=1, tumour_free_fraction=0.2
        )
    )
    name = "BraTS20_Training_001"
    f = f"{name}/{name}_flair.nii.gz"
    np.testing.assert_array_equal(_load(again / f)[0], _load(brats / f)[0])  # 2 vs 1 workers
    assert not np.array_equal(_load(other / f)[0], _load(brats / f)[0])


def test_same_phantom_recognises_its_settings(tmp_path: Path, brats: Path) -> None:
    """A phantom is reused (demo, bench) only if phantom.json records the same settings."""
    cfg = SynthConfig(out=brats, n_cases=5, shape=SMALL, seed=1, tumour_free_fraction=0.2)
    assert same_phantom(cfg)
    assert same_phantom(cfg.model_copy(update={"workers": 1}))  # workers change no voxel
    for change in ({"seed": 2}, {"n_cases": 4}, {"shape": (48, 48, 15)}, {"layout": "msd"}):
        assert not same_phantom(cfg.model_copy(update=change)), change
    assert not same_phantom(cfg.model_copy(update={"tumour_free_fraction": 0.3}))
    assert not same_phantom(cfg.model_copy(update={"out": tmp_path / "missing"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "phantom.json").write_text("{not json")
    assert not same_phantom(cfg.model_copy(update={"out": tmp_path / "broken"}))
    older = json.loads((brats / "phantom.json").read_text()) | {"version": "0"}
    (tmp_path / "older").mkdir()  # another generator version draws other voxels
    (tmp_path / "older" / "phantom.json").write_text(json.dumps(older))
    assert not same_phantom(cfg.model_copy(update={"out": tmp_path / "older"}))


def test_brats_contrasts_per_modality() -> None:
    # tissue contrasts of the paper's modalities, before bias field and noise matter
    case = make_brats_case((64, 64, 32), case_rng(5, 0))
    seg = case["seg"]
    oedema, rim, core = seg == 2, seg == 4, seg == 1
    assert oedema.any() and rim.any() and core.any()
    brain = (case["t1"] > 0.7) & (seg == 0)  # white matter: bright on T1
    assert case["flair"][oedema].mean() > case["flair"][brain].mean() + 0.2
    assert case["t2"][oedema].mean() > case["t2"][brain].mean() + 0.2
    assert case["t1ce"][rim].mean() > case["t1ce"][core].mean() + 0.3
    assert case["t1"][core].mean() < case["t1"][brain].mean()
    # confounders: bright FLAIR spots outside the tumour
    spots = case["confounders"]
    assert len(spots) >= 1
    for x, y, z in spots:
        assert seg[x, y, z] == 0
        assert case["flair"][x, y, z] > case["flair"][brain].mean() + 0.2


def test_lesion_sizes_vary_with_small_ones() -> None:
    fractions = []
    for i in range(6):
        seg = make_brats_case((64, 64, 24), case_rng(0, i))["seg"] > 0
        per_slice = seg.mean(axis=(0, 1))
        fractions += per_slice[per_slice > 0].tolist()
    fractions = np.asarray(fractions)
    assert (fractions < 0.01).any()  # some lesion slices under 1% of the slice
    assert (fractions > 0.03).any()  # and larger ones
    assert fractions.size > 20


def test_msd_and_kits_layouts(tmp_path: Path) -> None:
    msd = synth_dataset(SynthConfig(layout="msd", out=tmp_path / "msd", n_cases=2, shape=SMALL))
    meta = json.loads((msd / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T2", "1": "ADC"} and meta["numTraining"] == 2
    assert meta["training"][0] == {
        "image": "./imagesTr/prostate_00.nii.gz",
        "label": "./labelsTr/prostate_00.nii.gz",
    }
    img, _ = _load(msd / "imagesTr" / "prostate_00.nii.gz")
    lab, _ = _load(msd / "labelsTr" / "prostate_00.nii.gz")
    assert img.shape == (*SMALL, 2) and lab.shape == SMALL
    assert set(np.unique(lab)) == {0, 1, 2}
    case = make_msd_case(SMALL, case_rng(0, 0))
    adc = case["image"][..., 1]
    assert adc[case["label"] == 1].mean() > adc[case["label"] == 2].mean()  # PZ vs TZ on ADC
    assert (case["label"] > 0).any(axis=(0, 1)).sum() < SMALL[2]  # only some slices

    kits = synth_dataset(
        SynthConfig(
            layout="kits", out=tmp_path / "kits", n_cases=2, shape=SMALL, tumour_free_fraction=0.0
        )
    )
    for name in ("case_00000", "case_00001"):
        ct, im = _load(kits / name / "imaging.nii.gz")
        seg, _ = _load(kits / name / "segmentation.nii.gz")
        assert ct.dtype == np.int16 and ct.shape == seg.shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg == 1).any()
        assert nib.aff2axcodes(im.affine) == ("I", "P", "L")  # KiTS21 stored orientation
    case = make_kits_case(SMALL, case_rng(0, 1))
    hu, seg = case["imaging"].astype(float), case["segmentation"]
    assert hu.min() <= -900  # air
    assert 100 < np.median(hu[seg == 1]) < 250  # contrast-enhanced kidney
    assert (seg >= 2).any()


def test_existing_output_and_bad_values(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "p"
    args = ["synth", "--out", str(out), "--n-cases", "1", "--shape", "32,32,8"]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "phantom.json").read_text()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert "--force" in result.output and result.output.count("\n") == 1
    assert (out / "phantom.json").read_text() == before
    assert runner.invoke(app, [*args, "--seed", "4", "--force"]).exit_code == 0
    assert json.loads((out / "phantom.json").read_text())["seed"] == 4
    for bad in (
        ["--n-cases", "0"],
        ["--shape", "16,16,8"],
        ["--shape", "32,32"],
        ["--layout", "nope"],
    ):
        res = runner.invoke(app, ["synth", "--out", str(tmp_path / "q"), *bad])
        assert res.exit_code == 2, bad
        assert res.output.startswith("error:") and res.output.count("\n") == 1, res.output
        assert not (tmp_path / "q" / "phantom.json").exists()
    with pytest.raises(InputError, match="too small"):
        make_brats_case((16, 16, 4), case_rng(0, 0))


@pytest.mark.parametrize("layout", ["brats", "msd", "kits"])
def test_stored_orientation_round_trips_to_canonical(tmp_path: Path, layout: str) -> None:
    shape = (40, 36, 10)  # x != y so a transposed axis order would show
    out = synth_dataset(
        SynthConfig(
            layout=layout,
            out=tmp_path / layout,
            n_cases=1,
            shape=shape,
            seed=3,
            workers=1,
            tumour_free_fraction=0.0,
        )
    )
    gen = {"brats": make_brats_case, "msd": make_msd_case, "kits": make_kits_case}[layout]
    case = gen(shape, case_rng(3, 0))
    if layout == "brats":
        path, expect = out / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz", "seg"
    elif layout == "msd":
        path, expect = out / "labelsTr" / "prostate_00.nii.gz", "label"
    else:
        path, expect = out / "case_00000" / "segmentation.nii.gz", "segmentation"
    img = nib.load(path)
    canon = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(canon.dataobj), case[expect])
    assert not np.allclose(img.affine, np.eye(4))


def test_tumour_free_fraction_applies_to_every_layout(tmp_path: Path) -> None:
    """A lesion-free case has no target voxel in every layout (msd: no gland at all);
    phantom.json says which."""
    for layout in ("brats", "msd", "kits"):
        root = synth_dataset(
            SynthConfig(
                layout=layout,
                out=tmp_path / layout,
                n_cases=4,
                shape=(48, 48, 16),
                seed=1,
                workers=1,
                tumour_free_fraction=0.5,
            )
        )
        cases = json.loads((root / "phantom.json").read_text())["cases"]
        assert sum(c["lesion_free"] for c in cases) == 2
        assert all(c["lesion_voxels"] == 0 for c in cases if c["lesion_free"]), layout
        assert any(c["lesion_voxels"] > 0 for c in cases if not c["lesion_free"]), layout
    free = make_msd_case((32, 32, 8), case_rng(0, 0), lesion=False)
    assert free["label"].max() == 0 and free["image"].std() > 0
