"""``ensemblecam prepare``: layouts, options, geometry round trip, resume, bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.config import PrepareConfig
from ensemblecam.errors import InputError
from ensemblecam.io.store import SliceStore
from ensemblecam.stages import prepare as prep
from nifti_factory import (
    brats_dataset,
    folder_dataset,
    kits_dataset,
    msd_dataset,
    write_nifti,
)

RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
#: axes permuted and flipped: original (x, y, z) -> world (-y, x, 2z)
PERMUTED_AFFINE = np.array([[0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])


def run(data: Path, out: Path, **kw: Any) -> SliceStore:
    cfg = PrepareConfig(data=data, out=out, workers=kw.pop("workers", 1), **kw)
    return SliceStore.open(prep.prepare_store(cfg, force=kw.pop("force", False)))


def canonical(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def reconstruct(store: SliceStore, case: str) -> np.ndarray:
    """Merged seg in ORIGINAL voxel space from store masks + cases.json + slices.csv only."""
    geo = store.cases[case]
    vol = np.zeros(geo["canonical_shape"], np.uint8)
    vs = np.moveaxis(vol, geo["axis"], 0)
    t = store.table
    for i in np.flatnonzero(t["case"] == case):
        s, y0, y1, x0, x1 = (int(t[k][i]) for k in ("slice", "y0", "y1", "x0", "x1"))
        h, w = vs.shape[1:]
        sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        win = store.masks[i][sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        vs[s, sy0:sy1, sx0:sx1] = np.maximum(vs[s, sy0:sy1, sx0:sx1], win)
    orig = nio.apply_orientation(vol, nio.ornt_transform(RAS, np.asarray(geo["ornt"])))
    assert list(orig.shape) == geo["shape"]
    return orig


# ----------------------------------------------------------------------------- layouts


def test_brats_default_store(tmp_path: Path) -> None:
    names = brats_dataset(tmp_path / "d", n_cases=3)
    st = run(tmp_path / "d", tmp_path / "s", workers=2)
    assert st.channels == ["flair", "t1ce", "t2"] and st.size == (24, 24)
    assert st.images.dtype == np.float16 and st.images.shape == (24, 3, 24, 24)
    assert st.masks is not None and st.masks.dtype == np.uint8
    assert st.case_names == names and sorted(st.cases) == names
    assert float(st.images.min()) == 0.0 and float(st.images.max()) == 1.0
    geo = st.cases[names[0]]
    assert geo["shape"] == [24, 24, 8] and geo["axis"] == 2 and geo["has_mask"] is True
    assert set(geo["files"]) == {"flair", "t1ce", "t2", "seg"}
    # channel 0 is flair: the canonical flair volume clipped to its own 0.5 and 99.5
    # percentiles (the whole volume's, not the slice's) and scaled to 0..1
    flair = canonical(tmp_path / "d" / names[0] / f"{names[0]}_flair.nii.gz")
    lo, hi = np.percentile(flair, [0.5, 99.5])
    want = np.clip((flair[:, :, 3] - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(st.images[3, 0], want, atol=1e-3)
    # labels = any lesion; the last case is lesion-free; slices 2..5 of the others positive
    t = st.table
    assert t["label"].tolist() == [int(2 <= s <= 5) for s in range(8)] * 2 + [0] * 8
    np.testing.assert_allclose(t["lesion_fraction"], st.masks.mean(axis=(1, 2)), atol=1e-6)
    assert (t["has_mask"] == 1).all()


@pytest.mark.parametrize("crop_box", [None, (-3, 20, 5, 30)])
def test_geometry_round_trip(tmp_path: Path, crop_box: tuple[int, ...] | None) -> None:
    """Masks put back through cases.json + slices.csv give the original merged seg."""
    brats_dataset(
        tmp_path / "d", n_cases=2, shape=(24, 20, 8), modalities=("flair",), affine=PERMUTED_AFFINE
    )
    kw: dict[str, Any] = {"modalities": ["flair"]}
    if crop_box is not None:
        kw.update(crop="fixed", crop_box=crop_box)
    st = run(tmp_path / "d", tmp_path / "s", **kw)
    for case, geo in st.cases.items():
        assert geo["canonical_shape"] == [20, 24, 8]
        seg = np.asanyarray(nib.load(geo["files"]["seg"]).dataobj)
        expected = np.isin(seg, [1, 2, 4]).astype(np.uint8)
        assert expected.any() or case.endswith("002")
        if crop_box is not None:  # only the in-slice part of the box is recoverable
            region = np.zeros(geo["canonical_shape"], bool)
            y0, y1, x0, x1 = crop_box
            region[max(y0, 0) : y1, max(x0, 0) : x1, :] = True
            region = nio.apply_orientation(region, nio.ornt_transform(RAS, np.asarray(geo["ornt"])))
            expected = expected * region
        np.testing.assert_array_equal(reconstruct(st, case), expected)


def test_msd_adc_channel(tmp_path: Path) -> None:
    names = msd_dataset(tmp_path / "d", n_cases=3)
    st = run(
        tmp_path / "d", tmp_path / "s", layout="msd", normalise="zscore_volume", dtype="float32"
    )
    assert st.channels == ["adc"] and st.images.dtype == np.float32
    adc = canonical(tmp_path / "d" / "imagesTr" / f"{names[0]}.nii.gz")[..., 1]
    nz = adc[adc != 0]
    np.testing.assert_allclose(
        st.images[:8, 0], np.moveaxis((adc - nz.mean()) / nz.std(), 2, 0), rtol=1e-4, atol=1e-4
    )
    assert st.cases[names[0]]["volume_index"] == {"adc": 1}
    assert st.manifest["prepare"]["lesion_labels"] == [1, 2]
    assert st.labels.sum() == 8


def test_kits_kidney_crop(tmp_path: Path) -> None:
    kits_dataset(tmp_path / "d", n_cases=3)
    st = run(
        tmp_path / "d", tmp_path / "s", layout="kits", crop="kidney", crop_size=(10, 12), workers=2
    )
    t = st.table
    assert st.n_slices == 3 * 8 * 2 and st.size == (10, 12) and st.channels == ["ct"]
    assert t["part"].tolist()[:4] == ["left", "right", "left", "right"]
    assert (t["slice"][0::2] == t["slice"][1::2]).all()
    for case in st.case_names:
        geo = st.cases[case]
        seg = canonical(Path(geo["files"]["seg"]))
        for part in ("left", "right"):
            rows = np.flatnonzero((t["case"] == case) & (t["part"] == part))
            y0, y1, x0, x1 = (int(t[k][rows[0]]) for k in ("y0", "y1", "x0", "x1"))
            half = slice(0, 24) if part == "left" else slice(24, 48)
            ys, xs, _ = np.nonzero(seg[half] > 0)
            ys = ys + half.start
            # window centred on the half's kidney centroid
            assert abs((y0 + y1) / 2 - ys.mean()) <= 0.5 and abs((x0 + x1) / 2 - xs.mean()) <= 0.5
    # lesion = tumour (2) + cyst (3); kidney (1) alone is not a lesion
    assert st.masks.sum() > 0
    # the factory puts the tumour at low original x; the affine flips x, so in RAS+ it
    # lies at high x: the patient's right
    assert t["label"][t["part"] == "right"].sum() == 6
    assert t["label"][t["part"] == "left"].sum() == 0


def test_folder_layout_pairs_channels_by_name(tmp_path: Path) -> None:
    """Each file carries a bright pixel at a position coding (case, modality)."""
    shape = (12, 12, 2)
    cases = ["a", "a_b", "B"]
    for c, case in enumerate(cases):
        for m, mod in enumerate(("t2", "t1")):
            vol = np.zeros(shape, np.float32)
            vol[c, 6 + m, :] = 1.0
            write_nifti(tmp_path / "d" / "images" / f"{case}_{mod}.nii.gz", vol, np.eye(4))
        seg = np.zeros(shape, np.uint8)
        seg[0, 0, 1] = c + 1  # folder: any non-zero label is a lesion
        write_nifti(tmp_path / "d" / "labels" / f"{case}.nii.gz", seg, np.eye(4))
    st = run(tmp_path / "d", tmp_path / "s", layout="folder")
    assert st.channels == ["t1", "t2"] and st.case_names == sorted(cases)
    for i in range(st.n_slices):
        c = cases.index(st.table["case"][i])
        for ch, m in ((0, 1), (1, 0)):  # t1 was written with m=1, t2 with m=0
            assert np.argwhere(st.images[i, ch] == 1).tolist() == [[c, 6 + m]]
    assert st.labels.tolist() == [0, 1] * 3


# ----------------------------------------------------------------------------- options


def test_axis_slice_range_every_nth(tmp_path: Path) -> None:
    brats_dataset(tmp_path / "d", n_cases=2, shape=(24, 20, 8), modalities=("flair",))
    st = run(
        tmp_path / "d",
        tmp_path / "s",
        modalities=["flair"],
        axis=0,
        slice_range=(3, 30),
        every_nth=5,
    )
    assert st.size == (20, 8)
    assert st.table["slice"].tolist() == [3, 8, 13, 18, 23] * 2
    st2 = run(
        tmp_path / "d", tmp_path / "s2", modalities=["flair"], slice_range=(2, 6), every_nth=2
    )
    assert st2.table["slice"].tolist() == [2, 4, 6] * 2


def test_normalisations_and_constant_slices(tmp_path: Path) -> None:
    brats_dataset(tmp_path / "d", n_cases=2, modalities=("flair",))
    for name in ("BraTS20_Training_001", "BraTS20_Training_002"):  # a blank slice
        p = tmp_path / "d" / name / f"{name}_flair.nii.gz"
        img = nib.load(str(p))
        data = img.get_fdata().astype(np.float32)
        data[..., 0] = 7.0
        write_nifti(p, data, img.affine)
    # per-slice min-max (the paper's): a constant slice gives zeros
    st = run(tmp_path / "d", tmp_path / "a", modalities=["flair"], normalise="minmax_slice")
    assert np.isfinite(st.images).all() and not st.images[0].any()
    st = run(
        tmp_path / "d",
        tmp_path / "b",
        modalities=["flair"],
        normalise="percentile",
        percentiles=(1.0, 99.0),
    )
    assert np.isfinite(st.images).all()
    assert float(st.images.min()) == 0.0 and float(st.images.max()) == 1.0
    vol = canonical(tmp_path / "d" / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz")
    lo, hi = np.percentile(vol, [1, 99])
    np.testing.assert_allclose(
        st.images[4, 0], np.clip((vol[..., 4] - lo) / (hi - lo), 0, 1), atol=1e-3
    )
    assert prep.minmax_slices(np.ones((2, 3, 3))).sum() == 0


def test_ct_window_values_and_layout_defaults(tmp_path: Path) -> None:
    kits_dataset(tmp_path / "d", n_cases=2)
    path = tmp_path / "d" / "case_00000" / "imaging.nii.gz"
    img = nib.load(str(path))
    hu_values = np.array([-1000.0, -150.0, -50.0, 50.0, 250.0, 1000.0], np.float32)
    hu = np.broadcast_to(hu_values[np.arange(img.shape[0]) % 6][:, None, None], img.shape)
    write_nifti(path, np.ascontiguousarray(hu), img.affine)
    st = run(tmp_path / "d", tmp_path / "a", layout="kits", dtype="float32")
    assert st.manifest["prepare"]["normalise"] == "ct_window"
    assert st.manifest["prepare"]["window"] == [50.0, 400.0]
    # L50 W400 = -150..250 HU: (hu + 150) / 400 clipped to [0, 1]
    by_hu = {-1000.0: 0.0, -150.0: 0.0, -50.0: 0.25, 50.0: 0.5, 250.0: 1.0, 1000.0: 1.0}
    expected = np.vectorize(by_hu.get)(canonical(path)).astype(np.float32)
    rows = np.flatnonzero(st.table["case"] == "case_00000")
    for i in rows:
        np.testing.assert_array_equal(st.images[i, 0], expected[..., int(st.table["slice"][i])])
    # another window: L40 W350 = -135..215 HU
    st = run(tmp_path / "d", tmp_path / "b", layout="kits", window=(40.0, 350.0), dtype="float32")
    by_hu = {-1000.0: 0.0, -150.0: 0.0, -50.0: 85 / 350, 50.0: 185 / 350, 250.0: 1.0, 1000.0: 1.0}
    expected = np.vectorize(by_hu.get)(canonical(path)).astype(np.float32)
    np.testing.assert_allclose(st.images[rows[3], 0], expected[..., 3], rtol=1e-6)
    # an explicit normalisation overrides the layout's default; MRI layouts: percentiles
    st = run(tmp_path / "d", tmp_path / "c", layout="kits", normalise="minmax_slice")
    assert st.manifest["prepare"]["normalise"] == "minmax_slice"
    assert float(st.images[rows[3], 0].max()) == 1.0
    assert float(st.images[rows[3], 0].min()) == 0.0
    brats_dataset(tmp_path / "b", n_cases=1, modalities=("flair",))
    st = run(tmp_path / "b", tmp_path / "e", modalities=["flair"])
    assert st.manifest["prepare"]["normalise"] == "percentile"
    for window in ((50.0, 0.0), (50.0, -10.0), (float("nan"), 400.0)):
        with pytest.raises(InputError, match=r"window .*: need a finite level and a width > 0"):
            run(tmp_path / "d", tmp_path / "f", layout="kits", window=window)
    assert not (tmp_path / "f").exists()


def test_kits_slice_labels(tmp_path: Path) -> None:
    """A slice is a lesion slice iff it holds tumour (2) or cyst (3); kidney (1) alone is not."""
    kits_dataset(tmp_path / "d", n_cases=2)  # case 0: kidneys z 1-6, tumour z 3-4, cyst z 5
    st = run(tmp_path / "d", tmp_path / "a", layout="kits")
    t = st.table
    by_case = {c: t["label"][t["case"] == c].tolist() for c in st.case_names}
    assert by_case == {"case_00000": [0, 0, 0, 1, 1, 1, 0, 0], "case_00001": [0] * 8}
    seg = canonical(tmp_path / "d" / "case_00000" / "segmentation.nii.gz")
    for i in np.flatnonzero(t["case"] == "case_00000"):
        s = int(t["slice"][i])
        np.testing.assert_array_equal(st.masks[i], np.isin(seg[..., s], (2, 3)))
        assert t["lesion_fraction"][i] == np.isin(seg[..., s], (2, 3)).sum() / seg[..., s].size
    tumour_only = run(tmp_path / "d", tmp_path / "b", layout="kits", lesion_labels=[2])
    labels = tumour_only.table["label"][tumour_only.table["case"] == "case_00000"].tolist()
    assert labels == [0, 0, 0, 1, 1, 0, 0, 0]


def test_label_merging_and_min_fraction(tmp_path: Path) -> None:
    brats_dataset(tmp_path / "d", n_cases=2, modalities=("flair",))
    full = run(tmp_path / "d", tmp_path / "a", modalities=["flair"])
    only4 = run(tmp_path / "d", tmp_path / "b", modalities=["flair"], lesion_labels=[4])
    assert 0 < only4.masks.sum() < full.masks.sum()
    frac = full.table["lesion_fraction"]
    cut = float(np.median(frac[frac > 0]))
    st = run(tmp_path / "d", tmp_path / "c", modalities=["flair"], min_lesion_fraction=cut)
    assert st.labels.tolist() == (frac > cut).astype(int).tolist()
    assert 0 < st.labels.sum() < full.labels.sum()
    with pytest.raises(InputError, match="not labels of the brats layout"):
        run(tmp_path / "d", tmp_path / "e", modalities=["flair"], lesion_labels=[3])


def test_bbox_crop(tmp_path: Path) -> None:
    brats_dataset(tmp_path / "d", n_cases=3, shape=(40, 40, 4), modalities=("flair",))
    st = run(tmp_path / "d", tmp_path / "a", modalities=["flair"], crop="bbox")
    # body ellipse bbox 33 x 29 voxels -> rounded up to multiples of 8
    assert st.size == (40, 32)
    for case in st.case_names:
        flair = canonical(Path(st.cases[case]["files"]["flair"]))
        ys, xs = np.nonzero((flair > flair.min()).any(axis=2))
        i = np.flatnonzero(st.table["case"] == case)[0]
        y0, y1, x0, x1 = (int(st.table[k][i]) for k in ("y0", "y1", "x0", "x1"))
        assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1
        assert abs((y0 + y1) / 2 - (ys.min() + ys.max() + 1) / 2) <= 0.5
    st = run(tmp_path / "d", tmp_path / "b", modalities=["flair"], crop="bbox", crop_size=(50, 10))
    assert st.size == (50, 10) and (st.table["y0"] < 0).all()  # window leaves the slice


def test_labels_csv_without_masks(tmp_path: Path) -> None:
    names = folder_dataset(tmp_path / "d", n_cases=2, shape=(8, 8, 4), labels=False)
    rows = [f"{c},{s},{int(s % 2)}" for c in names for s in range(4)]
    csv = tmp_path / "labels.csv"
    csv.write_text("case,slice,label\n" + "\n".join(rows) + "\n")
    st = run(
        tmp_path / "d",
        tmp_path / "s",
        layout="folder",
        labels_csv=csv,
        every_nth=2,
        slice_range=(1, 3),
    )
    assert st.masks is None and st.manifest["has_masks"] is False
    assert st.table["slice"].tolist() == [1, 3, 1, 3] and st.labels.tolist() == [1, 1, 1, 1]
    assert (st.table["has_mask"] == 0).all() and np.isnan(st.table["lesion_fraction"]).all()
    assert st.cases[names[0]]["has_mask"] is False
    csv.write_text("case,slice,label\n" + "\n".join(rows[:-1]) + "\n")
    with pytest.raises(InputError, match="no label for case 'case1' slice 3"):
        run(tmp_path / "d", tmp_path / "t", layout="folder", labels_csv=csv)


def test_results_independent_of_workers(tmp_path: Path) -> None:
    kits_dataset(tmp_path / "d", n_cases=3, shape=(32, 16, 4))
    kw: dict[str, Any] = {"layout": "kits", "crop": "kidney", "crop_size": (8, 8)}
    a = run(tmp_path / "d", tmp_path / "a", workers=1, **kw)
    b = run(tmp_path / "d", tmp_path / "b", workers=3, **kw)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    csv_a, csv_b = (tmp_path / n / "slices.csv" for n in ("a", "b"))
    assert csv_a.read_text() == csv_b.read_text()


def test_resume_after_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    brats_dataset(tmp_path / "d", n_cases=3, modalities=("flair",))
    ref = run(tmp_path / "d", tmp_path / "ref", modalities=["flair"])
    real = prep.process_case
    calls: list[str] = []

    def dies_on_third(plan: Any, *args: Any) -> Any:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(plan.name)
        return real(plan, *args)

    monkeypatch.setattr(prep, "process_case", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "d", tmp_path / "s", modalities=["flair"])
    partial = tmp_path / ".s.partial"
    assert not (tmp_path / "s").exists() and len(list((partial / "done").iterdir())) == 2

    def counting(plan: Any, *args: Any) -> Any:
        calls.append(plan.name)
        return real(plan, *args)

    monkeypatch.setattr(prep, "process_case", counting)
    calls.clear()
    st = run(tmp_path / "d", tmp_path / "s", modalities=["flair"])
    assert calls == ["BraTS20_Training_003"]  # the two finished cases were skipped
    np.testing.assert_array_equal(st.images, ref.images)
    np.testing.assert_array_equal(st.masks, ref.masks)
    assert (tmp_path / "s" / "slices.csv").read_text() == (
        tmp_path / "ref" / "slices.csv"
    ).read_text()
    assert not partial.exists() and not (tmp_path / "s" / "done").exists()
    # different settings: start over
    monkeypatch.setattr(prep, "process_case", dies_on_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "d", tmp_path / "t", modalities=["flair"])
    monkeypatch.setattr(prep, "process_case", counting)
    calls.clear()
    run(tmp_path / "d", tmp_path / "t", modalities=["flair"], dtype="float32")
    assert len(calls) == 3


# ----------------------------------------------------------------------------- bad inputs


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["prepare", *args])


def assert_error(result: Any, pattern: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (out / "store.json").exists()


@pytest.fixture
def brats(tmp_path: Path) -> Path:
    brats_dataset(tmp_path / "d", n_cases=2, shape=(12, 12, 4))
    return tmp_path / "d"


def test_bad_truncated_nifti(brats: Path, tmp_path: Path) -> None:
    p = brats / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "s"
    assert_error(
        cli("--data", str(brats), "--out", str(out)),
        r"BraTS20_Training_002_t1ce\.nii\.gz: unreadable",
        out,
    )
    assert not out.exists()
    p.write_bytes(b"not a nifti at all")
    assert_error(
        cli("--data", str(brats), "--out", str(out)),
        r"BraTS20_Training_002_t1ce\.nii\.gz: unreadable NIfTI",
        out,
    )


def test_bad_shape_and_affine(brats: Path, tmp_path: Path) -> None:
    p = brats / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    write_nifti(p, np.zeros((12, 12, 5), np.float32))
    out = tmp_path / "s"
    assert_error(
        cli("--data", str(brats), "--out", str(out)),
        r"_001_t2\.nii\.gz: shape \[12, 12, 5\] differs",
        out,
    )
    write_nifti(p, np.zeros((12, 12, 4), np.float32), np.diag([2.0, 1, 1, 1]))
    assert_error(cli("--data", str(brats), "--out", str(out)), r"_001_t2\.nii\.gz: affine", out)


def test_bad_missing_files_and_empty(brats: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    (tmp_path / "empty").mkdir()
    assert_error(cli("--data", str(tmp_path / "empty"), "--out", str(out)), "empty data set", out)
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--slice-range", "50,60"),
        "empty data set",
        out,
    )
    (brats / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii.gz").unlink()
    assert_error(
        cli("--data", str(brats), "--out", str(out)), r"_002_flair\.nii\.gz: missing flair", out
    )
    (brats / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz").unlink()
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--modalities", "t1"),
        r"_001_seg\.nii\.gz: missing seg",
        out,
    )


def test_bad_label_values(brats: Path, tmp_path: Path) -> None:
    p = brats / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    seg = np.asanyarray(nib.load(str(p)).dataobj).copy()
    seg[0, 0, 0] = 3
    write_nifti(p, seg)
    out = tmp_path / "s"
    assert_error(
        cli("--data", str(brats), "--out", str(out)),
        r"_002_seg\.nii\.gz: unexpected label value\(s\) 3",
        out,
    )
    write_nifti(p, seg.astype(np.float32) + 0.5)
    assert_error(cli("--data", str(brats), "--out", str(out)), r"_002_seg.*non-integer", out)


def test_bad_labels_csv(brats: Path, tmp_path: Path) -> None:
    out, csv = tmp_path / "s", tmp_path / "labels.csv"
    csv.write_text("case,slice,label\nBraTS20_Training_009,0,1\n")
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--labels-csv", str(csv)),
        r"labels\.csv: line 2: unknown case 'BraTS20_Training_009'",
        out,
    )
    csv.write_text("case,slice,label\nBraTS20_Training_001,4,1\n")
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--labels-csv", str(csv)),
        r"labels\.csv: line 2: case 'BraTS20_Training_001' has no slice 4",
        out,
    )
    csv.write_text("case,slice\nBraTS20_Training_001,1\n")
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--labels-csv", str(csv)),
        r"labels\.csv: missing column\(s\) label",
        out,
    )


def test_existing_store_and_force(brats: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    ok = cli("--data", str(brats), "--out", str(out))
    assert ok.exit_code == 0, ok.output
    before = json.loads((out / "store.json").read_text())
    res = cli("--data", str(brats), "--out", str(out), "--dtype", "float32")
    assert res.exit_code == 2 and "already holds results" in res.stderr
    assert json.loads((out / "store.json").read_text()) == before
    res = cli("--data", str(brats), "--out", str(out), "--dtype", "float32", "--force")
    assert res.exit_code == 0 and SliceStore.open(out).images.dtype == np.float32


@pytest.mark.parametrize(
    "box, msg",
    [("10,5,0,8", "invalid"), ("20,30,0,8", "entirely outside"), ("1,2,3", "expected 4")],
)
def test_bad_crop_box(brats: Path, tmp_path: Path, box: str, msg: str) -> None:
    out = tmp_path / "s"
    assert_error(
        cli("--data", str(brats), "--out", str(out), "--crop", "fixed", "--crop-box", box), msg, out
    )


def test_cli_options_and_config(brats: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prepare:\n  modalities: [t2]\n  crop: fixed\n  crop_box: [56, 184, 56, 184]\n")
    out = tmp_path / "s"
    res = cli(
        "--config",
        str(cfg),
        "--data",
        str(brats),
        "--out",
        str(out),
        "--crop-box",
        "2,10,-2,6",
        "--slice-range",
        "1,2",
        "--workers",
        "2",
    )
    assert res.exit_code == 0, res.output
    st = SliceStore.open(out)
    assert st.channels == ["t2"] and st.size == (8, 8) and st.n_slices == 4
