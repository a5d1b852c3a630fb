"""Reading a run folder for the report: the :class:`Run` and the stage outputs it holds."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.ensemble.operators import CONFIG_KEYS
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import CHOSEN_SLUG, RESULTS_FORMAT, RunLayout


@dataclass
class Run:
    """What the report reads from a run folder (missing optional parts are None)."""

    path: Path
    results: dict[str, Any]
    run_json: dict[str, Any]
    config_text: str | None
    store: Any | None
    store_error: str | None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.path)


def open_run(run_dir: str | Path) -> Run:
    """Open a run folder; not a run folder or a missing/foreign results.json: InputError."""
    path = Path(run_dir)
    lay = RunLayout(path)
    if not path.is_dir():
        raise InputError(f"{path}: run folder not found")
    if not lay.run_record.is_file() and not lay.config.is_file():
        raise InputError(f"{path}: not an ensemblecam run folder (no run.json or config.yaml)")
    res_path = lay.results_json
    if not res_path.is_file():
        raise InputError(
            f"{res_path}: results.json not found; finish the run first (ensemblecam run)"
        )
    results = fsutil.read_json(res_path, "results file")
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise InputError(f"{res_path}: not an ensemblecam results file")
    rows = results.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise InputError(f"{res_path}: 'rows' must be a list of rows with a name")
    run_json: dict[str, Any] = {}
    if lay.run_record.is_file():
        loaded = fsutil.read_json(lay.run_record, "run record")
        run_json = loaded if isinstance(loaded, dict) else {}
    config_text = lay.config.read_text() if lay.config.is_file() else None
    store = None
    store_error = None
    try:
        from ensemblecam.io.store import SliceStore

        store = SliceStore.open(lay.store)
    except InputError as exc:
        store_error = str(exc)
    return Run(path, results, run_json, config_text, store, store_error)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def fold_names(run: Run) -> list[str]:
    folds = run.results.get("folds")
    if isinstance(folds, list) and folds:
        return [str(f) for f in folds]
    return [p.name for p in run.layout.fold_dirs()]


def config_yaml(run: Run) -> dict[str, Any]:
    """config.yaml of the run as a dict ({} when absent or unreadable)."""
    if run.config_text is None:
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(run.config_text)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def splits_path(run: Run) -> Path | None:
    """The run's splits.json: <run>/splits.json, <run>/split/splits.json or the store's."""
    cands = run.layout.splits_candidates()
    if run.store is None:
        cands = cands[:2]
    return next((c for c in cands if c.is_file()), None)


def best_json(run: Run, fold: str) -> dict[str, Any] | None:
    p = run.layout.fold(fold).best
    if not p.is_file():
        return None
    got = fsutil.read_json(p, "chosen configuration")
    return got if isinstance(got, dict) else None


def eval_masks(run: Run, fold: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(store indices, masks) of the fold's chosen configuration on its evaluated part, as
    the evaluation wrote them (eval/masks.npz); None when the file is absent."""
    path = run.layout.fold(fold).eval_masks
    if not path.is_file():
        return None
    from ensemblecam.io.masks import read_masks

    index, masks = read_masks(path)
    return index, np.asarray(masks).astype(bool)


def _config_of(metrics: Path) -> dict[str, Any] | None:
    if not metrics.is_file():
        return None
    cfg = fsutil.read_json(metrics, "metrics").get("config")
    return cfg if isinstance(cfg, dict) else None


def _same_config(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and all(a.get(k) == b.get(k) for k in CONFIG_KEYS)


def chosen_case_dice(run: Run, fold: str, best: dict[str, Any]) -> dict[str, float] | None:
    """Case Dice of the chosen configuration's lesion cases (reference lesion in the case:
    tp + fn > 0) as the evaluation stored it: eval/ensemble/per_case.csv, or the per_case.csv
    of another row evaluated with the same configuration; None when there is none."""
    f = run.layout.fold(fold)
    if not f.eval.is_dir():
        return None
    rows = sorted(p for p in f.eval.iterdir() if p.is_dir())
    for d in rows:
        path = f.per_case(d.name)
        if path.is_file() and (
            d.name.startswith(CHOSEN_SLUG) or _same_config(_config_of(f.eval_metrics(d.name)), best)
        ):
            try:
                return {
                    r["case"]: float(r["dice"])
                    for r in read_csv(path)
                    if int(r["tp"]) + int(r["fn"]) > 0
                }
            except (KeyError, ValueError) as exc:
                raise InputError(f"{path}: malformed ({exc})") from exc
    return None
