"""Benchmark: exact one-pass search vs the naive re-threshold loop and a plain read pass.

2 members, and/or/min/max, 11x11 grid (0.0..1.0 step 0.1), N slices of 128x128 float16
blob-like maps as .npy memmaps in a temp dir, uint8 masks. Prints figures; the last line
is one JSON object.

(a) naive loop: for each operator and threshold pair, re-threshold every slice and score
    (as the reference implementation does); timed on a subset of slices and scaled
    linearly to N (stated in the output).
(b) plain pass: read maps and masks chunk by chunk and sum them.
(c) peak traced memory (tracemalloc) of the search at N/4 and N slices.
(d) a 101x101 grid (step 0.01) vs the 11x11 grid.
(a), (b), (d) run interleaved, ``--repeat`` rounds; ratios are medians of per-round ratios
(wall clock; CPU-time ratios alongside, less sensitive to other load on the machine).
The search ranks by paper_miou with the default top_k=20 (slice/case metrics for the 20
best rows per operator, included in the time: for 11x11 from pass 1's per-slice
histograms cached on disk, for 101x101 (joint histogram larger than a slice) from a second
read of the maps).

Usage: python benchmarks/bench_search.py [--slices 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ensemblecam.ensemble import search as S
from ensemblecam.ensemble.grid import parse_grid
from ensemblecam.ensemble.operators import apply_config

H = W = 128
OPS = ["and", "or", "min", "max"]


def make_data(folder: Path, n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Blob-like maps (smoothed lesion + noise, per-slice min-max) and masks as memmaps."""
    rng = np.random.default_rng(seed)
    bank = 64
    yy, xx = np.mgrid[0:H, 0:W]
    gts = np.zeros((bank, H, W), np.uint8)
    maps = np.zeros((2, bank, H, W), np.float16)
    for b in range(bank):
        if rng.random() < 0.5:
            r = rng.uniform(5, 25)
            cy, cx = rng.uniform(r, H - r, 2)
            gts[b] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        for i, sigma in enumerate((4.0, 8.0)):
            m = gaussian_filter(gts[b] + 0.5 * rng.random((H, W)), sigma)
            maps[i, b] = (m - m.min()) / max(m.max() - m.min(), 1e-6)
    mm = [
        np.lib.format.open_memmap(folder / f"m{i}.npy", "w+", np.float16, (n, H, W))
        for i in range(2)
    ]
    gt = np.lib.format.open_memmap(folder / "gt.npy", "w+", np.uint8, (n, H, W))
    for s in range(0, n, 1000):
        e = min(s + 1000, n)
        pick = rng.integers(0, bank, e - s)
        shift = rng.integers(-20, 20, 2)
        gt[s:e] = np.roll(gts[pick], shift, axis=(1, 2))
        for i in range(2):
            mm[i][s:e] = np.roll(maps[i, pick], shift, axis=(1, 2))
    for a in [*mm, gt]:
        a.flush()
    return (
        [np.load(folder / f"m{i}.npy", mmap_mode="r") for i in range(2)],
        np.load(folder / "gt.npy", mmap_mode="r"),
    )


def run_search(maps, gt, cases, grid) -> S.SearchResult:
    return S.search(maps, gt, cases, grid, OPS, [(0, 1)], progress=False, chunk=128)


def plain_pass(maps, gt, chunk: int = 128) -> float:
    tot = 0.0
    for s in range(0, len(gt), chunk):
        tot += float(np.asarray(gt[s : s + chunk]).sum(dtype=np.int64))
        for m in maps:
            tot += float(np.asarray(m[s : s + chunk]).sum(dtype=np.float32))
    return tot


def naive(maps, gt, grid, n_sub: int) -> float:
    """Re-threshold and score every (operator, t1, t2) on the first n_sub slices."""
    m = [np.asarray(a[:n_sub]) for a in maps]
    g = np.asarray(gt[:n_sub]).astype(bool)
    best = -1.0
    for op in OPS:
        for t1 in grid:
            for t2 in grid:
                pred = apply_config(m, {"operator": op, "thresholds": [t1, t2], "gate": None})
                tp = np.sum(pred & g)
                fp = np.sum(pred & ~g)
                fn = np.sum(~pred & g)
                tn = pred.size - tp - fp - fn
                miou = 0.5 * (tp / max(tp + fp + fn, 1) + tn / max(tn + fp + fn, 1))
                best = max(best, miou)
    return best


def timed(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Run the functions in turn, ``repeat`` rounds: (wall times, CPU times) per name.

    Interleaving keeps each round's ratios under the same machine load (other processes
    share the 2 cores); the figures are medians over rounds.
    """
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def med_ratio(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-slices", type=int, default=200)
    args = ap.parse_args()
    n = args.slices
    grid11 = parse_grid("0:1:0.1")
    grid101 = parse_grid("0:1:0.01")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        maps, gt = make_data(Path(tmp), n)
        print(
            f"data: 2 members x {n} slices of {H}x{W} float16 + uint8 masks "
            f"({time.perf_counter() - t0:.1f} s to generate)"
        )
        cases = np.arange(n) // 128
        plain_pass(maps, gt)  # warm the page cache
        wall, cpu = interleaved(
            {
                "plain": lambda: plain_pass(maps, gt),
                "s11": lambda: run_search(maps, gt, cases, grid11),
                "s101": lambda: run_search(maps, gt, cases, grid101),
            },
            args.repeat,
        )
        t_plain = statistics.median(wall["plain"])
        t_search = statistics.median(wall["s11"])
        t_search101 = statistics.median(wall["s101"])
        over_plain = med_ratio(wall["s11"], wall["plain"])
        g101 = med_ratio(wall["s101"], wall["s11"])
        print(
            f"per round (wall s): plain {[round(v, 2) for v in wall['plain']]}, 11x11 "
            f"{[round(v, 2) for v in wall['s11']]}, 101x101 "
            f"{[round(v, 2) for v in wall['s101']]}"
        )
        t_naive_sub = timed(lambda: naive(maps, gt, grid11, args.naive_slices), 1)
        t_naive = t_naive_sub * n / args.naive_slices
        print(
            f"plain read pass: {t_plain:.2f} s; search 11x11: {t_search:.2f} s "
            f"(x{over_plain:.2f} of the plain pass, median of per-round ratios; CPU time "
            f"x{med_ratio(cpu['s11'], cpu['plain']):.2f})"
        )
        print(
            f"naive loop on {args.naive_slices} slices: {t_naive_sub:.2f} s, scaled "
            f"linearly to {n}: {t_naive:.0f} s -> speed-up x{t_naive / t_search:.0f}"
        )
        print(
            f"search 101x101: {t_search101:.2f} s (x{g101:.2f} of 11x11; CPU time "
            f"x{med_ratio(cpu['s101'], cpu['s11']):.2f})"
        )
        peaks = {}
        for k in (n // 4, n):
            tracemalloc.start()
            run_search([a[:k] for a in maps], gt[:k], cases[:k], grid11)
            peaks[k] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            print(f"peak traced memory at {k} slices: {peaks[k]:.1f} MiB")
        res = run_search(maps, gt, cases, grid11)
        best = res.ranked("paper_miou")[0]
        print(f"best: {best['operator']} {best['thresholds']} paper_miou {best['paper_miou']:.4f}")
    print(
        json.dumps(
            {
                "bench": "search",
                "slices": n,
                "size": [H, W],
                "members": 2,
                "operators": OPS,
                "grid": "11x11",
                "plain_pass_s": round(t_plain, 3),
                "search_s": round(t_search, 3),
                "search_over_plain": round(over_plain, 2),
                "search_over_plain_cpu": round(med_ratio(cpu["s11"], cpu["plain"]), 2),
                "naive_s_scaled": round(t_naive, 1),
                "naive_measured_slices": args.naive_slices,
                "speedup_vs_naive": round(t_naive / t_search, 1),
                "search_101x101_s": round(t_search101, 3),
                "grid101_over_grid11": round(g101, 2),
                "grid101_over_grid11_cpu": round(med_ratio(cpu["s101"], cpu["s11"]), 2),
                "repeats": args.repeat,
                "peak_mib": {str(k): round(v, 1) for k, v in peaks.items()},
                "best": {k: best[k] for k in ("operator", "thresholds", "paper_miou")},
            }
        )
    )


if __name__ == "__main__":
    main()
