"""``ensemblecam search``: open a split part's maps and masks, search, write the ranking.

Outputs (an atomic folder): ranking.csv/json, grid_<operator>[__members].npy/.json,
best_per_candidate.json, best.json (the best row + the search settings; its configuration
keys are :data:`ensemblecam.ensemble.operators.CONFIG_KEYS`), and with several
``calibration_cases`` calibration_curve.csv/json.

Criterion (``search.criterion``; best.json ``criterion`` records which one chose the
configuration and on how many cases): ``masks`` ranks by ``objective`` against the
masks of the calibration part's annotated cases; ``labels`` uses the slice labels only
(:mod:`ensemblecam.ensemble.labels`); ``auto`` is ``masks`` when the calibration part
has an annotated case, else ``labels``. ``slices: lesion`` scores only the annotated
slices labelled lesion (masks criterion): the view of the self-training labels, whose
lesion-free slices are background whatever the maps say (``run``'s pseudo-label search,
``fold<k>/pseudo_search``). With masks and ``compare_labels``, what the
labels criterion would choose on the same part is written to best_labels.json (with its
metrics against the calibration masks), so the two choices can be compared. The labels
criterion combines only ``label_members`` when given (``run``: the CAM members and the
first MIL localiser, since it cannot tell a collapsed localiser from a good one).
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
    masks: Rows | None  # None: opened without masks (``slices`` "labelled" or "all")
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
    lesion_only: bool = False,
) -> tuple[Any, Path, np.ndarray]:
    """(store, split file, store indices of the part's annotated slices); a store without
    masks or an empty selection is one InputError line.

    ``n_cases``: keep only N annotated cases of the part, chosen with ``seed``;
    ``lesion_only``: only the slices labelled lesion among them.
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
    idx = idx[store.annotated(idx)]
    if lesion_only:
        idx = idx[store.labels[idx] == 1]
    if len(idx) == 0:
        which = "annotated slice labelled lesion" if lesion_only else "annotated slice"
        raise InputError(f"{splits}: {what} set ({part} of fold {fold}) has no {which}")
    return store, splits, idx


def part_slices(
    store_path: Any, splits: Any, fold: int | str, part: str, labelled: bool = False
) -> tuple[Any, Path, np.ndarray]:
    """(store, split file, store indices of every slice of the part); ``labelled``: only
    slices with a known label (0 or 1). No masks needed; an empty part is one InputError."""
    from ensemblecam.io.split import get_fold
    from ensemblecam.io.store import SliceStore

    store = SliceStore.open(store_path)
    splits = Path(splits) if splits is not None else store.path / "splits.json"
    cases = get_fold(splits, int(fold) if str(fold).isdigit() else fold).part(part)
    idx = store.indices_for_cases(list(cases))
    if labelled:
        idx = idx[np.isin(store.labels[idx], (0, 1))]
    if len(idx) == 0:
        raise InputError(f"{splits}: {part} of fold {fold} has no {'labelled ' * labelled}slice")
    return store, splits, idx


def n_annotated_cases(store: Any, idx: np.ndarray) -> int:
    """Cases with a mask among store indices ``idx`` (0 for a store without masks)."""
    return len(set(store.table["case"][idx][store.annotated(idx)].tolist()))


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
    slices: str = "annotated",
) -> Inputs:
    """Open store + split part + members; every misalignment is one InputError line.

    ``slices``: "annotated" (the part's slices with masks; ``n_cases``: only N annotated
    cases, chosen with ``seed``), "annotated_lesion" (those labelled lesion), "labelled"
    (every slice with a label, no masks read) or "all" (every slice, no masks read).
    """
    from ensemblecam.io.mapstore import MapSet

    if not members:
        raise InputError("no members given (--members a__gradcam,b__gradcam)")
    scored = slices.startswith("annotated")
    if scored:
        store, splits, idx = annotated_part(
            store_path, splits, fold, part, what, n_cases, seed, slices == "annotated_lesion"
        )
    else:
        store, splits, idx = part_slices(store_path, splits, fold, part, slices == "labelled")
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
        if tuple(ms.maps.shape[1:]) != tuple(store.size):
            raise InputError(
                f"member {name!r}: maps of shape {tuple(ms.maps.shape[1:])} but "
                f"slices of shape {tuple(store.size)}"
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
        Rows(store.masks, idx) if scored else None,
        store.table["case"][idx],
        store.labels[idx],
    )


def run_search(cfg: SearchConfig, n_cases: int | None) -> tuple[SearchResult, list[dict[str, Any]]]:
    """Search ``cfg`` on ``n_cases`` annotated cases (None: all); (result, ranked rows)."""
    slices = "annotated_lesion" if cfg.slices == "lesion" else "annotated"
    inp = open_inputs(cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, cfg.members,
                      n_cases, cfg.seed, slices=slices)  # fmt: skip
    for op in cfg.operators:
        parse_operator(op, max(len(cfg.members), 1))
    allowed = objective_names(cfg.min_lesion_fraction, True)
    if cfg.objective not in allowed:
        raise InputError(f"objective {cfg.objective!r}: expected one of {', '.join(allowed)}")
    assert inp.masks is not None
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


def run_label_search(
    cfg: SearchConfig,
) -> tuple[SearchResult, list[dict[str, Any]], dict[str, Any]]:
    """The labels criterion (:mod:`ensemblecam.ensemble.labels`) on every labelled slice of
    the calibration part: (result, ranked rows, best.json ``criterion`` record). With
    ``cfg.gate`` every row's gate is the Youden gate of its members' mean probability."""
    from ensemblecam.ensemble.labels import label_search, label_settings, youden_gate

    members = cfg.members
    if cfg.label_members is not None:
        members = [m for m in cfg.members if m in cfg.label_members]
    inp = open_inputs(
        cfg.store, cfg.splits, cfg.fold, cfg.part, cfg.maps, members, slices="labelled"
    )
    res = label_search(
        inp.maps,
        inp.labels,
        inp.case_ids,
        inp.store.size,
        parse_grid(cfg.grid),
        cfg.operators,
        subsets_of(len(inp.maps), cfg.max_members),
        inp.member_names,
        cfg.fp_budget,
        cfg.chunk,
    )
    res.store_id = inp.store.identity
    ranked = res.ranked("label_score")
    if cfg.gate:
        gates = parse_grid(cfg.gate_grid)
        by_name = dict(zip(inp.member_names, inp.probs, strict=True))
        chosen: dict[tuple[str, ...], float | None] = {}
        for row in ranked:
            key = tuple(row["members"])
            if key not in chosen:
                p = np.mean([by_name[m] for m in key], axis=0)
                chosen[key] = youden_gate(p, inp.labels, gates)
            row["gate"] = chosen[key]
    n_pos = int((inp.labels == 1).sum())
    info = label_settings(cfg.fp_budget, n_pos, int((inp.labels == 0).sum()))
    info["n_cases"] = len(set(inp.case_ids.tolist()))
    return res, ranked, info


def resolve_criterion(cfg: SearchConfig) -> str:
    """``cfg.criterion``, with ``auto`` resolved: ``masks`` if the calibration part has an
    annotated slice, else ``labels``. ``masks`` on a part without masks is refused."""
    if cfg.criterion == "labels":
        return "labels"
    store, _, idx = part_slices(cfg.store, cfg.splits, cfg.fold, cfg.part)
    if n_annotated_cases(store, idx) == 0:
        if cfg.criterion == "masks":
            raise InputError(
                f"{store.path}: search.criterion masks, but the {cfg.part} part of fold "
                f"{cfg.fold} has no annotated case; use criterion labels or auto"
            )
        return "labels"
    return "masks"


def check_search_config(cfg: SearchConfig) -> None:
    """Every check of a search configuration that needs no data: grids (size and values),
    operators, objective and the number of configurations (``MAX_CONFIGURATIONS``)."""
    grid = parse_grid(cfg.grid)
    gates = parse_grid(cfg.gate_grid) if cfg.gate else np.zeros(0)
    other = sorted(set(cfg.label_members or []) - set(cfg.members))
    if other:
        raise InputError(f"--label-members {short_repr(','.join(other))}: not among --members")
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
    outputs of the last entry are kept. The criterion: module docstring.
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
    criterion = resolve_criterion(cfg)
    if criterion == "labels" and cfg.slices == "lesion":
        raise InputError(
            "search.slices lesion: scores the masks of the lesion slices, but the "
            f"{cfg.part} part has none to score (criterion labels)"
        )
    if criterion == "labels" and ns != [None]:
        raise InputError(
            f"--calibration-cases {cfg.calibration_cases}: counts annotated cases, but the "
            "labels criterion uses no masks (leave it at all)"
        )
    partial = fsutil.prepare_output_dir(cfg.out, force, "best.json")
    settings = cfg.model_dump(mode="json")
    if criterion == "labels":
        res, ranked, info = run_label_search(cfg)
        write_search_outputs(partial, res, ranked, "label_score", settings, info)
        fsutil.commit_output_dir(partial, cfg.out)
        return dict(ranked[0])
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
    store, _, idx = annotated_part(cfg.store, cfg.splits, cfg.fold, cfg.part, n_cases=ns[-1],
                                   seed=cfg.seed)  # fmt: skip
    _, _, part_idx = part_slices(cfg.store, cfg.splits, cfg.fold, cfg.part)
    info = {
        "name": "masks",
        "objective": cfg.objective,
        "slices": cfg.slices,
        "n_annotated_cases": n_annotated_cases(store, idx),
        "n_cases": len(set(store.table["case"][part_idx].tolist())),
    }
    write_search_outputs(partial, res, ranked, cfg.objective, settings, info)
    if cfg.compare_labels:
        _write_label_choice(cfg, partial, ranked)
    if len(ns) > 1:
        fsutil.write_json(partial / "calibration_curve.json", curve)
        fsutil.write_text(partial / "calibration_curve.csv", fsutil.csv_text(curve))
    fsutil.commit_output_dir(partial, cfg.out)
    return dict(ranked[0])


def _write_label_choice(cfg: SearchConfig, out: Path, ranked: list[dict[str, Any]]) -> None:
    """best_labels.json: the configuration the labels criterion picks on the same part, its
    label metrics and (from the mask search's ``ranked`` rows, same configuration) its
    metrics against the calibration masks. Skipped, with a note in it, when the part's
    labels do not allow the criterion (no lesion or no lesion-free slice)."""
    try:
        _, lranked, info = run_label_search(cfg)
    except InputError as exc:
        fsutil.write_json(out / "best_labels.json", {"skipped": str(exc)})
        return
    pick = lranked[0]
    conf = EnsembleConfig.from_dict(pick).to_dict()
    same = next(
        (r for r in ranked if EnsembleConfig.from_dict(r).to_dict() == conf),
        None,
    )
    fsutil.write_json(
        out / "best_labels.json",
        {
            **conf,
            **{k: pick[k] for k in ("label_score", "lesion_slice_area", "free_slice_area")},
            "criterion": info,
            "calibration_masks": None
            if same is None
            else {k: v for k, v in same.items() if k not in conf},
        },
    )


def write_search_outputs(
    out: Path,
    res: SearchResult,
    ranked: list[dict[str, Any]],
    objective: str,
    settings: dict[str, Any],
    criterion: dict[str, Any] | None = None,
) -> None:
    """ranking.csv/json, grid_<operator>[__members].npy/.json, best_per_candidate.json (the
    best row of every operator x member subset), best.json (each atomic; ``criterion``:
    what chose the configuration, recorded in best.json)."""
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
        finite = np.where(np.isfinite(values), values, -np.inf)
        best_gate = int(np.argmax(finite.reshape(values.shape[0], -1).max(axis=1)))
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
    if criterion is not None:
        best["criterion"] = criterion
    if res.store_id is not None:
        best["store_id"] = res.store_id
    fsutil.write_json(out / "best.json", best)
