"""Exact one-pass search over ensemble operators x per-member thresholds x member subsets.

Semantics: :mod:`ensemblecam.ensemble.operators` (:func:`~ensemblecam.ensemble.operators.
apply_config` is the reference the search equals exactly). A subset of one member is the
operator ``single``. Gating (optional): a slice whose classifier probability (the MEAN of
the configuration's members' ``probs.npy``) is below the gate threshold g gets an empty
mask; gate "none" (no gating) is always searched too.

How it is exact. Each map is quantised once to its grid level (:mod:`.counting`); one
histogram gives the TP/FP of every threshold at once.

Pass 1 (every configuration, data-set metrics ``DATASET_METRICS``): per chunk one
bincount of (gate bin, member levels..., gt) per subset, accumulated over all chunks (its
cost after the bincount does not depend on the number of slices); ``min``/``max`` from
per-slice per-member positive counts: member i wins on a half-line of every other
member's thresholds, so a histogram over (bin, t_i, half-line bounds) and prefix sums
give the data-set counts in O(slices x L) instead of O(slices x L^m) (``MinMaxAcc``).

Slice/case metrics need per-slice counts. With a slice/case ``objective`` or
``top_k=None`` they are computed for every combination in pass 1 (O(slices x L^m)).
Otherwise (default, ``top_k=20``) pass 1 ranks by the data-set objective and the top-K
pass computes them for the top-K configurations of each multi-member (subset, operator):
the thresholds they use form a coarse grid per member whose levels keep ``m > t`` exact,
and one per-slice joint histogram of coarse levels gives every needed per-slice count.
That histogram comes, without reading the maps again, from the per-slice histograms pass 1
builds anyway (the joint one when (L+1)^m * 2 * 4 <= pixels per slice; per-member counts
for subsets with only ``min``/``max``), streamed to temporary np.memmap files when they
fit ``SLICE_CACHE_BYTES`` on disk (:mod:`.cache`), and summed into coarse levels chunk by
chunk; other subsets' maps are read a second time. Both ways give identical rows. Rows
outside the top-K have slice/case metrics NaN (``rows()``: None, blank in ranking.csv),
never an estimate; one-threshold candidates (single, mean) are always exact for every
row. RAM depends on the chunk and the grid, not on the number of slices.

Size limits: :mod:`.grid`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ensemblecam import metrics
from ensemblecam import progress as progress_out
from ensemblecam.ensemble import cache as slice_cache
from ensemblecam.ensemble.accumulate import SliceAcc
from ensemblecam.ensemble.counting import (
    MAX_JOINT_BINS,
    MinMaxAcc,
    add_joint,
    combo_counts,
    kept,
    level_lut,
    quantise_levels,
    revcum,
    slice_hist,
    take_levels,
    vote_dataset_counts,
)
from ensemblecam.ensemble.grid import DEFAULT_GRID, check_search_size, parse_grid, subsets_of
from ensemblecam.ensemble.operators import mean_map, parse_operator
from ensemblecam.ensemble.rows import Rows, as_rows
from ensemblecam.errors import InputError

#: Metrics computed from data-set confusion counts: exact for every row of a search.
DATASET_METRICS = (
    "paper_miou",
    "paper_dsc",
    "background_iou",
    "lesion_iou",
    "lesion_dice",
    "tp",
    "fp",
    "fn",
    "tn",
)


def objective_names(min_lesion_fraction: float = 0.0, with_correct: bool = True) -> list[str]:
    """Metrics that can rank configurations (all higher-is-better)."""
    names = [
        "paper_miou",
        "paper_dsc",
        "background_iou",
        "lesion_iou",
        "lesion_dice",
        "slice_dice_mean",
        "slice_iou_mean",
        "case_dice_mean",
    ]
    if min_lesion_fraction > 0:
        names += ["slice_dice_large_mean", "slice_iou_large_mean"]
    if with_correct:
        names += ["slice_dice_correct_mean", "slice_iou_correct_mean"]
    return names


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
                    row[name] = float(vals[f]) if keep or name in DATASET_METRICS else None
                out.append(row)
        return out

    def ranked(self, objective: str) -> list[dict[str, Any]]:
        """Rows sorted by ``objective`` (descending, NaN last; stable on ties)."""
        rows = self.rows()
        if rows and objective not in rows[0]:
            known = [k for k in rows[0] if k.endswith(("iou", "dsc", "dice", "mean"))]
            raise InputError(
                f"objective {objective!r}: unknown metric; expected one of {', '.join(known)}"
            )
        if objective not in DATASET_METRICS and any(c.detail is not None for c in self.candidates):
            raise InputError(
                f"objective {objective!r}: slice/case metrics were computed "
                f"only for the top-{self.top_k} rows; search with this objective"
            )
        return sorted(rows, key=lambda r: -r[objective] if np.isfinite(r[objective]) else math.inf)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k best values (descending, NaN last, ties in index order)."""
    flat = values.ravel()
    key = np.where(np.isfinite(flat), -flat, np.inf)
    return np.argsort(key, kind="stable")[:k]


class _Entry(NamedTuple):
    """One candidate of a search: member subset, operator label, kind and k."""

    members: tuple[int, ...]
    label: str
    kind: str
    k: int


@dataclass
class _Chunk:
    """One chunk of slices: masks, per-member maps, case ids."""

    start: int
    stop: int
    gt8: np.ndarray | None  # (S, P) uint8 0/1 (None: chunk read from the slice cache)
    gt_pix: np.ndarray
    raw: list[np.ndarray]  # (S, P) per member, stored dtype
    cids: np.ndarray
    npix: int


@dataclass
class _State:
    """What both passes share: inputs, grid and gates, the plan, the accumulators, totals."""

    srcs: list[Rows]
    gts: Rows
    names: list[str]
    grid: np.ndarray
    case_ids: np.ndarray  # dense case index (0..C-1) of every slice
    last_pos: np.ndarray  # position of every case's last slice
    gate_thr: np.ndarray  # -inf (no gating), then the sorted gate thresholds
    probs: np.ndarray | None  # (M, N) float64
    plan: list[_Entry]
    min_lesion_fraction: float
    classifier_threshold: float
    chunk: int
    progress: bool | None
    luts: list[np.ndarray | None] = field(default_factory=list)
    sel_names: list[str] = field(default_factory=list)
    accs: list[SliceAcc | None] = field(default_factory=list)  # per-slice accumulation
    mm_accs: dict[int, MinMaxAcc] = field(default_factory=dict)  # data-set min/max
    joints: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)  # data-set vote
    cached_joints: list[tuple[int, ...]] = field(default_factory=list)
    hw: tuple[int, ...] | None = None
    gt_total: int = 0
    npix_total: int = 0
    n_lesion: int = 0

    @property
    def n(self) -> int:
        return len(self.gts)

    @property
    def L(self) -> int:  # the grid size, L in the formulas
        return int(self.grid.size)

    @property
    def n_bins(self) -> int:
        return int(self.gate_thr.size)

    def chunks(self, desc: str, size: int) -> Any:
        """(start, stop) of every chunk of ``size`` slices, with a progress bar."""
        for start in progress_out.bar(
            range(0, self.n, size), desc=desc, unit="chunks", label="search",
            enabled=self.progress,
        ):  # fmt: skip
            yield start, min(start + size, self.n)

    def read_chunk(self, start: int, stop: int) -> _Chunk:
        gt = self.gts.read(start, stop)
        s = stop - start
        raw = [src.read(start, stop) for src in self.srcs]
        for i, r in enumerate(raw):
            if r.shape[1:] != (self.hw or gt.shape[1:]):
                raise InputError(
                    f"{self.names[i]}: maps of shape {r.shape[1:]} but masks of "
                    f"shape {self.hw or gt.shape[1:]}"
                )
        gt = gt.reshape(s, -1)
        gt8 = gt.astype(bool).view(np.uint8) if gt.dtype != bool else gt.view(np.uint8)
        return _Chunk(
            start,
            stop,
            gt8,
            gt8.sum(axis=1, dtype=np.int64),
            [r.reshape(s, -1) for r in raw],
            self.case_ids[start:stop],
            gt8.shape[1],
        )

    def gate_of(self, u: tuple[int, ...], ch: _Chunk) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Gate bin and slice selections of every slice of ``ch`` for subset ``u``."""
        if self.probs is not None:
            p = self.probs[list(u), ch.start : ch.stop].mean(axis=0)
        else:
            p = np.zeros(ch.stop - ch.start)
        bins = np.searchsorted(self.gate_thr, p, side="right") - 1
        sel = metrics.slice_selection(
            ch.gt_pix,
            ch.npix,
            self.min_lesion_fraction,
            p if self.probs is not None else None,
            self.classifier_threshold,
        )
        return bins, sel

    def shape(self, e: _Entry) -> tuple[int, ...]:
        """Metric grid shape of a candidate: (gates, L) for one threshold, else (gates, L^m)."""
        return (self.n_bins,) + ((self.L,) if e.kind == "mean" else (self.L,) * len(e.members))


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
    st = _setup(
        maps,
        masks,
        case_ids,
        grid,
        operators,
        subsets,
        probs,
        gates,
        min_lesion_fraction,
        classifier_threshold,
        member_names,
        chunk,
        progress,
    )
    full = not top_k or objective not in DATASET_METRICS
    _add_accumulators(st, full)
    cache = _make_cache(st)
    try:
        _pass1(st, cache, on_chunk)
        if st.n_lesion == 0:
            raise InputError("calibration set has no lesion pixel: thresholds cannot be chosen")
        results = [_dataset_results(st, c) for c in range(len(st.plan))]
        details = {} if full else _top_k_pass(st, results, objective, int(top_k or 0), cache)
    finally:
        if cache is not None:
            cache.close()
    candidates = []
    for c, e in enumerate(st.plan):
        shape = st.shape(e)
        detail = details.get(c)
        candidates.append(
            Candidate(
                e.label,
                e.members,
                {k2: np.asarray(v).reshape(shape) for k2, v in results[c].items()},
                None if detail is None else detail.reshape(shape),
            )
        )
    return SearchResult(
        st.grid,
        st.gate_thr,
        st.names,
        candidates,
        st.n,
        st.n_lesion,
        None if full else int(top_k or 0),
    )


def _setup(
    maps: Sequence[np.ndarray | Rows],
    masks: np.ndarray | Rows,
    case_ids: np.ndarray,
    grid: np.ndarray | str,
    operators: Sequence[str],
    subsets: Sequence[tuple[int, ...]] | None,
    probs: Sequence[np.ndarray] | None,
    gates: np.ndarray | Sequence[float] | None,
    min_lesion_fraction: float,
    classifier_threshold: float,
    member_names: Sequence[str] | None,
    chunk: int,
    progress: bool | None,
) -> _State:
    """Check the inputs (one InputError line each) and plan the search."""
    srcs = [as_rows(a) for a in maps]
    gts = as_rows(masks)
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
    _, dense = np.unique(np.asarray(case_ids), return_inverse=True)
    last_pos = np.zeros(dense.max() + 1, np.int64)
    last_pos[dense] = np.arange(n)
    gate_thr = np.concatenate(
        [[-np.inf], np.sort(np.asarray(gates if gates is not None else [], np.float64))]
    )
    if gate_thr.size > 1 and probs is None:
        raise InputError("gating needs classifier probabilities (probs.npy)")
    probs_arr = None if probs is None else np.stack([np.asarray(p, np.float64) for p in probs])
    plan = _make_plan(subsets, operators)
    check_search_size(
        gate_thr.size
        * sum(L if e.kind in ("single", "mean") else L ** len(e.members) for e in plan),
        L,
    )
    sel_names = (
        ["lesion"]
        + (["large"] if min_lesion_fraction > 0 else [])
        + (["correct"] if probs_arr is not None else [])
    )
    return _State(
        srcs,
        gts,
        names,
        grid,
        dense,
        last_pos,
        gate_thr,
        probs_arr,
        plan,
        min_lesion_fraction,
        classifier_threshold,
        chunk,
        progress,
        luts=[level_lut(grid, s.array.dtype) for s in srcs],
        sel_names=sel_names,
    )


def _make_plan(subsets: Sequence[tuple[int, ...]], operators: Sequence[str]) -> list[_Entry]:
    """Candidates in search order; one-member subsets get the operator "single"."""
    plan: list[_Entry] = []
    for u in subsets:
        if len(u) == 1:
            plan.append(_Entry(u, "single", "single", 1))
            continue
        for op in operators:
            kind, k = parse_operator(op, len(u))
            e = _Entry(u, op if kind != "vote" else f"vote:{k}", kind, k)
            if e not in plan:  # e.g. "vote" and "vote:2" for M=3
                plan.append(e)
    return plan


def _add_accumulators(st: _State, full: bool) -> None:
    """Per-slice accumulation (every combination) for: all entries in ``full`` mode, else
    the one-threshold candidates; data-set accumulators (min/max, vote joints) for the rest."""
    L, n_bins = st.L, st.n_bins
    per_slice = [full or e.kind in ("single", "mean") for e in st.plan]
    st.accs = [
        SliceAcc(n_bins, L if e.kind == "mean" else L ** len(e.members), st.sel_names)
        if ps
        else None
        for e, ps in zip(st.plan, per_slice, strict=True)
    ]
    for c, (e, ps) in enumerate(zip(st.plan, per_slice, strict=True)):
        if ps:
            continue
        u = e.members
        if e.kind in ("min", "max"):
            st.mm_accs[c] = MinMaxAcc(e.kind, len(u), L, n_bins)
        elif u not in st.joints:
            size = n_bins * (L + 1) ** len(u) * 2
            if size > MAX_JOINT_BINS:
                raise InputError(
                    f"threshold grid of {L} values is too fine for {len(u)} "
                    f"members ({size} bins): use a coarser grid or --max-members"
                )
            st.joints[u] = np.zeros(size, np.int64)


def _make_cache(st: _State) -> slice_cache.SliceCache | None:
    """The slices' histograms for the top-K pass: cached on disk if small, else None
    (re-read maps); only joints that pass 1 builds per slice anyway (small next to the
    pixels). Sets ``st.cached_joints``."""
    L = st.L
    npix_all = math.prod(st.gts.array.shape[1:])
    todo_u = {
        e.members
        for c, e in enumerate(st.plan)
        if st.accs[c] is None and e.kind not in ("min", "max")
    }
    cache_joints = sorted(u for u in todo_u if (L + 1) ** len(u) * 2 * 4 <= npix_all)
    cache_members = sorted(
        {e.members for c, e in enumerate(st.plan) if st.accs[c] is None and e.members not in todo_u}
    )  # min/max only: per-member counts
    if (cache_joints or cache_members) and slice_cache.SliceCache.nbytes(
        st.n, npix_all, L, cache_joints, cache_members
    ) <= slice_cache.SLICE_CACHE_BYTES:
        st.cached_joints = cache_joints
        return slice_cache.SliceCache(st.case_ids, npix_all, L, cache_joints, cache_members)
    st.cached_joints = []
    return None


def _pass1(
    st: _State, cache: slice_cache.SliceCache | None, on_chunk: Callable[[int], None] | None
) -> None:
    """Stream every chunk once: data-set counts of every configuration, per-slice sums of
    the per-slice candidates, and (with ``cache``) the per-slice histograms to disk."""
    L = st.L
    used = sorted({i for e in st.plan if e.kind != "mean" for i in e.members})
    order = sorted(range(len(st.plan)), key=lambda c: st.plan[c].kind in ("min", "max"))
    for start, stop in st.chunks("threshold grid", st.chunk):
        ch = st.read_chunk(start, stop)
        st.hw = st.hw or st.gts.array.shape[1:]
        assert ch.gt8 is not None
        s, npix = ch.gt8.shape
        st.gt_total += int(ch.gt_pix.sum())
        st.npix_total += npix * s
        st.n_lesion += int((ch.gt_pix > 0).sum())
        levels = {
            i: quantise_levels(ch.raw[i], st.grid)
            if st.luts[i] is None
            else take_levels(ch.raw[i], st.luts[i])
            for i in used
        }
        member_R: dict[int, np.ndarray] = {}

        def rev(
            i: int,
            lv: dict[int, np.ndarray] = levels,
            ch: _Chunk = ch,
            cache: dict[int, np.ndarray] = member_R,
        ) -> np.ndarray:
            if i not in cache:
                cache[i] = revcum(slice_hist(lv[i], ch.gt8, L + 1), 1)
            return cache[i]

        slice_joints = _pass1_chunk(st, ch, order, levels, rev, member_R)
        if cache is not None:
            cache.write(start, ch.gt_pix, slice_joints, rev)
        if on_chunk is not None:
            on_chunk(stop)


def _pass1_chunk(
    st: _State,
    ch: _Chunk,
    order: list[int],
    levels: dict[int, np.ndarray],
    rev: Callable[[int], np.ndarray],
    member_R: dict[int, np.ndarray],
) -> dict[tuple[int, ...], np.ndarray]:
    """Add one chunk to every candidate's accumulator (in ``order``: min/max last, so they
    reuse the member counts the joints fill); return the per-slice joints to cache."""
    assert ch.gt8 is not None
    gate_cache: dict[tuple[int, ...], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    joint_cache: dict[tuple[int, ...], np.ndarray] = {}
    slice_joints: dict[tuple[int, ...], np.ndarray] = {}
    done = np.unique(ch.cids[st.last_pos[ch.cids] < ch.stop])
    for c in order:
        e = st.plan[c]
        u = e.members
        if u not in gate_cache:
            gate_cache[u] = st.gate_of(u, ch)
        bins, sel = gate_cache[u]
        acc = st.accs[c]
        if acc is None and e.kind in ("min", "max"):
            st.mm_accs[c].add([rev(i) for i in u], bins, ch.npix)
            continue
        if acc is None:
            if u not in joint_cache:
                flat = add_joint(
                    st.joints[u],
                    [levels[i] for i in u],
                    ch.gt8,
                    bins,
                    st.L,
                    member_R,
                    u,
                    per_slice=u in st.cached_joints,
                )
                joint_cache[u] = np.empty(0)  # data-set joint added for this chunk
                if flat is not None:
                    slice_joints[u] = flat
            continue
        tp, fp = _slice_counts(st, ch, e, levels, rev, joint_cache)
        acc.add(tp, fp, ch.gt_pix, bins, ch.cids, sel)
        acc.close_cases(done)
    return slice_joints


def _slice_counts(
    st: _State,
    ch: _Chunk,
    e: _Entry,
    levels: dict[int, np.ndarray],
    rev: Callable[[int], np.ndarray],
    joint_cache: dict[tuple[int, ...], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (TP, FP) of every threshold combination of candidate ``e`` on ``ch``."""
    assert ch.gt8 is not None
    u, _label, kind, k = e
    L = st.L
    if kind == "mean":
        mm = mean_map([ch.raw[i] for i in u])
        mean_R = revcum(slice_hist(quantise_levels(mm, st.grid), ch.gt8, L + 1), 1)
        return mean_R[..., 1], mean_R[..., 0]
    if kind in ("single", "min", "max"):
        return combo_counts(kind, k, [rev(i) for i in u], None)
    joint = joint_cache.get(u)
    if joint is None:
        code = levels[u[0]].astype(np.int32)
        for i in u[1:]:
            code *= L + 1
            code += levels[i]
        joint = slice_hist(code, ch.gt8, (L + 1) ** len(u)).reshape(
            (ch.stop - ch.start,) + (L + 1,) * len(u) + (2,)
        )
        joint_cache[u] = joint
    return combo_counts(kind, k, [rev(i) for i in u], joint)


def _dataset_results(st: _State, c: int) -> dict[str, np.ndarray]:
    """Data-set metrics of every configuration of candidate ``c`` (+ its slice/case metrics
    if accumulated per slice)."""
    u, _label, kind, k = st.plan[c]
    acc = st.accs[c]
    if acc is not None:
        tp_b, fp_b = acc.tp, acc.fp
    elif kind in ("min", "max"):
        tp_b, fp_b = st.mm_accs[c].counts()
    else:
        jt = st.joints[u].reshape((st.n_bins,) + (st.L + 1,) * len(u) + (2,))
        tp_b, fp_b = vote_dataset_counts(jt, k)
    tp = kept(tp_b)
    fp = kept(fp_b)
    fn = st.gt_total - tp
    tn = st.npix_total - tp - fp - fn
    res = metrics.dataset_metrics(tp, fp, fn, tn)
    res.update({"tp": tp, "fp": fp, "fn": fn, "tn": tn})
    if acc is not None:
        res.update(acc.detail_metrics())
    return res


@dataclass
class _TopK:
    """The top-K pass's plan: per candidate its picks (gate idx, threshold idx) and distinct
    coarse columns (unique flat index, inverse); per subset the coarse threshold grids
    (indices into the grid) and the maps level -> coarse level; new accumulators."""

    todo: list[int]
    picks: dict[int, tuple[np.ndarray, np.ndarray]]
    coarse: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]]
    chunk: int
    cols: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    accs: dict[int, SliceAcc] = field(default_factory=dict)
    luts: dict[tuple[tuple[int, ...], int], np.ndarray | None] = field(default_factory=dict)


def _top_k_pass(
    st: _State,
    results: list[dict[str, np.ndarray]],
    objective: str,
    top_k: int,
    cache: slice_cache.SliceCache | None,
) -> dict[int, np.ndarray]:
    """Second streaming pass: exact slice/case metrics of the top-K rows per candidate.

    Per subset U, the thresholds used by its top-K rows form a coarse grid T_j per member;
    a map's coarse level #{t in T_j: t < level} keeps ``level > t`` exact for t in T_j, so
    the per-slice joint histogram of coarse levels gives every needed per-slice count.
    With ``cache`` those histograms come from pass 1's per-slice histograms on disk (no
    second read of the maps); else the maps are read again. Both give identical counts.
    Fills the slice/case metrics of those rows into ``results``; returns detail masks.
    """
    tk = _top_k_plan(st, results, objective, top_k)
    if tk is None:  # only one-threshold candidates: all exact after pass 1
        return {}
    for start, stop in st.chunks("top-ranked rows", tk.chunk):
        ch, hists = _top_k_hists(st, tk, start, stop, cache)
        done = np.unique(ch.cids[st.last_pos[ch.cids] < stop])
        for c in tk.todo:
            u, _label, kind, k = st.plan[c]
            member_R, joint = hists[u]
            tp, fp = combo_counts(kind, k, member_R, joint)
            uniq = tk.cols[c][0]
            bins, sel = st.gate_of(u, ch)
            tk.accs[c].add(tp[:, uniq], fp[:, uniq], ch.gt_pix, bins, ch.cids, sel)
            tk.accs[c].close_cases(done)
    return _top_k_fill(st, tk, results)


def _top_k_plan(
    st: _State, results: list[dict[str, np.ndarray]], objective: str, top_k: int
) -> _TopK | None:
    """Picks, coarse grids, columns, accumulators and LUTs of the top-K pass."""
    L = st.L
    todo = [c for c, acc in enumerate(st.accs) if acc is None]
    if not todo:
        return None
    picks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    thr_sets: dict[tuple[int, ...], list[set[int]]] = {}
    for c in todo:
        u = st.plan[c].members
        flat = _top_k(results[c][objective], top_k)
        g, combo = np.divmod(flat, L ** len(u))
        t_idx = np.stack(np.unravel_index(combo, (L,) * len(u)), axis=1)
        picks[c] = (g, t_idx)
        sets = thr_sets.setdefault(u, [set() for _ in u])
        for j in range(len(u)):
            sets[j].update(t_idx[:, j].tolist())
    coarse: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    per_slice_bins = 1
    for u, sets in thr_sets.items():
        tgrids = [np.array(sorted(s), np.int64) for s in sets]
        maps_ = [
            np.searchsorted(tg, np.arange(L + 1), side="left").astype(np.int32) for tg in tgrids
        ]
        coarse[u] = (tgrids, maps_)
        per_slice_bins = max(per_slice_bins, 2 * math.prod(tg.size + 1 for tg in tgrids))
    # same chunks with or without the cache: identical float sums, identical rows
    tk = _TopK(todo, picks, coarse, max(1, min(st.chunk, 2**23 // per_slice_bins)))
    for c in todo:  # the distinct coarse threshold combinations of the candidate's picks
        u = st.plan[c].members
        tgrids = coarse[u][0]
        g, t_idx = picks[c]
        pos = [np.searchsorted(tgrids[j], t_idx[:, j]) for j in range(len(u))]
        flat = np.ravel_multi_index(pos, tuple(tg.size for tg in tgrids))
        uniq, inv = np.unique(flat, return_inverse=True)
        tk.cols[c] = (uniq, inv)
        tk.accs[c] = SliceAcc(st.n_bins, uniq.size, st.sel_names)
    for u, (_tgrids, maps_) in coarse.items():
        for j, i in enumerate(u):
            lut = st.luts[i]
            tk.luts[(u, j)] = (
                None
                if lut is None
                else maps_[j][lut].astype(np.uint8 if maps_[j][-1] < 255 else np.uint16)
            )
    return tk


def _top_k_hists(
    st: _State, tk: _TopK, start: int, stop: int, cache: slice_cache.SliceCache | None
) -> tuple[_Chunk, dict[tuple[int, ...], tuple[list[np.ndarray], np.ndarray | None]]]:
    """The chunk and, per subset, per-slice (member_R, joint) of coarse levels: from the
    slice cache where it has them, else from the maps (read only if needed)."""
    hists: dict[tuple[int, ...], tuple[list[np.ndarray], np.ndarray | None]] = {}
    if cache is not None:
        for u, (tgrids, _maps) in tk.coarse.items():
            if cache.has(u):
                hists[u] = cache.hists(start, stop, u, tgrids)
    if cache is not None and len(hists) == len(tk.coarse):
        ch = _Chunk(
            start,
            stop,
            None,
            np.asarray(cache.gt_pix[start:stop], np.int64),
            [],
            cache.case_ids[start:stop],
            cache.npix,
        )
        return ch, hists
    ch = st.read_chunk(start, stop)
    for u in tk.coarse:
        if u not in hists:
            hists[u] = _coarse_hist(st, tk, u, ch)
    return ch, hists


def _coarse_hist(
    st: _State, tk: _TopK, u: tuple[int, ...], ch: _Chunk
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-slice (member_R, joint) of subset ``u``'s coarse levels from the chunk's maps."""
    assert ch.gt8 is not None
    tgrids, maps_ = tk.coarse[u]
    code = None
    for j, i in enumerate(u):
        lut = tk.luts[(u, j)]
        if lut is not None:
            cl = take_levels(ch.raw[i], lut)
        else:
            cl = maps_[j][quantise_levels(ch.raw[i], st.grid)]
        if code is None:
            code = cl.astype(np.int32)
        else:
            code *= tgrids[j].size + 1
            code += cl
    assert code is not None
    joint = slice_hist(code, ch.gt8, math.prod(tg.size + 1 for tg in tgrids))
    joint = joint.reshape((ch.stop - ch.start, *(tg.size + 1 for tg in tgrids), 2))
    member_R = []
    for j in range(len(u)):
        others = tuple(1 + o for o in range(len(u)) if o != j)
        member_R.append(revcum(joint.sum(axis=others), 1))
    return member_R, joint


def _top_k_fill(
    st: _State, tk: _TopK, results: list[dict[str, np.ndarray]]
) -> dict[int, np.ndarray]:
    """Write the top-K rows' slice/case metrics into ``results`` (NaN elsewhere); return
    per candidate the bool mask of the rows that have them."""
    L, n_bins = st.L, st.n_bins
    details: dict[int, np.ndarray] = {}
    for c in tk.todo:
        u = st.plan[c].members
        g, t_idx = tk.picks[c]
        flat = g * L ** len(u) + np.ravel_multi_index(tuple(t_idx.T), (L,) * len(u))
        inv = tk.cols[c][1]
        det = tk.accs[c].detail_metrics()
        mask = np.zeros(n_bins * L ** len(u), bool)
        mask[flat] = True
        details[c] = mask
        for name, vals in det.items():
            arr = np.full(n_bins * L ** len(u), np.nan)
            arr[flat] = vals[g, inv]
            results[c][name] = arr.reshape(n_bins, -1)
    return details
