"""Metric conventions: hand-computed values and a MONAI cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from ensemblecam import metrics as M


def test_hand_computed_two_slices():
    # slice 0: gt [[1,1],[0,0]], pred [[1,0],[1,0]] -> TP1 FP1 FN1 TN1
    # slice 1: gt all 0,          pred [[0,0],[0,1]] -> TP0 FP1 FN0 TN3
    gt = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], bool)
    pred = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 1]]], bool)
    tp, fp, fn, tn = M.confusion(pred, gt)
    assert (tp, fp, fn, tn) == (1, 2, 1, 4)
    d = M.dataset_metrics(tp, fp, fn, tn)
    assert d["background_iou"] == pytest.approx(4 / 7)  # TN/(TN+FP+FN)
    assert d["lesion_iou"] == pytest.approx(1 / 4)  # TP/(TP+FP+FN)
    assert d["paper_miou"] == pytest.approx((4 / 7 + 1 / 4) / 2)  # 23/56
    assert d["paper_dsc"] == pytest.approx(2 * (23 / 56) / (1 + 23 / 56))
    assert d["lesion_dice"] == pytest.approx(2 / 5)  # 2TP/(2TP+FP+FN)
    # per slice: only slice 0 is a lesion slice: dice 2/4, iou 1/3
    stp, sfp, sfn, _ = M.confusion(pred, gt, axis=(1, 2))
    sel = M.slice_selection(stp + sfn, 4, min_lesion_fraction=0.6, probs=np.array([0.7, 0.9]))
    s = M.slice_metrics(stp, sfp, sfn, sel)
    assert s["slice_dice_mean"] == 0.5 and s["slice_iou_mean"] == pytest.approx(1 / 3)
    assert s["slice_dice_std"] == 0.0 and s["n_slices"] == 1
    assert s["n_slices_large"] == 0 and np.isnan(s["slice_dice_large_mean"])  # 2/4 < 0.6
    assert s["n_slices_correct"] == 1
    # one case: 3-D dice = 2/5; empty vs empty = 1
    assert M.case_dice(np.array([1, 0]), np.array([2, 0]), np.array([1, 0])).tolist() == [0.4, 1]


def test_empty_prediction_anchor():
    gt = np.zeros((4, 8, 8), bool)
    gt[0, 2:5, 2:5] = True
    tp, fp, fn, tn = M.confusion(np.zeros_like(gt), gt)
    assert M.lesion_iou(tp, fp, fn) == 0
    assert M.paper_miou(tp, fp, fn, tn) == pytest.approx(M.background_iou(tp, fp, fn, tn) / 2)


def test_hd95_simple_and_empty():
    a = np.zeros((1, 10, 10), bool)
    b = np.zeros((1, 10, 10), bool)
    a[0, 2, 2] = True
    b[0, 2, 5] = True
    assert M.hd95(a, b) == 3.0
    assert M.hd95(a, b, spacing=(1.0, 1.0, 2.0)) == 6.0
    assert M.hd95(np.zeros_like(a), np.zeros_like(b)) == 0.0
    assert np.isnan(M.hd95(a, np.zeros_like(b)))


def test_monai_cross_check():
    import torch
    from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_iou

    rng = np.random.default_rng(3)
    pred = rng.random((6, 12, 12)) < 0.4
    gt = rng.random((6, 12, 12)) < 0.3
    tp, fp, fn, _ = M.confusion(pred, gt, axis=(1, 2))
    p = torch.as_tensor(pred[:, None].astype(np.float32))
    g = torch.as_tensor(gt[:, None].astype(np.float32))
    dm = DiceMetric(include_background=True, reduction="none")
    dm(p, g)
    np.testing.assert_allclose(M.lesion_dice(tp, fp, fn), dm.aggregate().numpy().ravel(), rtol=1e-6)
    np.testing.assert_allclose(
        M.lesion_iou(tp, fp, fn), compute_iou(p, g).numpy().ravel(), rtol=1e-6
    )
    # 3-D case dice: one volume
    vol = DiceMetric(include_background=True, reduction="none")
    vol(p.permute(1, 0, 2, 3)[None], g.permute(1, 0, 2, 3)[None])
    assert M.case_dice(tp.sum(), fp.sum(), fn.sum()) == pytest.approx(
        float(vol.aggregate()), rel=1e-6
    )
    # paper_miou = MONAI mean IoU over the two classes of the pooled volume
    onehot_p = torch.stack([1 - p.flatten(), p.flatten()])[None, :, :, None]
    onehot_g = torch.stack([1 - g.flatten(), g.flatten()])[None, :, :, None]
    miou = compute_iou(onehot_p, onehot_g, include_background=True).mean()
    assert M.paper_miou(*M.confusion(pred, gt)) == pytest.approx(float(miou), rel=1e-6)
    # HD95 of the (6, 12, 12) volume, MONAI tensors (batch, channel, D, H, W)
    hd = compute_hausdorff_distance(p[:, 0][None, None], g[:, 0][None, None], percentile=95)
    assert M.hd95(pred, gt) == pytest.approx(float(hd), rel=1e-6)


def test_label_coverage_hand_computed() -> None:
    seg = np.array([[0, 0, 1, 1], [2, 2, 2, 3]])  # 3 is a label the mask never marks
    pred = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert M.label_coverage(pred, seg) == {0: (2, 1), 1: (2, 1), 2: (3, 2), 3: (1, 0)}
    # float label maps (as NIfTI files often hold) and any non-zero mask value
    assert M.label_coverage(pred * 255, seg.astype(np.float32)) == {
        0: (2, 1), 1: (2, 1), 2: (3, 2), 3: (1, 0)
    }  # fmt: skip
    with pytest.raises(ValueError, match="differ"):
        M.label_coverage(pred[:, :3], seg)
