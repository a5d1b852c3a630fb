"""Same seed and versions on the same machine: byte-identical results.

Across machines, results differ only where the libraries pick other CPU kernels (see
``ensemblecam.environment``); these tests pin down everything ensemblecam itself controls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ensemblecam import environment, pipeline
from ensemblecam.config import Config, SynthConfig
from ensemblecam.synth import synth_dataset
from test_pipeline import TINY

#: files that record wall-clock times or timestamps (logs), not results
TIMED = {"stage.json", "run.json", "last.pt", "metrics.csv", "train.json", "unet.json"}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in TIMED
    }


def test_pipeline_twice_gives_identical_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Store, split, checkpoints (best.pt), maps, search, evaluations, results and exported
    NIfTI masks of two runs of one configuration are byte-identical; resuming a run folder
    made with other package versions warns in one line naming them."""
    phantom = synth_dataset(
        SynthConfig(out=tmp_path / "ph", n_cases=6, shape=(48, 48, 12), seed=3, workers=1)
    )
    data = json.loads(json.dumps(TINY))
    data["prepare"]["data"] = str(phantom)
    # one fold: the other runs the same code on other cases
    data["run"].update(
        out=str(tmp_path / "run"), pseudo_unet=False, final="auto", report=False, folds=[0]
    )
    cfg = Config.model_validate(data)
    first = pipeline.run_pipeline(cfg, progress=False)
    shutil.move(first, tmp_path / "first")
    second = pipeline.run_pipeline(cfg, progress=False)  # same path: paths inside files agree
    a, b = _hashes(tmp_path / "first"), _hashes(second)
    for kind in (
        "store/",
        "split/",
        "/best.pt",
        "/maps/",
        "/search/",
        "/eval/",
        "export/",
        "results.json",
    ):
        assert any(kind in k for k in a), kind  # each kind of output is compared
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # without self-training: no such row, and the ensemble's masks are the final ones
    res = json.loads((second / "results.json").read_text())
    assert "pseudo_unet" not in [r["kind"] for r in res["rows"]]
    assert res["final"]["method"] == "ensemble"
    assert json.loads((second / "export" / "index.json").read_text())["source"]["method"] == (
        "ensemble"
    )
    assert not (second / "export_ensemble").exists()
    record = json.loads((second / "run.json").read_text())
    record["environment"]["packages"]["numpy"] = "1.0.0"
    (second / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    pipeline.run_pipeline(cfg, progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and f"numpy 1.0.0 -> {np.__version__}" in err[0]


_SYNTH = """
import sys
from pathlib import Path
from ensemblecam.config import SynthConfig
from ensemblecam.synth import synth_dataset
synth_dataset(SynthConfig(layout=sys.argv[2], out=Path(sys.argv[1]), n_cases=3,
                          shape=(40, 40, 8), seed=5, workers=int(sys.argv[3])))
"""


@pytest.mark.parametrize("layout", ["brats", "kits"])
def test_phantom_independent_of_threads_and_workers(tmp_path: Path, layout: str) -> None:
    """One process with one BLAS/OpenMP thread and two worker processes with the machine's
    default thread count write the same voxel arrays and affines."""
    runs = {"serial": ("1", "1"), "parallel": ("2", None)}
    arrays: dict[str, dict[str, bytes]] = {}
    for name, (workers, threads) in runs.items():
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        if threads is not None:
            env |= {
                k: threads for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            }
        out = tmp_path / name
        subprocess.run(
            [sys.executable, "-c", _SYNTH, str(out), layout, workers],
            env=env,
            check=True,
            capture_output=True,
        )
        arrays[name] = {}
        for f in sorted(out.rglob("*.nii.gz")):
            img = nib.load(f)
            arrays[name][str(f.relative_to(out))] = (
                np.asarray(img.dataobj).tobytes() + np.asarray(img.affine).tobytes()
            )
    assert arrays["serial"] and arrays["serial"] == arrays["parallel"]


def test_run_record_names_versions_threads_and_lock(tmp_path: Path) -> None:
    rec = environment.environment_record()
    assert rec["packages"]["torch"] and rec["packages"]["numpy"] == np.__version__
    assert rec["threads"]["torch_threads"] >= 1
    lock = environment.lock_file()
    assert lock is not None  # tests run from the source checkout, which has the lock
    assert rec["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    old = json.loads(json.dumps(rec))
    old["packages"]["numpy"] = "1.0.0"
    old["cpu"]["torch_cpu_capability"] = (
        "AVX2" if rec["cpu"]["torch_cpu_capability"] != "AVX2" else "AVX512"
    )
    assert environment.changes(old, rec) == [
        f"numpy 1.0.0 -> {np.__version__}",
        f"CPU kernels {old['cpu']['torch_cpu_capability']} -> {rec['cpu']['torch_cpu_capability']}",
    ]
    assert environment.changes(rec, rec) == []
