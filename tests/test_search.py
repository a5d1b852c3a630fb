"""The one-pass search equals a brute-force loop that re-thresholds every combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ensemblecam.ensemble import cache as C
from ensemblecam.ensemble import search as S
from ensemblecam.ensemble.grid import DEFAULT_GRID, parse_grid, subsets_of
from ensemblecam.ensemble.operators import apply_config, parse_operator
from ensemblecam.ensemble.rows import Rows
from ensemblecam.errors import InputError
from ensemblecam.metrics.conventions import score, slice_counts


def brute_force(
    maps, masks, case_ids, grid, operators, subsets, probs=None, gates=(), min_lesion_fraction=0.0
):
    """Re-threshold and score every configuration with apply_config (the reference)."""
    out = {}
    gate_list = [None, *gates]
    for u in subsets:
        ops = ["single"] if len(u) == 1 else operators
        for op in ops:
            m_u = [maps[i] for i in u]
            p_u = None if probs is None else [probs[i] for i in u]
            label = op
            if op.startswith("vote"):
                label = f"vote:{parse_operator(op, len(u))[1]}"
            nthr = 1 if op == "mean" else len(u)
            for thr in itertools.product(grid, repeat=nthr):
                for gate in gate_list:
                    cfg = {"operator": op, "thresholds": [float(t) for t in thr], "gate": gate}
                    pred = apply_config(m_u, cfg, p_u)
                    counts = slice_counts(pred, masks.astype(bool))
                    pm = None if p_u is None else np.mean(np.stack(p_u), axis=0)
                    out[(label, u, tuple(float(str(t)) for t in thr), gate)] = score(
                        *counts, case_ids, pm, min_lesion_fraction
                    )
    return out


DETAIL = ("slice_", "case_")


def compare(result, expected, top_k=None, objective="paper_miou"):
    """Every reported number equals brute force; slice/case metrics are reported exactly
    for every row (top_k None) or for the top_k rows by ``objective`` of each multi-member
    candidate (and every row of one-threshold candidates), None elsewhere."""
    rows = result.rows()
    assert len(rows) == len(expected)
    by_cand = {}
    for row in rows:
        u = tuple(result.member_names.index(n) for n in row["members"])
        key = (row["operator"], u, tuple(row["thresholds"]), row["gate"])
        by_cand.setdefault((row["operator"], u), []).append((key, row))
        exp = expected[key]
        for c in ("tp", "fp", "fn", "tn"):
            assert row[c] == exp[c], (key, c)
        for name in exp:
            if name.startswith(("slice_", "case_", "paper_", "lesion_", "background_")):
                if row[name] is None:
                    assert top_k is not None and name.startswith(DETAIL), (key, name)
                    continue
                np.testing.assert_allclose(
                    row[name], exp[name], rtol=1e-9, atol=1e-12, err_msg=f"{key} {name}"
                )
    for (op, u), items in by_cand.items():
        detailed = {key for key, row in items if row["case_dice_mean"] is not None}
        if top_k is None or op in ("single", "mean"):
            assert len(detailed) == len(items)
            continue
        # exactly the top_k rows of the candidate by the objective (stable order) are detailed
        order = sorted(items, key=lambda kr: -expected[kr[0]][objective])
        assert detailed == {key for key, _ in order[:top_k]}, (op, u)


def random_maps(rng, m, n, h, w, dtype):
    maps = []
    for _ in range(m):
        a = rng.random((n, h, w))
        if dtype == np.uint8:
            maps.append(np.rint(a * 255).astype(np.uint8))
        else:
            maps.append(a.astype(dtype))
    return maps


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize(
    "m,grid,dtype,ops,hw",
    [
        (1, "0:0.9:0.1", np.float16, ["and"], (4, 5)),
        (2, "0:0.9:0.1", np.float16, ["and", "or", "min", "max", "mean"], (4, 5)),
        # 12x12 slices and 3 thresholds: the small-grid path (one per-slice joint histogram)
        (2, "0.25,0.5,0.6", np.uint8, ["and", "or", "min", "max", "vote"], (12, 12)),
        (
            3,
            "0.1:0.5:0.2",
            np.float32,
            ["and", "or", "min", "max", "vote", "vote:2", "mean"],
            (4, 5),
        ),
    ],
)
def test_random_equals_brute_force(m, grid, dtype, ops, hw, top_k):
    rng = np.random.default_rng(m)
    n, (h, w) = 14, hw
    maps = random_maps(rng, m, n, h, w, dtype)
    masks = (rng.random((n, h, w)) < 0.3).astype(np.uint8)
    masks[3] = 0  # lesion-free slices count too
    case_ids = np.repeat(np.arange(5), 3)[:n][::-1].copy()  # non-contiguous order
    probs = [rng.random(n).astype(np.float32) for _ in range(m)]
    g = parse_grid(grid)
    subsets = subsets_of(m)
    res = S.search(
        maps,
        masks,
        case_ids,
        g,
        ops,
        subsets,
        probs=probs,
        gates=[0.3, 0.6],
        min_lesion_fraction=0.2,
        chunk=4,
        progress=False,
        top_k=top_k,
    )
    exp = brute_force(maps, masks, case_ids, g, ops, subsets, probs, (0.3, 0.6), 0.2)
    compare(res, exp, top_k)


def test_min_max_ties_go_to_first_member():
    # Both members have exactly 2 positives on every slice, in different places.
    masks = np.zeros((3, 2, 2), np.uint8)
    masks[:, 0, :] = 1
    a = np.zeros((3, 2, 2), np.float32)
    b = np.zeros((3, 2, 2), np.float32)
    a[:, 0, :] = 0.9  # member a hits the lesion
    b[:, 1, :] = 0.9  # member b misses it
    grid = parse_grid("0.5")
    res = S.search([a, b], masks, np.zeros(3), grid, ["min", "max"], [(0, 1)], progress=False)
    for cand in res.candidates:
        assert cand.metrics["tp"].ravel()[0] == 6  # member a chosen on every slice
    # swapped order: b first -> b chosen
    res = S.search([b, a], masks, np.zeros(3), grid, ["min", "max"], [(0, 1)], progress=False)
    for cand in res.candidates:
        assert cand.metrics["tp"].ravel()[0] == 0
    exp = brute_force([a, b], masks, np.zeros(3), grid, ["min", "max"], [(0, 1)])
    assert all(v["tp"] == 6 for v in exp.values())


def test_values_on_grid_edges_are_exact():
    # map values equal to thresholds: m > t is False at equality.
    grid = parse_grid("0:0.9:0.1")
    vals = grid.astype(np.float16)
    maps = [np.tile(vals, 4).reshape(2, 4, 5)]
    masks = (maps[0] > np.float16(0.45)).astype(np.uint8)
    res = S.search(maps, masks, np.arange(2), grid, ["and"], [(0,)], chunk=1, progress=False)
    compare(res, brute_force(maps, masks, np.arange(2), grid, ["and"], [(0,)]))


def test_blob_maps_equal_brute_force(tmp_path):
    from ensemblecam.io.store import SliceStore
    from store_factory import build_store

    store = SliceStore.open(
        build_store(tmp_path / "s", n_cases=4, slices_per_case=4, size=(16, 16))
    )
    gt = np.asarray(store.masks).astype(np.float32)
    rng = np.random.default_rng(1)
    from scipy.ndimage import gaussian_filter

    maps = []
    for sigma in (1.0, 2.5):
        sm = gaussian_filter(gt + 0.3 * rng.random(gt.shape), sigma=(0, sigma, sigma))
        sm = (sm - sm.min()) / (sm.max() - sm.min())
        maps.append(sm.astype(np.float16))
    cases = store.table["case"]
    g = parse_grid(DEFAULT_GRID)
    ops = ["and", "or", "min", "max"]
    res = S.search(maps, store.masks, cases, g, ops, chunk=5, progress=False)  # top_k=20
    assert res.top_k == 20
    compare(res, brute_force(maps, np.asarray(store.masks), cases, g, ops, subsets_of(2)), top_k=20)


def test_ranking_and_objective():
    rng = np.random.default_rng(0)
    maps = random_maps(rng, 2, 6, 4, 4, np.float16)
    masks = (rng.random((6, 4, 4)) < 0.4).astype(np.uint8)
    res = S.search(
        maps,
        masks,
        np.arange(6) // 2,
        "0:0.9:0.1",
        ["and", "or"],
        progress=False,
        objective="case_dice_mean",
    )  # a case-level objective: every row exact
    assert res.top_k is None
    ranked = res.ranked("case_dice_mean")
    vals = [r["case_dice_mean"] for r in ranked]
    assert vals == sorted(vals, reverse=True)
    assert len(ranked) == 2 * 100 + 2 * 10
    with pytest.raises(InputError, match="objective 'nope'"):
        res.ranked("nope")
    # default: ranked by paper_miou, slice/case metrics only for the top-K rows
    fast = S.search(
        maps, masks, np.arange(6) // 2, "0:0.9:0.1", ["and", "or"], progress=False, top_k=5
    )
    ranked = fast.ranked("paper_miou")
    assert [r["paper_miou"] for r in ranked] == sorted(
        vals_miou := [r["paper_miou"] for r in res.rows()], reverse=True
    ) and len(vals_miou) == 220
    assert ranked[0]["case_dice_mean"] is not None
    assert sum(r["case_dice_mean"] is None for r in ranked) == 2 * (100 - 5)
    with pytest.raises(InputError, match="top-5 rows"):
        fast.ranked("case_dice_mean")


def test_bad_inputs():
    maps = [np.zeros((3, 4, 4), np.float16)]
    masks = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(InputError, match="no lesion"):
        S.search(maps, masks, np.zeros(3), "0.5", progress=False)
    masks[0, 0, 0] = 1
    with pytest.raises(InputError, match="empty calibration"):
        S.search([m[:0] for m in maps], masks[:0], np.zeros(0), "0.5", progress=False)
    with pytest.raises(InputError, match="shape"):
        S.search([np.zeros((3, 5, 4), np.float16)], masks, np.zeros(3), "0.5", progress=False)
    with pytest.raises(InputError, match="a: 2 map slices for 3"):
        S.search([maps[0][:2]], masks, np.zeros(3), "0.5", member_names=["a"], progress=False)
    with pytest.raises(InputError, match="operator 'xor'"):
        S.search(maps * 2, masks, np.zeros(3), "0.5", ["xor"], progress=False)
    with pytest.raises(InputError, match="threshold grid"):
        parse_grid("0:1:-1")
    with pytest.raises(InputError, match="vote:5"):
        parse_operator("vote:5", 2)
    with pytest.raises(InputError, match="too fine"):  # refused before any pass over the maps
        S.search(maps * 3, masks, np.zeros(3), "0:1:0.002", ["and"], [(0, 1, 2)], progress=False)


class CountingRows(Rows):
    """Rows that count how many map slices the search reads."""

    def __init__(self, array, log):
        super().__init__(array)
        self.log = log

    def read(self, start, stop):
        self.log.append(stop - start)
        return super().read(start, stop)


def _rows_key(rows):
    """Rows with NaN made comparable (NaN == NaN) for an exact equality check."""
    return [
        {k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows
    ]


VOTE_OPS = ["and", "or", "min", "max", "vote:2"]


@pytest.mark.parametrize(
    "ops,hw,reads",
    [
        (VOTE_OPS, (16, 32), 1),  # every joint histogram (4^m * 2 bins) cached
        (VOTE_OPS, (12, 24), 2),  # pairs cached, the 3-member joint too large: maps re-read
        (["min", "max"], (5, 6), 1),  # min/max only: per-member counts cached
    ],
)
def test_slice_cache_equals_reread(monkeypatch, ops, hw, reads):
    """Top-K slice/case metrics from pass 1's on-disk histograms equal a second read of
    the maps (each path forced via SLICE_CACHE_BYTES) and brute force; the re-read path
    reads every map slice twice, the cached path once (``reads``: when nothing is left
    to re-read)."""
    rng = np.random.default_rng(7)
    m, n, (h, w) = 3, 23, hw
    maps = random_maps(rng, m, n, h, w, np.float16)
    masks = (rng.random((n, h, w)) < 0.35).astype(np.uint8)
    masks[[2, 9]] = 0
    case_ids = (np.arange(n) * 7) % 5  # cases interleaved across chunks
    probs = [rng.random(n).astype(np.float32) for _ in range(m)]
    g = parse_grid("0.1:0.7:0.3")
    subsets = subsets_of(m)
    out = {}
    monkeypatch.setattr(C.SliceCache, "MAX_READ", 64)  # cached rows read 1-2 at a time
    for budget in (0, 2**40):
        monkeypatch.setattr(C, "SLICE_CACHE_BYTES", budget)
        log: list[int] = []
        res = S.search(
            [CountingRows(a, log) for a in maps],
            masks,
            case_ids,
            g,
            ops,
            subsets,
            probs=probs,
            gates=[0.5],
            min_lesion_fraction=0.1,
            chunk=3,
            progress=False,
            top_k=4,
        )
        out[budget] = (res, sum(log))
    (reread, n_reread), (cached, n_cached) = out[0], out[2**40]
    assert n_reread == 2 * m * n and n_cached == reads * m * n
    assert _rows_key(cached.rows()) == _rows_key(reread.rows())
    compare(
        cached, brute_force(maps, masks, case_ids, g, ops, subsets, probs, (0.5,), 0.1), top_k=4
    )
