"""Supervised 2-D U-Net (MONAI) on one fold: the fully supervised baseline and the second stage.

``targets="store"`` trains on the store's ground-truth masks (the paper's FSSS, the
thesis's U-Net: the upper bound); a path to a ``masks.npz`` (arrays ``index`` int64 store
indices, ``masks`` uint8 (n, H, W) in {0, 1}) trains on those pseudo-labels (the ensemble's
masks of the training part: the usual second stage of weakly supervised segmentation);
then only the training-part slices listed in the npz are used.

One run writes, in ``<out>`` (built as ``.<out>.partial`` and renamed when complete)::

    best.pt               checkpoint of the best validation epoch (highest val lesion Dice,
                          ties to the lower val loss); the last epoch without validation
    last.pt               last epoch + optimizer/RNG state, rewritten every epoch; a killed
                          run resumes from it when started again with the same settings
    metrics.csv           one row per epoch (METRIC_COLUMNS)
    learning_curve.png    losses and val lesion Dice per epoch
    unet.json             run summary, written last: its presence means the run is complete

Validation masks come from ``cfg.val_targets``: "same" = the training targets' source (the
store's masks, or the npz's masks of the val-part slices it lists), "store" = the store's
ground truth, "none" = no validation. Without validation slices best.pt is the last epoch.
Val lesion Dice is accumulated over the part: 2TP / (2TP + FP + FN) (metrics.lesion_dice).
Loss: monai DiceCELoss (Dice over the whole batch + cross-entropy), Adam. Predicted lesion:
argmax of 2 softmax channels, or sigmoid > 0.5 of 1 channel.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ensemblecam import __version__, models
from ensemblecam.config import UNetConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import check_binary, check_slice_arrays, load_slice_arrays
from ensemblecam.io.split import Fold, get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.stages.evaluate import score, slice_counts
from ensemblecam.stages.train import (
    EpochSampler,
    StoreDataset,
    _gather,
    _rng_state,
    _set_rng_state,
    _worker_init,
    batch_loader,
    make_fabric,
    plot_learning_curve,
    start_run,
    train_one_epoch,
    write_metrics_csv,
)

RUN_MARKER = "unet.json"
RUN_FORMAT = "ensemblecam-unet-run"
MODEL_NAME = "unet"

UNET_SCORES = (("lesion_dice", "val lesion Dice"), ("paper_miou", "val paper mIoU"))
METRIC_COLUMNS = [
    "epoch", "train_loss", "val_loss", "lesion_dice", "lesion_iou", "paper_miou",
    "case_dice_mean", "lr", "images_per_s", "time_s",
]  # fmt: skip


# --------------------------------------------------------------------------- model


class UNet2D(nn.Module):
    """MONAI 2-D U-Net; input zero-padded to a multiple of prod(strides), output cropped back."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        strides: tuple[int, ...] | list[int] = (2, 2, 2),
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if len(strides) != len(channels) - 1:
            raise InputError(
                f"unet: {len(channels)} channel levels need {len(channels) - 1} strides, "
                f"got {len(strides)}"
            )
        self.multiple = int(np.prod(strides))
        self.net = UNet(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
            channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
            norm=norm, dropout=dropout,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        return self.net(x)[..., :h, :w]


def build_unet(in_channels: int, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """A fresh :class:`UNet2D` (same signature as a models.build_model builder)."""
    try:
        return UNet2D(in_channels, num_classes, **kwargs)
    except TypeError as exc:
        raise InputError(f"unet: bad model arguments {kwargs} ({exc})") from exc


def model_args(cfg: UNetConfig, in_channels: int) -> dict[str, Any]:
    """The keyword arguments of :func:`build_unet` for ``cfg`` (stored in checkpoints)."""
    return {
        "in_channels": in_channels, "num_classes": cfg.out_channels,
        "channels": list(cfg.channels), "strides": list(cfg.strides),
        "num_res_units": cfg.num_res_units, "norm": cfg.norm, "dropout": cfg.dropout,
    }  # fmt: skip


def load_unet(checkpoint: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a U-Net checkpoint written by :func:`train_unet`; (model in eval mode, info)."""
    checkpoint = Path(checkpoint)
    obj = models.read_checkpoint(checkpoint, map_location)
    info = obj["info"]
    if info.get("model") != MODEL_NAME or not isinstance(info.get("model_args"), dict):
        raise InputError(f"{checkpoint}: not a U-Net checkpoint (model {info.get('model')!r})")
    model = build_unet(**info["model_args"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:2])[:300]
        raise InputError(f"{checkpoint}: weights do not fit the U-Net ({detail})") from exc
    return model.eval(), info


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) bool lesion mask: argmax (K=2) or sigmoid > 0.5 (K=1)."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0  # sigmoid(z) > 0.5  <=>  z > 0
    return logits.argmax(dim=1) == 1


# --------------------------------------------------------------------------- data


class MaskDataset(StoreDataset):
    """Store slices with segmentation targets: ``ds[list]`` = (x (B, C, H, W), y (B, H, W) long).

    ``mask_source`` is the store's memory-mapped masks.npy or an in-memory (n, H, W) array;
    ``mask_rows[k]`` is the row of ``mask_source`` holding the target of position ``k``.
    """

    def __init__(
        self,
        store: SliceStore,
        indices: np.ndarray,
        mask_source: np.ndarray,
        mask_rows: np.ndarray,
    ) -> None:
        super().__init__(store, indices)
        self.mask_source = mask_source
        self.mask_rows = np.asarray(mask_rows, dtype=np.int64)
        self.labels = np.zeros(len(self.indices), np.int64)  # unused by segmentation

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, Any]:
        pos = np.atleast_1d(np.asarray(i, dtype=np.int64))
        x, _ = super().__getitem__(pos)
        rows = self.mask_rows[pos]
        order = np.argsort(rows, kind="stable")
        y = np.empty((len(pos), *self.mask_source.shape[1:]), np.int64)
        y[order] = self.mask_source[rows[order]]
        if np.ndim(i) == 0:
            return x[0], torch.from_numpy(y[0])
        return x, torch.from_numpy(y)


def read_pseudo_masks(path: str | Path, store: SliceStore) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 (n,), masks uint8 (n, H, W)) of a masks.npz (or a folder holding one),
    checked against ``store`` as exported masks are."""
    index, masks = check_slice_arrays(
        store, *load_slice_arrays(path, "masks"), "mask", f"{path}: pseudo-labels"
    )
    check_binary(masks, f"{path}: pseudo-labels")
    return index, masks.astype(np.uint8)


def _targets(
    store: SliceStore, idx: np.ndarray, source: str, pseudo: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept store indices, mask source array, rows in it) of part ``idx`` for ``source``."""
    if source == "store":
        assert store.masks is not None
        return idx, store.masks, idx
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

    cfg: UNetConfig
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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _part(store: SliceStore, splits: Path, fold: Fold, part: str) -> np.ndarray:
    try:
        return store.indices_for_cases(fold.part(part))
    except InputError as exc:
        raise InputError(f"{splits}: {fold.name} {part}: {exc}") from exc


def plan_unet(
    cfg: UNetConfig,
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
    source = "store" if str(targets) == "store" else "npz"
    if source == "store" and store.masks is None:
        raise InputError(
            f"{store.path}: store has no masks; the supervised U-Net needs targets (pass a "
            "pseudo-label masks.npz)"
        )
    pseudo = None if source == "store" else read_pseudo_masks(targets, store)
    train_all = _part(store, splits, f, "train")
    train_idx, _, _ = _targets(store, train_all, source, pseudo)
    if len(train_idx) == 0:
        where = store.path if source == "store" else targets
        raise InputError(f"{where}: no target masks for the {len(train_all)} slices of "
                         f"{f.name} train")  # fmt: skip
    val_source: str | None = {"same": source, "store": "store", "none": None}[cfg.val_targets]
    if val_source == "store" and store.masks is None:
        raise InputError(f"{store.path}: store has no masks for val_targets 'store'")
    val_idx = np.zeros(0, np.int64)
    if val_source is not None:
        val_idx, _, _ = _targets(store, _part(store, splits, f, "val"), val_source, pseudo)
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
        "model": MODEL_NAME,
        "model_args": args,
        "channels": store.channels,
        "size": list(store.size),
        "store": str(Path(store_path).resolve()),
        "splits": str(splits.resolve()),
        "fold": f.name,
        "targets": "store" if source == "store" else str(Path(targets).resolve()),
        "targets_sha256": None if source == "store" else _file_digest(Path(targets)),
        "val_targets": val_source,
        "config": cfg.model_dump(mode="json"),
        "ensemblecam_version": __version__,
    }
    resume_from = None
    last = partial / "last.pt"
    if not force and last.is_file():
        old = models.read_checkpoint(last)["info"]  # a refused file stops here (one line)
        same = all(old.get(k) == info[k] for k in info if k not in ("config",))
        old_cfg = {k: v for k, v in old.get("config", {}).items() if k != "epochs"}
        new_cfg = {k: v for k, v in info["config"].items() if k != "epochs"}
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
    cfg: UNetConfig,
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

    ``targets``: "store" (ground truth) or a masks.npz of pseudo-labels. A finished run in
    ``out`` is refused unless ``force``; an unfinished one with the same settings resumes.
    ``stop_after_epoch`` ends the run after that epoch as if killed (returns None); None is
    also returned in the non-zero ranks of a multi-process run.
    """

    plan = plan_unet(cfg, store_path, splits_path, fold, out, targets, force)
    status = make_fabric(cfg).launch(_run, plan, progress, stop_after_epoch)
    return plan.out if status == "done" else None


def _dataset(
    store: SliceStore, idx: np.ndarray, source: str, pseudo: tuple[np.ndarray, np.ndarray] | None
) -> MaskDataset:
    kept, src, rows = _targets(store, idx, source, pseudo)
    assert len(kept) == len(idx)
    return MaskDataset(store, kept, src, rows)


def _make_loss(cfg: UNetConfig) -> nn.Module:
    from monai.losses import DiceCELoss

    two = cfg.out_channels == 2
    return DiceCELoss(
        to_onehot_y=two, softmax=two, sigmoid=not two, batch=True,
        lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce,
    )  # fmt: skip


def _loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.unsqueeze(1).to(logits.dtype if logits.shape[1] == 1 else torch.long)
    return criterion(logits, target)


def _validate(
    fabric: Any, model: nn.Module, loader: DataLoader, criterion: nn.Module,
    n_total: int, case_ids: np.ndarray,
) -> dict[str, float]:  # fmt: skip
    """Val loss (slice-weighted mean of batch losses) and segmentation metrics of the part."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    loss_sum = torch.zeros((), device=fabric.device)
    n_seen = torch.zeros((), device=fabric.device)
    with torch.no_grad():
        for batch in loader:
            x, y = fabric.to_device(batch)
            logits = model(x).float()
            loss_sum += _loss(criterion, logits, y) * len(y)
            n_seen += len(y)
            counts = slice_counts(logits_to_mask(logits).cpu().numpy(), y.cpu().numpy() > 0)
            for p, c in zip(parts, counts, strict=True):
                p.append(torch.from_numpy(c).to(fabric.device))
    cat = [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64, device=fabric.device)
           for p in parts]  # fmt: skip
    tp, fp, fn, tn = (_gather(fabric, c, n_total) for c in cat)
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    n_seen = fabric.all_reduce(n_seen, reduce_op="sum")
    res = score(tp, fp, fn, tn, case_ids)
    res["val_loss"] = float(loss_sum / n_seen)
    return res


def _run(fabric: Any, plan: UNetPlan, progress: bool | None, stop_after_epoch: int | None) -> str:
    """Training loop of one process: "done" (rank 0, run complete), "stopped" or "worker"."""
    cfg, info = plan.cfg, dict(plan.info)
    rank0 = fabric.global_rank == 0
    store = SliceStore.open(plan.store)
    start_run(fabric, cfg.seed, plan.partial, resuming=plan.resume_from is not None,
              stage="unet")

    model = build_unet(**info["model_args"])
    state: dict[str, Any] | None = None
    if plan.resume_from is not None:
        ck = models.read_checkpoint(plan.resume_from)
        model.load_state_dict(ck["state_dict"])
        state = ck["train_state"]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)
    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    best_epoch, start = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        history, best_epoch = state["history"], int(state["best_epoch"])
        best_key = _key(history[best_epoch - 1], plan.val_source is not None)
        start = int(state["epoch"])
        _set_rng_state(state["rng"])
        if rank0:
            fabric.print(f"resuming {plan.out} after epoch {start}")

    uses_npz = "npz" in (plan.source, plan.val_source)
    pseudo = read_pseudo_masks(plan.targets, store) if uses_npz else None
    train_ds = _dataset(store, plan.train_idx, plan.source, pseudo)
    sampler = EpochSampler(len(train_ds), cfg.seed, fabric.global_rank, fabric.world_size)
    gpu = fabric.device.type == "cuda"
    bs = cfg.batch_size
    train_loader = batch_loader(
        train_ds, bs, sampler, drop_last=len(sampler) > bs, num_workers=cfg.workers,
        pin_memory=gpu, worker_init_fn=_worker_init, persistent_workers=cfg.workers > 0,
    )  # fmt: skip
    val_loader = None
    if plan.val_source is not None:
        shard = np.arange(len(plan.val_idx))[fabric.global_rank :: fabric.world_size]
        val_ds = _dataset(store, plan.val_idx[shard], plan.val_source, pseudo)
        val_loader = batch_loader(val_ds, bs, num_workers=cfg.workers, pin_memory=gpu)
    case_ids = store.table["case"][plan.val_idx]
    criterion = _make_loss(cfg)

    for epoch in range(start + 1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, n_seen, train_time = train_one_epoch(
            fabric, model, train_loader, optimizer, lambda z, y: _loss(criterion, z, y), bs,
            f"unet epoch {epoch}/{cfg.epochs}", progress)
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"], "images_per_s": n_seen / train_time,
        }  # fmt: skip
        if val_loader is not None:
            val = _validate(fabric, model, val_loader, criterion, len(plan.val_idx), case_ids)
            row.update({k: val[k] for k in METRIC_COLUMNS if k in val})
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        key = _key(row, val_loader is not None)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch = key, epoch
        if rank0:
            info_e = {**info, "epoch": epoch, "metrics": row}
            if improved:
                models.save_checkpoint(plan.partial / "best.pt", model, info_e)
            train_state = {
                "optimizer": optimizer.state_dict(), "epoch": epoch, "rng": _rng_state(),
                "history": history, "best_epoch": best_epoch,
            }  # fmt: skip
            models.save_checkpoint(plan.partial / "last.pt", model, info_e, train_state)
            write_metrics_csv(plan.partial / "metrics.csv", history, METRIC_COLUMNS)
            val_msg = (
                ""
                if val_loader is None
                else (f" val_loss {row['val_loss']:.4f} lesion_dice {row['lesion_dice']:.4f}")
            )
            fabric.print(f"unet epoch {epoch}/{cfg.epochs}: train_loss {row['train_loss']:.4f}"
                         f"{val_msg}{' *' if improved else ''}")  # fmt: skip
        fabric.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs:
            return "stopped"

    if rank0:
        _finish(plan, history, best_epoch)
    fabric.barrier()
    return "done" if rank0 else "worker"


def _key(row: dict[str, Any], validated: bool) -> tuple[float, float]:
    """Sort key of an epoch (higher is better): val lesion Dice, then lower val loss;
    without validation the epoch number (last epoch wins)."""
    if not validated:
        return (float(row["epoch"]), 0.0)
    dice = float(row["lesion_dice"])
    return (-math.inf if math.isnan(dice) else dice, -float(row["val_loss"]))


def _finish(plan: UNetPlan, history: list[dict[str, Any]], best_epoch: int) -> None:
    best = models.read_checkpoint(plan.partial / "best.pt")["info"]["metrics"]
    write_metrics_csv(plan.partial / "metrics.csv", history, METRIC_COLUMNS)
    plot_learning_curve(plan.partial / "learning_curve.png", history, best_epoch,
                        UNET_SCORES)
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
        "files": ["best.pt", "last.pt", "metrics.csv", "learning_curve.png"],
    }
    fsutil.write_json(plan.partial / RUN_MARKER, summary)
    fsutil.commit_output_dir(plan.partial, plan.out, "unet")


# --------------------------------------------------------------------------- records


# --------------------------------------------------------------------------- prediction


def predict_unet(
    checkpoint: str | Path,
    store: SliceStore,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> np.ndarray:
    """uint8 (n, H, W) lesion masks of the store slices ``indices`` (in that order)."""
    model, info = load_unet(checkpoint)
    if list(info.get("channels", [])) != store.channels:
        raise InputError(
            f"{checkpoint}: U-Net trained on channels {info.get('channels')}, store "
            f"{store.path} has {store.channels}"
        )
    indices = np.asarray(indices, dtype=np.int64)
    ds = StoreDataset(store, indices)
    h, w = store.size
    out = np.zeros((len(indices), h, w), np.uint8)
    model.to(device)
    with torch.inference_mode():
        pos = 0
        for x, _ in tqdm(batch_loader(ds, batch_size), desc="unet predict", unit="batch",
                         disable=None if progress is None else not progress):  # fmt: skip
            mask = logits_to_mask(model(x.to(device)).float())
            out[pos : pos + len(x)] = mask.cpu().numpy()
            pos += len(x)
    return out
