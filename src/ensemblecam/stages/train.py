"""Classifier training on one fold of a slice store, on any device through Lightning Fabric.

One run writes, in ``<out>`` (built as ``.<out>.partial`` and renamed when complete)::

    best.pt               checkpoint of the best validation epoch (``monitor``)
    last.pt               checkpoint of the last epoch + optimizer/scheduler/RNG state
                          (rewritten atomically every epoch; ``--resume`` continues from it)
    metrics.csv           one row per epoch: train loss, val loss and classifier metrics
    learning_curve.png    losses and val AUROC per epoch
    confusion_matrix.png  val confusion matrix of the best epoch
    train.json            run summary, written last: its presence means the run is complete

Conventions: class index 1 = lesion, ``prob`` = softmax probability of class 1, a slice is
predicted positive when ``prob >= threshold``. Data order depends only on (seed, epoch), so
a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ensemblecam import __version__, models
from ensemblecam.config import DeviceConfig, TrainConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.split import Fold, get_fold
from ensemblecam.io.store import SliceStore

RUN_MARKER = "train.json"
RUN_FORMAT = "ensemblecam-train-run"

#: Named recipes; any field set in the config overrides the preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, batch_size=32, epochs=10,
        scheduler="none", step_size=40, gamma=0.1, augment="none",
    ),
    "thesis": dict(
        optimizer="adam", lr=1e-2, momentum=0.0, weight_decay=0.0, batch_size=60, epochs=50,
        scheduler="step", step_size=40, gamma=0.1, augment="none",
    ),
}  # fmt: skip
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


# --------------------------------------------------------------------------- data


class StoreDataset(Dataset):
    """Slices of a store as (float32 tensor (C, H, W), int label), read from the memory map.

    ``ds[i]`` is one sample; ``ds[[i, j, ...]]`` is a whole batch (x (B, C, H, W), y (B,))
    read with one sorted fancy index, which :func:`batch_loader` uses: no per-sample
    collation (torch.stack of many small tensors is slow on CPU).
    """

    def __init__(
        self,
        store: SliceStore,
        indices: Sequence[int] | np.ndarray,
        augment: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= store.n_slices):
            raise InputError(f"{store.path}: slice index out of range 0..{store.n_slices - 1}")
        self.images = store.images
        self.labels = store.labels[self.indices]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.augment(x)).as_subclass(torch.Tensor)  # type: ignore[misc]

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, Any]:
        if np.ndim(i) == 0:
            x = torch.from_numpy(np.asarray(self.images[self.indices[i]], dtype=np.float32))
            return (x if self.augment is None else self._aug(x)), int(self.labels[i])
        pos = np.asarray(i, dtype=np.int64)
        idx = self.indices[pos]
        order = np.argsort(idx, kind="stable")
        block = np.empty((len(pos), *self.images.shape[1:]), np.float32)
        block[order] = self.images[idx[order]]
        x = torch.from_numpy(block)
        if self.augment is not None:
            for k in range(len(x)):
                x[k] = self._aug(x[k])
        return x, torch.from_numpy(self.labels[pos])


def batch_loader(
    dataset: StoreDataset,
    batch_size: int,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """DataLoader yielding (x, y) batches read in one piece (``dataset[list]``).

    ``sampler`` orders the samples (default: sequential); ``kwargs`` go to DataLoader
    (num_workers, pin_memory, worker_init_fn, ...).
    """
    order = sampler if sampler is not None else range(len(dataset))
    batches = BatchSampler(order, batch_size, drop_last)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=None, sampler=batches, **kwargs)


def blur_augment(sigma: tuple[float, float], prob: float, seed: int) -> Callable[..., Any]:
    """MONAI random Gaussian blur of a (C, H, W) slice, sigma ~ U(sigma) per axis, with ``prob``."""
    from monai.transforms import RandGaussianSmooth

    t = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=prob)
    t.set_random_state(seed)
    return t


class EpochSampler(Sampler[int]):
    """Shuffled (or class-weighted, with replacement) order drawn from (seed, epoch) alone.

    With ``world > 1`` the epoch's order is padded to a multiple of ``world`` and rank ``r``
    takes positions ``r, r + world, ...`` (as torch's DistributedSampler).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        weights: np.ndarray | None = None,
    ) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        total = self.per_rank * self.world
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return iter(order[self.rank : total : self.world].tolist())


def _worker_init(worker_id: int) -> None:
    """Seed numpy/random and a MONAI augmentation in a DataLoader worker from torch's seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    aug = getattr(info.dataset, "augment", None) if info is not None else None
    if aug is not None and hasattr(aug, "set_random_state"):
        aug.set_random_state(seed)


# --------------------------------------------------------------------------- metrics


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged.

    AUROC = (sum of positive ranks - P (P + 1) / 2) / (P N); NaN if either class is absent.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_metrics(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, AUROC and confusion matrix of lesion probabilities.

    Predicted positive = ``prob >= threshold``; precision (recall, F1) is 0 when there is
    no predicted (true) positive, as sklearn's ``zero_division=0``. ``confusion`` is
    [[tn, fp], [fn, tp]] (rows = truth, columns = prediction, as sklearn).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, prob has {p.size}")
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "accuracy": (tp + tn) / y.size if y.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(y, p),
        "confusion": [[tn, fp], [fn, tp]],
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }  # fmt: skip


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
    for x, y in tqdm(loader, desc="predict", disable=None if progress else True):
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


def _fold_indices(store: SliceStore, splits: Path, fold: Fold, part: str) -> np.ndarray:
    cases = fold.part(part)
    try:
        return store.indices_for_cases(cases)
    except InputError as exc:
        raise InputError(f"{splits}: {fold.name} {part}: {exc}") from exc


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Check store, split, model, weights and output folder; nothing is written."""
    recipe = resolve_recipe(cfg)
    store = SliceStore.open(cfg.store)
    splits = cfg.splits if cfg.splits is not None else Path(cfg.store) / "splits.json"
    fold = get_fold(splits, cfg.fold)
    train_idx = _fold_indices(store, splits, fold, "train")
    labels = store.labels
    n_pos = int(labels[train_idx].sum())
    if n_pos == 0 or n_pos == len(train_idx):
        missing = "lesion (label 1)" if n_pos == 0 else "lesion-free (label 0)"
        raise InputError(
            f"{splits}: {fold.name} train part has no {missing} slices "
            f"({len(train_idx)} slices); a classifier needs both"
        )
    val_idx = _fold_indices(store, splits, fold, cfg.val_part)
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
        cfg, recipe, Path(splits), fold, train_idx, val_idx, partial, resume_from, resume_epoch,
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


def make_fabric(cfg: DeviceConfig) -> Any:
    """Lightning Fabric from a config's device options; bad options are one InputError."""
    from lightning.fabric import Fabric

    try:
        return Fabric(
            accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
            strategy=cfg.strategy, precision=cfg.precision,  # type: ignore[arg-type]
        )  # fmt: skip
    except (ValueError, RuntimeError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"device options: {msg}") from exc


def start_run(fabric: Any, seed: int, partial: Path, resuming: bool, stage: str = "train"
              ) -> None:
    """Seed every process; rank 0 (re)creates the run's ``.partial`` folder (marked as
    ensemblecam's), kept when ``resuming``; all processes wait for it."""
    fabric.seed_everything(seed, verbose=False)
    fabric.barrier()
    if fabric.global_rank == 0:
        if not resuming and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        fsutil.write_owner_marker(partial, stage)
    fabric.barrier()


def train_one_epoch(
    fabric: Any, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int,
    desc: str, progress: bool | None,
) -> tuple[float, float, float]:
    """One pass over ``loader``: (mean loss over all ranks, images seen by all ranks, seconds).

    A tqdm bar (rank 0) shows images/s; ``loss_fn(logits, targets)`` gets float32 logits.
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=fabric.device)
    n_seen = torch.zeros((), device=fabric.device)
    world = fabric.world_size
    bar = tqdm(
        total=len(loader) * batch_size * world, unit="img", desc=desc, leave=False,
        disable=None if fabric.global_rank == 0 and progress is not False else True,
    )  # fmt: skip
    for batch in loader:
        x, y = fabric.to_device(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        n_seen += len(y)
        bar.update(len(y) * world)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    n_seen = fabric.all_reduce(n_seen, reduce_op="sum")
    return float(loss_sum / n_seen), float(n_seen), seconds


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


def _rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain data (``weights_only`` loads
    them): numpy's (name, uint32 keys, pos, has_gauss, gauss) with the keys as an int64
    tensor; Python's (version, ints, gauss) as lists."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(gauss)],
            "python": [int(version), [int(v) for v in internal], py_gauss]}  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos),
                         int(has_gauss), float(gauss)))
    version, internal, py_gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), py_gauss))


def _gather(fabric: Any, values: torch.Tensor, n_total: int) -> np.ndarray:
    """Concatenate per-rank 1-D tensors of slices ``rank::world`` back into store order."""
    if fabric.world_size == 1:
        return values.cpu().numpy()
    m = math.ceil(n_total / fabric.world_size)
    padded = torch.zeros(m, dtype=values.dtype, device=values.device)
    padded[: len(values)] = values
    with warnings.catch_warnings():  # lightning's own call of a deprecated torch API
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        gathered = fabric.all_gather(padded).cpu()  # (world, m)
    out = gathered.T.reshape(-1)  # position k * world + r = slice k of rank r
    return out[:n_total].numpy()


def _validate(
    fabric: Any, model: nn.Module, loader: DataLoader, n_total: int, threshold: float
) -> dict[str, Any]:
    model.eval()
    probs, labels, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            x, y = fabric.to_device(batch)
            logits = model(x).float()
            losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
            probs.append(torch.softmax(logits, dim=1)[:, 1])
            labels.append(y)
    dev = fabric.device
    cat = lambda t, dt: torch.cat(t) if t else torch.zeros(0, dtype=dt, device=dev)  # noqa: E731
    prob = _gather(fabric, cat(probs, torch.float32), n_total)
    label = _gather(fabric, cat(labels, torch.int64), n_total)
    loss = _gather(fabric, cat(losses, torch.float32), n_total)
    metrics = classifier_metrics(label, prob, threshold)
    metrics["val_loss"] = float(loss.mean())
    return metrics


def _score(row: dict[str, Any], monitor: str) -> tuple[float, float]:
    """Sort key of an epoch (higher is better): the monitored metric, then lower val loss."""
    value = float(row[monitor])
    if math.isnan(value):
        value = -math.inf
    return (-value, -value) if monitor == "val_loss" else (value, -float(row["val_loss"]))


def _run(
    fabric: Any, plan: RunPlan, progress: bool | None, stop_after_epoch: int | None
) -> str:
    """Training loop of one process: "done" (rank 0, run complete), "stopped" or "worker"."""
    cfg, recipe, info = plan.cfg, plan.recipe, dict(plan.info)
    rank0 = fabric.global_rank == 0
    store = SliceStore.open(cfg.store)
    start_run(fabric, cfg.seed, plan.partial, resuming=plan.resume_from is not None)

    model = models.build_model(cfg.model, **info["model_args"])
    if cfg.weights is not None:
        models.load_pretrained(model, cfg.weights)
    state: dict[str, Any] | None = None
    if plan.resume_from is not None:
        ck = models.read_checkpoint(plan.resume_from)
        model.load_state_dict(ck["state_dict"])
        state = ck["train_state"]
    optimizer = _make_optimizer(model, recipe)
    scheduler = _make_scheduler(optimizer, recipe)
    model, optimizer = fabric.setup(model, optimizer)
    history: list[dict[str, Any]] = []
    best_value: float | None = None
    best_key: tuple[float, float] | None = None
    best_epoch = 0
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_value, best_epoch = state["history"], state["best_value"], state["best_epoch"]
        best_key = _score(history[best_epoch - 1], cfg.monitor)
        start = int(state["epoch"])
        _set_rng_state(state["rng"])
        if rank0:
            fabric.print(f"resuming {cfg.out} after epoch {start}")

    # data
    train_labels = store.labels[plan.train_idx]
    augment = None
    if recipe["augment"] == "blur":
        augment = blur_augment(cfg.blur_sigma, cfg.blur_prob, cfg.seed + 7919 * fabric.global_rank)
    train_ds = StoreDataset(store, plan.train_idx, augment)
    counts = np.bincount(train_labels, minlength=2).astype(np.float64)
    class_w = counts.sum() / (2 * counts)  # n / (K n_c): balanced class weights
    sampler = EpochSampler(
        len(train_ds), cfg.seed, fabric.global_rank, fabric.world_size,
        weights=class_w[train_labels] if cfg.imbalance == "weighted_sampler" else None,
    )  # fmt: skip
    batch_size = int(recipe["batch_size"])
    gpu = fabric.device.type == "cuda"
    train_loader = batch_loader(
        train_ds, batch_size, sampler, drop_last=len(sampler) > batch_size,
        num_workers=cfg.workers, pin_memory=gpu, worker_init_fn=_worker_init,
        persistent_workers=cfg.workers > 0,
    )  # fmt: skip
    val_shard = plan.val_idx[fabric.global_rank :: fabric.world_size]
    val_loader = batch_loader(
        StoreDataset(store, val_shard), batch_size, num_workers=cfg.workers, pin_memory=gpu
    )
    # not fabric.setup_dataloaders: its loader calls sampler.set_epoch(<its own counter>),
    # which would restart the data order at 0 after a resume; batches are moved below.
    weight = torch.as_tensor(class_w, dtype=torch.float32, device=fabric.device)
    criterion = nn.CrossEntropyLoss(weight=weight if cfg.imbalance == "weighted_loss" else None)

    epochs = int(recipe["epochs"])
    for epoch in range(start + 1, epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, n_seen, train_time = train_one_epoch(
            fabric, model, train_loader, optimizer, criterion, batch_size,
            f"epoch {epoch}/{epochs}", progress)
        scheduler.step()
        val = _validate(fabric, model, val_loader, len(plan.val_idx), cfg.threshold)
        row = {
            "epoch": epoch, "train_loss": train_loss, "lr": lr,
            "images_per_s": n_seen / train_time, "time_s": time.perf_counter() - t0,
            **{k: val[k] for k in METRIC_COLUMNS if k in val},
        }  # fmt: skip
        history.append(row)
        key = _score(row, cfg.monitor)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_value, best_epoch = key, float(row[cfg.monitor]), epoch
        if rank0:
            info_e = {**info, "epoch": epoch, "metrics": {**row, "confusion": val["confusion"]}}
            if improved:
                models.save_checkpoint(plan.partial / "best.pt", model, info_e)
            train_state = {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "rng": _rng_state(), "history": history,
                "best_value": best_value, "best_epoch": best_epoch,
            }  # fmt: skip
            models.save_checkpoint(plan.partial / "last.pt", model, info_e, train_state)
            write_metrics_csv(plan.partial / "metrics.csv", history)
            fabric.print(
                f"epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} auroc {row['auroc']:.4f} f1 {row['f1']:.4f}"
                f"{' *' if improved else ''}"
            )
        fabric.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs:
            return "stopped"

    if rank0:
        _finish(plan, history, best_epoch, best_value)
    fabric.barrier()
    return "done" if rank0 else "worker"


def _finish(
    plan: RunPlan, history: list[dict[str, Any]], best_epoch: int, best_value: float | None
) -> None:
    best_info = models.read_checkpoint(plan.partial / "best.pt")["info"]
    write_metrics_csv(plan.partial / "metrics.csv", history)
    plot_learning_curve(plan.partial / "learning_curve.png", history, best_epoch)
    plot_confusion(
        plan.partial / "confusion_matrix.png",
        best_info["metrics"]["confusion"],
        f"{plan.cfg.model} {plan.fold.name} {plan.cfg.val_part}, epoch {best_epoch}",
    )
    _tensorboard(plan.partial, history)
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
        "files": ["best.pt", "last.pt", "metrics.csv", "learning_curve.png",
                  "confusion_matrix.png"],
    }  # fmt: skip
    fsutil.write_json(plan.partial / RUN_MARKER, summary)
    fsutil.commit_output_dir(plan.partial, plan.cfg.out, "train")


def _tensorboard(folder: Path, history: list[dict[str, Any]]) -> None:
    """Write the history as TensorBoard scalars when tensorboard is installed (else skip)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(str(folder / "tensorboard"))
    for row in history:
        for key in METRIC_COLUMNS[1:]:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.close()


# --------------------------------------------------------------------------- records


def write_metrics_csv(path: Path, history: list[dict[str, Any]],
                      columns: Sequence[str] = METRIC_COLUMNS) -> None:
    """Write the per-epoch history (``columns``; missing values as empty cells) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    fsutil.write_text(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Read a metrics.csv history back (all values as floats)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")


def plot_learning_curve(
    path: Path, history: list[dict[str, Any]], best_epoch: int,
    scores: Sequence[tuple[str, str]] = (("auroc", "val AUROC"), ("f1", "val F1")),
) -> None:
    """Train/val loss (left) and validation ``scores`` (key, label) (right) per epoch; the
    best epoch marked. Without validation (no ``val_loss``) the right panel says so."""
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    validated = all(r.get("val_loss") not in (None, "") for r in history)
    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss")
    if validated:
        ax1.plot(ep, [r["val_loss"] for r in history], "o-", label="val loss")
        for key, label in scores:
            ax2.plot(ep, [r[key] for r in history], "o-", label=label)
    else:
        ax2.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax2.transAxes)
    for ax in (ax1, ax2):
        ax.axvline(best_epoch, color="grey", ls="--", lw=1)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax2.set_ylim(0, 1.02)
    _save_figure(fig, path)


def plot_confusion(path: Path, confusion: list[list[int]], title: str) -> None:
    """Confusion matrix [[tn, fp], [fn, tp]] as an annotated 2x2 image."""
    from matplotlib.figure import Figure

    cm = np.asarray(confusion)
    fig = Figure(figsize=(3.6, 3.2))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")  # fmt: skip
    ax.set_xticks([0, 1], ["no lesion", "lesion"])
    ax.set_yticks([0, 1], ["no lesion", "lesion"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    _save_figure(fig, path)
