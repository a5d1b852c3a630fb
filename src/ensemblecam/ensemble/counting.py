"""Quantisation of maps to grid levels and the histogram kernels of the search.

A map value m has grid level ``level = #{j: t_j < m}`` (so ``m > t_j <=> level > j``;
float16 and uint8 maps go through a lookup table over all their bit patterns: one take).
Reverse cumulative sums over a level axis turn "level == l" counts into "level > j"
counts, so one histogram gives the TP/FP of every threshold at once; intersections over
member subsets U give N_U, and "at least k of m" =
sum_{|U|>=k} (-1)^(|U|-k) C(|U|-1, k-1) N_U (inclusion-exclusion). ``min``/``max``:
:class:`MinMaxAcc`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ensemblecam.errors import InputError
from ensemblecam.io.mapstore import dequantise

#: Joint histograms larger than this many bins are refused (grid too fine for the subset).
MAX_JOINT_BINS = 2**25


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


def take_levels(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Levels of uint8/float16 maps: one take of their bit patterns through ``lut``."""
    return np.take(lut, raw.view(np.uint16) if raw.dtype == np.float16 else raw)


def revcum(h: np.ndarray, axis: int) -> np.ndarray:
    """sum_{l > j} h[l] along ``axis`` for j = 0..L-1 (drops the top level)."""
    r = np.flip(np.cumsum(np.flip(h, axis), axis), axis)
    return np.take(r, np.arange(1, h.shape[axis]), axis=axis)


def slice_hist(codes: np.ndarray, gt: np.ndarray, nbins: int) -> np.ndarray:
    """Per-slice histogram of (code, gt): (S, nbins, 2); codes (S, P) in 0..nbins-1."""
    s = codes.shape[0]
    dt = np.int32 if s * nbins * 2 < 2**31 else np.int64
    idx = codes.astype(dt)  # a copy: int32 arithmetic is twice as fast as int64
    idx *= 2
    idx += gt
    idx += (np.arange(s, dtype=dt) * (2 * nbins))[:, None]
    return np.bincount(idx.ravel(), minlength=s * nbins * 2).reshape(s, nbins, 2)


def combo_counts(
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
                    n_u = revcum(n_u, 1 + i)
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


class MinMaxAcc:
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
            raise InputError(
                f"threshold grid of {L} values is too fine for {kind} over {m} "
                f"members ({size} bins): use a coarser grid or --max-members"
            )
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
                self.h[i, c] += np.bincount(
                    flat, weights=member_R[i][..., c].ravel(), minlength=self.h.shape[2]
                )

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(TP, FP) per gate bin, shape (n_bins, L**m), int64."""
        m, L = self.m, self.L
        out = np.zeros((2, self.n_bins) + (L,) * m)
        for i in range(m):
            a = self.h[i].reshape((2, self.n_bins, L) + (L + 1,) * (m - 1))
            for ax in range(3, 3 + m - 1):
                if self.kind == "min":
                    a = revcum(a, ax)
                else:
                    a = np.take(np.cumsum(a, ax), np.arange(L), axis=ax)
            out += np.moveaxis(a, 2, 2 + i)
        out = np.rint(out).astype(np.int64).reshape(2, self.n_bins, -1)
        return out[1], out[0]


def add_joint(
    target: np.ndarray,
    levels: list[np.ndarray],
    gt8: np.ndarray,
    bins: np.ndarray,
    L: int,
    member_R: dict[int, np.ndarray],
    members: tuple[int, ...],
    per_slice: bool = False,
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
        flat = slice_hist(code, gt8, nb).reshape(s, -1)
        per_bin = target.reshape(-1, nb * 2)
        add_rows(per_bin, bins, flat)
        pj = flat.reshape((s,) + (L + 1,) * m + (2,))
        for j, i in enumerate(members):
            if i not in member_R:
                others = tuple(1 + o for o in range(m) if o != j)
                member_R[i] = revcum(pj.sum(axis=others), 1)
        return flat
    code *= 2
    code += gt8
    code += (bins.astype(np.int32) * (2 * nb))[:, None]
    target += np.bincount(code.ravel(), minlength=target.size)
    return None


def vote_dataset_counts(joint: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Data-set (TP, FP) of vote:k per gate bin from the joint histogram (B, L+1, ..., 2)."""
    m = joint.ndim - 2
    member_R = []
    for i in range(m):
        others = tuple(1 + j for j in range(m) if j != i)
        member_R.append(revcum(joint.sum(axis=others), 1))
    return combo_counts("vote", k, member_R, joint)


def add_rows(target: np.ndarray, bins: np.ndarray, vals: np.ndarray) -> None:
    """target[bins[i]] += vals[i] for every row i (fast when few distinct bins)."""
    for b in np.unique(bins):
        target[b] += vals[bins == b].sum(axis=0)


def kept(per_bin: np.ndarray) -> np.ndarray:
    """Sum over bins b >= k for every gate index k (axis 0)."""
    return np.flip(np.cumsum(np.flip(per_bin, 0), 0), 0)
