"""Where everything lives in a run folder of ``ensemblecam run`` (one place for every path).

::

    <run>/
      run.json              config hash, package versions, seeds, per-stage timings
      config.yaml           the configuration the run was made with
      store/                slice store (prepare), shared by all folds
      split/splits.json     patient-level split file
      fold<k>/
        models/<model>/     classifier training runs (best.pt, metrics.csv, PNGs, train.json)
        maps/<model>__<method>/  map sets for the calibration and evaluation parts
                            (+ maps/localiser__<name>/: each MIL localiser's maps)
        mil/, mil_<...>/    MIL localisers trained from the slice labels, one folder per
                            run.mil_variants name (best.pt, unet.json)
        search/             ranking.csv/json, best.json, grid_<operator>.npy/json (search)
        unet/               supervised U-Net (fully supervised upper bound)
        refine/             refined pseudo-labels of the train/val parts (masks.npz with
                            0/1/255) and refine.json (candidates, their quality, the choice)
        pseudo_targets/     the chosen ensemble's masks of the training part (masks.npz),
                            used instead of refine/ when run.refine is off
        pseudo/             U-Net self-trained on those pseudo-labels (second stage)
        pseudo_round<r>/, round<r+1>.json, refine_round<r+1>/  (run.rounds > 1) an earlier
                            round's U-Net, the single member of its maps
                            (maps/selftrain__round<r>/) and the next round's pseudo-labels;
                            pseudo/ is always the last round's U-Net
        threshold/<kind>/   the decision threshold of U-Net <kind> (unet, pseudo_unet,
                            pseudo_round<r>), calibrated on the training part's masks
                            (threshold.json; run.segmenter_threshold auto)
        gate/<kind>/        the classifier gate of self-trained U-Net <kind> (pseudo_unet,
                            pseudo_round<r>), calibrated on the val part's slice labels
                            (gate.json; run.gate_threshold auto)
        select/<candidate>/ the ensemble and each self-training round's U-Net
                            (self_trained: the last; self_trained_round<r>) scored on
                            the val part's masks: the choice of the final method
                            (run.final auto)
        eval/<row>/         metrics.json, per_slice.csv, per_case.csv for each result row
                            (+ per_case_empty.csv: the Empty prediction on the same cases;
                            U-Net rows also masks.npz: their masks of the evaluation part)
        eval/masks.npz      the chosen configuration's masks of the evaluation part
                            (arrays ``index`` int64 store indices, ``masks`` uint8)
      results.json          the results table (format :data:`RESULTS_FORMAT`)
      results.csv           the same, one line per row, mean and std per metric
      results.md            the summary table as Markdown
      export/               NIfTI masks of every evaluated case (original scan geometry):
                            the final method's (results.json ``final``: by default the
                            best candidate on the val part's masks); index.json
                            ``source.method`` says which
      export_ensemble/      the ensemble's masks beside them (only when export/ holds the
                            self-trained U-Net's)
      report/report.html    self-contained HTML report + PNGs

Every stage folder gets ``stage.json`` (:data:`STAMP`, its cache key) when it completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: ``format`` of results.json
RESULTS_FORMAT = "ensemblecam-results"
#: ``format`` of run.json
RUN_FORMAT = "ensemblecam-run"
#: a finished stage folder's record (its cache key), written last
STAMP = "stage.json"
#: the refine stage's record (candidates, their quality, the choice), written last
REFINE_FILE = "refine.json"
#: a calibrated classifier gate's record (threshold and its table on the val part)
GATE_FILE = "gate.json"
#: a calibrated U-Net decision threshold's record (threshold and its table on the
#: training part)
THRESHOLD_FILE = "threshold.json"
#: the evaluation row of the chosen configuration (``eval/<slug>``)
CHOSEN_SLUG = "ensemble"
#: the PNGs the train stage writes in a classifier's folder: file name -> what it shows
TRAIN_FIGURES = {
    "learning_curve.png": "learning curve",
    "confusion_matrix.png": "val. confusion matrix",
}


def operator_slug(operator: str) -> str:
    """Folder name under eval/ of an operator's best configuration: ``op_<operator>``
    (a ``vote:k`` operator without the colon)."""
    return "op_" + operator.replace(":", "")


@dataclass(frozen=True)
class FoldLayout:
    """The paths of one fold's folder ``<run>/<name>``."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def models(self) -> Path:
        return self.dir / "models"

    def model(self, tag: str) -> Path:
        """A classifier's training run folder."""
        return self.models / tag

    def checkpoint(self, tag: str) -> Path:
        return self.model(tag) / "best.pt"

    def train_record(self, tag: str) -> Path:
        """train.json, written last by the train stage."""
        return self.model(tag) / "train.json"

    def train_metrics(self, tag: str) -> Path:
        """metrics.csv: one line per epoch (losses, validation metrics)."""
        return self.model(tag) / "metrics.csv"

    def train_figure(self, tag: str, name: str) -> Path:
        """A PNG of the train stage: :data:`TRAIN_FIGURES` names."""
        return self.model(tag) / name

    @property
    def maps(self) -> Path:
        return self.dir / "maps"

    def map_set(self, member: str) -> Path:
        return self.maps / member

    @property
    def search(self) -> Path:
        return self.dir / "search"

    @property
    def best(self) -> Path:
        """search/best.json: the chosen configuration."""
        return self.search / "best.json"

    @property
    def pseudo_search(self) -> Path:
        """The search of the configuration behind the self-training labels (its best.json)."""
        return self.dir / "pseudo_search"

    @property
    def best_per_candidate(self) -> Path:
        return self.search / "best_per_candidate.json"

    @property
    def ranking_csv(self) -> Path:
        return self.search / "ranking.csv"

    def grid(self, name: str) -> tuple[Path, Path]:
        """search/<name>.npy and .json: one operator's objective over the threshold grid."""
        return self.search / f"{name}.npy", self.search / f"{name}.json"

    @property
    def eval(self) -> Path:
        return self.dir / "eval"

    def eval_row(self, slug: str) -> Path:
        """eval/<slug>: metrics.json, per_slice.csv, per_case.csv of one result row."""
        return self.eval / slug

    def eval_metrics(self, slug: str) -> Path:
        return self.eval_row(slug) / "metrics.json"

    def per_case(self, slug: str) -> Path:
        """eval/<slug>/per_case.csv: the row's per-case values (3-D Dice, NSD, HD95 ...)."""
        return self.eval_row(slug) / "per_case.csv"

    @property
    def eval_masks(self) -> Path:
        """eval/masks.npz: the chosen configuration's masks of the evaluated part."""
        return self.eval / "masks.npz"

    def row_masks(self, slug: str) -> Path:
        """eval/<slug>/masks.npz: a U-Net or operator row's masks of the evaluated part."""
        return self.eval_row(slug) / "masks.npz"

    def unet(self, kind: str) -> Path:
        """U-Net training folder: ``unet`` (store masks), ``pseudo`` (pseudo-labels: the
        last self-training round) or ``pseudo_round<r>`` (an earlier round)."""
        return self.dir / {"unet": "unet", "pseudo_unet": "pseudo"}.get(kind, kind)

    def round_config(self, r: int) -> Path:
        """round<r>.json: the single-member configuration self-training round ``r`` refines
        (the previous round's U-Net maps at threshold 0.5)."""
        return self.dir / f"round{r}.json"

    def round_refine(self, r: int) -> Path:
        """refine_round<r>/: the pseudo-labels of self-training round ``r`` (as refine/)."""
        return self.dir / f"refine_round{r}"

    def unet_record(self, kind: str) -> Path:
        return self.unet(kind) / "unet.json"

    def unet_checkpoint(self, kind: str) -> Path:
        return self.unet(kind) / "best.pt"

    def unet_learning_curve(self, kind: str) -> Path:
        return self.unet(kind) / "learning_curve.png"

    def localiser(self, name: str) -> Path:
        """MIL localiser ``name``'s training folder (its maps: ``map_set(localiser__<name>)``;
        names start with mil, so they never meet another fold folder)."""
        return self.dir / name

    @property
    def refine(self) -> Path:
        return self.dir / "refine"

    @property
    def refine_record(self) -> Path:
        return self.refine / REFINE_FILE

    @property
    def refined_labels(self) -> Path:
        """refine/masks.npz: three-class pseudo-labels (0, 1, 255) of the train/val parts."""
        return self.refine / "masks.npz"

    def threshold(self, kind: str) -> Path:
        """threshold/<kind>/: the calibrated decision threshold of U-Net ``kind``
        (threshold.json: threshold and its table on the training part)."""
        return self.dir / "threshold" / kind

    def threshold_record(self, kind: str) -> Path:
        """threshold/<kind>/threshold.json: the calibrated threshold and its table."""
        return self.threshold(kind) / THRESHOLD_FILE

    def gate(self, kind: str) -> Path:
        """gate/<kind>/: the calibrated classifier gate of self-trained U-Net ``kind``
        (gate.json: threshold and its table on the val part)."""
        return self.dir / "gate" / kind

    def gate_record(self, kind: str) -> Path:
        """gate/<kind>/gate.json: the calibrated threshold and its table."""
        return self.gate(kind) / GATE_FILE

    @property
    def select(self) -> Path:
        """select/<candidate>/: the final candidates scored on the val part (the choice)."""
        return self.dir / "select"

    @property
    def pseudo_targets(self) -> Path:
        return self.dir / "pseudo_targets"

    @property
    def pseudo_masks(self) -> Path:
        return self.pseudo_targets / "masks.npz"


@dataclass(frozen=True)
class RunLayout:
    """The paths of a run folder ``root``; stage-internal files are the stages' own."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def store_manifest(self) -> Path:
        return self.store / "store.json"

    @property
    def split_dir(self) -> Path:
        return self.root / "split"

    @property
    def splits(self) -> Path:
        return self.split_dir / "splits.json"

    def splits_candidates(self) -> list[Path]:
        """Where a run's splits.json may be: the run's own (older runs: at the top) first."""
        return [self.root / "splits.json", self.splits, self.store / "splits.json"]

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_index(self) -> Path:
        return self.export / "index.json"

    @property
    def export_ensemble(self) -> Path:
        """The ensemble's NIfTI masks when ``export`` holds the self-trained U-Net's."""
        return self.root / "export_ensemble"

    @property
    def export_ensemble_index(self) -> Path:
        return self.export_ensemble / "index.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.html"

    def fold(self, name: str) -> FoldLayout:
        return FoldLayout(self.root / name)

    def fold_dirs(self) -> list[Path]:
        """Fold folders present (``fold*``), sorted by name."""
        return sorted(p for p in self.root.glob("fold*") if p.is_dir())
