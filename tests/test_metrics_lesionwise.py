"""BraTS 2023 lesion-wise metrics, NSD, MONAI-backed HD95, bootstrap CIs and paired tests:
hand-computed values on tiny 3-D volumes, the challenge's procedure re-implemented by brute
force, and MONAI itself on the full arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ensemblecam import metrics as M

SHAPE = (20, 20, 20)


def cube(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def two_lesions_case() -> tuple[np.ndarray, np.ndarray]:
    """Reference: L1 = 4^3 cube (64 voxels), L2 = 4^3 cube far away, L3 = 3^3 cube (27,
    small), L4 = one voxel (small). Prediction: P1 = L1 grown by one layer along z (80
    voxels), P2 = 3^3 cube far from every lesion (false positive), P3 = L3 exactly."""
    gt = (
        cube((2, 2, 2), (6, 6, 6))
        | cube((12, 12, 12), (16, 16, 16))
        | cube((2, 14, 14), (5, 17, 17))
    )
    gt[18, 2, 18] = True
    pred = (
        cube((2, 2, 2), (6, 6, 7)) | cube((12, 2, 2), (15, 5, 5)) | cube((2, 14, 14), (5, 17, 17))
    )
    return pred, gt


def test_two_lesions_one_missed_one_false_positive() -> None:
    pred, gt = two_lesions_case()
    lw = M.lesion_wise(pred, gt)  # BraTS defaults: dilation 3, > 50 voxels, FP 374
    # L1 vs P1: Dice 2*64/(64+80) = 8/9. HD95: L1's 56 surface voxels are 0 from P1's
    # surface except its 4 top-interior ones (1); P1's 68 surface voxels are 0 except its
    # 16 top ones (1): both 95th percentiles are 1.
    assert lw.lesions[0].dice == pytest.approx(8 / 9)
    assert lw.lesions[0].hd95 == pytest.approx(1.0)
    # L2 missed: Dice 0, HD95 374. P2: one false positive. L3 (27) and L4 (1) dropped;
    # P3 matches L3 only, so it is no false positive.
    assert (lw.ref_lesions, lw.detected, lw.missed, lw.fp, lw.small) == (2, 1, 1, 1, 2)
    assert lw.dice == pytest.approx((8 / 9 + 0 + 0) / 3)
    assert lw.hd95 == pytest.approx((1 + 374 + 374) / 3)
    assert lw.sensitivity == 0.5
    # the same case without the size rule: L3 (Dice 1, HD95 0) and L4 (missed) now count
    lw0 = M.lesion_wise(pred, gt, min_volume=0)
    assert (lw0.ref_lesions, lw0.fp) == (4, 1)
    assert lw0.dice == pytest.approx((8 / 9 + 0 + 1 + 0) / 5)
    assert lw0.hd95 == pytest.approx((1 + 374 + 0 + 374 + 374) / 5)


def test_case_metrics_on_the_two_lesions_case() -> None:
    pred, gt = two_lesions_case()
    m = M.case_metrics(pred, gt, (1.0, 1.0, 1.0), nsd_tolerance=1.0)
    tp = 64 + 27
    assert m["ref_voxels"] == 64 + 64 + 27 + 1 and m["pred_voxels"] == 80 + 27 + 27
    assert m["dice"] == pytest.approx(2 * tp / (156 + 134))
    assert m["iou"] == pytest.approx(tp / (156 + 134 - tp))
    assert m["lesionwise_dice"] == pytest.approx(8 / 27)
    assert (m["fp_lesions"], m["missed_lesions"], m["lesion_sensitivity"]) == (1, 1, 0.5)


def test_empty_reference_rules() -> None:
    empty = np.zeros(SHAPE, bool)
    fp = cube((3, 3, 3), (5, 5, 5))
    both = M.lesion_wise(empty, empty)  # nothing to score
    assert (both.dice, both.hd95, both.fp, both.ref_lesions) == (1.0, 0.0, 0, 0)
    assert np.isnan(both.sensitivity)
    only_fp = M.lesion_wise(fp, empty)  # one false positive, no lesion
    assert (only_fp.dice, only_fp.hd95, only_fp.fp) == (0.0, 374.0, 1)
    missed = M.lesion_wise(empty, cube((2, 2, 2), (6, 6, 6)))
    assert (missed.dice, missed.hd95, missed.missed, missed.sensitivity) == (0.0, 374.0, 1, 0.0)
    # only a small lesion, missed: dropped, nothing left to score -> 1 / 0 as the challenge
    small = M.lesion_wise(empty, cube((2, 2, 2), (4, 4, 4)))
    assert (small.dice, small.hd95, small.small, small.ref_lesions) == (1.0, 0.0, 1, 0)
    # the other conventions on empty references
    assert M.hd95(empty, empty) == 0.0 and np.isnan(M.hd95(fp, empty))
    assert M.nsd(empty, empty, 1.0) == 1.0 and M.nsd(fp, empty, 1.0) == 0.0
    assert M.nsd(empty, fp, 1.0) == 0.0


def test_dilation_merges_and_matches() -> None:
    # two reference pieces 2 voxels apart: one lesion after 3 dilations, two without
    a, b = cube((2, 2, 2), (6, 6, 6)), cube((2, 2, 8), (6, 6, 12))
    lw = M.lesion_wise(a, a | b)
    assert lw.ref_lesions == 1 and lw.dice == pytest.approx(2 * 64 / (64 + 128))
    assert lw.hd95 == pytest.approx(M.hd95(a, a | b))
    lw0 = M.lesion_wise(a, a | b, dilation=0)
    assert (lw0.ref_lesions, lw0.detected) == (2, 1) and lw0.dice == pytest.approx(0.5)
    assert lw0.hd95 == pytest.approx((0 + 374) / 2)
    # a prediction 1 voxel beside the lesion: matched through the dilated lesion (Dice 0,
    # finite HD95, no false positive); without dilation: a miss plus a false positive
    near = cube((2, 2, 7), (6, 6, 9))
    lw = M.lesion_wise(near, a)
    assert (lw.detected, lw.fp, lw.dice) == (1, 0, 0.0)
    assert lw.hd95 == pytest.approx(M.hd95(near, a)) and lw.hd95 < 374
    lw0 = M.lesion_wise(near, a, dilation=0)
    assert (lw0.detected, lw0.fp, lw0.dice, lw0.hd95) == (0, 1, 0.0, 374.0)


def test_connectivity_volume_units_and_parameters() -> None:
    two = np.zeros(SHAPE, bool)
    two[5, 5, 5] = two[6, 6, 6] = True  # touch at a corner only
    empty = np.zeros(SHAPE, bool)
    assert M.lesion_wise(two, empty).fp == 1  # 26-connected: one component
    assert M.lesion_wise(two, empty, connectivity=6).fp == 2
    assert M.lesion_wise(two, empty, fp_hd95=100.0).hd95 == 100.0
    # 30 voxels: dropped at 1 mm^3, kept at 2 mm^3 per voxel (volume in mm^3)
    les = cube((2, 2, 2), (5, 5, 2 + 30 // 9))
    les[2, 2, 7:10] = True  # 27 + 3 = 30 voxels, one component
    assert les.sum() == 30
    assert M.lesion_wise(empty, les).ref_lesions == 0
    assert M.lesion_wise(empty, les, spacing=(1.0, 1.0, 2.0)).ref_lesions == 1
    with pytest.raises(ValueError, match="connectivity 5"):
        M.lesion_wise(two, empty, connectivity=5)


def _challenge_procedure(
    pred: np.ndarray, gt: np.ndarray, dil: int, thresh: float, spacing: tuple[float, ...]
) -> tuple[float, float, int]:
    """The challenge code's steps literally on the FULL arrays (scipy labels in place of
    cc3d, MONAI HD95 in place of DeepMind's surface distance, as documented)."""
    from monai.metrics import compute_hausdorff_distance

    s26 = ndimage.generate_binary_structure(3, 3)
    s18 = ndimage.generate_binary_structure(3, 2)
    gt_cc, _ = ndimage.label(gt, s26)
    pred_cc, _ = ndimage.label(pred, s26)
    dil_cc, n_dil = ndimage.label(ndimage.binary_dilation(gt, s18, iterations=dil), s26)
    combined = np.zeros_like(dil_cc)
    for comp in range(1, n_dil + 1):  # get_gt_seg_combined_by_dilation
        tmp = gt_cc * (dil_cc == comp)
        combined[tmp > 0] = comp
    tp_ids: list[int] = []
    pairs = []
    vox = float(np.prod(spacing))
    for comp in range(1, combined.max() + 1):
        gt_tmp = combined == comp
        roi = ndimage.binary_dilation(gt_tmp, s18, iterations=dil)
        inter = np.unique(pred_cc * roi)
        inter = inter[inter != 0]
        tp_ids += inter.tolist()
        pm = np.isin(pred_cc, inter)
        dice = 2 * (pm & gt_tmp).sum() / (pm.sum() + gt_tmp.sum())
        if pm.any():
            hd = float(
                compute_hausdorff_distance(
                    pm[None, None].astype(np.float32),
                    gt_tmp[None, None].astype(np.float32),
                    include_background=True,
                    percentile=95,
                    spacing=list(spacing),
                )[0, 0]
            )
        else:
            hd = np.inf
        pairs.append((gt_tmp.sum() * vox, dice, hd))
    fp = len(np.unique(pred_cc[np.isin(pred_cc, [*tp_ids, 0], invert=True)]))
    kept = [(d, 374.0 if np.isinf(h) else h) for v, d, h in pairs if v > thresh]
    den = len(kept) + fp
    if den == 0:
        return 1.0, 0.0, fp
    return (sum(d for d, _ in kept) / den, (sum(h for _, h in kept) + 374 * fp) / den, fp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_challenge_procedure_on_random_volumes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (18, 16, 14)
    gt = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.56
    pred = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.56
    pred |= np.roll(gt, 1, axis=0) & (rng.random(shape) < 0.9)  # partly right
    spacing = (1.0, 0.8, 2.0)
    for dil, thresh in ((3, 10.0), (1, 5.0)):
        lw = M.lesion_wise(pred, gt, spacing, dilation=dil, min_volume=thresh)
        dice, hd, fp = _challenge_procedure(pred, gt, dil, thresh, spacing)
        assert lw.fp == fp
        assert lw.dice == pytest.approx(dice, rel=1e-12)
        assert lw.hd95 == pytest.approx(hd, rel=1e-6)


def _rand_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    gt = ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.52
    pred = ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.52
    return pred, gt


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_nsd_equal_monai_on_full_arrays(seed: int) -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, gt = _rand_pair(seed)
    pred[0, :3, :3] = True  # touches the array border
    p = torch.as_tensor(pred[None, None].astype(np.float32))
    g = torch.as_tensor(gt[None, None].astype(np.float32))
    for spacing in (None, (1.0, 0.7, 2.5)):
        sp = None if spacing is None else list(spacing)
        ref = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)
        assert M.hd95(pred, gt, spacing) == float(ref[0, 0])
        for tol in (0.0, 1.0, 2.2):
            for sub in (False, True) if spacing is not None else (False,):
                ref = compute_surface_dice(
                    p, g, [tol], include_background=True, spacing=sp, use_subvoxels=sub
                )
                assert M.nsd(pred, gt, tol, spacing, subvoxels=sub) == float(ref[0, 0])


def test_hd95_and_nsd_hand_computed() -> None:
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[5, 5, 5] = b[5, 5, 6] = True  # one voxel apart along z
    assert M.hd95(a, b) == 1.0 and M.hd95(a, b, (1.0, 1.0, 2.0)) == 2.0
    assert M.nsd(a, b, 1.0) == 1.0 and M.nsd(a, b, 0.5) == 0.0
    assert M.nsd(a, b, 1.0, (1.0, 1.0, 2.0)) == 0.0 and M.nsd(a, b, 2.0, (1.0, 1.0, 2.0)) == 1.0
    # L1 (4^3) vs P1 (4x4x5): 52 of 56 and 52 of 68 surface voxels at distance 0, the rest 1
    l1, p1 = cube((2, 2, 2), (6, 6, 6)), cube((2, 2, 2), (6, 6, 7))
    assert M.nsd(p1, l1, 0.5) == pytest.approx(104 / 124, rel=1e-6)
    assert M.nsd(p1, l1, 1.0) == 1.0
    assert M.hd95(p1, l1) == 1.0


def test_bootstrap_ci() -> None:
    assert M.bootstrap_ci([0.25, 0.25, 0.25]) == (0.25, 0.25)
    lo, hi = M.bootstrap_ci([0.0, 1.0], n_boot=4000)  # means 0, .5, 1 with p 1/4, 1/2, 1/4
    assert (lo, hi) == (0.0, 1.0)
    v = np.random.default_rng(1).random(30)
    ci = M.bootstrap_ci(v, seed=3)
    assert ci == M.bootstrap_ci(v, seed=3) and ci[0] < v.mean() < ci[1]
    assert ci == M.bootstrap_ci(np.r_[v, np.nan, np.inf], seed=3)  # non-finite left out
    assert all(np.isnan(M.bootstrap_ci([np.nan])))
    # the percentile interval of the exact resampling distribution for a large n_boot:
    # mean of 30 values, CI width ~ 2 * 1.96 * sd / sqrt(30)
    assert hi - lo == 1.0
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 * v.std() / np.sqrt(30), rel=0.15)


def test_paired_wilcoxon() -> None:
    # d = 1, 2, 3, 4 (all positive): W = 0, exact two-sided p = 2 / 2^4 = 0.125
    r = M.paired_wilcoxon([2, 3, 4, 5, np.nan], [1, 1, 1, 1, 0.0])
    assert (r["n"], r["statistic"], r["p_value"]) == (4, 0.0, 0.125)
    assert r["mean_difference"] == 2.5 and r["ci95"][0] <= 2.5 <= r["ci95"][1]
    # d = 1, -2, 3, 4, 5: ranks 1, 2, 3, 4, 5; W- = 2 -> p = 2 * #{W <= 2} / 32 = 6/32
    r = M.paired_wilcoxon([1, -2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert (r["statistic"], r["p_value"]) == (2.0, pytest.approx(6 / 32))
    same = M.paired_wilcoxon([1.0, 2.0], [1.0, 2.0])  # every difference 0: undefined
    assert (same["n"], same["mean_difference"], same["p_value"]) == (2, 0.0, None)
    assert M.paired_wilcoxon([np.nan], [1.0])["n"] == 0
    # ties and a zero: d = 1, 1, -2, 3, 0; the zero dropped, ranks 1.5, 1.5, 3, 4, W+ = 7,
    # W- = 3. The 16 sign patterns give W+ = 0, 1.5, 1.5, 3, 3, 4, 4.5, 4.5, 5.5, 5.5, 6, 7,
    # 7, 8.5, 8.5, 10: 5 of them >= 7, so p = 2 * 5 / 16
    r = M.paired_wilcoxon([1, 1, -2, 3, 0], [0, 0, 0, 0, 0])
    assert (r["n"], r["statistic"], r["p_value"]) == (5, 3.0, 0.625)
    # one non-zero difference: W+ is 0 or 1 with probability 1/2 each, so p = 1
    r = M.paired_wilcoxon([0.5, 0, 0], [0, 0, 0])
    assert (r["n"], r["statistic"], r["p_value"]) == (3, 0.0, 1.0)


def test_paired_wilcoxon_equals_scipy() -> None:
    """The same statistic and p-value as scipy.stats.wilcoxon on every path it takes: exact
    (no ties), permutation (n <= 13 with ties or zeros), normal approximation (n > 13)."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    for trial in range(36):
        n = int(rng.integers(2, 20))
        d = rng.integers(-4, 5, size=n).astype(float) / 4  # ties and zeros
        if trial % 3 == 0:
            d = rng.normal(size=n)  # no ties
        if not np.any(d != 0):
            continue
        ref = wilcoxon(d, alternative="two-sided", zero_method="wilcox")
        r = M.paired_wilcoxon(d, np.zeros(n))
        assert r["statistic"] == float(ref.statistic), d
        assert r["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-12, abs=1e-15), d
    d = np.array([1.0, 2.0, 2.0, -1.0, 0.0, 3.0])
    np.testing.assert_array_equal(M.signed_rank_sum(d[d != 0]), 1.5 + 3.5 + 3.5 + 5)
    np.testing.assert_array_equal(M.signed_rank_sum(np.stack([d[d != 0], -d[d != 0]])), [13.5, 1.5])
