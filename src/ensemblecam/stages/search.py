"""``ensemblecam search``: open a split part's maps and masks, search, write the ranking.

Outputs (an atomic folder): ranking.csv/json, grid_<operator>[__members].npy/.json,
best_per_candidate.json, best.json (the best row + the search settings; its configuration
keys are :data:`ensemblecam.ensemble.operators.CONFIG_KEYS`), and with several
``calibration_cases`` calibration_curve.csv/json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.config import SearchConfig, short_repr
from ensemblecam.ensemble.grid import check_search_size, n_configurations, parse_grid, subsets_of
from ensemblecam.ensemble.operators import EnsembleConfig, parse_operator
from ensemblecam.ensemble.rows import Rows
from ensemblecam.ensemble.search import SearchResult, objective_names, search
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil


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
    store_path: Any,
    splits: Any,
    fold: int | str,
    part: str,
    what: str = "calibration",
    n_cases: int | None = None,
    seed: int = 0,
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
    store_path: Any,
    splits: Any,
    fold: int | str,
    part: str,
    maps_root: Any,
    members: Sequence[str],
    n_cases: int | None = None,
    seed: int = 0,
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
            raise InputError(
                f"member {name!r}: no folder {root / name} "
                f"(available: {', '.join(avail) or 'none'})"
            )
        ms = MapSet.open(root / name)
        ms.check_store(store)
        rows = ms.rows_for(idx)
        if tuple(ms.maps.shape[1:]) != tuple(store.masks.shape[1:]):
            raise InputError(
                f"member {name!r}: maps of shape {tuple(ms.maps.shape[1:])} but "
                f"masks of shape {tuple(store.masks.shape[1:])}"
            )
        names.append(name)
        srcs.append(Rows(ms.maps, rows))
        probs.append(ms.probs[rows])
    return Inputs(
        store,
        idx,
        names,
        srcs,
        probs,
        Rows(store.masks, idx),
        store.table["case"][idx],
        store.labels[idx],
    )


def run_search(cfg: SearchConfig, n_cases: int | None) -> tuple[SearchResult, list[dict[str, Any]]]:
    """Search ``cfg`` on ``n_cases`` annotated cases (None: all); (result, ranked rows)."""
    inp = open_inputs(
        cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, cfg.members, n_cases, cfg.seed
    )
    for op in cfg.operators:
        parse_operator(op, max(len(cfg.members), 1))
    allowed = objective_names(cfg.min_lesion_fraction, True)
    if cfg.objective not in allowed:
        raise InputError(f"objective {cfg.objective!r}: expected one of {', '.join(allowed)}")
    res = search(
        inp.maps,
        inp.masks,
        inp.case_ids,
        parse_grid(cfg.grid),
        cfg.operators,
        subsets_of(len(inp.maps), cfg.max_members),
        probs=inp.probs,
        gates=parse_grid(cfg.gate_grid) if cfg.gate else None,
        min_lesion_fraction=cfg.min_lesion_fraction,
        classifier_threshold=cfg.classifier_threshold,
        member_names=inp.member_names,
        chunk=cfg.chunk,
        objective=cfg.objective,
        top_k=cfg.top_k or None,
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
        raise InputError(
            f"objective {short_repr(cfg.objective)}: expected one of {', '.join(allowed)}"
        )
    check_search_size(
        n_configurations(m, grid.size, cfg.operators, cfg.max_members, gates.size), grid.size
    )


def run_search_stage(cfg: SearchConfig, force: bool = False) -> dict[str, Any]:
    """Search ``cfg`` and write its outputs to ``cfg.out`` (atomic folder); return the best row.

    ``cfg.calibration_cases`` "N1,N2,all" repeats the search on N annotated cases each and
    writes calibration_curve.csv/json (how the chosen configuration changes with N); the
    outputs of the last entry are kept.
    """
    ns: list[int | None] = []
    for v in [v.strip() for v in cfg.calibration_cases.split(",") if v.strip()] or ["all"]:
        if v == "all":
            ns.append(None)
        elif v.isdigit():
            ns.append(int(v))
        else:
            raise InputError(
                f"--calibration-cases {short_repr(cfg.calibration_cases)}: N, all or N1,N2"
            )
    check_search_config(cfg)
    partial = fsutil.prepare_output_dir(cfg.out, force, "best.json")
    curve = []
    res, ranked = None, []
    for n_cases in ns:
        res, ranked = run_search(cfg, n_cases)
        best = ranked[0]
        curve.append(
            {
                "calibration_cases": "all" if n_cases is None else n_cases,
                **EnsembleConfig.from_dict(best).to_dict(),
                cfg.objective: best[cfg.objective],
            }
        )
    assert res is not None
    write_search_outputs(partial, res, ranked, cfg.objective, cfg.model_dump(mode="json"))
    if len(ns) > 1:
        fsutil.write_json(partial / "calibration_curve.json", curve)
        fsutil.write_text(partial / "calibration_curve.csv", fsutil.csv_text(curve))
    fsutil.commit_output_dir(partial, cfg.out)
    return dict(ranked[0])


def write_search_outputs(
    out: Path,
    res: SearchResult,
    ranked: list[dict[str, Any]],
    objective: str,
    settings: dict[str, Any],
) -> None:
    """ranking.csv/json, grid_<operator>[__members].npy/.json, best_per_candidate.json (the
    best row of every operator x member subset), best.json (each atomic)."""
    fsutil.write_text(out / "ranking.csv", fsutil.csv_text(ranked))
    fsutil.write_json(
        out / "ranking.json",
        {
            "objective": objective,
            "n_configurations": len(ranked),
            "slice_case_metrics": "every row"
            if res.top_k is None
            else f"top {res.top_k} rows per multi-member operator and every single/mean row; "
            "null elsewhere (data-set metrics: every row)",
            "top": ranked[:1000],
        },
    )
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
        fsutil.write_json(
            out / f"{name}.json",
            {
                "operator": cand.operator,
                "objective": objective,
                "members": [res.member_names[i] for i in cand.members],
                "thresholds": [float(str(t)) for t in res.grid],
                "gate": None if best_gate == 0 else float(res.gates[best_gate]),
                "axes": "one axis per member (member order), threshold index",
                "values": grid_vals.tolist(),
            },
        )
    per: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for row in ranked:
        per.setdefault((row["operator"], tuple(row["members"])), row)
    fsutil.write_json(out / "best_per_candidate.json", list(per.values()))
    best = dict(ranked[0])
    best.update(
        objective=objective,
        search=settings,
        n_slices=res.n_slices,
        n_lesion_slices=res.n_lesion_slices,
    )
    if res.store_id is not None:
        best["store_id"] = res.store_id
    fsutil.write_json(out / "best.json", best)
