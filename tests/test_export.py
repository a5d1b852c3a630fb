"""Export: stored 2-D slices back to NIfTI in the original scan geometry (round trips)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import (
    export_cases,
    load_slice_arrays,
    slices_to_volume,
    write_case_nifti,
)
from ensemblecam.io.store import (
    MANIFEST,
    STORE_FORMAT,
    STORE_VERSION,
    SliceStore,
    write_slice_table,
)

# --------------------------------------------------------------------------- helpers

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS[:3, 3] = [12.5, -7.0, 30.0]
# first voxel axis runs inferior (-z), second anterior->posterior (-y), third left->right (+x)
PERMUTED = np.array(
    [[0.0, 0.0, 0.8, -5.0], [0.0, -1.2, 0.0, 4.0], [-2.0, 0.0, 0.0, 9.0], [0, 0, 0, 1]]
)
_c, _s = np.cos(0.2), np.sin(0.2)
OBLIQUE = np.array([[_c, -_s, 0, 1.0], [_s, _c, 0, 2.0], [0, 0, 1.5, -3.0], [0, 0, 0, 1]]) @ LPS

AFFINES = {"lps": LPS, "permuted": PERMUTED, "oblique": OBLIQUE}


def _seg(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random BraTS-like labels {0, 1, 2, 4} in blobs, with an asymmetric pattern."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    grid = np.indices(shape)
    for _ in range(4):
        centre = [rng.uniform(0, n) for n in shape]
        r = rng.uniform(1.5, 3.5)
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= r * r
        labels[ball] = rng.choice([1, 2, 4])
    labels[0, 0, 0] = 2  # marks the voxel origin: catches flips
    return labels


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def _windows(h: int, w: int, crop: str) -> list[tuple[str, int, int, int, int]]:
    """(part, y0, y1, x0, x1) windows of one canonical slice of size h x w."""
    if crop == "none":
        return [("", 0, h, 0, w)]
    if crop == "inside":
        return [("", 1, h - 2, 2, w - 1)]
    if crop == "outside":  # extends beyond the slice on every side: zero padding
        return [("", -2, h + 3, -1, w + 2)]
    if crop == "kidney":  # two overlapping windows, one partly outside
        return [("left", 0, 6, -2, 4), ("right", 2, 8, 2, 8)]
    raise AssertionError(crop)


def _build_store(
    store_dir: Path,
    segs: dict[str, Path],
    axis: int = 2,
    crop: str = "none",
    slice_range: tuple[int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[SliceStore, dict[str, np.ndarray]]:
    """Build a store the way prepare does (store.py's geometry contract), independently.

    Returns the store and, per case, the expected export: the merged lesion mask in
    original voxel order, zero outside the stored windows / slice range.
    """
    images, masks, rows, cases, expected = [], [], [], {}, {}
    for name, path in segs.items():
        img = nib.load(path)
        canon = nib.as_closest_canonical(img)
        lesion = (np.asanyarray(canon.dataobj) > 0).astype(np.uint8)
        kept = np.zeros_like(lesion)
        n_s = lesion.shape[axis]
        first, last = slice_range if slice_range else (0, n_s - 1)
        for s in range(first, min(last, n_s - 1) + 1):
            sl = np.take(lesion, s, axis=axis)
            kept_sl = np.moveaxis(kept, axis, 0)[s]
            h, w = sl.shape
            for part, y0, y1, x0, x1 in _windows(h, w, crop):
                win = np.zeros((y1 - y0, x1 - x0), np.uint8)
                sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
                win[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = sl[sy0:sy1, sx0:sx1]
                kept_sl[sy0:sy1, sx0:sx1] = sl[sy0:sy1, sx0:sx1]
                if size is not None:
                    assert win.shape == size
                masks.append(win)
                images.append(win[None].astype(np.float32))
                rows.append(
                    dict(
                        index=len(rows),
                        case=name,
                        slice=s,
                        part=part,
                        y0=y0,
                        y1=y1,
                        x0=x0,
                        x1=x1,
                        label=int(win.any()),
                        lesion_fraction=float(win.mean()),
                        has_mask=1,
                    )
                )
        cases[name] = {
            "shape": list(img.shape),
            "affine": img.affine.tolist(),
            "canonical_shape": list(canon.shape),
            "axis": axis,
            "ornt": nib.orientations.io_orientation(img.affine).tolist(),
            "files": {"seg": str(path)},
            "has_mask": True,
        }
        # back to original order by the independent route: nibabel's inverse transform
        inv = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(canon.affine),
            nib.orientations.io_orientation(img.affine),
        )
        expected[name] = nib.orientations.apply_orientation(kept, inv)
    shapes = {m.shape for m in masks}
    assert len(shapes) == 1, "test store needs one window size"
    store_dir.mkdir(parents=True)
    np.save(store_dir / "images.npy", np.stack(images).astype(np.float16))
    np.save(store_dir / "masks.npy", np.stack(masks))
    write_slice_table(store_dir / "slices.csv", rows)
    fsutil.write_json(store_dir / "cases.json", cases)
    fsutil.write_json(
        store_dir / MANIFEST,
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "n_slices": len(rows),
            "channels": ["seg"],
            "size": list(shapes.pop()),
            "dtype": "float16",
            "has_masks": True,
            "prepare": {"layout": "test"},
        },
    )
    return SliceStore.open(store_dir), expected


def _cli(args: list[str]) -> object:
    """Invoke ``ensemblecam export``; works whether or not other commands are registered."""
    group = hasattr(typer.main.get_command(app), "commands")  # a group, not a lone command
    return CliRunner().invoke(app, (["export"] if group else []) + args)


def _errors(result: object) -> list[str]:
    text = getattr(result, "stderr", "") or getattr(result, "output", "")
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- core


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("crop", ["none", "inside", "outside"])
def test_slices_to_volume_undoes_canonical_slicing_and_crop(
    tmp_path: Path, affine_name: str, axis: int, crop: str
) -> None:
    seg = _seg((9, 10, 7), seed=axis)
    path = _write_nifti(tmp_path / "c.nii.gz", seg, AFFINES[affine_name])
    store, expected = _build_store(tmp_path / "store", {"c": path}, axis=axis, crop=crop)
    rows = [
        {k: store.table[k][i] for k in ("slice", "part", "y0", "y1", "x0", "x1")}
        for i in range(store.n_slices)
    ]
    vol = slices_to_volume(store.cases["c"], rows, np.asarray(store.masks))
    assert vol.shape == seg.shape and vol.dtype == np.uint8
    np.testing.assert_array_equal(vol, expected["c"])
    if crop in ("none", "outside"):  # everything stored: exactly the merged seg
        np.testing.assert_array_equal(vol, (seg > 0).astype(np.uint8))
    else:
        assert vol.sum() < (seg > 0).sum()


def test_slices_not_given_stay_zero_and_fill_dtype(tmp_path: Path) -> None:
    seg = np.ones((4, 5, 6), np.uint8)
    path = _write_nifti(tmp_path / "c.nii.gz", seg, LPS)
    store, _ = _build_store(tmp_path / "store", {"c": path})
    geo = store.cases["c"]
    rows = [{"slice": 3, "part": "", "y0": 0, "y1": 4, "x0": 0, "x1": 5}]
    vol = slices_to_volume(
        geo, rows, np.full((1, 4, 5), 0.25, np.float32), fill=-1.0, dtype=np.float32
    )
    assert vol.dtype == np.float32
    assert (vol[..., 3] == 0.25).all()  # LPS: third axis is not flipped
    assert (np.delete(vol, 3, axis=2) == -1.0).all()
    with pytest.raises(InputError, match="crop box"):
        slices_to_volume(geo, rows, np.zeros((1, 5, 5), np.uint8))
    with pytest.raises(InputError, match="outside the volume"):
        slices_to_volume(geo, [{**rows[0], "slice": 6}], np.zeros((1, 4, 5), np.uint8))
    with pytest.raises(InputError, match="canonical shape"):
        slices_to_volume({**geo, "canonical_shape": [5, 4, 6]}, rows, np.zeros((1, 4, 5)))


def test_kidney_windows_overlap_or_for_masks_max_for_maps(tmp_path: Path) -> None:
    seg = _seg((8, 8, 5), seed=3)
    path = _write_nifti(tmp_path / "k.nii.gz", seg, PERMUTED)
    store, expected = _build_store(tmp_path / "store", {"k": path}, crop="kidney")
    assert set(store.table["part"].tolist()) == {"left", "right"}
    # masks: the overlap of the two windows must be the OR of both, which here equals the seg
    idx = np.arange(store.n_slices)
    export_cases(store, idx, np.asarray(store.masks), tmp_path / "out", "mask")
    out = nib.load(tmp_path / "out" / "k.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), expected["k"])
    # a mask set only in one window survives where the other window says 0 (OR, not overwrite)
    only_left = np.asarray(store.masks).copy()
    only_left[store.table["part"] == "right"] = 0
    only_left[store.table["part"] == "left"] = 1
    rows = [{k: store.table[k][i] for k in ("slice", "part", "y0", "y1", "x0", "x1")} for i in idx]
    vol = slices_to_volume(store.cases["k"], rows, only_left)
    canon = nib.as_closest_canonical(nib.load(path))
    left_cover = np.zeros(canon.shape, np.uint8)
    left_cover[0:6, 0:4, :] = 1
    inv = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(canon.affine), nib.orientations.io_orientation(PERMUTED)
    )
    np.testing.assert_array_equal(vol, nib.orientations.apply_orientation(left_cover, inv))
    # maps: max of the two windows where they overlap
    maps = np.where(store.table["part"] == "left", 0.3, 0.7)[:, None, None] * np.ones(
        (1, 6, 6), np.float32
    )
    vol = slices_to_volume(store.cases["k"], rows, maps.astype(np.float32))
    canon_vol = np.zeros(canon.shape, np.float32)
    canon_vol[0:6, 0:4, :] = 0.3
    canon_vol[2:8, 2:8, :] = 0.7
    np.testing.assert_allclose(vol, nib.orientations.apply_orientation(canon_vol, inv))


def test_write_case_nifti_header_and_atomic(tmp_path: Path) -> None:
    geo = {
        "shape": [3, 4, 5],
        "affine": OBLIQUE.tolist(),
        "canonical_shape": [3, 4, 5],
        "axis": 2,
        "ornt": nib.orientations.io_orientation(OBLIQUE).tolist(),
    }
    geo["canonical_shape"] = list(
        nib.orientations.apply_orientation(np.zeros((3, 4, 5)), np.asarray(geo["ornt"])).shape
    )
    vol = np.zeros((3, 4, 5), np.float64)
    vol[1, 2, 3] = 1
    p = write_case_nifti(tmp_path / "m.nii.gz", vol, geo, "mask")
    img = nib.load(p)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.affine, OBLIQUE, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), OBLIQUE, atol=1e-5)
    assert np.asanyarray(img.dataobj).sum() == 1
    vol[0, 0, 0] = 0.123
    img = nib.load(write_case_nifti(tmp_path / "m_map.nii", vol, geo, "map"))
    assert img.get_data_dtype() == np.float32
    assert np.isclose(np.asanyarray(img.dataobj)[0, 0, 0], 0.123)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.nii.gz", "m_map.nii"]
    with pytest.raises(InputError, match="does not match"):
        write_case_nifti(tmp_path / "x.nii.gz", np.zeros((3, 4, 6)), geo)
    assert not (tmp_path / "x.nii.gz").exists()


# --------------------------------------------------------------------------- CLI / files


@pytest.fixture
def two_case_store(tmp_path: Path) -> tuple[SliceStore, dict[str, np.ndarray], dict[str, Path]]:
    # PERMUTED's canonical shape is the original reversed: (7, 12, 10) -> (10, 12, 7), so
    # both cases have 10x12 canonical axial slices
    segs = {
        "lps": _write_nifti(tmp_path / "lps.nii.gz", _seg((10, 12, 7), 1), LPS),
        "perm": _write_nifti(tmp_path / "perm.nii.gz", _seg((7, 12, 10), 2), PERMUTED),
    }
    store, expected = _build_store(tmp_path / "store", segs, axis=2, crop="none")
    return store, expected, segs


def test_cli_ground_truth_round_trip(two_case_store, tmp_path: Path) -> None:
    store, expected, segs = two_case_store
    out = tmp_path / "gt"
    res = _cli(["--store", str(store.path), "--ground-truth", "--out", str(out)])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "ensemblecam-nifti-export" and set(index["cases"]) == set(segs)
    for name, seg_path in segs.items():
        orig = nib.load(seg_path)
        got = nib.load(out / index["cases"][name]["mask"])
        assert got.shape == orig.shape
        np.testing.assert_array_equal(got.affine, orig.affine)
        np.testing.assert_array_equal(
            np.asanyarray(got.dataobj), (np.asanyarray(orig.dataobj) > 0).astype(np.uint8)
        )
        np.testing.assert_array_equal(np.asanyarray(got.dataobj), expected[name])
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())


def test_cli_masks_and_maps_npz(two_case_store, tmp_path: Path) -> None:
    store, _, segs = two_case_store
    rng = np.random.default_rng(0)
    sel = np.flatnonzero(store.table["case"] == "perm")[::2]  # one case, every other slice
    masks = (rng.random((len(sel), *store.size)) > 0.5).astype(np.uint8)
    maps = rng.random((len(sel), *store.size)).astype(np.float32)
    np.savez(tmp_path / "masks.npz", index=sel.astype(np.int64), masks=masks)
    np.savez(tmp_path / "maps.npz", index=sel[::-1].astype(np.int64), maps=maps[::-1])
    out = tmp_path / "pred"
    res = _cli(
        [
            "--store",
            str(store.path),
            "--masks",
            str(tmp_path),
            "--maps",
            str(tmp_path / "maps.npz"),
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".ensemblecam",
        "index.json",
        "perm.nii.gz",
        "perm_map.nii.gz",
    ]
    rows = [{k: store.table[k][i] for k in ("slice", "part", "y0", "y1", "x0", "x1")} for i in sel]
    geo = store.cases["perm"]
    m = nib.load(out / "perm.nii.gz")
    f = nib.load(out / "perm_map.nii.gz")
    assert m.get_data_dtype() == np.uint8 and f.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(m.dataobj), slices_to_volume(geo, rows, masks))
    np.testing.assert_array_equal(np.asanyarray(f.dataobj), slices_to_volume(geo, rows, maps))
    np.testing.assert_array_equal(f.affine, nib.load(segs["perm"]).affine)
    # slices not given stay 0: the seg has lesions in them, the export must not
    assert np.asanyarray(f.dataobj).shape == nib.load(segs["perm"]).shape
    index = json.loads((out / "index.json").read_text())
    assert index["kinds"] == ["mask", "map"] and index["cases"]["perm"]["n_slices"] == len(sel)


def test_map_store_member_is_accepted(two_case_store, tmp_path: Path) -> None:
    from ensemblecam.io.mapstore import quantise, write_map_set

    store, _, _ = two_case_store
    idx = np.arange(store.n_slices)
    maps = np.random.default_rng(1).random((len(idx), *store.size)).astype(np.float32)
    write_map_set(
        tmp_path / "maps" / "m__gradcam", {}, idx, quantise(maps, "uint8"), np.zeros(len(idx))
    )
    got_idx, got = load_slice_arrays(tmp_path / "maps" / "m__gradcam", "maps")
    np.testing.assert_array_equal(got_idx, idx)
    assert np.abs(got - maps).max() <= 1 / 510 + 1e-6
    res = _cli(
        [
            "--store",
            str(store.path),
            "--maps",
            str(tmp_path / "maps" / "m__gradcam"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".ensemblecam",
        "index.json",
        "lps_map.nii.gz",
        "perm_map.nii.gz",
    ]


def _bad(
    tmp_path: Path,
    store: SliceStore,
    index: np.ndarray,
    masks: np.ndarray,
    extra: tuple[str, ...] = (),
    out: Path | None = None,
) -> object:
    np.savez(tmp_path / "bad.npz", index=index, masks=masks)
    out = out or tmp_path / "bad_out"
    return _cli(
        [
            "--store",
            str(store.path),
            "--masks",
            str(tmp_path / "bad.npz"),
            "--out",
            str(out),
            *extra,
        ]
    )


def test_bad_inputs_one_error_line_nothing_written(two_case_store, tmp_path: Path) -> None:
    store, _, _ = two_case_store
    n, (h, w) = store.n_slices, store.size
    cases = [
        (np.array([0, n]), np.zeros((2, h, w), np.uint8), "unknown store index"),
        (np.array([0, 1]), np.zeros((2, h, w + 1), np.uint8), "does not match"),
        (np.array([0, 1]), np.zeros((3, h, w), np.uint8), "does not match"),
        (np.array([1, 1]), np.zeros((2, h, w), np.uint8), "more than once"),
        (np.array([0, 1]), np.full((2, h, w), 2, np.uint8), "0/1"),
        (np.array([0.0, 1.0]), np.zeros((2, h, w), np.uint8), "integer"),
    ]
    for index, masks, message in cases:
        res = _bad(tmp_path, store, index, masks)
        assert res.exit_code == 2, res.output
        errs = _errors(res)
        assert len(errs) == 1 and message in errs[0], (message, res.output)
        assert not (tmp_path / "bad_out").exists()
        assert not (tmp_path / ".bad_out.partial").exists()
    res = _cli(
        [
            "--store",
            str(store.path),
            "--masks",
            str(tmp_path / "nope.npz"),
            "--out",
            str(tmp_path / "bad_out"),
        ]
    )
    assert res.exit_code == 2 and "not found" in _errors(res)[0]
    np.savez(tmp_path / "wrongkeys.npz", idx=np.arange(2))
    res = _cli(
        [
            "--store",
            str(store.path),
            "--masks",
            str(tmp_path / "wrongkeys.npz"),
            "--out",
            str(tmp_path / "bad_out"),
        ]
    )
    assert res.exit_code == 2 and "expected arrays" in _errors(res)[0]
    res = _cli(["--store", str(tmp_path / "nostore"), "--ground-truth", "--out", "x"])
    assert res.exit_code == 2 and len(_errors(res)) == 1
    res = _cli(["--store", str(store.path), "--out", str(tmp_path / "bad_out")])
    assert res.exit_code == 2 and "nothing to export" in _errors(res)[0]
    assert not (tmp_path / "bad_out").exists()


def test_existing_output_needs_force(two_case_store, tmp_path: Path) -> None:
    store, _, _ = two_case_store
    out = tmp_path / "out"
    good = (np.array([0, 1]), np.zeros((2, *store.size), np.uint8))
    assert _bad(tmp_path, store, *good, out=out).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = _bad(tmp_path, store, *good, out=out)
    assert res.exit_code == 2 and "--force" in _errors(res)[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    ones = (np.array([0]), np.ones((1, *store.size), np.uint8))
    res = _bad(tmp_path, store, *ones, extra=("--force",), out=out)
    assert res.exit_code == 0, res.output
    index = json.loads((out / "index.json").read_text())
    assert list(index["cases"]) == [store.table["case"][0]]
    assert index["cases"][store.table["case"][0]]["mask_voxels"] == store.size[0] * store.size[1]
    # a foreign non-empty folder is refused too
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    res = _bad(tmp_path, store, *good, out=tmp_path / "foreign")
    assert res.exit_code == 2 and (tmp_path / "foreign" / "keep.txt").exists()


# --------------------------------------------------------------------------- real prepare


def _brats_case(root: Path, name: str, seg: np.ndarray, affine: np.ndarray) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    for mod in ("t1", "t1ce", "t2", "flair"):
        img = (rng.random(seg.shape) + seg).astype(np.float32)
        _write_nifti(folder / f"{name}_{mod}.nii.gz", img, affine)
    return _write_nifti(folder / f"{name}_seg.nii.gz", seg, affine)


def _expected_in_region(
    seg_path: Path,
    axis: int,
    box: tuple[int, int, int, int] | None,
    slice_range: tuple[int, int] | None,
) -> np.ndarray:
    """Merged lesion of the seg file, zeroed outside the crop box / slice range.

    The region is built in canonical space and taken back to the original voxel order with
    nibabel's own inverse transform (independent of the export code path).
    """
    img = nib.load(seg_path)
    canon = nib.as_closest_canonical(img)
    lesion = np.isin(np.asanyarray(canon.dataobj), [1, 2, 4]).astype(np.uint8)
    region = np.zeros(canon.shape, bool)
    view = np.moveaxis(region, axis, 0)
    first, last = slice_range or (0, view.shape[0] - 1)
    y0, y1, x0, x1 = box or (0, view.shape[1], 0, view.shape[2])
    view[first : last + 1, max(y0, 0) : y1, max(x0, 0) : x1] = True
    lesion[~region] = 0
    inv = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(canon.affine), nib.orientations.io_orientation(img.affine)
    )
    return nib.orientations.apply_orientation(lesion, inv)


@pytest.mark.parametrize(
    ("axis", "crop", "box", "slice_range"),
    [(2, "none", None, None), (0, "none", None, None), (2, "fixed", (2, 9, 3, 14), (2, 6))],
)
def test_real_prepare_ground_truth_round_trip(
    tmp_path: Path,
    axis: int,
    crop: str,
    box: tuple[int, int, int, int] | None,
    slice_range: tuple[int, int] | None,
) -> None:
    from ensemblecam.config import PrepareConfig
    from ensemblecam.stages import prepare

    root = tmp_path / "brats"
    # LPS (10, 12, 9) and PERMUTED (9, 12, 10) both have canonical shape (10, 12, 9)
    segs = {
        "BraTS20_Training_001": _brats_case(
            root, "BraTS20_Training_001", _seg((10, 12, 9), 5), LPS
        ),
        "BraTS20_Training_002": _brats_case(
            root, "BraTS20_Training_002", _seg((9, 12, 10), 6), PERMUTED
        ),
    }
    cfg = PrepareConfig(
        data=root,
        layout="brats",
        out=tmp_path / "store",
        axis=axis,
        crop=crop,
        crop_box=box,
        slice_range=slice_range,
        workers=1,
    )
    store_path = prepare.prepare_store(cfg)
    out = tmp_path / "gt"
    res = _cli(["--store", str(store_path), "--ground-truth", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name, seg_path in segs.items():
        orig = nib.load(seg_path)
        got = nib.load(out / f"{name}.nii.gz")
        assert got.shape == orig.shape and got.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(got.affine, orig.affine)
        data = np.asanyarray(got.dataobj)
        expected = _expected_in_region(seg_path, axis, box, slice_range)
        np.testing.assert_array_equal(data, expected)
        if crop == "none":  # the whole seg, voxel for voxel
            merged = np.isin(np.asanyarray(orig.dataobj), [1, 2, 4]).astype(np.uint8)
            np.testing.assert_array_equal(data, merged)
        else:
            assert 0 < data.sum() < np.count_nonzero(np.asanyarray(orig.dataobj))


def test_real_prepare_kidney_crops_round_trip(tmp_path: Path) -> None:
    from ensemblecam.config import PrepareConfig
    from ensemblecam.stages import prepare

    shape = (20, 16, 6)
    x, y, _ = np.indices(shape)
    seg = np.zeros(shape, np.uint8)
    seg[(x - 5) ** 2 + (y - 8) ** 2 <= 9] = 1  # one kidney per half
    seg[(x - 14) ** 2 + (y - 8) ** 2 <= 9] = 1
    seg[(x - 5) ** 2 + (y - 7) ** 2 <= 2] = 2  # tumour
    seg[(x - 15) ** 2 + (y - 9) ** 2 <= 1] = 3  # cyst
    ct = np.where(np.abs(x - 9.5) < 9, 40.0, -1000.0).astype(np.float32)
    case = tmp_path / "kits" / "case_00000"
    case.mkdir(parents=True)
    _write_nifti(case / "imaging.nii.gz", ct, LPS)
    seg_path = _write_nifti(case / "segmentation.nii.gz", seg, LPS)
    cfg = PrepareConfig(
        data=tmp_path / "kits",
        layout="kits",
        out=tmp_path / "store",
        crop="kidney",
        crop_size=(12, 12),
        workers=1,
    )
    store = SliceStore.open(prepare.prepare_store(cfg))
    assert set(store.table["part"].tolist()) == {"left", "right"}
    out = tmp_path / "gt"
    res = _cli(["--store", str(store.path), "--ground-truth", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = nib.load(out / "case_00000.nii.gz")
    np.testing.assert_array_equal(got.affine, LPS)
    # expected: the lesion (2, 3) inside the union of the store's windows
    canon = nib.as_closest_canonical(nib.load(seg_path))
    lesion = np.isin(np.asanyarray(canon.dataobj), [2, 3])
    covered = np.zeros(canon.shape, bool)
    t = store.table
    for i in range(store.n_slices):
        covered[max(t["y0"][i], 0) : t["y1"][i], max(t["x0"][i], 0) : t["x1"][i], t["slice"][i]] = (
            True
        )
    inv = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(canon.affine), nib.orientations.io_orientation(LPS)
    )
    expected = nib.orientations.apply_orientation((lesion & covered).astype(np.uint8), inv)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), expected)
    assert np.array_equal(expected, np.isin(seg, [2, 3]))  # both lesions lie in the windows
