"""2-D U-Net (MONAI) on one fold: the supervised baseline, the self-trained segmenter and
the MIL localiser, all through the one training loop.

``targets="store"`` trains on the store's ground-truth masks (the paper's FSSS, the
thesis's U-Net: the upper bound); a path to a ``masks.npz`` (arrays ``index`` int64 store
indices, ``masks`` uint8 (n, H, W) in {0, 1, 255}) trains on those pseudo-labels (the
refined pseudo-labels of the training part: the usual second stage of weakly supervised
segmentation), 255 = ignore: left out of the loss (:func:`masked_dice_ce`) and of the
validation scores, and with it the labels' lesion border (``cfg.boundary_ignore`` pixels,
:func:`ensemblecam.refine.ignore_lesion_border`); then only the training-part slices listed
in the npz are used.
``targets="labels"`` trains a localiser from the slice labels alone with the
multiple-instance loss (:func:`ensemblecam.training.losses.mil_loss`; config
:class:`ensemblecam.config.MilConfig`): validation is its loss on the val part, best.pt the
lowest val loss. With ``objective: denoise`` the MilConfig trains a denoising autoencoder
of healthy appearance instead (``source`` "healthy"): only the slices labelled lesion-free
are used, the input is the slice plus coarse noise
(:class:`ensemblecam.training.data.EpochNoise`), the target the clean slice, the loss the
mean squared error; validation as the localiser's, on the val part's lesion-free slices.

One run writes, in ``<out>`` (built as ``.<out>.partial`` and renamed when complete)::

    best.pt               checkpoint of the best validation epoch (highest val lesion Dice,
                          ties to the lower val loss); the last epoch without validation
    last.pt               last epoch + optimizer/RNG state, rewritten every epoch and deleted
                          at the end; a killed run resumes from it (same settings)
    metrics.csv           one row per epoch (METRIC_COLUMNS)
    learning_curve.png    losses and val lesion Dice per epoch
    unet.json             run summary, written last: its presence means the run is complete

Validation masks (store or npz targets) come from ``cfg.val_targets``: "same" = the
training targets' source (the store's masks, or the npz's masks of the val-part slices it
lists), "store" = the store's
ground truth, "none" = no validation. Without validation slices best.pt is the last epoch.
Val lesion Dice is accumulated over the part: 2TP / (2TP + FP + FN) (metrics.lesion_dice).
Loss: monai DiceCELoss (Dice over the whole batch + cross-entropy) on store masks, its
masked form on pseudo-labels; Adam. Augmentation (``cfg.augment: spatial``): each training
batch's slices and targets are rotated, zoomed and mirrored together
(:class:`ensemblecam.training.data.EpochSpatial`; the MIL localiser's slices alone, their
labels do not move), with draws from (seed, epoch, worker), so a resumed run is identical.
Predicted lesion: argmax of 2 softmax channels, or sigmoid > 0.5 of 1 channel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ensemblecam import __version__, models
from ensemblecam import progress as progress_out
from ensemblecam.config import MilConfig, UNetConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import check_slice_arrays, load_slice_arrays
from ensemblecam.io.split import Fold, get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.metrics.conventions import score, slice_counts
from ensemblecam.models.segmenters import UNET, build_unet, load_unet, logits_to_mask, model_args
from ensemblecam.refine import ignore_lesion_border
from ensemblecam.training.data import (
    DenoiseDataset,
    EpochNoise,
    EpochSampler,
    EpochSpatial,
    MaskDataset,
    StoreDataset,
    batch_loader,
    part_indices,
    rank_seed,
    train_loader,
)
from ensemblecam.training.fabric import gather, make_fabric
from ensemblecam.training.loop import EpochData, LossFn, Task, eval_batches, fit
from ensemblecam.training.losses import IGNORE_INDEX, MaskedDiceCELoss, mil_loss
from ensemblecam.training.records import plot_learning_curve, write_metrics_csv

RUN_MARKER = "unet.json"
RUN_FORMAT = "ensemblecam-unet-run"

UNET_SCORES = (("lesion_dice", "val lesion Dice"), ("paper_miou", "val paper mIoU"))
METRIC_COLUMNS = [
    "epoch", "train_loss", "val_loss", "lesion_dice", "lesion_iou", "paper_miou",
    "case_dice_mean", "lr", "images_per_s", "time_s",
]  # fmt: skip


def read_pseudo_masks(path: str | Path, store: SliceStore) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 (n,), masks uint8 (n, H, W) in {0, 1, 255}) of a masks.npz (or a folder
    holding one), checked against ``store`` as exported masks are (255 = ignore)."""
    index, masks = check_slice_arrays(
        store, *load_slice_arrays(path, "masks"), "mask", f"{path}: pseudo-labels"
    )
    if masks.dtype != bool:
        bad = masks[(masks != 0) & (masks != 1) & (masks != IGNORE_INDEX)]
        if bad.size:
            raise InputError(
                f"{path}: pseudo-labels must be 0, 1 or {IGNORE_INDEX} (ignore), found "
                f"value {bad.flat[0]}"
            )
    return index, masks.astype(np.uint8)


def _targets(
    store: SliceStore, idx: np.ndarray, source: str, pseudo: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept store indices, mask source array, rows in it) of part ``idx`` for ``source``;
    "labels": the slices with a known label (the label array, rows = kept indices);
    "healthy": the slices labelled lesion-free (a denoising autoencoder's)."""
    if source == "store":
        assert store.masks is not None
        return idx, store.masks, idx
    if source in ("labels", "healthy"):
        kept = idx[store.labels[idx] >= 0] if source == "labels" else idx[store.labels[idx] == 0]
        return kept, store.labels, kept
    assert pseudo is not None
    index, masks = pseudo
    keep = np.isin(idx, index)
    kept = idx[keep]
    order = np.argsort(index, kind="stable")
    rows = order[np.searchsorted(index, kept, sorter=order)]
    return kept, masks, rows


# --------------------------------------------------------------------------- planning


@dataclass
class UNetPlan:
    """Everything checked before any process is started (picklable for ddp_spawn)."""

    cfg: UNetConfig | MilConfig
    store: Path
    targets: str
    source: str
    fold: Fold
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_source: str | None
    out: Path
    partial: Path
    resume_from: Path | None
    info: dict[str, Any]


def plan_unet(
    cfg: UNetConfig | MilConfig,
    store_path: str | Path,
    splits_path: str | Path | None,
    fold: int | str,
    out: str | Path,
    targets: str | Path = "store",
    force: bool = False,
) -> UNetPlan:
    """Check store, split, targets, model and output folder; nothing is written."""
    store = SliceStore.open(store_path)
    splits = Path(splits_path) if splits_path is not None else Path(store_path) / "splits.json"
    f = get_fold(splits, fold)
    source = str(targets) if str(targets) in ("store", "labels") else "npz"
    if (source == "labels") != isinstance(cfg, MilConfig):
        raise InputError(f"unet: targets {str(targets)!r} need a mil config; masks a unet config")
    if source == "labels" and getattr(cfg, "objective", "mil") == "denoise":
        source = "healthy"
    if source == "store" and store.masks is None:
        raise InputError(
            f"{store.path}: store has no masks; the supervised U-Net needs targets (pass a "
            "pseudo-label masks.npz)"
        )
    pseudo = None if source != "npz" else read_pseudo_masks(targets, store)
    train_all = part_indices(store, splits, f, "train")
    train_idx, _, _ = _targets(store, train_all, source, pseudo)
    if len(train_idx) == 0:
        where = targets if source == "npz" else store.path
        what = {"labels": "slice labels", "healthy": "slices labelled lesion-free"}.get(
            source, "target masks"
        )
        raise InputError(f"{where}: no {what} for the {len(train_all)} slices of "
                         f"{f.name} train")  # fmt: skip
    from_labels = source in ("labels", "healthy")
    val_targets = "same" if from_labels else getattr(cfg, "val_targets", "same")
    val_source: str | None = {"same": source, "store": "store", "none": None}[val_targets]
    if val_source == "store" and store.masks is None:
        raise InputError(f"{store.path}: store has no masks for val_targets 'store'")
    val_idx = np.zeros(0, np.int64)
    if val_source is not None:
        val_idx, _, _ = _targets(store, part_indices(store, splits, f, "val"), val_source, pseudo)
    if len(val_idx) == 0:
        val_source = None
    args = model_args(cfg, len(store.channels))
    build_unet(**args)  # bad architecture settings fail here
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    fsutil.check_not_input(out, [store_path, splits, None if source == "store" else targets])
    if not force and (out / RUN_MARKER).exists() and fsutil.is_ours(out):
        raise InputError(f"{out}: already holds a finished U-Net run; use --force to replace")
    fsutil.check_replaceable(out, force, RUN_MARKER)
    info = {
        "model": UNET,
        "model_args": args,
        "channels": store.channels,
        "size": list(store.size),
        "store": str(Path(store_path).resolve()),
        "splits": str(splits.resolve()),
        "fold": f.name,
        "targets": str(Path(targets).resolve()) if source == "npz" else source,
        "targets_sha256": fsutil.file_sha256(targets) if source == "npz" else None,
        "val_targets": val_source,
        "config": cfg.model_dump(mode="json"),
        "ensemblecam_version": __version__,
    }
    resume_from = None
    last = partial / "last.pt"
    if not force and last.is_file():
        old = models.read_checkpoint(last)["info"]  # a refused file stops here (one line)
        same = all(old.get(k) == info[k] for k in info if k not in ("config",))
        # more epochs may resume a run, unless a schedule depends on their number
        free = () if getattr(cfg, "scheduler", "none") != "none" else ("epochs",)
        old_cfg = {k: v for k, v in old.get("config", {}).items() if k not in free}
        new_cfg = {k: v for k, v in info["config"].items() if k not in free}
        if same and old_cfg == new_cfg and int(old.get("epoch", 0)) <= cfg.epochs:
            resume_from = last
    return UNetPlan(
        cfg,
        Path(store_path),
        str(targets),
        source,
        f,
        train_idx,
        val_idx,
        val_source,
        out,
        partial,
        resume_from,
        info,
    )


# --------------------------------------------------------------------------- training


def train_unet(
    cfg: UNetConfig | MilConfig,
    store_path: str | Path,
    splits_path: str | Path | None,
    fold: int | str,
    out: Path,
    targets: str | Path = "store",
    force: bool = False,
    progress: bool | None = None,
    stop_after_epoch: int | None = None,
) -> Path | None:
    """Train a U-Net on ``fold``'s train part of the store; return the finished run folder.

    ``targets``: "store" (ground truth), a masks.npz of pseudo-labels, or "labels" (the
    MIL localiser; ``cfg`` a :class:`MilConfig`). A finished run in
    ``out`` is refused unless ``force``; an unfinished one with the same settings resumes.
    ``stop_after_epoch`` ends the run after that epoch as if killed (returns None); None is
    also returned in the non-zero ranks of a multi-process run.
    """

    plan = plan_unet(cfg, store_path, splits_path, fold, out, targets, force)
    status = make_fabric(cfg).launch(_run, plan, progress, stop_after_epoch)
    return plan.out if status == "done" else None


def _dataset(
    store: SliceStore,
    idx: np.ndarray,
    source: str,
    pseudo: tuple[np.ndarray, np.ndarray] | None,
    augment: EpochSpatial | None = None,
    noise: EpochNoise | None = None,
) -> StoreDataset:
    """The dataset of part ``idx`` for ``source``; "healthy" needs ``noise`` (which applies
    ``augment`` itself)."""
    kept, src, rows = _targets(store, idx, source, pseudo)
    assert len(kept) == len(idx)
    if source == "labels":
        return StoreDataset(store, kept, augment)
    if source == "healthy":
        assert isinstance(noise, EpochNoise)
        return DenoiseDataset(store, kept, noise)
    return MaskDataset(store, kept, src, rows, augment)


def make_augment(cfg: UNetConfig | MilConfig, rank: int) -> EpochSpatial | None:
    """The training augmentation of ``cfg``, its draws seeded per rank."""
    if cfg.augment == "none":
        return None
    return EpochSpatial(cfg.rotate_deg, cfg.zoom, cfg.augment_prob, cfg.flip,
                        rank_seed(cfg.seed, rank))  # fmt: skip


def make_noise(cfg: MilConfig, rank: int, spatial: EpochSpatial | None, seed: int) -> EpochNoise:
    """The denoising input noise of ``cfg`` after ``spatial``, its draws from ``seed`` (a
    validation part's differ from training's)."""
    return EpochNoise(cfg.noise_std, cfg.noise_grid, rank_seed(seed, rank), spatial)


def has_lesion(ds: StoreDataset) -> np.ndarray:
    """Bool (n,) per training slice: its target mask has a lesion pixel (mask targets), or
    its slice label says lesion (slice labels: the MIL localiser)."""
    if not isinstance(ds, MaskDataset):
        return ds.store.labels[ds.indices] == 1
    out = np.zeros(len(ds), bool)
    for s in range(0, len(ds), 256):
        rows = ds.mask_rows[s : s + 256]
        order = np.argsort(rows, kind="stable")
        block = np.asarray(ds.mask_source[rows[order]])
        out[s + order] = (block == 1).any(axis=(1, 2))
    return out


def oversample_weights(lesion: np.ndarray, share: float) -> np.ndarray | None:
    """Sampling weights giving slices with lesion at least ``share`` of the draws: w = 1 for
    lesion-free slices and ``share n_0 / ((1 - share) n_1)`` for the n_1 lesion slices (so
    P(lesion) = share); None (plain shuffling) when they already make up that share, or
    when either kind is absent."""
    n1 = int(np.sum(lesion))
    n0 = len(lesion) - n1
    if share <= 0 or n1 == 0 or n0 == 0 or n1 / len(lesion) >= share:
        return None
    return np.where(lesion, share * n0 / ((1 - share) * n1), 1.0)


def _make_loss(cfg: UNetConfig | MilConfig, source: str) -> LossFn:
    """loss(float32 logits, targets) of ``source``: DiceCE on store masks, its masked form
    (255 left out) on pseudo-labels, the MIL loss on slice labels, the mean squared error
    to the clean slice of a denoising autoencoder (lesion-free slices)."""
    if source == "healthy":
        return nn.functional.mse_loss
    if isinstance(cfg, MilConfig):
        top, bottom, neg_top = cfg.top_fraction, cfg.bottom_fraction, cfg.negative_top
        return lambda z, y: mil_loss(z, y, top, bottom, neg_top)
    if source == "npz":
        return MaskedDiceCELoss(IGNORE_INDEX, cfg.lambda_dice, cfg.lambda_ce)
    from monai.losses import DiceCELoss

    two = cfg.out_channels == 2
    criterion = DiceCELoss(
        to_onehot_y=two, softmax=two, sigmoid=not two, batch=True,
        lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce,
    )  # fmt: skip
    return lambda z, y: criterion(z, y.unsqueeze(1).to(z.dtype if z.shape[1] == 1 else torch.long))


def known_counts(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-slice (TP, FP, FN, TN) of bool masks ``pred`` against targets in {0, 1, 255}
    over the known pixels only: an ignored (255) pixel counts in none of the four."""
    known = target != IGNORE_INDEX
    tp, fp, fn, tn = slice_counts(pred & known, (target == 1) & known)
    return tp, fp, fn, tn - (~known).sum(axis=(1, 2))


def _validate(
    fabric: Any, model: nn.Module, loader: DataLoader, loss: LossFn,
    n_total: int, case_ids: np.ndarray | None,
) -> dict[str, float]:  # fmt: skip
    """Val loss (slice-weighted mean of batch losses) and, with masks (``case_ids`` given),
    segmentation metrics of the part; ignored pixels (255) count as neither class."""
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    loss_sum = torch.zeros((), device=fabric.device)
    n_seen = torch.zeros((), device=fabric.device)
    for logits, y in eval_batches(fabric, model, loader):
        loss_sum += loss(logits, y) * len(y)
        n_seen += len(y)
        if case_ids is None:
            continue
        counts = known_counts(logits_to_mask(logits).cpu().numpy(), y.cpu().numpy())
        for p, c in zip(parts, counts, strict=True):
            p.append(torch.from_numpy(c).to(fabric.device))
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    n_seen = fabric.all_reduce(n_seen, reduce_op="sum")
    res: dict[str, Any] = {}
    if case_ids is not None:
        cat = [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64, device=fabric.device)
               for p in parts]  # fmt: skip
        tp, fp, fn, tn = (gather(fabric, c, n_total) for c in cat)
        res = score(tp, fp, fn, tn, case_ids)
    res["val_loss"] = float(loss_sum / n_seen)
    return res


def _data(fabric: Any, plan: UNetPlan) -> EpochData:
    """This process's training batches, the DiceCE loss and its shard of the validation
    part (None without validation)."""
    cfg = plan.cfg
    rank, world = fabric.global_rank, fabric.world_size
    store = SliceStore.open(plan.store)
    uses_npz = "npz" in (plan.source, plan.val_source)
    pseudo = read_pseudo_masks(plan.targets, store) if uses_npz else None
    if pseudo is not None and isinstance(cfg, UNetConfig):
        pseudo = (pseudo[0], ignore_lesion_border(pseudo[1], cfg.boundary_ignore))
    augment = make_augment(cfg, rank)
    noise = val_noise = None
    if plan.source == "healthy":
        assert isinstance(cfg, MilConfig)
        noise = make_noise(cfg, rank, augment, cfg.seed)
        val_noise = make_noise(cfg, rank, None, cfg.seed + 1)
    train_ds = _dataset(store, plan.train_idx, plan.source, pseudo, augment, noise)
    weights = oversample_weights(has_lesion(train_ds), cfg.oversample)
    sampler = EpochSampler(len(train_ds), cfg.seed, rank, world, weights)
    gpu = fabric.device.type == "cuda"
    loader = train_loader(train_ds, cfg.batch_size, sampler, cfg.workers, gpu)
    loss = _make_loss(cfg, plan.source)
    validate = None
    if plan.val_source is not None:
        shard = np.arange(len(plan.val_idx))[rank::world]
        val_ds = _dataset(store, plan.val_idx[shard], plan.val_source, pseudo, noise=val_noise)
        val_loader = batch_loader(val_ds, cfg.batch_size, num_workers=cfg.workers,
                                  pin_memory=gpu)  # fmt: skip
        n_val, case_ids = len(plan.val_idx), store.table["case"][plan.val_idx]
        cases = None if plan.val_source in ("labels", "healthy") else case_ids

        def validate(model: nn.Module) -> dict[str, Any]:
            return _validate(fabric, model, val_loader, loss, n_val, cases)

    return EpochData(sampler, loader, loss, validate)


def _run(fabric: Any, plan: UNetPlan, progress: bool | None, stop_after_epoch: int | None) -> str:
    """One process of the run: the shared loop on the U-Net task ("done", "stopped" or
    "worker", see :func:`ensemblecam.training.loop.fit`). best.pt: highest val lesion Dice,
    ties to the lower val loss; without validation the last epoch."""
    cfg = plan.cfg
    kinds = {"store": "supervised", "labels": "MIL localiser", "healthy": "denoising autoencoder"}
    kind = kinds.get(plan.source, "pseudo-labels")
    monitor = None
    if plan.val_source is not None:
        monitor = "val_loss" if plan.source in ("labels", "healthy") else "lesion_dice"
    task = Task(
        stage="unet", out=plan.out, partial=plan.partial, resume_from=plan.resume_from,
        seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, info=dict(plan.info),
        columns=METRIC_COLUMNS, monitor=monitor,
        build_model=lambda: build_unet(**plan.info["model_args"]),
        make_optimizer=lambda model: torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        make_scheduler=_scheduler(cfg),
        make_data=lambda fab: _data(fab, plan),
        finish=lambda history, best_epoch: _finish(plan, history, best_epoch),
        log_keys=("val_loss", "lesion_dice"), prefix=f"unet {kind} {plan.fold.name} ",
    )  # fmt: skip
    return fit(fabric, task, progress, stop_after_epoch)


def _scheduler(cfg: UNetConfig | MilConfig) -> Callable[[Any], Any] | None:
    """The per-epoch learning-rate schedule of ``cfg``: cosine from lr to 0 over
    ``cfg.epochs`` (``scheduler: cosine``), else none (constant)."""
    if getattr(cfg, "scheduler", "none") != "cosine":
        return None
    return lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs)


def _finish(plan: UNetPlan, history: list[dict[str, Any]], best_epoch: int) -> None:
    """Rank 0, after the last epoch: learning curve, unet.json; rename the folder."""
    best = models.read_checkpoint(plan.partial / "best.pt")["info"]["metrics"]
    write_metrics_csv(plan.partial / "metrics.csv", history, METRIC_COLUMNS)
    scores = () if plan.source in ("labels", "healthy") else UNET_SCORES
    plot_learning_curve(plan.partial / "learning_curve.png", history, best_epoch, scores)
    summary = {
        "format": RUN_FORMAT,
        "version": 1,
        **plan.info,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "best": best,
        "last": history[-1],
        "n_train": len(plan.train_idx),
        "n_val": len(plan.val_idx),
        "resumed": plan.resume_from is not None,
        "files": ["best.pt", "metrics.csv", "learning_curve.png"],
    }
    fsutil.write_json(plan.partial / RUN_MARKER, summary)
    fsutil.commit_output_dir(plan.partial, plan.out, "unet")


# --------------------------------------------------------------------------- prediction


def logit_batches(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows of ``indices``, float32 logits (B, K, H, W) on the CPU) per batch of a U-Net."""
    model, info = load_unet(checkpoint)
    if list(info.get("channels", [])) != store.channels:
        raise InputError(
            f"{checkpoint}: U-Net trained on channels {info.get('channels')}, store "
            f"{store.path} has {store.channels}"
        )
    ds = StoreDataset(store, np.asarray(indices, dtype=np.int64))
    model.to(device)
    with torch.inference_mode():
        pos = 0
        batches = batch_loader(ds, batch_size)
        for x, _ in progress_out.bar(batches, desc="segment", unit="batches", label="unet",
                                     enabled=progress):  # fmt: skip
            yield slice(pos, pos + len(x)), model(x.to(device)).float().cpu()
            pos += len(x)


def predict_unet(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """uint8 (n, H, W) lesion masks of the store slices ``indices`` (in that order);
    ``threshold``: as :func:`segment_unet`."""
    return segment_unet(checkpoint, store, indices, batch_size, device, progress, threshold)[0]


def segment_unet(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 masks, float32 lesion probabilities), each (n, H, W), of the store slices
    ``indices`` (in that order). Probability: softmax of the lesion channel (2 channels) or
    sigmoid (1 channel), in [0, 1]; mask: probability > ``threshold`` (a calibrated one,
    :mod:`ensemblecam.stages.threshold`), or :func:`logits_to_mask` when None."""
    h, w = store.size
    out = np.zeros((len(indices), h, w), np.uint8)
    prob = np.zeros((len(indices), h, w), np.float32)
    for rows, z in logit_batches(checkpoint, store, indices, batch_size, device, progress):
        prob[rows] = lesion_prob(z).numpy()
        out[rows] = logits_to_mask(z).numpy() if threshold is None else prob[rows] > threshold
    return out, prob


def lesion_prob(logits: torch.Tensor) -> torch.Tensor:
    """P(lesion) (B, H, W) of U-Net logits (B, K, H, W): softmax of the lesion channel
    (K = 2) or sigmoid (K = 1)."""
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(1)[:, 1]


def predict_lesion_logits(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> np.ndarray:
    """float32 (n, H, W) lesion logits d of the store slices ``indices``: d = z_1 - z_0 of
    2 channels (softmax P(lesion) = sigmoid(d)), d = z_0 of 1 channel."""

    def lesion_logit(rows: slice, z: torch.Tensor) -> torch.Tensor:
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z[:, 0]

    return _per_slice(checkpoint, store, indices, batch_size, device, progress, lesion_logit)


def predict_residuals(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> np.ndarray:
    """float32 (n, H, W) residuals r = sum_c |x_c - f(x)_c| of a denoising autoencoder f
    (``objective: denoise``) on the store slices ``indices`` x."""
    idx = np.asarray(indices, dtype=np.int64)

    def residual(rows: slice, z: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(store.images[idx[rows]], np.float32))
        if z.shape != x.shape:
            raise InputError(
                f"{checkpoint}: not a denoising autoencoder (output channels "
                f"{z.shape[1]}, input channels {x.shape[1]})"
            )
        return (x - z).abs().sum(1)

    return _per_slice(checkpoint, store, idx, batch_size, device, progress, residual)


def _per_slice(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int,
    device: str | torch.device,
    progress: bool | None,
    fn: Callable[[slice, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """float32 (n, H, W): ``fn(rows, z)`` of each batch of the network's outputs z on the
    store slices ``indices`` (rows: the batch's positions in ``indices``)."""
    h, w = store.size
    out = np.zeros((len(indices), h, w), np.float32)
    for rows, z in logit_batches(checkpoint, store, indices, batch_size, device, progress):
        out[rows] = fn(rows, z).numpy()
    return out
