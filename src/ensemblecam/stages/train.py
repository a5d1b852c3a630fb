"""Classifier training on one fold of a slice store, on any device through Lightning Fabric.

One run writes, in ``<out>`` (built as ``.<out>.partial`` and renamed when complete)::

    best.pt               checkpoint of the best validation epoch (``monitor``)
    last.pt               last epoch + optimizer/scheduler/RNG state, only while training runs
                          (rewritten atomically every epoch; ``--resume`` continues from it)
    metrics.csv           one row per epoch: train loss, val loss and classifier metrics
    learning_curve.png    losses and val AUROC per epoch
    confusion_matrix.png  val confusion matrix of the best epoch
    train.json            run summary, written last: its presence means the run is complete

Conventions: class index 1 = lesion, ``prob`` = softmax probability of class 1, a slice is
predicted positive when ``prob >= threshold``. The epoch loop, resume and checkpoints are
:func:`ensemblecam.training.loop.fit`'s; this module supplies the classifier's task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ensemblecam import __version__, models
from ensemblecam import progress as progress_out
from ensemblecam.config import PRESETS, TrainConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.split import Fold, get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.metrics.classification import classifier_metrics
from ensemblecam.training.data import (
    EpochBlur,
    EpochSampler,
    StoreDataset,
    batch_loader,
    part_indices,
    rank_seed,
    train_loader,
)
from ensemblecam.training.fabric import gather, make_fabric
from ensemblecam.training.loop import EpochData, Task, eval_batches, fit
from ensemblecam.training.records import (
    plot_confusion,
    plot_learning_curve,
    write_metrics_csv,
    write_tensorboard,
)

RUN_MARKER = "train.json"
RUN_FORMAT = "ensemblecam-train-run"

RECIPE_KEYS = tuple(PRESETS["paper"])

METRIC_COLUMNS = [
    "epoch", "train_loss", "val_loss", "accuracy", "precision", "recall", "f1", "auroc",
    "tn", "fp", "fn", "tp", "lr", "images_per_s", "time_s",
]  # fmt: skip


def resolve_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The preset's recipe with every non-None config field applied on top."""
    recipe = dict(PRESETS[cfg.preset])
    for key in RECIPE_KEYS:
        value = getattr(cfg, key)
        if value is not None:
            recipe[key] = value
    return recipe


def output_stride_arg(cfg: TrainConfig) -> dict[str, int]:
    """``{"output_stride": n}`` when ``cfg.output_stride`` is set (stored with the other
    build arguments in the checkpoint, so the cam stage rebuilds the dilated network);
    a different ``output_stride`` in ``model_args`` is an InputError."""
    if cfg.output_stride is None:
        return {}
    given = cfg.model_args.get("output_stride")
    if given is not None and given != cfg.output_stride:
        raise InputError(
            f"train.output_stride {cfg.output_stride} contradicts train.model_args "
            f"output_stride {given}"
        )
    return {"output_stride": cfg.output_stride}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(lesion probabilities, labels) of ``dataset`` in order, model in eval mode."""
    model.eval().to(device)
    if isinstance(dataset, StoreDataset):
        loader = batch_loader(dataset, batch_size)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    for x, y in progress_out.bar(loader, desc="predict", unit="batches", enabled=progress):
        probs.append(torch.softmax(model(x.to(device)).float(), dim=1)[:, 1].cpu())
        labels.append(y)
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


# --------------------------------------------------------------------------- planning


@dataclass
class RunPlan:
    """Everything checked before any process is started (picklable for ddp_spawn)."""

    cfg: TrainConfig
    recipe: dict[str, Any]
    splits: Path
    fold: Fold
    train_idx: np.ndarray
    val_idx: np.ndarray
    partial: Path
    resume_from: Path | None
    resume_epoch: int | None
    info: dict[str, Any]


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Check store, split, model, weights and output folder; nothing is written."""
    recipe = resolve_recipe(cfg)
    store = SliceStore.open(cfg.store)
    splits = cfg.splits if cfg.splits is not None else Path(cfg.store) / "splits.json"
    fold = get_fold(splits, cfg.fold)
    train_idx = part_indices(store, splits, fold, "train")
    labels = store.labels
    n_pos = int(labels[train_idx].sum())
    if n_pos == 0 or n_pos == len(train_idx):
        missing = "lesion (label 1)" if n_pos == 0 else "lesion-free (label 0)"
        raise InputError(
            f"{splits}: {fold.name} train part has no {missing} slices "
            f"({len(train_idx)} slices); a classifier needs both"
        )
    val_idx = part_indices(store, splits, fold, cfg.val_part)
    if len(val_idx) == 0:
        hint = " (pass --val-part test to validate on the test part)"
        hint = hint if cfg.val_part == "val" else ""
        raise InputError(f"{splits}: {fold.name} has no {cfg.val_part} slices{hint}")
    val_pos = int(labels[val_idx].sum())
    if cfg.monitor == "auroc" and val_pos in (0, len(val_idx)):
        raise InputError(
            f"{splits}: {fold.name} {cfg.val_part} part has only one class, AUROC is "
            "undefined; choose --monitor val_loss"
        )
    in_channels = len(store.channels)
    model_args = {**cfg.model_args, "in_channels": in_channels, "num_classes": 2}
    model_args.update(output_stride_arg(cfg))
    model = models.build_model(cfg.model, **model_args)  # unknown name / bad args fail here
    if cfg.weights is not None:
        models.load_pretrained(model, cfg.weights)  # a file that does not fit fails here
    out = Path(cfg.out)
    partial = out.with_name(f".{out.name}.partial")
    resume_from = _check_output(cfg, out, partial)
    info = {
        "model": cfg.model,
        "model_args": model_args,
        "channels": store.channels,
        "size": list(store.size),
        "prepare": store.manifest.get("prepare", {}),
        "store": str(Path(cfg.store).resolve()),
        "splits": str(Path(splits).resolve()),
        "fold": fold.name,
        "val_part": cfg.val_part,
        "seed": cfg.seed,
        "recipe": recipe,
        "imbalance": cfg.imbalance,
        "monitor": cfg.monitor,
        "threshold": cfg.threshold,
        "weights": None if cfg.weights is None else str(Path(cfg.weights).resolve()),
        "cam_layer": models.cam_layer(model),
        "ensemblecam_version": __version__,
    }
    resume_epoch = None if resume_from is None else _check_resumable(resume_from, info)
    return RunPlan(
        cfg,
        recipe,
        Path(splits),
        fold,
        train_idx,
        val_idx,
        partial,
        resume_from,
        resume_epoch,
        info,
    )


def _check_output(cfg: TrainConfig, out: Path, partial: Path) -> Path | None:
    """Refuse to overwrite; return the last.pt to resume from, if resuming."""
    fsutil.check_not_input(out, [cfg.store, cfg.splits, cfg.weights])
    if (out / RUN_MARKER).exists() and not cfg.force and fsutil.is_ours(out):
        raise InputError(f"{out}: already holds a finished run; use --force to replace it")
    fsutil.check_replaceable(out, cfg.force, RUN_MARKER)
    if cfg.force:
        return None
    last = partial / "last.pt"
    if cfg.resume:
        return last if last.is_file() else None
    if last.is_file():
        raise InputError(
            f"{out}: an unfinished run exists ({partial}); use --resume to continue it "
            "or --force to start over"
        )
    return None


_RESUME_KEYS = ("model", "model_args", "channels", "size", "store", "fold", "val_part", "seed")


def _check_resumable(last: Path, info: dict[str, Any]) -> int:
    """The epoch ``last`` holds, after checking it belongs to the same run."""
    old = models.read_checkpoint(last)["info"]
    for key in _RESUME_KEYS:
        if old.get(key) != info[key]:
            raise InputError(
                f"{last}: cannot resume: it was started with {key}={old.get(key)!r}, "
                f"now {info[key]!r}; use --force to start over"
            )
    old_recipe = {k: v for k, v in old.get("recipe", {}).items() if k != "epochs"}
    new_recipe = {k: v for k, v in info["recipe"].items() if k != "epochs"}
    if old_recipe != new_recipe:
        raise InputError(f"{last}: cannot resume: the training recipe changed; use --force")
    return int(old["epoch"])


# --------------------------------------------------------------------------- training


def train_classifier(
    cfg: TrainConfig, progress: bool | None = None, stop_after_epoch: int | None = None
) -> Path | None:
    """Train ``cfg.model`` on ``cfg.fold`` of ``cfg.store``; return the finished run folder.

    Returns None in the other processes of a multi-process run. ``stop_after_epoch`` ends
    the run after that epoch as if the process were killed (the unfinished run stays in
    ``.<out>.partial`` for ``resume``); then None is returned.
    """
    plan = plan_run(cfg)
    status = make_fabric(cfg).launch(_run, plan, progress, stop_after_epoch)
    return Path(cfg.out) if status == "done" else None


def _make_optimizer(model: nn.Module, recipe: dict[str, Any]) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), recipe["lr"], recipe["weight_decay"]
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe["momentum"], weight_decay=wd)
    if recipe["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _make_scheduler(
    opt: torch.optim.Optimizer, recipe: dict[str, Any]
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: step (x gamma every step_size epochs), cosine, or constant."""
    if recipe["scheduler"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, recipe["step_size"], recipe["gamma"])
    if recipe["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe["epochs"])
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def _validate(
    fabric: Any, model: nn.Module, loader: DataLoader, n_total: int, threshold: float
) -> dict[str, Any]:
    """Classifier metrics and mean cross-entropy of the validation part (all ranks)."""
    probs, labels, losses = [], [], []
    for logits, y in eval_batches(fabric, model, loader):
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
        probs.append(torch.softmax(logits, dim=1)[:, 1])
        labels.append(y)
    dev = fabric.device
    cat = lambda t, dt: torch.cat(t) if t else torch.zeros(0, dtype=dt, device=dev)  # noqa: E731
    prob = gather(fabric, cat(probs, torch.float32), n_total)
    label = gather(fabric, cat(labels, torch.int64), n_total)
    loss = gather(fabric, cat(losses, torch.float32), n_total)
    metrics = classifier_metrics(label, prob, threshold)
    metrics["val_loss"] = float(loss.mean())
    return metrics


def _data(fabric: Any, plan: RunPlan) -> EpochData:
    """This process's training batches (optionally blurred, class-weighted sampling), the
    (optionally class-weighted) cross-entropy and its shard of the validation part.

    Not fabric.setup_dataloaders: its loader calls sampler.set_epoch(<its own counter>),
    which would restart the data order at 0 after a resume; the loop moves the batches.
    """
    cfg, recipe = plan.cfg, plan.recipe
    rank, world = fabric.global_rank, fabric.world_size
    store = SliceStore.open(cfg.store)
    train_labels = store.labels[plan.train_idx]
    augment = None
    if recipe["augment"] == "blur":
        augment = EpochBlur(cfg.blur_sigma, cfg.blur_prob, rank_seed(cfg.seed, rank))
    train_ds = StoreDataset(store, plan.train_idx, augment)
    counts = np.bincount(train_labels, minlength=2).astype(np.float64)
    class_w = counts.sum() / (2 * counts)  # n / (K n_c): balanced class weights
    sampler = EpochSampler(
        len(train_ds), cfg.seed, rank, world,
        weights=class_w[train_labels] if cfg.imbalance == "weighted_sampler" else None,
    )  # fmt: skip
    batch_size = int(recipe["batch_size"])
    gpu = fabric.device.type == "cuda"
    loader = train_loader(train_ds, batch_size, sampler, cfg.workers, gpu)
    val_ds = StoreDataset(store, plan.val_idx[rank::world])
    val_loader = batch_loader(val_ds, batch_size, num_workers=cfg.workers, pin_memory=gpu)
    weight = torch.as_tensor(class_w, dtype=torch.float32, device=fabric.device)
    criterion = nn.CrossEntropyLoss(weight=weight if cfg.imbalance == "weighted_loss" else None)
    n_val, threshold = len(plan.val_idx), cfg.threshold
    return EpochData(
        sampler, loader, criterion,
        lambda model: _validate(fabric, model, val_loader, n_val, threshold),
    )  # fmt: skip


def _run(fabric: Any, plan: RunPlan, progress: bool | None, stop_after_epoch: int | None) -> str:
    """One process of the run: the shared loop on the classifier task ("done", "stopped"
    or "worker", see :func:`ensemblecam.training.loop.fit`)."""
    cfg, recipe = plan.cfg, plan.recipe

    def build_model() -> nn.Module:
        model = models.build_model(cfg.model, **plan.info["model_args"])
        if cfg.weights is not None:
            models.load_pretrained(model, cfg.weights)
        return model

    task = Task(
        stage="train", out=Path(cfg.out), partial=plan.partial, resume_from=plan.resume_from,
        seed=cfg.seed, epochs=int(recipe["epochs"]), batch_size=int(recipe["batch_size"]),
        info=dict(plan.info), columns=METRIC_COLUMNS, monitor=cfg.monitor,
        build_model=build_model,
        make_optimizer=lambda model: _make_optimizer(model, recipe),
        make_scheduler=lambda opt: _make_scheduler(opt, recipe),
        make_data=lambda fab: _data(fab, plan),
        finish=lambda history, best_epoch: _finish(plan, history, best_epoch),
        log_keys=("val_loss", "auroc", "f1"), extras=("confusion",),
        prefix=f"train {cfg.model} {plan.fold.name} ",
    )  # fmt: skip
    return fit(fabric, task, progress, stop_after_epoch)


def _finish(plan: RunPlan, history: list[dict[str, Any]], best_epoch: int) -> None:
    """Rank 0, after the last epoch: figures, TensorBoard, train.json; rename the folder."""
    best_value = float(history[best_epoch - 1][plan.cfg.monitor])
    best_info = models.read_checkpoint(plan.partial / "best.pt")["info"]
    write_metrics_csv(plan.partial / "metrics.csv", history, METRIC_COLUMNS)
    plot_learning_curve(plan.partial / "learning_curve.png", history, best_epoch)
    plot_confusion(
        plan.partial / "confusion_matrix.png",
        best_info["metrics"]["confusion"],
        f"{plan.cfg.model} {plan.fold.name} {plan.cfg.val_part}, epoch {best_epoch}",
    )
    write_tensorboard(plan.partial, history, METRIC_COLUMNS[1:])
    summary = {
        "format": RUN_FORMAT,
        "version": 1,
        **plan.info,
        "epochs": len(history),
        "monitor": plan.cfg.monitor,
        "best_epoch": best_epoch,
        "best_value": best_value,
        "best": best_info["metrics"],
        "last": history[-1],
        "n_train": len(plan.train_idx),
        "n_val": len(plan.val_idx),
        "resumed_from": plan.resume_epoch,
        "config": plan.cfg.model_dump(mode="json"),
        "files": ["best.pt", "metrics.csv", "learning_curve.png",
                  "confusion_matrix.png"],
    }  # fmt: skip
    fsutil.write_json(plan.partial / RUN_MARKER, summary)
    fsutil.commit_output_dir(plan.partial, plan.cfg.out, "train")
