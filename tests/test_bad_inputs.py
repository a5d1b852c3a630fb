"""Bad inputs, resource limits and interruptions (issue 12, items 3, 4, 5 and 9).

Every refusal is checked the same way: exit status 2, exactly one stderr line
``error: ...`` naming the file or value, no traceback, nothing left behind beside the
output, and the inputs byte-for-byte unchanged (hash of the input tree).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.cli._common import INTERRUPTED, one_line_errors
from ensemblecam.config import MAX_SHOWN, CamConfig, PrepareConfig, load_config
from ensemblecam.ensemble.grid import MAX_CONFIGURATIONS, MAX_GRID_LEVELS, n_configurations
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import MapSet, write_map_set
from ensemblecam.io.split import read_splits
from ensemblecam.io.store import SliceStore
from ensemblecam.stages import prepare as prep
from ensemblecam.stages.cam import run_cam
from ensemblecam.stages.prepare import prepare_store
from nets import tiny_checkpoint
from nifti_factory import brats_dataset, msd_dataset, write_nifti
from store_factory import build_store

CLI = [sys.executable, "-c", "from ensemblecam.cli import main; main()"]


# ----------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result: Any, pattern: str) -> str:
    """Exit 2, one stderr line ``error: ...`` matching ``pattern``, no traceback."""
    stderr = result.stderr
    assert result.exit_code == 2, (result.exit_code, stderr, result.exception)
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


class Snapshot:
    """Hashes of the inputs and the listing of the output's folder, checked after a refusal."""

    def __init__(self, inputs: list[Path], out_parent: Path) -> None:
        self.inputs = {
            p: tree_hash(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in inputs
        }
        self.parent, self.before = out_parent, listing(out_parent)

    def unchanged(self) -> None:
        for p, h in self.inputs.items():
            now = tree_hash(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            assert now == h, f"{p} changed"
        assert listing(self.parent) == self.before, listing(self.parent) ^ self.before


@pytest.fixture
def brats(tmp_path: Path) -> Path:
    brats_dataset(tmp_path / "d", n_cases=2, shape=(12, 12, 4), modalities=("flair",))
    return tmp_path / "d"


def checkpoint(path: Path, store: SliceStore) -> Path:
    """A tiny untrained classifier checkpoint fitting ``store``."""
    return tiny_checkpoint(path, store.channels, store.size)


# ----------------------------------------------------------------------------- item 3


def test_output_that_is_or_lies_under_a_file(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=2, size=(16, 16))
    ck = checkpoint(tmp_path / "ck" / "best.pt", SliceStore.open(store))
    (tmp_path / "run.yaml").write_text("run: {models: [simplecnn]}\n")
    afile = tmp_path / "afile"
    afile.write_text("precious")
    commands = {
        "prepare": ["prepare", "--data", tmp_path / "nodata"],
        "train": ["train", "--store", store],
        "cam": ["cam", "--store", store, "--checkpoints", ck],
        "search": ["search", "--store", store, "--maps", tmp_path / "maps", "--members", "a"],
        "evaluate": ["evaluate", "--store", store, "--best", tmp_path / "best.json"],
    }
    snap = Snapshot([store, ck, afile], tmp_path)
    for args in commands.values():
        assert_refused(
            invoke(*args, "--out", afile),
            r"--out .*afile: exists and is not a "
            r"folder",
        )
        assert_refused(
            invoke(*args, "--out", afile / "sub" / "out"), r"afile is a file, not a folder"
        )
        snap.unchanged()
    assert_refused(invoke("run", tmp_path / "run.yaml", "--out", afile), r"afile: exists and")
    assert_refused(invoke("split", "--store", store, "--out", tmp_path), r"is a folder, not a file")
    snap.unchanged()


def test_read_only_output_folder() -> None:
    """A read-only parent folder: refused up front (as an unprivileged user if root)."""
    root = Path(tempfile.mkdtemp(prefix="ensemblecam-ro-"))
    try:
        os.chmod(root, 0o755)
        brats_dataset(root / "d", n_cases=1, shape=(8, 8, 2), modalities=("flair",))
        ro = root / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        for p in (root / "d").rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        snap = Snapshot([root / "d"], ro)
        user = (
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            if os.geteuid() == 0
            else []
        )
        for out in (ro / "store", ro / "missing" / "parent" / "store"):
            proc = subprocess.run(
                [
                    *user,
                    *CLI,
                    "prepare",
                    "--data",
                    str(root / "d"),
                    "--out",
                    str(out),
                    "--modalities",
                    "flair",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "HOME": str(root)},
                timeout=300,
            )
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.splitlines() == [
                f"error: --out {out}: cannot write in {ro} (permission denied or read-only)"
            ]
            snap.unchanged()
    finally:
        os.chmod(root / "ro", 0o755)
        shutil.rmtree(root)


def test_missing_parents_are_created(brats: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "store"
    result = invoke("prepare", "--data", brats, "--out", out, "--modalities", "flair")
    assert result.exit_code == 0, result.stderr
    assert SliceStore.open(out).n_slices == 8


def test_non_utf8_config_and_labels_csv(brats: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.yaml"
    raw = "prepare:\n  layout: brats  # caf\xe9\n".encode("latin-1")
    cfg.write_bytes(raw)
    offset = raw.index(0xE9)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_bytes(b"case,slice,label\nBraTS20_Training_001\xff,0,1\n")
    out = tmp_path / "s"
    snap = Snapshot([brats, cfg, csv_file], tmp_path)
    assert_refused(
        invoke("prepare", "--config", cfg, "--data", brats, "--out", out),
        rf"{re.escape(str(cfg))}: not UTF-8 text \(byte 0xe9 at offset "
        rf"{offset}\)",
    )
    assert_refused(invoke("search", "--config", cfg), r"latin1\.yaml: not UTF-8")
    assert_refused(
        invoke(
            "prepare",
            "--data",
            brats,
            "--out",
            out,
            "--labels-csv",
            csv_file,
            "--modalities",
            "flair",
        ),
        rf"{re.escape(str(csv_file))}: labels CSV is not UTF-8 text \(byte 0xff\)",
    )
    snap.unchanged()
    # a UTF-8 byte-order mark (spreadsheet export) is accepted
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfprepare:\n  modalities: [flair]\n")
    result = invoke("prepare", "--config", bom, "--data", brats, "--out", out)
    assert result.exit_code == 0, result.stderr


def test_two_prepares_into_one_output(tmp_path: Path) -> None:
    brats_dataset(tmp_path / "d", n_cases=12, shape=(16, 16, 6), modalities=("flair",))
    out = tmp_path / "s"
    args = [
        *CLI,
        "prepare",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(out),
        "--modalities",
        "flair",
        "--workers",
        "1",
    ]
    data_hash = tree_hash(tmp_path / "d")
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.match(
        rf"error: {re.escape(str(out))}: (in use by another ensemblecam process "
        rf"\(pid \d+|already holds results)",
        err,
    ), err
    # the winner's store is complete and equals a store prepared alone
    ref = prepare_store(
        PrepareConfig(data=tmp_path / "d", out=tmp_path / "ref", modalities=["flair"], workers=1)
    )
    assert (out / "images.npy").read_bytes() == (ref / "images.npy").read_bytes()
    assert sorted(listing(tmp_path)) == ["d", "ref", "s"]  # no lock, partial or temp left
    assert tree_hash(tmp_path / "d") == data_hash


def _fails(exc: BaseException) -> Any:
    app_ = typer.Typer()

    @app_.command()
    @one_line_errors
    def cmd() -> None:
        raise exc

    return CliRunner().invoke(app_, [])


def test_oserror_fallback_only_for_named_environment_errors() -> None:
    r = _fails(PermissionError(13, "Permission denied", "/some/out/file"))
    assert r.exit_code == 2 and r.stderr == "error: /some/out/file: Permission denied\n"
    r = _fails(OSError(28, "No space left on device", "/a", None, "/b"))
    assert r.stderr == "error: /a -> /b: No space left on device\n"
    # a bug keeps its traceback: an OSError without a file, another errno, other errors
    for exc in (
        OSError(13, "Permission denied"),
        OSError(9, "Bad file descriptor", "/x"),
        ValueError("bug"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
    ):
        r = _fails(exc)
        assert r.exit_code == 1 and r.exception is exc


def test_interruption_in_the_wrapper() -> None:
    from ensemblecam.cli._common import Terminated

    before = signal.getsignal(signal.SIGTERM)
    for exc, code in ((KeyboardInterrupt(), 130), (Terminated(), 143)):
        r = _fails(exc)
        assert (r.exit_code, r.stderr) == (code, INTERRUPTED + "\n")
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is removed


def test_check_writable_unit(tmp_path: Path) -> None:
    fsutil.check_writable(tmp_path / "a" / "b")  # missing parents: fine (created later)
    fsutil.check_writable(None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        fsutil.check_writable(tmp_path / "f")
    with pytest.raises(InputError, match="is a file, not a folder"):
        fsutil.check_writable(tmp_path / "f" / "x" / "y")
    fsutil.check_writable(tmp_path / "f", folder=False)


# ----------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_voxels_refused_or_replaced(tmp_path: Path, bad: float) -> None:
    brats_dataset(tmp_path / "d", n_cases=2, shape=(12, 12, 4), modalities=("flair",))
    f = tmp_path / "d" / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii.gz"
    img = nib.load(str(f))
    vol = np.asarray(img.dataobj, np.float32)
    finite_min = float(vol.min())
    vol[1, 2, 0] = vol[5, 5, 3] = vol[0, 0, 1] = bad
    write_nifti(f, vol, img.affine)
    out = tmp_path / "s"
    snap = Snapshot([tmp_path / "d"], tmp_path)
    assert_refused(
        invoke("prepare", "--data", tmp_path / "d", "--out", out, "--modalities", "flair"),
        rf"{re.escape(str(f))}: 3 of 576 voxels are NaN or infinite; use "
        rf"--nonfinite replace",
    )
    snap.unchanged()
    result = invoke(
        "prepare",
        "--data",
        tmp_path / "d",
        "--out",
        out,
        "--modalities",
        "flair",
        "--nonfinite",
        "replace",
    )
    assert result.exit_code == 0, result.stderr
    assert re.search(r"replaced 3 NaN/Inf voxel\(s\) in 1 file\(s\)", result.stderr)
    store = SliceStore.open(out)
    assert store.manifest["prepare"]["nonfinite_replaced"] == {str(f.resolve()): 3}
    # independent reference: the same data with those voxels set to the finite minimum
    vol[~np.isfinite(vol)] = finite_min
    write_nifti(f, vol, img.affine)
    ref = SliceStore.open(
        prepare_store(
            PrepareConfig(
                data=tmp_path / "d", out=tmp_path / "ref", modalities=["flair"], workers=1
            )
        )
    )
    assert np.isfinite(np.asarray(store.images, np.float32)).all()
    np.testing.assert_array_equal(store.images, ref.images)
    np.testing.assert_array_equal(store.masks, ref.masks)


def test_msd_image_without_the_requested_channel(tmp_path: Path) -> None:
    msd_dataset(tmp_path / "d", n_cases=2, shape=(12, 12, 4))
    f = tmp_path / "d" / "imagesTr" / "prostate_01.nii.gz"
    img = nib.load(str(f))
    write_nifti(f, np.asarray(img.dataobj)[..., 0], img.affine)  # T2 only: 3-D
    out = tmp_path / "s"
    snap = Snapshot([tmp_path / "d"], tmp_path)
    assert_refused(
        invoke("prepare", "--data", tmp_path / "d", "--layout", "msd", "--out", out),
        rf"{re.escape(str(f))}: has 1 channel \(3-D, shape \[12, 12, 4\]\), no "
        rf"channel 1 \(adc\)",
    )
    snap.unchanged()
    result = invoke(
        "prepare", "--data", tmp_path / "d", "--layout", "msd", "--out", out, "--modalities", "t2"
    )  # channel 0 of a 3-D file is the file itself
    assert result.exit_code == 0, result.stderr


def _split_file(path: Path, folds: list[dict[str, Any]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "format": "ensemblecam-splits",
                "version": 1,
                "scheme": "list",
                "seed": 0,
                "store": "s",
                "folds": folds,
            }
        )
    )
    return path


def test_split_with_a_case_in_two_parts_or_two_test_folds(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=2, size=(16, 16))
    both = _split_file(
        tmp_path / "both.json",
        [
            {
                "name": "f0",
                "train": ["case_000", "case_001", "case_002"],
                "val": [],
                "test": ["case_003", "case_001"],
            }
        ],
    )
    twice = _split_file(
        tmp_path / "twice.json",
        [
            {"name": "f0", "train": ["case_000"], "val": [], "test": ["case_001", "case_002"]},
            {"name": "f1", "train": ["case_001"], "val": [], "test": ["case_002", "case_003"]},
        ],
    )
    with pytest.raises(
        InputError,
        match=r"both\.json: case 'case_001' is in both train and "
        r"test of f0",
    ):
        read_splits(both)
    with pytest.raises(
        InputError,
        match=r"twice\.json: case 'case_002' is in the test part "
        r"of both f0 and f1",
    ):
        read_splits(twice)
    ck = checkpoint(tmp_path / "ck" / "best.pt", SliceStore.open(store))
    snap = Snapshot([store, both, twice, ck], tmp_path)
    assert_refused(
        invoke("train", "--store", store, "--splits", both, "--out", tmp_path / "t"),
        r"both\.json: case 'case_001' is in both train and test of f0",
    )
    assert_refused(
        invoke(
            "cam", "--store", store, "--splits", twice, "--checkpoints", ck, "--out", tmp_path / "m"
        ),
        r"twice\.json: case 'case_002'",
    )
    assert_refused(
        invoke(
            "search",
            "--store",
            store,
            "--splits",
            both,
            "--maps",
            tmp_path / "m",
            "--members",
            "x",
            "--out",
            tmp_path / "q",
        ),
        r"both\.json: case 'case_001'",
    )
    snap.unchanged()


def test_maps_of_another_store_are_refused(tmp_path: Path) -> None:
    a = build_store(tmp_path / "a", n_cases=6, slices_per_case=4, size=(16, 16), seed=0)
    b = build_store(tmp_path / "b", n_cases=6, slices_per_case=4, size=(16, 16), seed=1)
    sa, sb = SliceStore.open(a), SliceStore.open(b)
    assert sa.n_slices == sb.n_slices and sa.size == sb.size and sa.identity != sb.identity
    ck = checkpoint(tmp_path / "ck" / "best.pt", sa)
    run_cam(
        CamConfig(
            store=a,
            checkpoints=[ck],
            out=tmp_path / "maps",
            methods=["gradcam"],
            parts=["all"],
            tags=["m"],
            batch_size=32,
            accelerator="cpu",
        )
    )
    meta = json.loads((tmp_path / "maps" / "m__gradcam" / "meta.json").read_text())
    assert meta["store_id"] == sa.identity and meta["store_n_slices"] == sa.n_slices
    args = ["search", "--maps", tmp_path / "maps", "--members", "m__gradcam", "--grid", "0.5"]
    best = _best(tmp_path)
    snap = Snapshot([a, b, tmp_path / "maps", best], tmp_path)
    assert_refused(
        invoke(*args, "--store", b, "--out", tmp_path / "q"),
        rf"m__gradcam/meta\.json: maps were made from slice store .*a \(id "
        rf"{sa.identity}\), not from .*b \(id {sb.identity}\)",
    )
    assert_refused(
        invoke(
            "evaluate",
            "--store",
            b,
            "--maps",
            tmp_path / "maps",
            "--best",
            best,
            "--out",
            tmp_path / "e",
        ),
        r"maps were made from slice store",
    )
    snap.unchanged()
    # the same store: accepted, and the search output records the store's identity
    result = invoke(*args, "--store", a, "--out", tmp_path / "q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "q" / "best.json").read_text())["store_id"] == sa.identity


def _best(tmp_path: Path) -> Path:
    p = tmp_path / "best.json"
    p.write_text(
        json.dumps(
            {"operator": "single", "members": ["m__gradcam"], "thresholds": [0.5], "gate": None}
        )
    )
    return p


def test_old_map_sets_checked_by_size_and_slice_count(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, size=(16, 16))
    s = SliceStore.open(store)
    small = tmp_path / "maps" / "small"
    write_map_set(small, {}, np.arange(24), np.zeros((24, 8, 8), np.float16), np.zeros(24))
    write_map_set(
        tmp_path / "maps" / "long",
        {},
        np.arange(30),
        np.zeros((30, 16, 16), np.float16),
        np.zeros(30),
    )
    with pytest.raises(
        InputError,
        match=r"small/meta\.json: maps of shape \[8, 8\] were made "
        r"from another slice store",
    ):
        MapSet.open(small).check_store(s)
    with pytest.raises(
        InputError,
        match=r"long/meta\.json: maps of store slice 29 were made "
        r"from another slice store .* \(24 slices\)",
    ):
        MapSet.open(tmp_path / "maps" / "long").check_store(s)


def test_map_meta_inconsistent_with_arrays(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=4, size=(16, 16))
    member = tmp_path / "maps" / "a__gradcam"
    write_map_set(member, {}, np.arange(24), np.zeros((24, 16, 16), np.float16), np.zeros(24))
    meta = json.loads((member / "meta.json").read_text())
    (member / "meta.json").write_text(json.dumps({**meta, "n": 999}))
    snap = Snapshot([store, tmp_path / "maps"], tmp_path)
    assert_refused(
        invoke(
            "search",
            "--store",
            store,
            "--maps",
            tmp_path / "maps",
            "--members",
            "a__gradcam",
            "--out",
            tmp_path / "q",
        ),
        r"a__gradcam/meta\.json: says n 999 but the arrays hold 24; the map set is "
        r"inconsistent",
    )
    snap.unchanged()
    (member / "meta.json").write_text(json.dumps({**meta, "size": [16, 17]}))
    with pytest.raises(InputError, match=r"says size \[16, 17\] but the arrays hold \[16, 16\]"):
        MapSet.open(member)
    (member / "meta.json").write_text(json.dumps(meta))
    np.save(member / "index.npy", np.arange(24)[::-1].copy())
    with pytest.raises(InputError, match=r"index\.npy: store indices must be ascending"):
        MapSet.open(member)


# ----------------------------------------------------------------------------- item 5


def test_threshold_grid_and_search_size_caps(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=6, slices_per_case=2, size=(16, 16))
    for m in ("a__gradcam", "b__gradcam"):
        write_map_set(
            tmp_path / "maps" / m,
            {},
            np.arange(12),
            np.zeros((12, 16, 16), np.float16),
            np.zeros(12),
        )
    base = [
        "search",
        "--store",
        store,
        "--maps",
        tmp_path / "maps",
        "--out",
        tmp_path / "q",
        "--members",
        "a__gradcam,b__gradcam",
    ]
    snap = Snapshot([store, tmp_path / "maps"], tmp_path)
    assert_refused(
        invoke(*base, "--grid", "0:1e9:1e-9"),
        rf"^error: threshold grid '0:1e9:1e-9': 1e\+18 thresholds; at most "
        rf"{MAX_GRID_LEVELS:,} per member \(use a larger step\)$",
    )
    assert_refused(invoke(*base, "--grid", "0:1e308:1e-308"), r"inf thresholds; at most")
    assert_refused(
        invoke(*base, "--grid", ",".join(str(i / 20000) for i in range(20000))),
        r"threshold grid '0\.0,5e-05,[^ ]*\.\.\.[^ ]*': 20,000 thresholds; at "
        r"most 10,001",
    )
    assert_refused(
        invoke(*base, "--gate", "--gate-grid", "0:1:0.00001"),
        r"threshold grid '0:1:0.00001': 1e\+05 thresholds",
    )
    # 2 members, 2000 levels, and/or: 2 x 2000 + 2 x 2000^2 configurations
    n = n_configurations(2, 2000, ["and", "or"])
    assert n == 2 * 2000 + 2 * 2000**2 > MAX_CONFIGURATIONS
    assert_refused(
        invoke(*base, "--grid", "0.0005:1:0.0005", "--operators", "and,or"),
        rf"threshold grid of 2,000 values is too fine for this search: {n:,} "
        rf"configurations .* at most {MAX_CONFIGURATIONS:,}",
    )
    snap.unchanged()


def test_n_configurations_matches_a_search() -> None:
    from ensemblecam.ensemble.grid import subsets_of
    from ensemblecam.ensemble.search import search

    rng = np.random.default_rng(0)
    maps = [rng.random((3, 4, 4)).astype(np.float16) for _ in range(3)]
    masks = (rng.random((3, 4, 4)) > 0.5).astype(np.uint8)
    ops = ["and", "or", "min", "vote", "vote:2", "mean"]
    res = search(
        maps,
        masks,
        np.arange(3),
        "0.2,0.5,0.7",
        ops,
        subsets_of(3),
        top_k=None,
        probs=[np.full(3, 0.6)] * 3,
        gates=[0.5],
        progress=False,
    )
    assert len(res.rows()) == n_configurations(3, 3, ops, gate_levels=1)


def test_yaml_alias_bomb_size_and_long_values(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 800
    many = tmp_path / "many.yaml"
    many.write_text("x: &x 1\ny: [" + ",".join(["*x"] * 101) + "]\n")
    big = tmp_path / "big.yaml"
    big.write_text("search:\n  grid: '" + "0.5," * 300_000 + "'\n")
    long = tmp_path / "long.yaml"
    long.write_text("search:\n  chunk: '" + "9x" * 100_000 + "'\n")
    snap = Snapshot([bomb, many, big, long], tmp_path)
    assert_refused(
        invoke("search", "--config", bomb),
        r"bomb\.yaml: YAML larger than 4,194,304 values and characters once aliases "
        r"are expanded",
    )
    assert_refused(invoke("search", "--config", many), r"many\.yaml: more than 100 YAML aliases")
    assert_refused(
        invoke("search", "--config", big),
        r"big\.yaml: config file of 1,200,0\d\d bytes; at most 1,048,576 bytes",
    )
    line = assert_refused(
        invoke("search", "--config", long),
        r"long\.yaml: key 'search\.chunk': Input should be a valid integer.* "
        r"\(got '9x9x[9x]*\.\.\.[9x]*'\)$",
    )
    assert len(line) < 2 * MAX_SHOWN
    snap.unchanged()
    # a normal config with an anchor still loads
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {accelerator: &dev cpu}\ncam: {accelerator: *dev}\n")
    assert load_config(ok).cam.accelerator == "cpu"


# ----------------------------------------------------------------------------- item 9


def finished(done: Path) -> int:
    """Cases recorded as finished in a partial store (not temporary files being written)."""
    return len(list(done.glob("[!.]*.json"))) if done.is_dir() else 0


@pytest.fixture(scope="module")
def sixty_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 60-case data set (read-only for the tests) and its store prepared in-process."""
    root = tmp_path_factory.mktemp("sixty")
    brats_dataset(root / "d", n_cases=60, shape=(16, 16, 6), modalities=("flair",))
    ref = prepare_store(
        PrepareConfig(data=root / "d", out=root / "ref", modalities=["flair"], workers=1)
    )
    return root / "d", ref


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, as in a terminal. A test suite started in the
    background by a shell without job control (``cmd &``) ignores SIGINT, and a child
    inherits an ignored signal, so the signal sent below would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_prepare_says_so_and_resumes(
    sixty_cases: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sig: int,
    code: int,
) -> None:
    data, ref = sixty_cases
    data_hash = tree_hash(data)
    out = tmp_path / "s"
    args = [
        *CLI,
        "prepare",
        "--data",
        str(data),
        "--out",
        str(out),
        "--modalities",
        "flair",
        "--workers",
        "2",
    ]
    done = tmp_path / ".s.partial" / "done"
    for _attempt in range(3):  # the signal must arrive mid-run; retried if the run won
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        while proc.poll() is None and not finished(done):
            time.sleep(0.002)
        if proc.poll() is None:
            # SIGINT as Ctrl-C sends it (whole process group), SIGTERM as `kill PID`
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    assert proc.returncode == code, err
    assert err.splitlines() == [INTERRUPTED], err
    assert not out.exists() and finished(done)  # finished cases kept for the resume
    assert sorted(listing(tmp_path)) == [".s.partial"]  # lock released
    n_done = finished(done)
    # the same command again (in-process: same settings, so the same resume key); only the
    # unfinished cases are processed
    jobs: list[int] = []
    real = prep._run_parallel

    def counting(fn: Any, todo: list[Any], *rest: Any) -> Any:
        jobs.append(len(todo))
        return real(fn, todo, *rest)

    monkeypatch.setattr(prep, "_run_parallel", counting)
    resumed = prepare_store(PrepareConfig(data=data, out=out, modalities=["flair"], workers=2))
    assert resumed == out and jobs == [60 - n_done] and 0 < n_done < 60
    for name in ("images.npy", "masks.npy", "slices.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert tree_hash(data) == data_hash
    assert sorted(listing(tmp_path)) == ["s"]
