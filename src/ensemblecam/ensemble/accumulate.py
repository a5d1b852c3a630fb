"""Per-slice accumulation of one (member subset, operator) over gate bins: data-set
counts, slice Dice/IoU sums per slice selection, and case Dice as cases complete."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemblecam import metrics
from ensemblecam.ensemble.counting import add_rows, kept


@dataclass
class SliceAcc:
    """Running sums of one (subset, operator) over gate bins b (slice kept at gate k iff b>=k)."""

    n_bins: int
    n_combos: int
    selections: list[str]
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    sums: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    cases: dict[int, list[Any]] = field(init=False, default_factory=dict)
    case_sum: np.ndarray = field(init=False)
    case_sq: np.ndarray = field(init=False)
    n_cases: int = 0
    counts: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = dict.fromkeys(self.selections, 0)
        self.tp = np.zeros((self.n_bins, self.n_combos), np.int64)
        self.fp = np.zeros((self.n_bins, self.n_combos), np.int64)
        for sel in self.selections:
            for key in ("dice", "dice2", "iou", "iou2"):
                self.sums[f"{sel}/{key}"] = np.zeros((self.n_bins, self.n_combos))
        self.case_sum = np.zeros((self.n_bins, self.n_combos))
        self.case_sq = np.zeros((self.n_bins, self.n_combos))

    def add(
        self,
        tp: np.ndarray,
        fp: np.ndarray,
        gt_pix: np.ndarray,
        bins: np.ndarray,
        case_ids: np.ndarray,
        sel: dict[str, np.ndarray],
    ) -> None:
        keys = case_ids.astype(np.int64) * self.n_bins + bins
        order = np.argsort(keys, kind="stable")
        uk, starts = np.unique(keys[order], return_index=True)
        tp_k = np.add.reduceat(tp[order], starts, axis=0)
        fp_k = np.add.reduceat(fp[order], starts, axis=0)
        gt_k = np.add.reduceat(gt_pix[order], starts)
        b_k = uk % self.n_bins
        add_rows(self.tp, b_k, tp_k)
        add_rows(self.fp, b_k, fp_k)
        for c, b, t, f, g in zip(uk // self.n_bins, b_k, tp_k, fp_k, gt_k, strict=True):
            entry = self.cases.setdefault(
                int(c),
                [
                    np.zeros((self.n_bins, self.n_combos), np.int64),
                    np.zeros((self.n_bins, self.n_combos), np.int64),
                    0,
                ],
            )
            entry[0][b] += t
            entry[1][b] += f
            entry[2] += int(g)
        for name, mask in sel.items():
            self.counts[name] += int(mask.sum())
        lesion = gt_pix > 0
        if not lesion.any():
            return
        ltp, lfp = tp[lesion], fp[lesion]
        lfn = gt_pix[lesion][:, None] - ltp
        dice = metrics.lesion_dice(ltp, lfp, lfn)
        iou = metrics.lesion_iou(ltp, lfp, lfn)
        lbins = bins[lesion]
        for name, mask in sel.items():
            ms = mask[lesion]
            if not ms.any():
                continue
            for key, vals in (("dice", dice), ("iou", iou)):
                v = vals[ms]
                add_rows(self.sums[f"{name}/{key}"], lbins[ms], v)
                add_rows(self.sums[f"{name}/{key}2"], lbins[ms], v * v)

    def close_cases(self, done: Sequence[int]) -> None:
        for c in done:
            entry = self.cases.pop(int(c), None)
            if entry is None:
                continue
            tp = kept(entry[0])
            fp = kept(entry[1])
            d = metrics.case_dice(tp, fp, entry[2] - tp)
            self.case_sum += d
            self.case_sq += d * d
            self.n_cases += 1

    def detail_metrics(self) -> dict[str, np.ndarray]:
        """Slice- and case-level metrics, shape (n_bins, n_combos) (gate index k: bins >= k)."""
        self.close_cases(list(self.cases))
        res: dict[str, np.ndarray] = {}
        for name in self.selections:
            cnt = self.counts[name]
            suffix = "" if name == "lesion" else f"_{name}"
            for key in ("dice", "iou"):
                tot = kept(self.sums[f"{name}/{key}"])
                sq = kept(self.sums[f"{name}/{key}2"])
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = tot / cnt if cnt else np.full_like(tot, np.nan)
                    std = np.sqrt(np.maximum(sq / cnt - mean * mean, 0.0)) if cnt else mean
                res[f"slice_{key}{suffix}_mean"] = mean
                res[f"slice_{key}{suffix}_std"] = std
        cmean = self.case_sum / self.n_cases
        res["case_dice_mean"] = cmean
        res["case_dice_std"] = np.sqrt(np.maximum(self.case_sq / self.n_cases - cmean**2, 0.0))
        return res
