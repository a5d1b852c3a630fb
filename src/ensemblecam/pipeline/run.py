"""``ensemblecam run``: the whole protocol from one config, cached, resumable, per fold.

Run folder layout: :class:`ensemblecam.io.runlayout.RunLayout` (every file written
atomically; a stage folder's ``stage.json`` is written last and holds the stage's cache key).
The results table: :mod:`ensemblecam.pipeline.results`.

Caching. Each stage folder gets ``stage.json`` = {"key": hash of the stage's options and
of the keys of every stage it reads} when it completes. A rerun skips a stage whose key
matches, reruns (replacing the old results) a stage whose key changed, and resumes a
stage that was interrupted (``.<folder>.pending.json`` beside the stage's ``.partial``
folder holds the key of the attempt; each stage resumes from its own ``.partial`` files).
A partial is resumed only by the same key: one left by an attempt with another key (or
an unknown one) is removed, with a notice, before the stage starts afresh. The run folder
remembers the hash of the whole configuration; another configuration is refused unless
``--force``, and even then only the stages whose keys changed are recomputed.

Safety. The whole configuration is checked before any work (:func:`check_run_config`);
the run folder may not be, hold or lie inside an input; it carries ensemblecam's marker
file (a folder without it is never used, not even with ``--force``) and is locked while
a run works in it (``.<run>.lock`` beside it; a second run is refused). A refused stage
leaves no ``.partial`` it created, and a finished run sweeps every leftover partial,
pending record and temporary file out of the run folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from ensemblecam import __version__, environment
from ensemblecam import progress as progress_out
from ensemblecam.config import (
    Config,
    EvaluateConfig,
    MilConfig,
    SearchConfig,
    UNetConfig,
    load_config,
    short_repr,
)
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.runlayout import REFINE_FILE, RUN_FORMAT, STAMP, FoldLayout, RunLayout
from ensemblecam.pipeline.results import (
    aggregate,
    final_unet,
    result_rows,
    results_csv,
    results_markdown,
    with_metrics,
)

# options that name files or control how (not what) a stage computes: not part of keys
_NOT_KEYED = {
    "store",
    "splits",
    "out",
    "data",
    "force",
    "resume",
    "workers",
    "config_file",
    "maps",
    "checkpoints",
    "tags",
    "members",
    "fold",
    "part",
    "parts",
    "chunk",
}

#: options that name a user's input file: keyed by the file's content, not by its name
_INPUT_FILES = {"labels_csv", "list_file", "weights"}

#: options whose default changed, with their former default: a value other than that is
#: keyed (:func:`_changed_defaults`), so results made before the change stay valid under
#: the old value and are recomputed under the new one
_FORMER_DEFAULTS: dict[tuple[type, str], Any] = {
    (UNetConfig, "augment"): "none",
    (MilConfig, "augment"): "none",
    (UNetConfig, "boundary_ignore"): 0,
}

#: U-Net options that change only training on pseudo-labels: not in the supervised one's key
_PSEUDO_ONLY = {"boundary_ignore"}

#: the methods whose masks a run exports and ``predict`` applies: results-row names
METHOD_NAMES = {
    "self_trained": "U-Net self-trained on ensemble pseudo-labels",
    "ensemble": "ensemble (best configuration)",
}


def stable_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _options(section: Any) -> dict[str, Any]:
    """Keyed options that differ from their defaults (a new option with a default leaves
    existing keys, and so existing results, valid; a changed default goes into
    :data:`_FORMER_DEFAULTS`); an option of :data:`_INPUT_FILES` as its file's content."""
    opts = section.model_dump(mode="json", exclude_defaults=True)
    return {
        k: _file_key(v) if k in _INPUT_FILES and v is not None else v
        for k, v in opts.items()
        if k not in _NOT_KEYED
    }


def _file_key(path: str) -> str:
    """Key of a user's input file: the SHA-256 of its bytes, whatever its name (a missing
    file keys as its path; its stage then refuses it)."""
    st = Path(path).stat() if Path(path).is_file() else None
    return f"missing: {path}" if st is None else _sha256(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """:func:`fsutil.file_sha256`, once per (path, size, mtime) in a process."""
    return fsutil.file_sha256(path)


def _store_key(cfg: Config) -> str:
    """Key of the prepare stage: its options, the normalisation as resolved (its default
    depends on the layout) and the input files' fingerprint (size and time stamp of each
    file it reads, :func:`ensemblecam.stages.prepare.input_fingerprint`), so that a scan
    rewritten in place prepares the store again and everything after it reruns. The data
    folder's path is not in it: a folder moved with its time stamps needs nothing redone."""
    from ensemblecam.io.layouts import DEFAULT_NORMALISE
    from ensemblecam.stages.prepare import input_fingerprint

    norm = cfg.prepare.normalise or DEFAULT_NORMALISE[cfg.prepare.layout]
    return stable_hash(["prepare", _options(cfg.prepare), norm, input_fingerprint(cfg.prepare)])


def _changed_defaults(section: Any) -> list[list[Any]]:
    """Key part for the options of ``section`` whose default changed (:data:`_FORMER_DEFAULTS`):
    ``[name, value]`` for each that differs from its former default. :func:`_options` leaves
    defaults out, so without this a run made under the former default would be reused."""
    return [
        [name, getattr(section, name)]
        for (cls, name), former in _FORMER_DEFAULTS.items()
        if type(section) is cls and getattr(section, name) != former
    ]


def config_hash(cfg: Config) -> str:
    """Hash of a whole configuration's non-default values."""
    return stable_hash(cfg.model_dump(mode="json", exclude_defaults=True))


@dataclass
class Runner:
    """Runs stages into a run folder with caching by key; records timings."""

    root: Path
    progress: bool | None = None
    timings: dict[str, float] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root)

    def stage(
        self, name: str, folder: Path, key: str, marker: str | None, fn: Callable[[bool], Any]
    ) -> bool:
        """Run ``fn(force)`` for ``folder`` unless its stamp holds ``key``; True if it ran."""
        stamp = folder / STAMP
        pending = folder.with_name(f".{folder.name}.pending.json")
        old = _read_key(stamp)
        if old == key:
            progress_out.done(name, None)
            return False
        attempt = _read_key(pending)
        if old is None and attempt == key and marker is not None and (folder / marker).exists():
            _stamp(stamp, name, key, 0.0)  # finished just before an interruption
            pending.unlink(missing_ok=True)
            progress_out.done(name, None)
            return False
        stale = sorted(p for p in _stage_partials(folder) if p.exists())
        if stale and attempt != key:
            why = "an unknown key" if attempt is None else f"stage key {attempt}"
            progress_out.info(
                f"note: {name}: removing the unfinished attempt made with other settings "
                f"({why}, now {key}): {', '.join(map(str, stale))}"
            )
            for p in stale:
                shutil.rmtree(p)
        force = old is not None or (attempt != key and folder.exists())
        folder.parent.mkdir(parents=True, exist_ok=True)
        before = {p for p in _stage_partials(folder) if p.exists()}
        fsutil.write_json(pending, {"key": key, "stage": name})
        t0 = time.perf_counter()
        try:
            with progress_out.stage(name):
                fn(force)
        except (InputError, OSError):  # refused: leave no partial this attempt started
            for p in _stage_partials(folder) - before:
                shutil.rmtree(p, ignore_errors=True)
            if not before:
                pending.unlink(missing_ok=True)
            raise
        seconds = time.perf_counter() - t0
        _stamp(stamp, name, key, seconds)
        pending.unlink(missing_ok=True)
        self.timings[name] = round(seconds, 2)
        self.ran.append(name)
        progress_out.done(name, seconds)
        return True


def _stage_partials(folder: Path) -> set[Path]:
    """Build folders of a stage: ``.<folder>.partial`` beside it and ``.<x>.partial``
    directly inside it (map-set members, evaluation rows)."""
    inner = set(folder.glob(".*.partial")) if folder.is_dir() else set()
    return {fsutil.partial_dir(folder)} | inner


_LEFTOVER = re.compile(r"^\..+\.(partial|pending\.json|old-\d+|tmp-\d+)$")


def _sweep(root: Path) -> list[Path]:
    """Remove what interrupted or refused attempts left in a finished run folder:
    ``.partial`` folders, pending records, ``.old-<pid>`` and ``.tmp-<pid>`` names."""
    found = sorted(
        (p for p in root.rglob(".*") if _LEFTOVER.match(p.name)), key=lambda p: len(p.parts)
    )
    removed: list[Path] = []
    for p in found:
        if any(r in p.parents for r in removed) or not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def _read_key(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stamp(path: Path, name: str, key: str, seconds: float) -> None:
    fsutil.write_json(
        path,
        {
            "stage": name,
            "key": key,
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


# --------------------------------------------------------------------------- run


def _check_run_folder(root: Path, cfg: Config, force: bool) -> None:
    """A run folder belongs to one configuration; another one needs ``force``."""
    run_file = RunLayout(root).run_record
    stage = fsutil.owner_stage(root)
    if root.is_dir() and any(root.iterdir()) and stage != "run":
        why = (
            f"not written by ensemblecam: no {fsutil.OWNER_MARKER} file"
            if stage is None
            else f"it holds ensemblecam's {stage} output"
        )
        raise InputError(
            f"{root}: folder is not empty and is not a run folder ({why}); it "
            "is never used as one, not even with --force"
        )
    if not run_file.is_file():
        return
    old = fsutil.read_json(run_file, "run record")
    changed = environment.changes(
        old.get("environment", {"packages": old.get("packages", {})}),
        environment.environment_record(),
    )
    if changed:
        print(
            f"warning: {root}: made with other versions ({', '.join(changed)}); results of "
            "rerun stages may differ from the cached ones",
            file=sys.stderr,
        )
    new = config_hash(cfg)
    if old.get("config_hash") != new and not force:
        raise InputError(
            f"{root}: run folder was made by another configuration "
            f"(hash {old.get('config_hash')} vs {new}); use --force to rerun what changed"
        )


def _write_run_record(root: Path, cfg: Config, runner: Runner, started: float, status: str) -> None:
    record = RunLayout(root).run_record
    old = fsutil.read_json(record, "run record") if record.is_file() else {}
    timings = {**old.get("timings", {}), **runner.timings}
    env = environment.environment_record()
    fsutil.write_json(
        record,
        {
            "format": RUN_FORMAT,
            "version": 1,
            "status": status,
            "config_hash": config_hash(cfg),
            "ensemblecam": __version__,
            "python": env["python"],
            "packages": env["packages"],
            "platform": env["platform"],
            "environment": env,
            "seeds": {
                "split": cfg.split.seed,
                "train": cfg.train.seed,
                "cam": cfg.cam.seed,
                "search": cfg.search.seed,
                "synth": cfg.synth.seed,
            },
            "timings": timings,
            "ran_this_time": runner.ran,
            "wall_s_this_time": round(time.perf_counter() - started, 2),
        },
    )


def check_run_config(cfg: Config) -> None:
    """Every check of a run configuration that needs no stage output, made before any
    work: data folder, models (built on the meta device: names and arguments), folds,
    CAM methods and target, pretrained weights, training recipe, U-Net and MIL localiser
    architectures, refine options."""
    import torch

    from ensemblecam import models
    from ensemblecam.cam.methods import METHODS
    from ensemblecam.models.segmenters import build_unet, model_args
    from ensemblecam.stages.cam import target_layers
    from ensemblecam.stages.train import output_stride_arg, resolve_recipe

    rc = cfg.run
    if cfg.prepare.data is None:
        raise InputError("config: prepare.data is not set (the data set root folder)")
    if not Path(cfg.prepare.data).is_dir():
        raise InputError(f"{cfg.prepare.data}: data folder not found")
    if not rc.models:
        raise InputError("config: run.models is empty")
    if len(set(rc.models)) != len(rc.models):
        raise InputError(f"config: run.models {rc.models} has duplicates")
    n_ch = len(cfg.prepare.modalities) if cfg.prepare.modalities else 1
    build_args = {**cfg.train.model_args, **output_stride_arg(cfg.train)}
    for name in rc.models:
        try:
            try:
                with torch.device("meta"):  # no memory, no initialisation cost
                    models.build_model(name, n_ch, 2, **build_args)
            except InputError:
                raise
            except Exception:  # a model reading tensor values while built: build it for real
                models.build_model(name, n_ch, 2, **build_args)
        except InputError as exc:
            raise InputError(f"config: run.models: {exc}") from exc
        except Exception as exc:  # a model's own argument checks
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"config: run.models {name!r}: bad train.model_args "
                f"{cfg.train.model_args} ({first})"
            ) from exc
    if rc.folds is not None:
        n_folds = {"kfold": cfg.split.folds, "holdout": 1}.get(cfg.split.scheme)
        for k in rc.folds:
            if k < 0 or (n_folds is not None and k >= n_folds):
                has = "" if n_folds is None else f"; the split has {n_folds} fold(s) (0..)"
                raise InputError(f"config: run.folds has {k}: not a fold position{has}")
        if len(set(rc.folds)) != len(rc.folds):
            raise InputError(f"config: run.folds {rc.folds} has duplicates")
    bad = [m for m in cfg.cam.methods if m not in METHODS]
    if bad or not cfg.cam.methods:
        raise InputError(
            f"config: cam.methods {','.join(bad) or '(none)'}: expected any of {', '.join(METHODS)}"
        )
    target_layers(cfg.cam)
    if cfg.cam.target not in ("lesion", "predicted", "0", "1"):
        raise InputError(
            f"config: cam.target {cfg.cam.target!r}: expected lesion, predicted, "
            "0 or 1 (the classifiers have 2 classes)"
        )
    if cfg.train.weights is not None and not Path(cfg.train.weights).is_file():
        raise InputError(f"{cfg.train.weights}: weights file not found (train.weights)")
    resolve_recipe(cfg.train)
    _check_masks_needed(cfg)
    if rc.unet or rc.pseudo_unet:
        with torch.device("meta"):
            build_unet(**model_args(cfg.unet, n_ch))
    for mcfg in cfg.localisers().values():
        with torch.device("meta"):
            build_unet(**model_args(mcfg, n_ch))
    if rc.final == "self_trained" and not rc.pseudo_unet:
        raise InputError("config: run.final self_trained needs run.pseudo_unet: true")
    if (rc.unet or rc.pseudo_unet) and rc.segmenter_threshold == "auto":
        from ensemblecam.ensemble.grid import parse_grid

        what = f"config: run.segmenter_grid {short_repr(rc.segmenter_grid)}"
        try:
            grid = parse_grid(rc.segmenter_grid)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
        if not ((grid > 0) & (grid < 1)).all():
            raise InputError(f"{what}: thresholds must lie in (0, 1)")
    if rc.pseudo_unet and rc.refine:
        from ensemblecam.stages.refine import check_refine_options

        for r in range(1, min(rc.rounds, 2) + 1):
            check_refine_options(cfg.refine.for_round(r), 1)


def expected_masks(cfg: Config) -> str:
    """Which cases the prepared store will have masks for, from the prepare config and the
    data folder's file names (nothing is read): "all", "some" or "none"."""
    pc = cfg.prepare
    if not pc.masks:
        return "none"
    if pc.labels_csv is None:
        return "all"  # prepare requires every seg file
    from ensemblecam.io.layouts import discover

    assert pc.data is not None
    cases = discover(pc.layout, Path(pc.data), pc.modalities, False, keep_seg=True).cases
    n = sum(c.seg is not None for c in cases)
    return "all" if n == len(cases) else "some" if n else "none"


def _check_masks_needed(cfg: Config) -> None:
    """Options that need masks (or labels) refused up front when the data has none."""
    pc, rc, sc = cfg.prepare, cfg.run, cfg.search
    if not pc.masks and pc.labels_csv is None:
        raise InputError(
            "config: prepare.masks is false and no prepare.labels_csv: the slices have no "
            "labels to train on (give a labels CSV or the seg files)"
        )
    have = expected_masks(cfg)
    why = (
        "prepare.masks is false"
        if not pc.masks
        else f"no case of {pc.data} has a seg file (labels from {pc.labels_csv})"
    )
    if have == "none":
        if rc.unet:
            raise InputError(
                f"config: run.unet (the fully supervised U-Net) needs masks, but {why}; "
                "set run.unet: false"
            )
        if sc.criterion == "masks":
            raise InputError(
                f"config: search.criterion masks needs masks, but {why}; use labels or auto"
            )
        if sc.calibration_cases.strip() not in ("", "all"):
            raise InputError(
                f"config: search.calibration_cases {sc.calibration_cases} counts annotated "
                f"cases, but {why}; leave it at all"
            )
        if rc.pseudo_unet and cfg.unet.val_targets == "store":
            raise InputError(
                f"config: unet.val_targets store needs masks, but {why}; use same or none"
            )
    if have == "some" and rc.unet:
        raise InputError(
            f"config: run.unet (the fully supervised U-Net) trains on the masks of every "
            f"training case, but only some cases of {pc.data} have seg files; set "
            "run.unet: false"
        )


def run_pipeline(cfg: Config, force: bool = False, progress: bool | None = None) -> Path:
    """Run every stage of ``cfg`` into ``cfg.run.out``; return the run folder.

    The configuration and the run folder are checked first (:func:`check_run_config`,
    no overlap with the inputs, ensemblecam's marker); the run folder is locked while
    the stages run. A run folder this call created is removed again if a stage is
    refused before any stage finished.
    """
    root = Path(cfg.run.out)
    fsutil.check_writable(root)  # the output first, as every command reports it
    check_run_config(cfg)
    pc = cfg.prepare
    fsutil.check_not_input(root, [pc.data, pc.labels_csv, cfg.split.list_file, cfg.train.weights])
    created = not root.exists()
    with fsutil.output_guard(root):
        try:
            return _run_locked(cfg, root, force, progress)
        except (InputError, OSError):
            if created and root.is_dir() and not any(root.rglob(STAMP)):
                shutil.rmtree(root, ignore_errors=True)
            raise


def _run_locked(cfg: Config, root: Path, force: bool, progress: bool | None) -> Path:
    """:func:`run_pipeline` once the checks are made and the lock is held."""
    from ensemblecam.io.split import make_splits, read_splits
    from ensemblecam.stages.prepare import prepare_store

    rc = cfg.run
    lay = RunLayout(root)
    _check_run_folder(root, cfg, force)
    root.mkdir(parents=True, exist_ok=True)
    fsutil.write_owner_marker(root, "run")
    fsutil.write_text(lay.config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    runner = Runner(root, progress)
    started = time.perf_counter()
    _write_run_record(root, cfg, runner, started, "running")

    store = lay.store
    pcfg = cfg.prepare.model_copy(update={"out": store})
    k_store = _store_key(cfg)
    runner.stage(
        "prepare",
        store,
        k_store,
        lay.store_manifest.name,
        lambda force: prepare_store(pcfg, force=force),
    )

    splits = lay.splits
    scfg = cfg.split.model_copy(update={"store": store, "out": splits})
    k_split = stable_hash(["split", _options(cfg.split), k_store])
    runner.stage(
        "split", lay.split_dir, k_split, splits.name, lambda force: make_splits(scfg, force=force)
    )
    folds = read_splits(splits)
    chosen = rc.folds if rc.folds is not None else list(range(len(folds)))
    for k in chosen:
        if not 0 <= k < len(folds):
            raise InputError(f"config: run.folds has {k}; the split has {len(folds)} folds")

    fold_results = {}
    for k in chosen:
        fold_results[folds[k].name] = _run_fold(
            cfg, runner, store, splits, k, folds[k].name, k_split
        )
    results = aggregate(fold_results, cfg.search.objective)
    results["final"] = choose_final(cfg, fold_results)
    from ensemblecam.stages.evaluate import add_case_statistics

    add_case_statistics(results, fold_results, root)  # per-case CIs, paired tests
    fsutil.write_json(lay.results_json, results)
    fsutil.write_text(lay.results_csv, results_csv(results))
    fsutil.write_text(lay.results_md, results_markdown(results))

    if rc.export:
        method, kind = results["final"]["method"], final_unet(results)
        _export(cfg, runner, [lay.fold(f) for f in fold_results], method, kind)
    _write_run_record(root, cfg, runner, started, "complete")
    if rc.report:
        from ensemblecam.report import write_report

        t0 = time.perf_counter()
        with progress_out.stage("report"):
            write_report(root, force=True)
        runner.timings["report"] = round(time.perf_counter() - t0, 2)
        progress_out.done("report", runner.timings["report"])
        _write_run_record(root, cfg, runner, started, "complete")
    for p in _sweep(root):
        print(f"note: removed the leftover {p}")
    return root


def _members(cfg: Config, localisers: Sequence[str] = ()) -> list[str]:
    """Map-store members of a run: every (classifier, CAM method), then the MIL
    localisers named ``localisers``."""
    from ensemblecam.io.mapstore import localiser_member, member_name

    cams = [member_name(m, method) for m in cfg.run.models for method in cfg.cam.methods]
    return [*cams, *(localiser_member(name) for name in localisers)]


@dataclass
class _Fold:
    """One fold of a run: where its stages read and write, and the run's shared inputs."""

    cfg: Config
    runner: Runner
    store: Path
    splits: Path
    k: int
    name: str
    fold: FoldLayout

    def update(self, **changes: Any) -> dict[str, Any]:
        """The fields every stage section of this fold gets, plus ``changes``."""
        return {"store": self.store, "splits": self.splits, **changes}


def _run_fold(
    cfg: Config, runner: Runner, store: Path, splits: Path, k: int, name: str, k_split: str
) -> dict[str, Any]:
    """Train, map, search, evaluate (with baselines) one fold; return its result rows."""
    f = _Fold(cfg, runner, store, splits, k, name, runner.layout.fold(name))
    rc = cfg.run
    selection = None
    k_maps = [_fold_cam(f, _fold_train(f, k_split))]
    localisers = _fold_localisers(f)
    k_maps += [_fold_mil(f, name, mcfg, k_split) for name, mcfg in localisers.items()]
    k_search = _fold_search(
        f, stable_hash(k_maps) if len(k_maps) > 1 else k_maps[0], list(localisers)
    )
    ecfg: EvaluateConfig = cfg.evaluate.model_copy(
        update=f.update(fold=str(k), part=rc.eval_part, maps=f.fold.maps)
    )
    scored = _part_annotated(store, splits, k, rc.eval_part)
    rows = _fold_evaluate(f, ecfg, k_search, scored)
    if rc.unet:
        rows.append(_unet_row(f, "unet", "store", k_split, ecfg)[0])
    if rc.pseudo_unet:
        conf_file, k_conf = _fold_pseudo_search(f, k_search, list(localisers))
        targets, k_pt = _fold_pseudo_labels(f, ecfg, conf_file, k_conf)
        k_refined = k_pt if rc.refine else None
        if rc.refine and _part_annotated(store, splits, k, "train"):
            rows.append(_pseudo_label_row(f, ecfg, k_pt))
        unets = []  # the self-trained U-Net of each round
        for r in range(1, rc.rounds + 1):  # each round's U-Net; all but the last relabel
            row, unet = _unet_row(f, round_kind(r, rc.rounds), targets, k_pt, ecfg)
            rows.append(row)
            unets.append(unet)
            if r < rc.rounds:
                targets, k_pt = _fold_next_round(f, r, k_pt)
        if rc.final == "auto" and _part_annotated(store, splits, k, "val"):
            selection = _fold_select(f, ecfg, rows[0]["config"], k_search, unets, k_refined)
    for row in rows if not scored else []:
        row["scored"] = False  # no masks to score with: masks written, metrics null
    return {
        "dir": f.fold.dir,
        "rows": with_metrics(rows, f.fold),
        "scored": scored,
        "criterion": fsutil.read_json(f.fold.best, "search result").get("criterion"),
        "select": selection,
    }


def _fold_select(
    f: _Fold,
    ecfg: EvaluateConfig,
    chosen: dict[str, Any],
    k_search: str,
    unets: list[_Unet],
    k_refined: str | None,
) -> dict[str, float | None]:
    """Lesion Dice of the fold's final candidates, the chosen ensemble and the U-Net of each
    self-training round (``unets``, each gated and thresholded as in its evaluation), on
    the val part's annotated slices: calibration data, never the held-out part
    (``select/<candidate>/metrics.json``, names :func:`candidate_name`). With refined
    pseudo-labels (stage key ``k_refined``) that cover the val part, also theirs
    (``select/pseudo_labels/``, key ``pseudo_labels``; not a candidate: they need the
    slices' labels), so the chain ensemble -> pseudo-labels -> U-Nets is compared on the
    same slices."""
    from ensemblecam.stages.evaluate import evaluate_stage, evaluate_unet

    vcfg = ecfg.model_copy(update={"part": "val"})
    sel = f.fold.select
    candidates = {candidate_name(u.kind): u for u in unets}
    key_parts: list[Any] = ["select", k_search, _options(f.cfg.evaluate), k_refined]
    for u in unets:
        key_parts.append([u.kind, u.key, ["threshold", u.threshold], u.gate and u.gate[1]])

    def run(force: bool) -> None:
        evaluate_stage(vcfg, chosen, sel / "ensemble", force=True)
        for name, u in candidates.items():
            ckpt = f.fold.unet_checkpoint(u.kind)
            evaluate_unet(vcfg, ckpt, sel / name, force=True, gate=u.gate, threshold=u.threshold)
        if k_refined is None or not _score_pseudo_labels(f, vcfg, sel / PSEUDO_LABELS):
            shutil.rmtree(sel / PSEUDO_LABELS, ignore_errors=True)  # an earlier run's

    f.runner.stage(f"{f.name}/select", sel, stable_hash(key_parts), None, run)
    names = ["ensemble", *candidates]
    if (sel / PSEUDO_LABELS / "metrics.json").is_file():
        names.append(PSEUDO_LABELS)
    return {
        m: fsutil.read_json(sel / m / "metrics.json", "evaluation")["metrics"].get("lesion_dice")
        for m in names
    }


#: the refined pseudo-labels' name in select/ and results.json ``final`` (not a candidate)
PSEUDO_LABELS = "pseudo_labels"


def round_kind(r: int, rounds: int) -> str:
    """The U-Net kind of self-training round ``r`` of ``rounds``: ``pseudo_unet`` for the
    last, ``pseudo_round<r>`` for an earlier one."""
    return "pseudo_unet" if r >= rounds else f"pseudo_round{r}"


def candidate_name(kind: str) -> str:
    """A self-trained U-Net kind's name among the final candidates (``select/<name>/``,
    results.json ``final.val_lesion_dice``): ``self_trained`` for the last round's,
    ``self_trained_round<r>`` for an earlier one's."""
    return "self_trained" + ("" if kind == "pseudo_unet" else kind.removeprefix("pseudo"))


def choose_final(cfg: Config, fold_results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's final method (results.json ``final``): ``run.final`` when set; with
    ``auto``, the candidate with the highest mean lesion Dice over the folds on the val
    part's masks: the chosen ensemble or the U-Net of one self-training round (``round``;
    on a tie the later round, and a U-Net before the ensemble), or the last round's U-Net
    when a fold's val part has no masks to choose with; the ensemble when no U-Net was
    self-trained. ``val_pseudo_labels``: the refined pseudo-labels' mean lesion Dice on the
    same slices (every fold scored them; not a candidate)."""
    rc = cfg.run
    if not rc.pseudo_unet:
        return {"method": "ensemble", "chosen_by": "run.pseudo_unet is off"}
    if rc.final == "ensemble":
        return {"method": "ensemble", "chosen_by": "run.final"}
    last = _self_trained(rc.rounds, rc.rounds)
    if rc.final == "self_trained":
        return {**last, "chosen_by": "run.final"}
    per_fold = {name: res.get("select") for name, res in fold_results.items()}
    if any(s is None for s in per_fold.values()):
        return {**last, "chosen_by": "no masks in the val part: the default"}
    # in the chain's order; on a tie the later candidate (reversed order) wins
    rounds = {candidate_name(round_kind(r, rc.rounds)): r for r in range(1, rc.rounds + 1)}
    means = {
        m: float(np.mean([s.get(m) or 0.0 for s in per_fold.values()]))
        for m in ["ensemble", *rounds]
    }
    best = max(reversed(means), key=means.__getitem__)  # the first of the highest
    pseudo = [s.get(PSEUDO_LABELS) for s in per_fold.values()]
    return {
        **(
            {"method": "ensemble"} if best == "ensemble" else _self_trained(rounds[best], rc.rounds)
        ),
        "chosen_by": "mean lesion Dice on the val part's masks",
        "val_lesion_dice": means,
        **(
            {"val_pseudo_labels": float(np.mean(pseudo))}
            if all(v is not None for v in pseudo)
            else {}
        ),
        "per_fold": per_fold,
    }


def _self_trained(r: int, rounds: int) -> dict[str, Any]:
    """results.json ``final`` of the U-Net of self-training round ``r`` of ``rounds``."""
    return {"method": "self_trained", "round": r, "unet": round_kind(r, rounds)}


def _part_annotated(store: Path, splits: Path, k: int, part: str) -> bool:
    """Whether split part ``part`` of fold ``k`` has a case with masks (it can be scored)."""
    from ensemblecam.stages.search import n_annotated_cases, part_slices

    st, _, idx = part_slices(store, splits, k, part)
    return n_annotated_cases(st, idx) > 0


def _fold_train(f: _Fold, k_split: str) -> list[str]:
    """Train every classifier of the run on the fold; their stage keys."""
    from ensemblecam.stages.train import train_classifier

    keys = []
    for model in f.cfg.run.models:
        out = f.fold.model(model)
        tcfg = f.cfg.train.model_copy(update=f.update(fold=f.k, model=model, out=out))
        key = stable_hash(["train", _options(f.cfg.train), model, f.k, k_split])
        keys.append(key)
        f.runner.stage(
            f"{f.name}/train/{model}",
            out,
            key,
            f.fold.train_record(model).name,
            lambda force, t=tcfg: train_classifier(
                t.model_copy(update={"force": force, "resume": not force}),
                progress=f.runner.progress,
            ),
        )
    return keys


def _fold_cam(f: _Fold, train_keys: list[str]) -> str:
    """Maps of every (classifier, method) on the parts the fold's later stages read."""
    from ensemblecam.stages.cam import run_cam

    rc = f.cfg.run
    parts = _map_parts(f.cfg)
    ccfg = f.cfg.cam.model_copy(
        update=f.update(
            fold=f.k,
            parts=parts,
            out=f.fold.maps,
            checkpoints=[f.fold.checkpoint(m) for m in rc.models],
            tags=list(rc.models),
        )
    )
    k_cam = stable_hash(["cam", _options(f.cfg.cam), parts, train_keys])
    f.runner.stage(
        f"{f.name}/cam",
        f.fold.maps,
        k_cam,
        None,
        lambda force: run_cam(ccfg.model_copy(update={"force": force}), progress=f.runner.progress),
    )
    return k_cam


def _map_parts(cfg: Config) -> list[str]:
    """Split parts every member's maps are made for: calibration, evaluation, and the parts
    the self-training labels (train; val for its validation when refining, and for the
    choice of the final method)."""
    rc = cfg.run
    parts = [rc.calibration_part, rc.eval_part]
    if rc.pseudo_unet:
        parts += ["train", "val"] if rc.refine or rc.final == "auto" else ["train"]
    return list(dict.fromkeys(parts))


def _fold_localisers(f: _Fold) -> dict[str, MilConfig]:
    """The fold's MIL localisers: every ``run.mil_variants`` entry when the search judges
    them on the calibration part's masks, else only the first. The slice-label criterion
    favours large masks: on the demo it picked the symmetric localiser, collapsed on the
    brats phantom, in every fold (held-out lesion Dice 0.012, against 0.328 with the
    plain localiser alone)."""
    from ensemblecam.stages.search import resolve_criterion

    localisers = f.cfg.localisers()
    qcfg = f.cfg.search.model_copy(update=f.update(fold=str(f.k), part=f.cfg.run.calibration_part))
    by_masks = resolve_criterion(qcfg) == "masks"
    return localisers if by_masks else dict(list(localisers.items())[:1])


def _fold_mil(f: _Fold, name: str, mcfg: MilConfig, k_split: str) -> str:
    """Train MIL localiser ``name`` (config ``mcfg``) on the fold's slice labels and write
    its member maps."""
    from ensemblecam.io.mapstore import localiser_member
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.cam import split_indices
    from ensemblecam.stages.mil import write_mil_maps
    from ensemblecam.stages.unet import RUN_MARKER, train_unet

    mcfg = mcfg.model_copy(update={"epochs": mcfg.run_epochs(f.cfg.unet.epochs)})
    k_mil = stable_hash(["mil", _options(mcfg), f.k, k_split, *_changed_defaults(mcfg)])
    out = f.fold.localiser(name)
    f.runner.stage(
        f"{f.name}/{name}",
        out,
        k_mil,
        RUN_MARKER,
        lambda force: train_unet(
            mcfg, f.store, f.splits, f.k, out, "labels", force, progress=f.runner.progress
        ),
    )
    parts = _map_parts(f.cfg)
    k_maps = stable_hash(["mil maps", k_mil, parts])
    member = f.fold.map_set(localiser_member(name))

    def write_maps(force: bool) -> None:
        store = SliceStore.open(f.store)
        idx = split_indices(store, f.splits, f.k, parts)
        train = None  # the scale_quantile's part
        if mcfg.scale_quantile is not None:
            train = split_indices(store, f.splits, f.k, ["train"])
        write_mil_maps(mcfg, out / "best.pt", f.store, idx, member, force, f.runner.progress, train)

    f.runner.stage(f"{f.name}/{name}/maps", member, k_maps, "meta.json", write_maps)
    return k_maps


def _fold_pseudo_search(f: _Fold, k_search: str, localisers: list[str]) -> tuple[Path, str]:
    """(best.json, stage key) of the configuration behind the fold's self-training labels:
    with ``run.pseudo_search`` and masks in the calibration part, the search again on the
    part's slices labelled lesion only, by lesion Dice (``fold<k>/pseudo_search``);
    otherwise the ensemble's choice (``search/best.json``)."""
    from ensemblecam.stages.search import resolve_criterion, run_search_stage

    out = f.fold.pseudo_search
    base = _search_config(f, localisers, out)
    if not f.cfg.run.pseudo_search or resolve_criterion(base) != "masks":
        return f.fold.best, k_search
    qcfg = base.model_copy(
        update={
            "slices": "lesion",
            "objective": "lesion_dice",
            "criterion": "masks",
            "compare_labels": False,
            "calibration_cases": "all",
            "gate": False,
        }
    )
    key = stable_hash(["pseudo_search", _options(f.cfg.search), k_search])
    f.runner.stage(f"{f.name}/pseudo_search", out, key, "best.json",
                   lambda force: run_search_stage(qcfg, force=force))  # fmt: skip
    return out / "best.json", key


def _fold_pseudo_labels(
    f: _Fold, ecfg: EvaluateConfig, conf_file: Path, k_conf: str
) -> tuple[Path, str]:
    """The self-training targets of the fold and their stage key: the refined three-class
    pseudo-labels (``run.refine``) or the plain masks of the configuration in
    ``conf_file`` (a best.json, stage key ``k_conf``)."""
    from ensemblecam.ensemble.operators import EnsembleConfig
    from ensemblecam.stages.evaluate import write_config_masks

    if f.cfg.run.refine:
        key = _fold_refine(f, "refine", conf_file, f.fold.refine, k_conf)
        return f.fold.refined_labels, key
    tcfg = ecfg.model_copy(update={"part": "train"})
    key = stable_hash(["pseudo_targets", k_conf, _options(f.cfg.evaluate)])

    def write(force: bool) -> None:
        chosen = EnsembleConfig.read(conf_file, "search result").to_dict()
        write_config_masks(tcfg, chosen, f.fold.pseudo_masks)

    f.runner.stage(f"{f.name}/pseudo_targets", f.fold.pseudo_targets, key, None, write)
    return f.fold.pseudo_masks, key


def _fold_refine(
    f: _Fold, name: str, config_file: Path, out: Path, upstream: str, r: int = 1
) -> str:
    """Run the refine stage ``name`` (of self-training round ``r``) of the fold on the
    member maps of ``config_file`` into ``out``; its key holds the round's refine options
    and the resolved candidates (a changed default margin list changes it) on maps and
    configuration with key ``upstream``."""
    from ensemblecam.stages.refine import candidates, refine_stage

    section = f.cfg.refine.for_round(r)
    rcfg = section.model_copy(
        update=f.update(fold=str(f.k), maps=f.fold.maps, config_file=config_file, out=out)
    )
    opts = {k: v for k, v in _options(section).items() if k != "round_options"}
    key = stable_hash(["refine", opts, candidates(section), upstream])
    f.runner.stage(
        f"{f.name}/{name}", out, key, REFINE_FILE, lambda force: refine_stage(rcfg, force=force)
    )
    return key


def _fold_next_round(f: _Fold, r: int, k_prev: str) -> tuple[Path, str]:
    """Self-training round ``r + 1``'s targets and stage key: round ``r``'s U-Net maps the
    refined parts (member ``selftrain__round<r>``: its softmax P(lesion), unsmoothed), and
    the refine stage turns that single member at threshold 0.5 into three-class
    pseudo-labels (slice labels applied, refiner chosen as in round 1)."""
    from ensemblecam.io.mapstore import member_name
    from ensemblecam.io.store import SliceStore
    from ensemblecam.stages.cam import split_indices
    from ensemblecam.stages.mil import write_unet_maps

    kind = round_kind(r, f.cfg.run.rounds)
    member = member_name("selftrain", f"round{r}")
    parts = list(f.cfg.refine.parts)
    conf = f.fold.round_config(r + 1)

    def write_maps(force: bool) -> None:
        idx = split_indices(SliceStore.open(f.store), f.splits, f.k, parts)
        ckpt = f.fold.unet_checkpoint(kind)
        top, batch = f.cfg.mil.top_fraction, f.cfg.unet.batch_size
        out_maps = f.fold.map_set(member)
        write_unet_maps(
            ckpt, f.store, idx, out_maps, f"round{r}", 0.0, top, batch, force, f.runner.progress
        )
        single = {"operator": "single", "members": [member], "thresholds": [0.5], "gate": None}
        fsutil.write_json(conf, single)

    k_maps = stable_hash(["round maps", _unet_key(f.cfg, kind, f.k, k_prev), parts])
    f.runner.stage(f"{f.name}/{kind}/maps", f.fold.map_set(member), k_maps, "meta.json", write_maps)
    out = f.fold.round_refine(r + 1)
    return out / "masks.npz", _fold_refine(f, f"refine_round{r + 1}", conf, out, k_maps, r + 1)


def _pseudo_label_row(f: _Fold, ecfg: EvaluateConfig, k_refine: str) -> dict[str, Any]:
    """Score the refined pseudo-labels of the training part's annotated slices against
    their masks (ignore counted as background): how good the self-training targets are.
    Not a held-out result: the refiner was chosen on the same masks."""
    tcfg = ecfg.model_copy(update={"part": "train"})
    slug = PSEUDO_LABELS

    def run(force: bool) -> None:
        _score_pseudo_labels(f, tcfg, f.fold.eval_row(slug))

    key = stable_hash([slug, k_refine, _options(f.cfg.evaluate)])
    f.runner.stage(
        f"{f.name}/pseudo_labels/evaluate", f.fold.eval_row(slug), key, "metrics.json", run
    )
    name = "refined pseudo-labels (training part: not held out)"
    return {"name": name, "kind": "pseudo_labels", "slug": slug, "config": None}


def _score_pseudo_labels(f: _Fold, ecfg: EvaluateConfig, out: Path) -> bool:
    """Score the fold's refined pseudo-labels on the annotated slices of part ``ecfg.part``
    (ignore counted as background) into ``out``; False, nothing written, when the refine
    stage did not label that part."""
    from ensemblecam.io.mapstore import positions
    from ensemblecam.io.masks import read_masks
    from ensemblecam.stages.evaluate import evaluate_masks
    from ensemblecam.stages.search import annotated_part

    _, _, idx = annotated_part(f.store, f.splits, f.k, ecfg.part, "evaluation")
    index, labels = read_masks(f.fold.refined_labels)
    rows = positions(index, idx)
    if rows is None:
        return False
    pred = (np.asarray(labels)[rows] == 1).astype(np.uint8)
    evaluate_masks(ecfg, pred, out, force=True, source=str(index))
    return True


def _fold_search(f: _Fold, k_cam: str, localisers: list[str]) -> str:
    """The ensemble search on the fold's calibration part, over the CAM members and the
    MIL localisers ``localisers``; the slice-label criterion (best_labels.json) sees only
    the first localiser (:func:`_fold_localisers`)."""
    from ensemblecam.stages.search import run_search_stage

    rc = f.cfg.run
    label_members = _members(f.cfg, localisers[:1]) if len(localisers) > 1 else None
    qcfg = _search_config(f, localisers, f.fold.search, label_members=label_members)
    parts: list[Any] = ["search", _options(f.cfg.search), rc.calibration_part, k_cam]
    k_search = stable_hash(parts if label_members is None else [*parts, label_members])
    f.runner.stage(
        f"{f.name}/search",
        f.fold.search,
        k_search,
        f.fold.best.name,
        lambda force: run_search_stage(qcfg, force=force),
    )
    return k_search


def _search_config(f: _Fold, localisers: list[str], out: Path, **changes: Any) -> SearchConfig:
    """The fold's search section: its calibration part, its map store, the CAM members
    and ``localisers``, output ``out``, plus ``changes``."""
    return f.cfg.search.model_copy(
        update=f.update(
            fold=str(f.k),
            part=f.cfg.run.calibration_part,
            maps=f.fold.maps,
            members=_members(f.cfg, localisers),
            out=out,
            **changes,
        )
    )


def _fold_evaluate(
    f: _Fold, ecfg: EvaluateConfig, k_search: str, scored: bool = True
) -> list[dict[str, Any]]:
    """Every result row (chosen, per operator, single members, Empty) on the held-out part;
    not ``scored`` (no masks there): only the chosen configuration's masks are written."""
    from ensemblecam.stages.evaluate import evaluate_stage, write_config_masks

    rows = result_rows(f.fold, scored)
    k_eval = stable_hash(
        [
            "evaluate",
            _options(f.cfg.evaluate),
            f.cfg.run.eval_part,
            k_search,
            [(r["slug"], r["config"]) for r in rows],
        ]
    )
    eval_dir = f.fold.eval

    def evaluate_all(force: bool) -> None:
        rounds = {round_kind(r, f.cfg.run.rounds) for r in range(1, f.cfg.run.rounds)}
        keep = {r["slug"] for r in rows} | {"unet", "pseudo_unet", "pseudo_labels"} | rounds
        if eval_dir.is_dir():  # rows of an earlier search that are no longer evaluated
            for stale in eval_dir.iterdir():
                if stale.is_dir() and stale.name not in keep:
                    shutil.rmtree(stale)
        for row in rows if scored else []:
            if row["config"] is not None:
                evaluate_stage(ecfg, row["config"], f.fold.eval_row(row["slug"]), force=True)
            if row["kind"] == "operator":  # the report's gallery draws these
                write_config_masks(ecfg, row["config"], f.fold.row_masks(row["slug"]))
        write_config_masks(ecfg, rows[0]["config"], f.fold.eval_masks)

    f.runner.stage(f"{f.name}/evaluate", eval_dir, k_eval, None, evaluate_all)
    return rows


class _Unet(NamedTuple):
    """A fold's trained U-Net as its evaluation used it: kind, stage key, decision
    threshold and classifier gate (map sets and threshold; None: ungated)."""

    kind: str
    key: str
    threshold: float
    gate: tuple[list[Path], float] | None


def _unet_row(
    f: _Fold, kind: str, targets: str | Path, upstream: str, ecfg: EvaluateConfig
) -> tuple[dict[str, Any], _Unet]:
    """Train a U-Net on ``targets`` (store masks or pseudo masks), calibrate its decision
    threshold and classifier gate (self-trained kinds) and evaluate it; its result row and
    the U-Net as evaluated."""
    from ensemblecam.stages.evaluate import evaluate_unet
    from ensemblecam.stages.unet import train_unet

    cfg, fold = f.cfg, f.fold
    out = fold.unet(kind)
    key = _unet_key(cfg, kind, f.k, upstream)
    f.runner.stage(
        f"{fold.name}/{kind}",
        out,
        key,
        fold.unet_record(kind).name,
        lambda force: train_unet(
            cfg.unet, f.store, f.splits, f.k, out, targets=targets, force=force,
            progress=f.runner.progress,
        ),
    )  # fmt: skip
    ev = fold.eval_row(kind)
    # "masks": the evaluation keeps the U-Net's masks (an older row without them reruns)
    thr = _threshold(f, kind, key, ecfg)
    k_parts: list[Any] = [kind, "evaluate", key, _options(cfg.evaluate), ecfg.part, "masks",
                          ["threshold", thr]]  # fmt: skip
    gate = _gate(f, kind, key, ecfg, thr) if kind != "unet" else None
    if gate is not None:  # the classifiers' map sets are upstream of ``key`` already
        k_parts.append(["gate", cfg.run.gate, gate[1]])  # ungated: old key
    f.runner.stage(
        f"{fold.name}/{kind}/evaluate",
        ev,
        stable_hash(k_parts),
        fold.eval_metrics(kind).name,
        lambda force: evaluate_unet(
            ecfg, fold.unet_checkpoint(kind), ev, force=force, gate=gate, threshold=thr
        ),
    )
    label = {"unet": "U-Net, fully supervised", "pseudo_unet": METHOD_NAMES["self_trained"]}
    name = label.get(kind) or f"U-Net self-trained, round {kind.removeprefix('pseudo_round')}"
    row_kind = "pseudo_round" if kind.startswith("pseudo_round") else kind
    row = {"name": name, "kind": row_kind, "slug": kind, "config": None}
    return row, _Unet(kind, key, thr, gate)


def _unet_key(cfg: Config, kind: str, k: int, upstream: str) -> str:
    """Stage key of fold ``k``'s U-Net ``kind`` trained on targets with key ``upstream``
    (the supervised one's without :data:`_PSEUDO_ONLY`)."""
    drop = _PSEUDO_ONLY if kind == "unet" else set()
    opts = {name: v for name, v in _options(cfg.unet).items() if name not in drop}
    changed = [c for c in _changed_defaults(cfg.unet) if c[0] not in drop]
    return stable_hash([kind, opts, k, upstream, *changed])


def _threshold(f: _Fold, kind: str, k_unet: str, ecfg: EvaluateConfig) -> float:
    """The decision threshold of fold ``f``'s U-Net ``kind`` (stage key ``k_unet``):
    ``run.segmenter_threshold``, or with ``auto`` the one calibrated on the masks of the
    part the search calibrates on (``run.calibration_part``; stage ``fold<k>/threshold/<kind>``,
    :func:`ensemblecam.stages.threshold.calibrate_segmenter`)."""
    rc = f.cfg.run
    if rc.segmenter_threshold != "auto":
        return float(rc.segmenter_threshold)
    from ensemblecam.ensemble.grid import parse_grid
    from ensemblecam.stages.threshold import calibrate_segmenter

    out, record = f.fold.threshold(kind), f.fold.threshold_record(kind)
    grid = [round(float(g), 6) for g in parse_grid(rc.segmenter_grid)]  # float32 -> 0.05
    tcfg = ecfg.model_copy(update={"part": rc.calibration_part})
    f.runner.stage(
        f"{f.name}/{kind}/threshold",
        out,
        stable_hash(["threshold", k_unet, grid, tcfg.part]),
        record.name,
        lambda force: calibrate_segmenter(
            tcfg, f.fold.unet_checkpoint(kind), grid, out, force=force, progress=f.runner.progress
        ),
    )
    return float(fsutil.read_json(record, "threshold calibration")["threshold"])


def _gate(
    f: _Fold, kind: str, k_unet: str, ecfg: EvaluateConfig, threshold: float
) -> tuple[list[Path], float] | None:
    """The classifier gate of fold ``f``'s self-trained U-Net ``kind`` (stage key
    ``k_unet``, masks P(lesion) > ``threshold``): the map sets of the first CAM method
    (whose slice probabilities are the classifiers') and the threshold, calibrated on the
    val part with ``run.gate_threshold: auto`` (stage ``fold<k>/gate/<kind>``,
    :func:`ensemblecam.stages.gate.calibrate_gate`); None with ``run.gate: none``."""
    if f.cfg.run.gate != "classifiers":
        return None
    from ensemblecam.ensemble.grid import parse_grid
    from ensemblecam.io.mapstore import member_name
    from ensemblecam.stages.gate import calibrate_gate

    rc = f.cfg.run
    sets = [f.fold.map_set(member_name(m, f.cfg.cam.methods[0])) for m in rc.models]
    if rc.gate_threshold != "auto":
        return sets, float(rc.gate_threshold)
    out, record = f.fold.gate(kind), f.fold.gate_record(kind)
    grid = [round(float(g), 6) for g in parse_grid(f.cfg.search.gate_grid)]  # float32 -> 0.1
    vcfg = ecfg.model_copy(update={"part": "val"})
    f.runner.stage(
        f"{f.name}/{kind}/gate",
        out,
        stable_hash(["gate", k_unet, grid, vcfg.part, ["threshold", threshold]]),
        record.name,
        lambda force: calibrate_gate(
            vcfg, f.fold.unet_checkpoint(kind), sets, grid, out, force=force, threshold=threshold
        ),
    )
    return sets, float(fsutil.read_json(record, "gate calibration")["threshold"])


def final_method(cfg: Config, results: dict[str, Any] | None = None) -> str:
    """The method whose masks a run exports to ``export/`` and ``predict`` uses by default:
    results.json's ``final`` (:func:`choose_final`); a run without it: ``self_trained``
    (the U-Net self-trained on the ensemble's masks) when ``run.pseudo_unet``, else
    ``ensemble``."""
    chosen = (results or {}).get("final") or {}
    return chosen.get("method") or ("self_trained" if cfg.run.pseudo_unet else "ensemble")


def _export(cfg: Config, runner: Runner, folds: list[FoldLayout], method: str, kind: str) -> None:
    """Masks of every evaluated case (each fold's evaluation part) as NIfTI: the final
    ``method``'s in ``export/`` (self_trained: U-Net ``kind``'s); with the self-trained
    U-Net, the ensemble's in ``export_ensemble/`` (a leftover of an earlier run with it is
    removed otherwise)."""
    lay = runner.layout
    ensemble = ([f.eval_masks for f in folds], [f.eval / STAMP for f in folds])
    if method == "self_trained":
        own = ([f.row_masks(kind) for f in folds], [f.eval_row(kind) / STAMP for f in folds])
        _export_masks(cfg, runner, folds, "export", lay.export, "self_trained", *own, False)
        _export_masks(
            cfg, runner, folds, "export_ensemble", lay.export_ensemble, "ensemble", *ensemble
        )
    else:
        _export_masks(cfg, runner, folds, "export", lay.export, "ensemble", *ensemble)
        if lay.export_ensemble.is_dir() and fsutil.is_ours(lay.export_ensemble):
            shutil.rmtree(lay.export_ensemble)


def _export_masks(
    cfg: Config,
    runner: Runner,
    folds: list[FoldLayout],
    name: str,
    out: Path,
    method: str,
    paths: list[Path],
    stamps: list[Path],
    with_maps: bool = True,
) -> None:
    """One export stage: the ``masks.npz`` files ``paths`` (one per fold, finished stages
    ``stamps``) as NIfTI in ``out``; index.json ``source.method`` names ``method``."""
    from ensemblecam.io.export import export_cases
    from ensemblecam.io.masks import read_masks
    from ensemblecam.io.store import SliceStore

    lay = runner.layout
    keys = [_read_key(p) for p in stamps]
    export_maps = cfg.run.export_maps and with_maps

    def run(force: bool) -> None:
        st = SliceStore.open(lay.store)
        idx, masks = zip(*(read_masks(p) for p in paths), strict=True)
        index = np.concatenate(idx)
        order = np.argsort(index, kind="stable")
        if len(np.unique(index)) != len(index):
            raise InputError("export: a slice is evaluated in two folds; check run.folds")
        maps = None
        if export_maps:
            from ensemblecam.io.mapstore import MapSet, dequantise

            first = _members(cfg)[0]
            sets = [MapSet.open(f.map_set(first)) for f in folds]
            maps = (
                index[order],
                np.concatenate(
                    [dequantise(ms.maps[ms.rows_for(i)]) for ms, i in zip(sets, idx, strict=True)]
                )[order],
            )
        export_cases(
            st,
            index[order],
            np.concatenate(masks)[order],
            out,
            kind="mask",
            maps=maps,
            force=True,
            source={
                "command": "ensemblecam run",
                "run": str(lay.root),
                "folds": [f.name for f in folds],
                "method": method,
                "method_name": METHOD_NAMES[method],
                "masks": [str(p) for p in paths],
            },
            progress=runner.progress,
        )

    runner.stage(name, out, stable_hash([name, method, keys, export_maps]), "index.json", run)


def load_run_config(path: str | Path) -> Config:
    """The config a run folder was made with (``<run>/config.yaml``)."""
    config = RunLayout(path).config
    if not config.is_file():
        raise InputError(f"{path}: not a run folder (no config.yaml); run `ensemblecam run`")
    return load_config(config)
