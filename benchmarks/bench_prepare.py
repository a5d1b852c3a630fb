"""Benchmark: ``prepare`` vs merely loading the same volumes with nibabel.

Generates the default phantom (``ensemblecam.synth``, BraTS layout, 40 cases of
96x96x64) unless ``--data`` is given, then times, with the same process count:

- reference: ``nibabel.load(f).get_fdata()`` of every file prepare reads
  (flair, t1ce, t2 and seg of every case);
- ``prepare_store`` (default settings: per-slice min-max, float16, resume records on);
- ``prepare_store`` without resume records (to show their cost).

Each is repeated ``--repeats`` times (interleaved; medians reported). The last output
line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib

from ensemblecam.config import PrepareConfig, SynthConfig
from ensemblecam.io.layouts import discover


def _load(path: str) -> float:
    return float(nib.load(path).get_fdata().ravel()[0])


def load_all(files: list[str], workers: int) -> None:
    """Reference: decompress and scale every file, ``workers`` processes."""
    if workers <= 1:
        for f in files:
            _load(f)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_load, files, chunksize=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="BraTS-layout data set (default: make phantom)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-cases", type=int, default=40)
    args = ap.parse_args()

    from ensemblecam.stages.prepare import prepare_store

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from ensemblecam.synth import synth_dataset

            t0 = time.perf_counter()
            data = synth_dataset(
                SynthConfig(out=work / "phantom", n_cases=args.n_cases, workers=args.workers)
            )
            print(f"phantom: {args.n_cases} cases in {time.perf_counter() - t0:.1f} s")
        found = discover("brats", data)
        files = [str(p) for c in found.cases for p in [*c.images.values(), c.seg]]
        t_load, t_prep, t_nockpt = [], [], []
        n_slices = 0
        for r in range(args.repeats):
            t0 = time.perf_counter()
            load_all(files, args.workers)
            t_load.append(time.perf_counter() - t0)
            for ckpt, times in ((True, t_prep), (False, t_nockpt)):
                out = work / f"store_{r}_{int(ckpt)}"
                t0 = time.perf_counter()
                prepare_store(
                    PrepareConfig(data=data, out=out, workers=args.workers), checkpoint=ckpt
                )
                times.append(time.perf_counter() - t0)
                n_slices = json.loads((out / "store.json").read_text())["n_slices"]
                shutil.rmtree(out)
            print(
                f"repeat {r}: nibabel load {t_load[-1]:.2f} s, prepare {t_prep[-1]:.2f} s, "
                f"prepare without resume records {t_nockpt[-1]:.2f} s"
            )
    load_s, prep_s, nockpt_s = (statistics.median(t) for t in (t_load, t_prep, t_nockpt))
    result = {
        "bench": "prepare",
        "cases": len(found.cases),
        "files": len(files),
        "slices": n_slices,
        "workers": args.workers,
        "repeats": args.repeats,
        "nibabel_load_s": round(load_s, 3),
        "prepare_s": round(prep_s, 3),
        "prepare_no_resume_records_s": round(nockpt_s, 3),
        "slices_per_s": round(n_slices / prep_s, 1),
        "ratio_vs_nibabel_load": round(prep_s / load_s, 3),
        "resume_records_overhead": round(prep_s / nockpt_s - 1, 3),
    }
    print(
        f"prepare: {result['slices_per_s']} slices/s; prepare / nibabel load = "
        f"{result['ratio_vs_nibabel_load']} (goal <= 1.5)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
