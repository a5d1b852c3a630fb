"""Exact one-pass search over ensemble operators x per-member thresholds x member subsets.

Semantics (DESIGN.md, "Ensemble operators"): a member's map m (dequantised to float32,
``mapstore.dequantise``) is binarised as ``m > t`` with t a float32 grid value.

- ``and`` / ``or``: intersection / union of the member masks; ``vote:k``: >= k of the
  members (``vote`` alone: majority, k = m//2 + 1); ``and`` = vote:m, ``or`` = vote:1.
- ``min`` (the paper's '<') / ``max`` ('>'): per slice, the member mask with the fewest /
  most positive pixels; ties go to the first member (in the order given).
- ``mean``: ``mean(maps) > t`` with mean = (m_1 + ... + m_M) / M in float32, summed in
  member order; one threshold.
- a subset of one member is the operator ``single``.
- gating (optional): a slice whose classifier probability is below the gate threshold g
  gets an empty mask. The probability is the MEAN of the configuration's members'
  ``probs.npy`` (for one member, its own). Gate "none" (no gating) is always searched too.

How it is exact. Each map is quantised once to its grid level
``level = #{j: t_j < m}`` (so ``m > t_j <=> level > j``; float16 and uint8 maps go
through a lookup table over all their bit patterns: one take). Reverse cumulative sums
over a level axis turn "level == l" counts into "level > j" counts, so one histogram
gives the TP/FP of every threshold at once; intersections over member subsets U give N_U,
and "at least k of m" = sum_{|U|>=k} (-1)^(|U|-k) C(|U|-1, k-1) N_U (inclusion-exclusion).

Pass 1 (every configuration, data-set metrics ``DATASET_METRICS``): per chunk one
bincount of (gate bin, member levels..., gt) per subset, accumulated over all chunks (its
cost after the bincount does not depend on the number of slices); ``min``/``max`` from
per-slice per-member positive counts: member i wins on a half-line of every other
member's thresholds, so a histogram over (bin, t_i, half-line bounds) and prefix sums
give the data-set counts in O(slices x L) instead of O(slices x L^m) (``_MinMaxAcc``).

Slice/case metrics need per-slice counts. With a slice/case ``objective`` or
``top_k=None`` they are computed for every combination in pass 1 (O(slices x L^m)).
Otherwise (default, ``top_k=20``) pass 1 ranks by the data-set objective and the top-K
pass computes them for the top-K configurations of each multi-member (subset, operator):
the thresholds they use form a coarse grid per member whose levels keep ``m > t`` exact,
and one per-slice joint histogram of coarse levels gives every needed per-slice count.
That histogram comes, without reading the maps again, from the per-slice histograms pass 1
builds anyway (the joint one when (L+1)^m * 2 * 4 <= pixels per slice; per-member counts
for subsets with only ``min``/``max``), streamed to temporary np.memmap files when they
fit ``SLICE_CACHE_BYTES`` on disk, and summed into coarse levels chunk by chunk; other
subsets' maps are read a second time. Both ways give identical rows. Rows outside the
top-K have slice/case metrics NaN (``rows()``: None, blank in ranking.csv), never an
estimate; one-threshold candidates (single, mean) are always exact for every row. RAM
depends on the chunk and the grid, not on the number of slices.

Limits, refused up front with the numbers in the message: a grid (thresholds, gates) of
more than ``MAX_GRID_LEVELS`` = 10,001 values, and a search of more than
``MAX_CONFIGURATIONS`` = 1,000,000 configurations (``n_configurations``: operators x
member subsets x thresholds per member x gates; each becomes a row of ranking.csv).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ensemblecam import metrics
from ensemblecam.config import SearchConfig, short_repr
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import dequantise

BASE_OPERATORS = ("and", "or", "min", "max", "vote", "mean")
DEFAULT_GRID = "0:0.9:0.1"

def objective_names(min_lesion_fraction: float = 0.0, with_correct: bool = True) -> list[str]:
    """Metrics that can rank configurations (all higher-is-better)."""
    names = ["paper_miou", "paper_dsc", "background_iou", "lesion_iou", "lesion_dice",
             "slice_dice_mean", "slice_iou_mean", "case_dice_mean"]
    if min_lesion_fraction > 0:
        names += ["slice_dice_large_mean", "slice_iou_large_mean"]
    if with_correct:
        names += ["slice_dice_correct_mean", "slice_iou_correct_mean"]
    return names


# --------------------------------------------------------------------------- parsing


#: most thresholds in one grid (per member; also the gate grid): 0:1:0.0001 fits
MAX_GRID_LEVELS = 10_001
#: most configurations (operator x member subset x thresholds x gate) one search scores;
#: every one becomes a row of ranking.csv (about 1 KB of RAM per row while ranked)
MAX_CONFIGURATIONS = 1_000_000


def parse_grid(spec: str | Sequence[float]) -> np.ndarray:
    """Threshold grid: ``"start:stop:step"`` (inclusive) or ``"0.1,0.5"`` or a sequence.

    Returned as sorted unique float32 values (the dtype maps are compared in); more than
    ``MAX_GRID_LEVELS`` values is refused before any is generated.
    """
    shown = short_repr(spec)
    if isinstance(spec, str):
        try:
            if ":" in spec:
                start, stop, step = (float(v) for v in spec.split(":"))
                if not all(math.isfinite(v) for v in (start, stop, step)):
                    raise ValueError("start, stop and step must be finite")
                if step <= 0 or stop < start:
                    raise ValueError("need step > 0 and stop >= start")
                steps = (stop - start) / step
                if not steps < MAX_GRID_LEVELS:  # also inf (1e308 / 1e-308)
                    raise InputError(f"threshold grid {shown}: {steps + 1:.4g} thresholds; "
                                     f"at most {MAX_GRID_LEVELS:,} per member (use a larger "
                                     f"step)")
                n = math.floor(steps + 1e-9) + 1
                values = [round(start + i * step, 10) for i in range(n)]
            else:
                values = [float(v) for v in spec.split(",") if v.strip()]
        except InputError:
            raise
        except ValueError as exc:
            raise InputError(f"threshold grid {shown}: expected start:stop:step or a list "
                             f"of numbers ({short_repr(str(exc))})") from exc
    else:
        values = [float(v) for v in spec]
    grid = np.unique(np.asarray(values, dtype=np.float32))
    if grid.size == 0 or not np.all(np.isfinite(grid)):
        raise InputError(f"threshold grid {shown}: empty or not finite")
    if grid.size > MAX_GRID_LEVELS:
        raise InputError(f"threshold grid {shown}: {grid.size:,} thresholds; at most "
                         f"{MAX_GRID_LEVELS:,} per member")
    return grid


def n_configurations(n_members: int, levels: int, operators: Sequence[str],
                     max_members: int | None = None, gate_levels: int = 0) -> int:
    """Configurations a search scores: for every member subset U (up to ``max_members``),
    ``levels`` thresholds if |U| = 1, else per distinct operator ``levels`` (mean) or
    ``levels ** |U|``; times ``gate_levels + 1`` (no gate, then each gate threshold)."""
    total = 0
    top = n_members if max_members is None else min(max_members, n_members)
    for size in range(1, top + 1):
        if size == 1:
            per = levels
        else:
            kinds = {parse_operator(op, size) for op in operators}
            per = sum(levels if kind == "mean" else levels**size for kind, _ in kinds)
        total += math.comb(n_members, size) * per
    return total * (gate_levels + 1)


def check_search_size(n: int, levels: int) -> None:
    """Refuse a search of more than ``MAX_CONFIGURATIONS`` configurations."""
    if n > MAX_CONFIGURATIONS:
        raise InputError(
            f"threshold grid of {levels:,} values is too fine for this search: {n:,} "
            f"configurations (operators x member subsets x thresholds per member x gates); "
            f"at most {MAX_CONFIGURATIONS:,}: use a coarser grid, fewer operators or "
            f"--max-members")


def parse_operator(name: str, m: int) -> tuple[str, int]:
    """Operator name -> (kind, k). ``vote:k`` or ``vote`` (majority); unknown is an error."""
    base, _, arg = name.partition(":")
    if base not in BASE_OPERATORS or (arg and base != "vote"):
        raise InputError(f"operator {name!r}: expected one of {', '.join(BASE_OPERATORS)} "
                         f"(vote:k for k of M)")
    if base == "vote":
        try:
            k = int(arg) if arg else m // 2 + 1
        except ValueError as exc:
            raise InputError(f"operator {name!r}: k must be an integer") from exc
        if not 1 <= k <= m:
            raise InputError(f"operator {name!r}: k must be within 1..{m}")
        return "vote", k
    return base, m if base == "and" else 1


# --------------------------------------------------------------------------- levels


def level_lut(grid: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Lookup table bit-pattern -> level for uint8/float16 maps (None for other dtypes)."""
    grid = np.asarray(grid, dtype=np.float32)
    ldt = np.uint8 if grid.size < 255 else np.uint16
    if dtype == np.uint8:
        values = np.arange(256, dtype=np.uint8)
    elif dtype == np.float16:
        values = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    else:
        return None
    v = dequantise(values)
    lut = np.searchsorted(grid, v, side="left").astype(ldt)
    lut[np.isnan(v)] = 0  # NaN > t is False for every t
    return lut


def quantise_levels(
    maps: np.ndarray, grid: np.ndarray, lut: np.ndarray | None = None
) -> np.ndarray:
    """Grid level of every map value: #{j: grid_j < m}, so m > grid_j <=> level > j."""
    grid = np.asarray(grid, dtype=np.float32)
    if lut is None:
        lut = level_lut(grid, maps.dtype)
    if lut is not None:
        bits = maps.view(np.uint16) if maps.dtype == np.float16 else maps
        return lut[bits]
    v = dequantise(np.asarray(maps))
    lv = np.searchsorted(grid, v, side="left")
    lv[np.isnan(v)] = 0
    return lv.astype(np.uint8 if grid.size < 255 else np.uint16)


def mean_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of dequantised maps in float32, summed in member order then divided by M."""
    acc = dequantise(np.asarray(maps[0])).copy()
    for m in maps[1:]:
        acc += dequantise(np.asarray(m))
    return acc / np.float32(len(maps))


# --------------------------------------------------------------------------- inputs


@dataclass
class Rows:
    """An (N, H, W) array (memmap) read at ``rows`` (None: all rows in order)."""

    array: np.ndarray
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.rows is None:
            return np.asarray(self.array[start:stop])
        r = self.rows[start:stop]
        if len(r) and r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
            return np.asarray(self.array[r[0] : r[-1] + 1])
        return np.asarray(self.array[r])


def _as_rows(a: np.ndarray | Rows) -> Rows:
    return a if isinstance(a, Rows) else Rows(a)


# --------------------------------------------------------------------------- kernels

#: Metrics computed from data-set confusion counts: exact for every row of a search.
DATASET_METRICS = ("paper_miou", "paper_dsc", "background_iou", "lesion_iou", "lesion_dice",
                   "tp", "fp", "fn", "tn")
#: Joint histograms larger than this many bins are refused (grid too fine for the subset).
MAX_JOINT_BINS = 2**25


def _revcum(h: np.ndarray, axis: int) -> np.ndarray:
    """sum_{l > j} h[l] along ``axis`` for j = 0..L-1 (drops the top level)."""
    r = np.flip(np.cumsum(np.flip(h, axis), axis), axis)
    return np.take(r, np.arange(1, h.shape[axis]), axis=axis)


def _slice_hist(codes: np.ndarray, gt: np.ndarray, nbins: int) -> np.ndarray:
    """Per-slice histogram of (code, gt): (S, nbins, 2); codes (S, P) in 0..nbins-1."""
    s = codes.shape[0]
    dt = np.int32 if s * nbins * 2 < 2**31 else np.int64
    idx = codes.astype(dt)  # a copy: int32 arithmetic is twice as fast as int64
    idx *= 2
    idx += gt
    idx += (np.arange(s, dtype=dt) * (2 * nbins))[:, None]
    return np.bincount(idx.ravel(), minlength=s * nbins * 2).reshape(s, nbins, 2)


def _combo_counts(
    kind: str, k: int, member_R: list[np.ndarray], joint: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (TP, FP) for every threshold combination, shape (S, L_1 * ... * L_m).

    ``member_R[i]``: (S, L_i, 2) counts of level > j per member (last axis: gt 0/1);
    ``joint``: (S, L_1+1, ..., L_m+1, 2) per-slice joint histogram of levels (vote only).
    """
    m = len(member_R)
    s = member_R[0].shape[0]
    ls = tuple(r.shape[1] for r in member_R)
    shape = (s, *ls)
    if m == 1:
        r = member_R[0]
        return r[..., 1], r[..., 0]
    if kind in ("min", "max"):
        pos = [r[..., 0] + r[..., 1] for r in member_R]
        tps = [r[..., 1] for r in member_R]
        fps = [r[..., 0] for r in member_R]

        def expand(a: np.ndarray, i: int) -> np.ndarray:
            sh = [s] + [1] * m
            sh[1 + i] = ls[i]
            return np.broadcast_to(a.reshape(sh), shape)

        best_pos = expand(pos[0], 0)
        tp = expand(tps[0], 0).copy()
        fp = expand(fps[0], 0).copy()
        for i in range(1, m):
            pi = expand(pos[i], i)
            better = pi < best_pos if kind == "min" else pi > best_pos  # ties: earlier
            best_pos = np.where(better, pi, best_pos)
            np.copyto(tp, expand(tps[i], i), where=better)
            np.copyto(fp, expand(fps[i], i), where=better)
        return tp.reshape(s, -1), fp.reshape(s, -1)
    # vote / and / or: inclusion-exclusion over member subsets U with |U| >= k
    assert joint is not None
    total = np.zeros((*shape, 2), dtype=np.int64)
    for size in range(k, m + 1):
        coef = (-1) ** (size - k) * math.comb(size - 1, k - 1)
        for U in itertools.combinations(range(m), size):
            if size == 1:
                sh = [s] + [1] * m + [2]
                sh[1 + U[0]] = ls[U[0]]
                n_u = member_R[U[0]].reshape(sh)
            else:
                others = tuple(1 + i for i in range(m) if i not in U)
                n_u = joint.sum(axis=others, keepdims=True) if others else joint
                for i in U:
                    n_u = _revcum(n_u, 1 + i)
            total += coef * n_u
    return total[..., 1].reshape(s, -1), total[..., 0].reshape(s, -1)


def _row_count(pos: np.ndarray, x: np.ndarray, strict: bool, npix: int) -> np.ndarray:
    """Per row s and query q: #{t: pos[s, t] > x[s, q]} (strict) or ``>=`` (not strict).

    ``pos`` (S, L) is non-increasing along its rows with values in 0..npix, so each row
    is a sorted key range after ``npix - pos + s * (npix + 1)``: one searchsorted.
    """
    s, n_t = pos.shape
    off = np.arange(s, dtype=np.int64)[:, None] * (npix + 1)
    keys = (npix - pos.astype(np.int64)) + off
    q = (npix - x.astype(np.int64)) + off
    idx = np.searchsorted(keys.ravel(), q.ravel(), side="left" if strict else "right")
    return idx.reshape(x.shape) - np.arange(s, dtype=np.int64)[:, None] * n_t


class _MinMaxAcc:
    """Data-set TP/FP of ``min``/``max`` for every threshold combination and gate bin.

    Member i is chosen at thresholds (t_1..t_m) iff, for min, pos_j(t_j) > pos_i(t_i) for
    j < i and pos_j(t_j) >= pos_i(t_i) for j > i (max: < and <=; ties to the first
    member). pos_j is non-increasing in t_j, so each condition is a half-line of t_j:
    min: t_j < b_j, max: t_j >= b_j, with b_j = #{t: pos_j(t) > or >= pos_i(t_i)}. Every
    (slice, t_i) adds tp_i/fp_i to a histogram over (bin, t_i, b_j...); prefix sums over
    the b axes at the end give sum over slices of the chosen member's counts: O(S L) per
    chunk instead of O(S L^m).
    """

    def __init__(self, kind: str, m: int, L: int, n_bins: int) -> None:
        self.kind, self.m, self.L, self.n_bins = kind, m, L, n_bins
        size = n_bins * L * (L + 1) ** (m - 1)
        if size > MAX_JOINT_BINS:
            raise InputError(f"threshold grid of {L} values is too fine for {kind} over {m} "
                             f"members ({size} bins): use a coarser grid or --max-members")
        self.h = np.zeros((m, 2, size))

    def add(self, member_R: list[np.ndarray], bins: np.ndarray, npix: int) -> None:
        m, L = self.m, self.L
        pos = [r[..., 0] + r[..., 1] for r in member_R]
        base = bins.astype(np.int64)[:, None] * L + np.arange(L, dtype=np.int64)[None, :]
        for i in range(m):
            idx = base
            for j in range(m):
                if j == i:
                    continue
                strict = j < i if self.kind == "min" else j > i
                idx = idx * (L + 1) + _row_count(pos[j], pos[i], strict, npix)
            flat = idx.ravel()
            for c in (0, 1):  # 0: fp (gt 0), 1: tp (gt 1)
                self.h[i, c] += np.bincount(flat, weights=member_R[i][..., c].ravel(),
                                            minlength=self.h.shape[2])

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(TP, FP) per gate bin, shape (n_bins, L**m), int64."""
        m, L = self.m, self.L
        out = np.zeros((2, self.n_bins) + (L,) * m)
        for i in range(m):
            a = self.h[i].reshape((2, self.n_bins, L) + (L + 1,) * (m - 1))
            for ax in range(3, 3 + m - 1):
                if self.kind == "min":
                    a = _revcum(a, ax)
                else:
                    a = np.take(np.cumsum(a, ax), np.arange(L), axis=ax)
            out += np.moveaxis(a, 2, 2 + i)
        out = np.rint(out).astype(np.int64).reshape(2, self.n_bins, -1)
        return out[1], out[0]


def _add_joint(
    target: np.ndarray, levels: list[np.ndarray], gt8: np.ndarray, bins: np.ndarray, L: int,
    member_R: dict[int, np.ndarray], members: tuple[int, ...], per_slice: bool = False,
) -> np.ndarray | None:
    """Add one chunk's joint histogram of (gate bin, member levels..., gt) to ``target``.

    Small grids (or ``per_slice``): one per-slice joint histogram, whose marginals also
    give the members' per-slice counts (stored in ``member_R``, level > j); returned,
    shape (S, (L+1)**m * 2). Large grids: one global histogram straight over (bin,
    levels, gt); returns None.
    """
    m = len(levels)
    s, npix = gt8.shape
    nb = (L + 1) ** m
    code = levels[0].astype(np.int32)
    for lv in levels[1:]:
        code *= L + 1
        code += lv
    if per_slice or nb * 2 * 4 <= npix:
        flat = _slice_hist(code, gt8, nb).reshape(s, -1)
        per_bin = target.reshape(-1, nb * 2)
        _add_rows(per_bin, bins, flat)
        pj = flat.reshape((s,) + (L + 1,) * m + (2,))
        for j, i in enumerate(members):
            if i not in member_R:
                others = tuple(1 + o for o in range(m) if o != j)
                member_R[i] = _revcum(pj.sum(axis=others), 1)
        return flat
    code *= 2
    code += gt8
    code += (bins.astype(np.int32) * (2 * nb))[:, None]
    target += np.bincount(code.ravel(), minlength=target.size)
    return None


def _vote_dataset_counts(joint: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Data-set (TP, FP) of vote:k per gate bin from the joint histogram (B, L+1, ..., 2)."""
    m = joint.ndim - 2
    member_R = []
    for i in range(m):
        others = tuple(1 + j for j in range(m) if j != i)
        member_R.append(_revcum(joint.sum(axis=others), 1))
    return _combo_counts("vote", k, member_R, joint)


# --------------------------------------------------------------------------- accumulation


@dataclass
class _Acc:
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

    def add(self, tp: np.ndarray, fp: np.ndarray, gt_pix: np.ndarray, bins: np.ndarray,
            case_ids: np.ndarray, sel: dict[str, np.ndarray]) -> None:
        keys = case_ids.astype(np.int64) * self.n_bins + bins
        order = np.argsort(keys, kind="stable")
        uk, starts = np.unique(keys[order], return_index=True)
        tp_k = np.add.reduceat(tp[order], starts, axis=0)
        fp_k = np.add.reduceat(fp[order], starts, axis=0)
        gt_k = np.add.reduceat(gt_pix[order], starts)
        b_k = uk % self.n_bins
        _add_rows(self.tp, b_k, tp_k)
        _add_rows(self.fp, b_k, fp_k)
        for c, b, t, f, g in zip(uk // self.n_bins, b_k, tp_k, fp_k, gt_k, strict=True):
            entry = self.cases.setdefault(int(c), [np.zeros((self.n_bins, self.n_combos),
                                                             np.int64),
                                                   np.zeros((self.n_bins, self.n_combos),
                                                            np.int64), 0])
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
                _add_rows(self.sums[f"{name}/{key}"], lbins[ms], v)
                _add_rows(self.sums[f"{name}/{key}2"], lbins[ms], v * v)

    def close_cases(self, done: Sequence[int]) -> None:
        for c in done:
            entry = self.cases.pop(int(c), None)
            if entry is None:
                continue
            tp = _kept(entry[0])
            fp = _kept(entry[1])
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
                tot = _kept(self.sums[f"{name}/{key}"])
                sq = _kept(self.sums[f"{name}/{key}2"])
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = tot / cnt if cnt else np.full_like(tot, np.nan)
                    std = np.sqrt(np.maximum(sq / cnt - mean * mean, 0.0)) if cnt else mean
                res[f"slice_{key}{suffix}_mean"] = mean
                res[f"slice_{key}{suffix}_std"] = std
        cmean = self.case_sum / self.n_cases
        res["case_dice_mean"] = cmean
        res["case_dice_std"] = np.sqrt(np.maximum(self.case_sq / self.n_cases - cmean**2, 0.0))
        return res


def _add_rows(target: np.ndarray, bins: np.ndarray, vals: np.ndarray) -> None:
    """target[bins[i]] += vals[i] for every row i (fast when few distinct bins)."""
    for b in np.unique(bins):
        target[b] += vals[bins == b].sum(axis=0)


def _kept(per_bin: np.ndarray) -> np.ndarray:
    """Sum over bins b >= k for every gate index k (axis 0)."""
    return np.flip(np.cumsum(np.flip(per_bin, 0), 0), 0)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k best values (descending, NaN last, ties in index order)."""
    flat = values.ravel()
    key = np.where(np.isfinite(flat), -flat, np.inf)
    return np.argsort(key, kind="stable")[:k]


# --------------------------------------------------------------------------- result


@dataclass
class Candidate:
    """One (member subset, operator) and its metric grids of shape (G, L, ..., L).

    ``detail``: None if every metric is exact for every entry; else a bool grid of the
    same shape marking where the slice/case metrics were computed (elsewhere they are NaN
    and rows() reports None). Data-set metrics (DATASET_METRICS) are always exact.
    """

    operator: str
    members: tuple[int, ...]
    metrics: dict[str, np.ndarray]
    detail: np.ndarray | None = None


@dataclass
class SearchResult:
    """Every metric for every (subset, operator, gate, thresholds)."""

    grid: np.ndarray
    gates: np.ndarray  # gate thresholds; index 0 is -inf (no gating)
    member_names: list[str]
    candidates: list[Candidate]
    n_slices: int
    n_lesion_slices: int
    top_k: int | None = None  # None: slice/case metrics exact for every row
    store_id: str | None = None  # identity of the slice store searched (SliceStore.identity)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per configuration (operator, members, thresholds, gate, metrics).

        Slice/case metrics not computed for a row (outside the top-K of its candidate)
        are None (blank in CSV, null in JSON), never an estimate.
        """
        out = []
        grid_vals = [float(str(t)) for t in self.grid]
        gate_vals = [None] + [float(g) for g in self.gates[1:]]
        for cand in self.candidates:
            any_metric = next(iter(cand.metrics.values()))
            shape = any_metric.shape
            flat = {name: arr.ravel().tolist() for name, arr in cand.metrics.items()}
            detail = None if cand.detail is None else cand.detail.ravel().tolist()
            members = [self.member_names[i] for i in cand.members]
            for f, idx in enumerate(np.ndindex(*shape)):
                row: dict[str, Any] = {
                    "operator": cand.operator,
                    "members": list(members),
                    # shortest float32 repr: 0.8, not 0.800000011920929 (same float32)
                    "thresholds": [grid_vals[j] for j in idx[1:]],
                    "gate": gate_vals[idx[0]],
                }
                keep = detail is None or detail[f]
                for name, vals in flat.items():
                    row[name] = (float(vals[f]) if keep or name in DATASET_METRICS
                                 else None)
                out.append(row)
        return out

    def ranked(self, objective: str) -> list[dict[str, Any]]:
        """Rows sorted by ``objective`` (descending, NaN last; stable on ties)."""
        rows = self.rows()
        if rows and objective not in rows[0]:
            known = [k for k in rows[0] if k.endswith(("iou", "dsc", "dice", "mean"))]
            raise InputError(f"objective {objective!r}: unknown metric; expected one of "
                             f"{', '.join(known)}")
        if objective not in DATASET_METRICS and any(c.detail is not None
                                                    for c in self.candidates):
            raise InputError(f"objective {objective!r}: slice/case metrics were computed "
                             f"only for the top-{self.top_k} rows; search with this objective")
        return sorted(rows, key=lambda r: -r[objective] if np.isfinite(r[objective])
                      else math.inf)


def subsets_of(
    m: int, max_members: int | None = None, min_members: int = 1
) -> list[tuple[int, ...]]:
    """All member subsets with min_members..max_members members (default: all)."""
    hi = m if max_members is None else min(max_members, m)
    sizes = range(min_members, hi + 1)
    return [u for size in sizes for u in itertools.combinations(range(m), size)]


@dataclass
class _Chunk:
    """One chunk of slices: masks, per-member levels and per-subset gate bins/selections."""

    start: int
    stop: int
    gt8: np.ndarray | None  # (S, P) uint8 0/1 (None: chunk read from the slice cache)
    gt_pix: np.ndarray
    raw: list[np.ndarray]  # (S, P) per member, stored dtype
    cids: np.ndarray
    npix: int


#: Pass 1 streams the per-slice histograms that the top-K rows need to temporary
#: np.memmap files (system temp dir, deleted afterwards) when they take at most this many
#: bytes on disk; above it, the top-K pass reads the maps a second time instead.
SLICE_CACHE_BYTES = 256 * 2**20


class _SliceCache:
    """Per-slice histograms of pass 1 on disk, read back chunk by chunk for the top-K rows.

    ``joints[u]``: (N, (L+1)**m * 2) joint histogram of (member levels, gt) per slice (subsets
    with a vote/and/or candidate); ``members[i]``: (N, L * 2) per-slice counts of level > j
    (``_revcum``) of the members of ``subsets`` (those that only need ``min``/``max``);
    subsets in neither are not cached (the top-K pass re-reads their maps); ``gt_pix``: (N,)
    lesion pixels per slice. Counts are <= pixels per slice: uint16 when that fits, else
    uint32. Files are anonymous temporary files: removed on ``close()`` or process exit.
    """

    MAX_READ = 2**22  #: cached values read into RAM at once (int64: 32 MiB)

    def __init__(self, case_ids: np.ndarray, npix: int, L: int,
                 joints: Sequence[tuple[int, ...]], subsets: Sequence[tuple[int, ...]]) -> None:
        n = len(case_ids)
        self.case_ids, self.L, self.npix = case_ids, L, npix
        self.subsets = set(subsets)
        members = sorted({i for u in subsets for i in u})
        self.dtype = np.dtype(np.uint16 if npix <= np.iinfo(np.uint16).max else np.uint32)
        self._files = contextlib.ExitStack()
        self.gt_pix = self._array(n, 1, np.dtype(np.uint32))[:, 0]
        self.joints = {u: self._array(n, (L + 1) ** len(u) * 2, self.dtype) for u in joints}
        self.members = {i: self._array(n, L * 2, self.dtype) for i in members}

    @staticmethod
    def nbytes(n: int, npix: int, L: int, joints: Sequence[tuple[int, ...]],
               subsets: Sequence[tuple[int, ...]]) -> int:
        """Bytes on disk: N x (4 + itemsize x (sum_u (L+1)^|u| * 2 + #members * L * 2))."""
        item = 2 if npix <= np.iinfo(np.uint16).max else 4
        members = {i for u in subsets for i in u}
        per = sum((L + 1) ** len(u) * 2 for u in joints) + len(members) * L * 2
        return n * (4 + item * per)

    def _array(self, n: int, width: int, dtype: np.dtype) -> np.ndarray:
        # lives as long as the cache; closed (and so deleted) by close()
        f = tempfile.TemporaryFile(prefix="ensemblecam-search-")  # noqa: SIM115
        self._files.enter_context(f)
        return np.memmap(f, dtype=dtype, mode="w+", shape=(n, width))

    def write(self, start: int, gt_pix: np.ndarray, joints: dict[tuple[int, ...], np.ndarray],
              member_R: Callable[[int], np.ndarray]) -> None:
        """Store one chunk of pass 1 at rows start.. (joints flat (S, -1); member_R(i))."""
        stop = start + len(gt_pix)
        self.gt_pix[start:stop] = gt_pix
        for u, arr in self.joints.items():
            arr[start:stop] = joints[u]
        for i, arr in self.members.items():
            arr[start:stop] = member_R(i).reshape(stop - start, -1)

    def has(self, u: tuple[int, ...]) -> bool:
        """Whether the per-slice counts of subset ``u`` are cached (else: re-read maps)."""
        return u in self.joints or u in self.subsets

    def hists(self, start: int, stop: int, u: tuple[int, ...], tgrids: list[np.ndarray]
              ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Per-slice (member_R, joint) of coarse levels, as the top-K pass builds from maps.

        Coarse level #{t in T: t < level}: the levels of one coarse level are a run, so
        the joint reduces with ``np.add.reduceat`` and member_R is a column pick.
        """
        s, L = stop - start, self.L
        if u in self.joints:
            src = self.joints[u]
            step = max(1, self.MAX_READ // src.shape[1])  # rows read at once: bounded RAM
            parts = []
            for a in range(start, stop, step):
                b = min(a + step, stop)
                part = np.asarray(src[a:b], np.int64).reshape((b - a,) + (L + 1,) * len(u)
                                                              + (2,))
                for j, tg in enumerate(tgrids):
                    # first level of coarse level c: 0, then T[c-1] + 1
                    part = np.add.reduceat(part, np.concatenate([[0], tg + 1]), axis=1 + j)
                parts.append(part)
            joint = parts[0] if len(parts) == 1 else np.concatenate(parts)
            member_R = []
            for j in range(len(u)):
                others = tuple(1 + o for o in range(len(u)) if o != j)
                member_R.append(_revcum(joint.sum(axis=others), 1))
            return member_R, joint
        assert u in self.subsets
        return [np.asarray(self.members[i][start:stop], np.int64).reshape(s, L, 2)[:, tg]
                for i, tg in zip(u, tgrids, strict=True)], None

    def close(self) -> None:
        self.joints.clear()
        self.members.clear()
        del self.gt_pix
        self._files.close()


def _take_levels(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Levels of uint8/float16 maps: one take of their bit patterns through ``lut``."""
    return np.take(lut, raw.view(np.uint16) if raw.dtype == np.float16 else raw)


def search(
    maps: Sequence[np.ndarray | Rows],
    masks: np.ndarray | Rows,
    case_ids: np.ndarray,
    grid: np.ndarray | str = DEFAULT_GRID,
    operators: Sequence[str] = ("and", "or", "min", "max"),
    subsets: Sequence[tuple[int, ...]] | None = None,
    probs: Sequence[np.ndarray] | None = None,
    gates: np.ndarray | Sequence[float] | None = None,
    min_lesion_fraction: float = 0.0,
    classifier_threshold: float = 0.5,
    member_names: Sequence[str] | None = None,
    chunk: int = 128,
    progress: bool | None = None,
    on_chunk: Callable[[int], None] | None = None,
    objective: str = "paper_miou",
    top_k: int | None = 20,
) -> SearchResult:
    """Score every operator x threshold combination x member subset x gate, exactly.

    ``maps``: one (N, H, W) array per member (float16/uint8/float32, [0, 1]) aligned with
    ``masks`` (N, H, W) {0, 1}; ``case_ids`` (N,) ints (slices of a case need not be
    contiguous). ``probs``: one (N,) array per member (needed for ``gates`` and for the
    "correct" slice subset).

    Data-set metrics (DATASET_METRICS) are exact for every configuration. Slice- and
    case-level metrics are exact for every configuration when ``top_k`` is None/0, when
    ``objective`` is itself a slice/case metric, and for one-threshold candidates (single
    member, mean); otherwise (default) they are computed exactly, in a second streaming
    pass, for the ``top_k`` best configurations by ``objective`` of every multi-member
    (subset, operator) and left NaN (rows(): None) elsewhere.
    """
    srcs = [_as_rows(a) for a in maps]
    gts = _as_rows(masks)
    m_all = len(srcs)
    if m_all < 1:
        raise InputError("search needs at least one member")
    n = len(gts)
    if n == 0:
        raise InputError("empty calibration set: no slices to search on")
    for i, s in enumerate(srcs):
        if len(s) != n:
            name = member_names[i] if member_names else f"member {i}"
            raise InputError(f"{name}: {len(s)} map slices for {n} mask slices")
    grid = parse_grid(grid) if isinstance(grid, str) else np.asarray(grid, np.float32)
    L = grid.size
    names = list(member_names) if member_names else [f"m{i}" for i in range(m_all)]
    subsets = list(subsets) if subsets is not None else subsets_of(m_all)
    case_ids = np.asarray(case_ids)
    _, case_ids = np.unique(case_ids, return_inverse=True)
    last_pos = np.zeros(case_ids.max() + 1, np.int64)
    last_pos[case_ids] = np.arange(n)
    gate_thr = np.concatenate([[-np.inf], np.sort(np.asarray(gates if gates is not None else [],
                                                             np.float64))])
    n_bins = gate_thr.size
    if n_bins > 1 and probs is None:
        raise InputError("gating needs classifier probabilities (probs.npy)")
    probs_arr = None if probs is None else np.stack([np.asarray(p, np.float64) for p in probs])
    full = not top_k or objective not in DATASET_METRICS

    # (subset, operator name, kind, k) list; single member subsets get "single".
    plan: list[tuple[tuple[int, ...], str, str, int]] = []
    for u in subsets:
        if len(u) == 1:
            plan.append((u, "single", "single", 1))
            continue
        for op in operators:
            kind, k = parse_operator(op, len(u))
            label = op if kind != "vote" else f"vote:{k}"
            if (u, label, kind, k) not in plan:  # e.g. "vote" and "vote:2" for M=3
                plan.append((u, label, kind, k))
    check_search_size(n_bins * sum(L if kind in ("single", "mean") else L ** len(u)
                                   for u, _, kind, _ in plan), L)
    luts = [level_lut(grid, s.array.dtype) for s in srcs]
    sel_names = ["lesion"] + (["large"] if min_lesion_fraction > 0 else []) + (
        ["correct"] if probs_arr is not None else [])
    # per-slice accumulation (every combination) for: all entries in full mode, else the
    # one-threshold candidates; data-set accumulators for the rest.
    per_slice = [full or kind in ("single", "mean") for _, _, kind, _ in plan]
    accs: list[_Acc | None] = [
        _Acc(n_bins, L if kind == "mean" else L ** len(u), sel_names) if ps else None
        for (u, _, kind, _), ps in zip(plan, per_slice, strict=True)]
    mm_accs: dict[int, _MinMaxAcc] = {}
    joints: dict[tuple[int, ...], np.ndarray] = {}
    for c, ((u, _, kind, _), ps) in enumerate(zip(plan, per_slice, strict=True)):
        if ps:
            continue
        if kind in ("min", "max"):
            mm_accs[c] = _MinMaxAcc(kind, len(u), L, n_bins)
        elif u not in joints:
            size = n_bins * (L + 1) ** len(u) * 2
            if size > MAX_JOINT_BINS:
                raise InputError(f"threshold grid of {L} values is too fine for {len(u)} "
                                 f"members ({size} bins): use a coarser grid or --max-members")
            joints[u] = np.zeros(size, np.int64)

    def read_chunk(start: int, stop: int, hw: tuple[int, ...] | None) -> _Chunk:
        gt = gts.read(start, stop)
        s = stop - start
        raw = [src.read(start, stop) for src in srcs]
        for i, r in enumerate(raw):
            if r.shape[1:] != (hw or gt.shape[1:]):
                raise InputError(f"{names[i]}: maps of shape {r.shape[1:]} but masks of "
                                 f"shape {hw or gt.shape[1:]}")
        gt = gt.reshape(s, -1)
        gt8 = gt.astype(bool).view(np.uint8) if gt.dtype != bool else gt.view(np.uint8)
        return _Chunk(start, stop, gt8, gt8.sum(axis=1, dtype=np.int64),
                      [r.reshape(s, -1) for r in raw], case_ids[start:stop], gt8.shape[1])

    def gate_of(u: tuple[int, ...], ch: _Chunk) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if probs_arr is not None:
            p = probs_arr[list(u), ch.start:ch.stop].mean(axis=0)
        else:
            p = np.zeros(ch.stop - ch.start)
        bins = np.searchsorted(gate_thr, p, side="right") - 1
        sel = metrics.slice_selection(ch.gt_pix, ch.npix, min_lesion_fraction,
                                      p if probs_arr is not None else None,
                                      classifier_threshold)
        return bins, sel

    # slices' histograms for the top-K pass: cached on disk if small, else re-read maps
    # (only joints that pass 1 builds per slice anyway: small next to the pixels)
    npix_all = math.prod(gts.array.shape[1:])
    todo_u = {u for c, (u, _, kind, _) in enumerate(plan) if accs[c] is None
              and kind not in ("min", "max")}
    cache_joints = sorted(u for u in todo_u if (L + 1) ** len(u) * 2 * 4 <= npix_all)
    cache_members = sorted({u for c, (u, _, _, _) in enumerate(plan) if accs[c] is None
                            and u not in todo_u})  # min/max only: per-member counts
    cache = None
    if (cache_joints or cache_members) and _SliceCache.nbytes(
            n, npix_all, L, cache_joints, cache_members) <= SLICE_CACHE_BYTES:
        cache = _SliceCache(case_ids, npix_all, L, cache_joints, cache_members)
    else:
        cache_joints = []
    gt_total = 0
    npix_total = 0
    n_lesion = 0
    hw: tuple[int, ...] | None = None
    used = sorted({i for u, _, kind, _ in plan if kind != "mean" for i in u})
    try:
        for start in tqdm(range(0, n, chunk), desc="search", unit="chunk",
                          disable=None if progress is None else not progress):
            stop = min(start + chunk, n)
            ch = read_chunk(start, stop, hw)
            hw = hw or gts.array.shape[1:]
            s, npix = ch.gt8.shape
            gt_total += int(ch.gt_pix.sum())
            npix_total += npix * s
            n_lesion += int((ch.gt_pix > 0).sum())
            levels = {i: quantise_levels(ch.raw[i], grid) if luts[i] is None
                      else _take_levels(ch.raw[i], luts[i]) for i in used}
            member_R: dict[int, np.ndarray] = {}

            def rev(i: int, lv: dict[int, np.ndarray] = levels, ch: _Chunk = ch,
                    cache: dict[int, np.ndarray] = member_R) -> np.ndarray:
                if i not in cache:
                    cache[i] = _revcum(_slice_hist(lv[i], ch.gt8, L + 1), 1)
                return cache[i]

            gate_cache: dict[tuple[int, ...], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
            joint_cache: dict[tuple[int, ...], np.ndarray] = {}
            slice_joints: dict[tuple[int, ...], np.ndarray] = {}
            done = np.unique(ch.cids[last_pos[ch.cids] < stop])
            order = sorted(range(len(plan)), key=lambda c: plan[c][2] in ("min", "max"))
            for c in order:
                u, _label, kind, k = plan[c]
                if u not in gate_cache:
                    gate_cache[u] = gate_of(u, ch)
                bins, sel = gate_cache[u]
                acc = accs[c]
                if acc is None and kind in ("min", "max"):
                    mm_accs[c].add([rev(i) for i in u], bins, npix)
                    continue
                if acc is None:
                    if u not in joint_cache:
                        flat = _add_joint(joints[u], [levels[i] for i in u], ch.gt8, bins, L,
                                          member_R, u, per_slice=u in cache_joints)
                        joint_cache[u] = np.empty(0)  # data-set joint added for this chunk
                        if flat is not None:
                            slice_joints[u] = flat
                    continue
                if kind == "mean":
                    mm = mean_map([ch.raw[i] for i in u])
                    mean_R = _revcum(_slice_hist(quantise_levels(mm, grid), ch.gt8, L + 1), 1)
                    tp, fp = mean_R[..., 1], mean_R[..., 0]
                elif kind in ("single", "min", "max"):
                    tp, fp = _combo_counts(kind, k, [rev(i) for i in u], None)
                else:
                    joint = joint_cache.get(u)
                    if joint is None:
                        code = levels[u[0]].astype(np.int32)
                        for i in u[1:]:
                            code *= L + 1
                            code += levels[i]
                        joint = _slice_hist(code, ch.gt8, (L + 1) ** len(u)).reshape(
                            (s,) + (L + 1,) * len(u) + (2,))
                        joint_cache[u] = joint
                    tp, fp = _combo_counts(kind, k, [rev(i) for i in u], joint)
                acc.add(tp, fp, ch.gt_pix, bins, ch.cids, sel)
                acc.close_cases(done)
            if cache is not None:
                cache.write(start, ch.gt_pix, slice_joints, rev)
            if on_chunk is not None:
                on_chunk(stop)
        if n_lesion == 0:
            raise InputError("calibration set has no lesion pixel: thresholds cannot be chosen")

        # data-set metrics for every configuration
        results: list[dict[str, np.ndarray]] = []
        shapes = []
        for c, (u, _label, kind, k) in enumerate(plan):
            shape = (n_bins,) + ((L,) if kind == "mean" else (L,) * len(u))
            shapes.append(shape)
            acc = accs[c]
            if acc is not None:
                tp_b, fp_b = acc.tp, acc.fp
            elif kind in ("min", "max"):
                tp_b, fp_b = mm_accs[c].counts()
            else:
                jt = joints[u].reshape((n_bins,) + (L + 1,) * len(u) + (2,))
                tp_b, fp_b = _vote_dataset_counts(jt, k)
            tp = _kept(tp_b)
            fp = _kept(fp_b)
            fn = gt_total - tp
            tn = npix_total - tp - fp - fn
            res = metrics.dataset_metrics(tp, fp, fn, tn)
            res.update({"tp": tp, "fp": fp, "fn": fn, "tn": tn})
            if acc is not None:
                res.update(acc.detail_metrics())
            results.append(res)

        details: dict[int, np.ndarray] = {}
        if not full:
            details = _top_k_pass(plan, accs, results, objective, int(top_k or 0), n_bins, L,
                                  grid, luts, srcs, read_chunk, gate_of, last_pos, n, chunk,
                                  sel_names, progress, hw, cache)
    finally:
        if cache is not None:
            cache.close()
    candidates = []
    for c, (u, label, _kind, _k) in enumerate(plan):
        detail = details.get(c)
        candidates.append(Candidate(label, u, {k2: np.asarray(v).reshape(shapes[c])
                                               for k2, v in results[c].items()},
                                    None if detail is None else detail.reshape(shapes[c])))
    return SearchResult(grid, gate_thr, names, candidates, n, n_lesion,
                        None if full else int(top_k or 0))


def _top_k_pass(
    plan: list[tuple[tuple[int, ...], str, str, int]],
    accs: list[_Acc | None],
    results: list[dict[str, np.ndarray]],
    objective: str,
    top_k: int,
    n_bins: int,
    L: int,
    grid: np.ndarray,
    luts: list[np.ndarray | None],
    srcs: list[Rows],
    read_chunk: Callable[[int, int, Any], _Chunk],
    gate_of: Callable[[tuple[int, ...], _Chunk], tuple[np.ndarray, dict[str, np.ndarray]]],
    last_pos: np.ndarray,
    n: int,
    chunk: int,
    sel_names: list[str],
    progress: bool | None,
    hw: tuple[int, ...] | None,
    cache: _SliceCache | None = None,
) -> dict[int, np.ndarray]:
    """Second streaming pass: exact slice/case metrics of the top-K rows per candidate.

    Per subset U, the thresholds used by its top-K rows form a coarse grid T_j per member;
    a map's coarse level #{t in T_j: t < level} keeps ``level > t`` exact for t in T_j, so
    the per-slice joint histogram of coarse levels gives every needed per-slice count.
    With ``cache`` those histograms come from pass 1's per-slice histograms on disk (no
    second read of the maps); else the maps are read again. Both give identical counts.
    Fills the slice/case metrics of those rows into ``results``; returns detail masks.
    """
    todo = [c for c, acc in enumerate(accs) if acc is None]
    if not todo:  # only one-threshold candidates: all exact after pass 1
        return {}
    picks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # c -> (gate idx, threshold idx)
    thr_sets: dict[tuple[int, ...], list[set[int]]] = {}
    for c in todo:
        u = plan[c][0]
        flat = _top_k(results[c][objective], top_k)
        g, combo = np.divmod(flat, L ** len(u))
        t_idx = np.stack(np.unravel_index(combo, (L,) * len(u)), axis=1)
        picks[c] = (g, t_idx)
        sets = thr_sets.setdefault(u, [set() for _ in u])
        for j in range(len(u)):
            sets[j].update(t_idx[:, j].tolist())
    # coarse grids and LUTs per subset
    coarse: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    per_slice_bins = 1
    for u, sets in thr_sets.items():
        tgrids = [np.array(sorted(st), np.int64) for st in sets]
        maps_ = [np.searchsorted(tg, np.arange(L + 1), side="left").astype(np.int32)
                 for tg in tgrids]
        coarse[u] = (tgrids, maps_)
        per_slice_bins = max(per_slice_bins, 2 * math.prod(tg.size + 1 for tg in tgrids))
    # same chunks with or without the cache: identical float sums, identical rows
    chunk2 = max(1, min(chunk, 2**23 // per_slice_bins))
    # per candidate: the distinct coarse threshold combinations of its picks
    cols: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    accs2: dict[int, _Acc] = {}
    for c in todo:
        u = plan[c][0]
        tgrids = coarse[u][0]
        g, t_idx = picks[c]
        pos = [np.searchsorted(tgrids[j], t_idx[:, j]) for j in range(len(u))]
        flat = np.ravel_multi_index(pos, tuple(tg.size for tg in tgrids))
        uniq, inv = np.unique(flat, return_inverse=True)
        cols[c] = (uniq, inv)
        accs2[c] = _Acc(n_bins, uniq.size, sel_names)
    lut_cache: dict[tuple[tuple[int, ...], int], np.ndarray | None] = {}
    for u, (_tgrids, maps_) in coarse.items():
        for j, i in enumerate(u):
            lut_cache[(u, j)] = None if luts[i] is None else maps_[j][luts[i]].astype(
                np.uint8 if maps_[j][-1] < 255 else np.uint16)
    for start in tqdm(range(0, n, chunk2), desc="search top-k", unit="chunk",
                      disable=None if progress is None else not progress):
        stop = min(start + chunk2, n)
        s = stop - start
        hists: dict[tuple[int, ...], tuple[list[np.ndarray], np.ndarray | None]] = {}
        if cache is not None:
            for u, (tgrids, _maps) in coarse.items():
                if cache.has(u):
                    hists[u] = cache.hists(start, stop, u, tgrids)
        if cache is not None and len(hists) == len(coarse):
            ch = _Chunk(start, stop, None, np.asarray(cache.gt_pix[start:stop], np.int64), [],
                        cache.case_ids[start:stop], cache.npix)
        else:
            ch = read_chunk(start, stop, hw)
            for u, (tgrids, maps_) in coarse.items():
                if u in hists:
                    continue
                assert ch.gt8 is not None
                code = None
                for j, i in enumerate(u):
                    lut = lut_cache[(u, j)]
                    if lut is not None:
                        cl = _take_levels(ch.raw[i], lut)
                    else:
                        cl = maps_[j][quantise_levels(ch.raw[i], grid)]
                    if code is None:
                        code = cl.astype(np.int32)
                    else:
                        code *= tgrids[j].size + 1
                        code += cl
                assert code is not None
                joint = _slice_hist(code, ch.gt8, math.prod(tg.size + 1 for tg in tgrids))
                joint = joint.reshape((s, *(tg.size + 1 for tg in tgrids), 2))
                member_R = []
                for j in range(len(u)):
                    others = tuple(1 + o for o in range(len(u)) if o != j)
                    member_R.append(_revcum(joint.sum(axis=others), 1))
                hists[u] = (member_R, joint)
        done = np.unique(ch.cids[last_pos[ch.cids] < stop])
        for c in todo:
            u, _label, kind, k = plan[c]
            member_R, joint = hists[u]
            tp, fp = _combo_counts(kind, k, member_R, joint)
            uniq = cols[c][0]
            bins, sel = gate_of(u, ch)
            accs2[c].add(tp[:, uniq], fp[:, uniq], ch.gt_pix, bins, ch.cids, sel)
            accs2[c].close_cases(done)
    details: dict[int, np.ndarray] = {}
    for c in todo:
        u = plan[c][0]
        g, t_idx = picks[c]
        flat = g * L ** len(u) + np.ravel_multi_index(tuple(t_idx.T), (L,) * len(u))
        inv = cols[c][1]
        det = accs2[c].detail_metrics()
        mask = np.zeros(n_bins * L ** len(u), bool)
        mask[flat] = True
        details[c] = mask
        for name, vals in det.items():
            arr = np.full(n_bins * L ** len(u), np.nan)
            arr[flat] = vals[g, inv]
            results[c][name] = arr.reshape(n_bins, -1)
    return details


# --------------------------------------------------------------------------- store inputs


@dataclass
class Inputs:
    """Maps, masks, probabilities and case ids of one split part, aligned by store index."""

    store: Any
    indices: np.ndarray
    member_names: list[str]
    maps: list[Rows]
    probs: list[np.ndarray]
    masks: Rows
    case_ids: np.ndarray
    labels: np.ndarray


def annotated_part(
    store_path: Any, splits: Any, fold: int | str, part: str, what: str = "calibration",
    n_cases: int | None = None, seed: int = 0,
) -> tuple[Any, Path, np.ndarray]:
    """(store, split file, store indices of the part's annotated slices); a store without
    masks or an empty selection is one InputError line.

    ``n_cases``: keep only N annotated cases of the part, chosen with ``seed``.
    """
    from ensemblecam.io.split import get_fold
    from ensemblecam.io.store import SliceStore

    store = SliceStore.open(store_path)
    if store.masks is None:
        raise InputError(f"{store.path}: store has no masks; {what} needs masks to score")
    splits = Path(splits) if splits is not None else store.path / "splits.json"
    cases = get_fold(splits, int(fold) if str(fold).isdigit() else fold).part(part)
    annotated = [c for c in cases if store.cases.get(c, {}).get("has_mask", True)]
    if n_cases is not None:
        if n_cases < 1:
            raise InputError(f"--calibration-cases {n_cases}: must be >= 1")
        rng = np.random.default_rng(seed)
        annotated = sorted(rng.permutation(annotated)[:n_cases].tolist())
    idx = store.indices_for_cases(annotated)
    idx = idx[store.table["has_mask"][idx].astype(bool)]
    if len(idx) == 0:
        raise InputError(f"{splits}: {what} set ({part} of fold {fold}) has no annotated slice")
    return store, splits, idx


def open_inputs(
    store_path: Any, splits: Any, fold: int | str, part: str, maps_root: Any,
    members: Sequence[str], n_cases: int | None = None, seed: int = 0,
    what: str = "calibration",
) -> Inputs:
    """Open store + split part + members; every misalignment is one InputError line.

    ``n_cases``: keep only N annotated cases of the part, chosen with ``seed``.
    """
    from ensemblecam.io.mapstore import MapSet

    if not members:
        raise InputError("no members given (--members a__gradcam,b__gradcam)")
    store, splits, idx = annotated_part(store_path, splits, fold, part, what, n_cases, seed)
    root = Path(maps_root)
    names, srcs, probs = [], [], []
    for name in members:
        if not (root / name).is_dir():
            avail = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise InputError(f"member {name!r}: no folder {root / name} "
                             f"(available: {', '.join(avail) or 'none'})")
        ms = MapSet.open(root / name)
        ms.check_store(store)
        rows = ms.rows_for(idx)
        if tuple(ms.maps.shape[1:]) != tuple(store.masks.shape[1:]):
            raise InputError(f"member {name!r}: maps of shape {tuple(ms.maps.shape[1:])} but "
                             f"masks of shape {tuple(store.masks.shape[1:])}")
        names.append(name)
        srcs.append(Rows(ms.maps, rows))
        probs.append(ms.probs[rows])
    return Inputs(store, idx, names, srcs, probs, Rows(store.masks, idx),
                  store.table["case"][idx], store.labels[idx])


# --------------------------------------------------------------------------- stage

CONFIG_KEYS = ("operator", "members", "thresholds", "gate")


def _run_search(cfg: Any, n_cases: int | None) -> tuple[SearchResult, list[dict[str, Any]]]:
    inp = open_inputs(cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, cfg.members,
                        n_cases, cfg.seed)
    for op in cfg.operators:
        parse_operator(op, max(len(cfg.members), 1))
    allowed = objective_names(cfg.min_lesion_fraction, True)
    if cfg.objective not in allowed:
        raise InputError(f"objective {cfg.objective!r}: expected one of {', '.join(allowed)}")
    res = search(
        inp.maps, inp.masks, inp.case_ids, parse_grid(cfg.grid), cfg.operators,
        subsets_of(len(inp.maps), cfg.max_members), probs=inp.probs,
        gates=parse_grid(cfg.gate_grid) if cfg.gate else None,
        min_lesion_fraction=cfg.min_lesion_fraction,
        classifier_threshold=cfg.classifier_threshold, member_names=inp.member_names,
        chunk=cfg.chunk, objective=cfg.objective, top_k=cfg.top_k or None,
    )
    res.store_id = inp.store.identity
    return res, res.ranked(cfg.objective)


def check_search_config(cfg: SearchConfig) -> None:
    """Every check of a search configuration that needs no data: grids (size and values),
    operators, objective and the number of configurations (``MAX_CONFIGURATIONS``)."""
    grid = parse_grid(cfg.grid)
    gates = parse_grid(cfg.gate_grid) if cfg.gate else np.zeros(0)
    m = max(len(cfg.members), 1)
    for op in cfg.operators:
        parse_operator(op, m)
    allowed = objective_names(cfg.min_lesion_fraction, True)
    if cfg.objective not in allowed:
        raise InputError(f"objective {short_repr(cfg.objective)}: expected one of "
                         f"{', '.join(allowed)}")
    check_search_size(n_configurations(m, grid.size, cfg.operators, cfg.max_members,
                                       gates.size), grid.size)


def run_search_stage(cfg: SearchConfig, force: bool = False) -> dict[str, Any]:
    """Search ``cfg`` and write its outputs to ``cfg.out`` (atomic folder); return the best row.

    ``cfg.calibration_cases`` "N1,N2,all" repeats the search on N annotated cases each and
    writes calibration_curve.csv/json (how the chosen configuration changes with N); the
    outputs of the last entry are kept.
    """
    ns: list[int | None] = []
    for v in [v.strip() for v in cfg.calibration_cases.split(',') if v.strip()] or ["all"]:
        if v == "all":
            ns.append(None)
        elif v.isdigit():
            ns.append(int(v))
        else:
            raise InputError(f"--calibration-cases {short_repr(cfg.calibration_cases)}: N, "
                             f"all or N1,N2")
    check_search_config(cfg)
    partial = fsutil.prepare_output_dir(cfg.out, force, "best.json")
    curve = []
    res, ranked = None, []
    for n_cases in ns:
        res, ranked = _run_search(cfg, n_cases)
        best = ranked[0]
        curve.append({"calibration_cases": "all" if n_cases is None else n_cases,
                      **{k: best[k] for k in CONFIG_KEYS}, cfg.objective: best[cfg.objective]})
    assert res is not None
    write_search_outputs(partial, res, ranked, cfg.objective, cfg.model_dump(mode="json"))
    if len(ns) > 1:
        fsutil.write_json(partial / "calibration_curve.json", curve)
        fsutil.write_text(partial / "calibration_curve.csv", fsutil.csv_text(curve))
    fsutil.commit_output_dir(partial, cfg.out)
    return dict(ranked[0])


def write_search_outputs(out: Path, res: SearchResult, ranked: list[dict[str, Any]],
                         objective: str, settings: dict[str, Any]) -> None:
    """ranking.csv/json, grid_<operator>[__members].npy/.json, best_per_candidate.json (the
    best row of every operator x member subset), best.json (each atomic)."""
    fsutil.write_text(out / "ranking.csv", fsutil.csv_text(ranked))
    fsutil.write_json(out / "ranking.json", {
        "objective": objective, "n_configurations": len(ranked),
        "slice_case_metrics": "every row" if res.top_k is None else
        f"top {res.top_k} rows per multi-member operator and every single/mean row; "
        "null elsewhere (data-set metrics: every row)",
        "top": ranked[:1000]})
    m_all = len(res.member_names)
    for cand in res.candidates:
        if len(cand.members) < 2 and m_all > 1:
            continue
        values = cand.metrics[objective]
        best_gate = int(np.nanargmax(values.reshape(values.shape[0], -1).max(axis=1)))
        name = f"grid_{cand.operator.replace(':', '')}"
        if len(cand.members) != m_all:
            name += "__" + "+".join(res.member_names[i] for i in cand.members)
        grid_vals = values[best_gate]
        fsutil.save_npy(out / f"{name}.npy", grid_vals)
        fsutil.write_json(out / f"{name}.json", {
            "operator": cand.operator, "objective": objective,
            "members": [res.member_names[i] for i in cand.members],
            "thresholds": [float(str(t)) for t in res.grid],
            "gate": None if best_gate == 0 else float(res.gates[best_gate]),
            "axes": "one axis per member (member order), threshold index",
            "values": grid_vals.tolist()})
    per: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for row in ranked:
        per.setdefault((row["operator"], tuple(row["members"])), row)
    fsutil.write_json(out / "best_per_candidate.json", list(per.values()))
    best = dict(ranked[0])
    best.update(objective=objective, search=settings, n_slices=res.n_slices,
                n_lesion_slices=res.n_lesion_slices)
    if res.store_id is not None:
        best["store_id"] = res.store_id
    fsutil.write_json(out / "best.json", best)
