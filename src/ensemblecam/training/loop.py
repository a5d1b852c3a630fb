"""ONE Fabric training loop for every trained model (classifier, U-Net), with resume.

A stage describes its run as a :class:`Task` (model, optimizer, data, loss, validation,
monitored score, summary) and calls :func:`fit` in each process. Per epoch ``e``:
``sampler.set_epoch(e)`` (and the augmentation's), one pass over the training batches,
``scheduler.step()``, validation, one row ``{epoch, train_loss, lr (of the epoch),
images_per_s, <validation columns>, time_s}``. Rank 0 then writes, in the run's
``.partial`` folder:

    best.pt       when the epoch's key (:func:`epoch_key`) beats the best so far (ties keep
                  the earlier epoch); info["metrics"] = the row (+ ``Task.extras``)
    last.pt       every epoch, with ``train_state`` = {optimizer, scheduler (if any),
                  epoch, rng, history, best_value, best_epoch} for resuming; deleted when
                  the last epoch is done (resume state is needed only while training runs)
    metrics.csv   the history (``Task.columns``)

``last.pt`` holds tensors and plain data only (``torch.load(weights_only=True)``). A run
resumed from it restores the optimizer, scheduler and RNG states and continues at the next
epoch; data order depends on (seed, epoch) only, so it sees the same batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ensemblecam import progress as progress_out
from ensemblecam.models.checkpoints import read_checkpoint, save_checkpoint
from ensemblecam.training.data import EpochSampler
from ensemblecam.training.fabric import rng_state, set_rng_state, start_run
from ensemblecam.training.records import write_metrics_csv

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochData:
    """The data side of a run, built in each process after the RNG state is restored."""

    sampler: EpochSampler
    loader: DataLoader
    loss: LossFn  #: loss(float32 logits, targets) of a training batch
    #: validation metrics of the model (all ranks), or None: no validation
    validate: Callable[[nn.Module], dict[str, Any]] | None


@dataclass
class Task:
    """What a training stage supplies to :func:`fit`; everything else is shared."""

    stage: str  #: owner marker of the partial folder ("train", "unet")
    out: Path
    partial: Path
    resume_from: Path | None
    seed: int
    epochs: int
    batch_size: int
    info: dict[str, Any]  #: stored in every checkpoint, with "epoch" and "metrics"
    columns: Sequence[str]  #: metrics.csv columns; the row takes validation keys among them
    monitor: str | None  #: row key selecting best.pt (None: the last epoch)
    build_model: Callable[[], nn.Module]  #: fresh model (weights loaded), after seeding
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_data: Callable[[Any], EpochData]  #: fabric -> data of this process
    finish: Callable[[list[dict[str, Any]], int], None]  #: rank 0: (history, best epoch)
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    log_keys: Sequence[str] = ()  #: row values printed after train_loss when present
    prefix: str = ""  #: progress/log prefix ("unet ")
    extras: Sequence[str] = ()  #: validation keys kept in checkpoints besides the row


def epoch_key(row: dict[str, Any], monitor: str | None) -> tuple[float, float]:
    """Sort key of an epoch (higher is better): the monitored value (NaN lowest), then lower
    val loss; ``val_loss`` itself: lower is better; ``monitor=None``: the epoch number."""
    if monitor is None:
        return (float(row["epoch"]), 0.0)
    value = float(row[monitor])
    if math.isnan(value):
        value = -math.inf
    return (-value, -value) if monitor == "val_loss" else (value, -float(row["val_loss"]))


def train_one_epoch(
    fabric: Any,
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch_size: int,
    desc: str,
    progress: bool | None,
    label: str = "",
) -> tuple[float, float, float]:
    """One pass over ``loader``: (mean loss over all ranks, images seen by all ranks, seconds).

    A bar (rank 0) counts the batches, with the last batch's loss.
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=fabric.device)
    n_seen = torch.zeros((), device=fabric.device)
    bar = progress_out.bar(
        total=len(loader), desc=desc, unit="batches", label=label,
        enabled=fabric.global_rank == 0 and progress is not False,
    )  # fmt: skip
    for batch in loader:
        x, y = fabric.to_device(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        n_seen += len(y)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    n_seen = fabric.all_reduce(n_seen, reduce_op="sum")
    return float(loss_sum / n_seen), float(n_seen), seconds


@torch.no_grad()
def eval_batches(
    fabric: Any, model: nn.Module, loader: DataLoader
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, targets) of every batch of ``loader``; model in eval mode, no grad."""
    model.eval()
    for batch in loader:
        x, y = fabric.to_device(batch)
        yield model(x).float(), y


@dataclass
class _LoopState:
    """The loop's state: what ``last.pt`` stores besides optimizer, scheduler and RNG."""

    history: list[dict[str, Any]]
    best_epoch: int = 0
    best_key: tuple[float, float] | None = None
    start: int = 0


def fit(fabric: Any, task: Task, progress: bool | None, stop_after_epoch: int | None) -> str:
    """Train ``task`` in this process: "done" (rank 0, run complete), "stopped" (after
    ``stop_after_epoch``, as if killed) or "worker" (other ranks)."""
    rank0 = fabric.global_rank == 0
    start_run(fabric, task.seed, task.partial, task.resume_from is not None, task.stage)
    model = task.build_model()
    state: dict[str, Any] | None = None
    if task.resume_from is not None:
        ck = read_checkpoint(task.resume_from)
        model.load_state_dict(ck["state_dict"])
        state = ck["train_state"]
    optimizer = task.make_optimizer(model)
    scheduler = task.make_scheduler(optimizer) if task.make_scheduler is not None else None
    model, optimizer = fabric.setup(model, optimizer)
    run = _LoopState([])
    if state is not None:
        run = _restore(state, optimizer, scheduler, task.monitor)
        if rank0:
            fabric.print(f"resuming {task.out} after epoch {run.start}")
    data = task.make_data(fabric)

    epochs = progress_out.bar(
        total=task.epochs, desc="epochs", unit="epochs", label=task.prefix.strip(),
        enabled=rank0 and progress is not False, completed=run.start,
    )  # fmt: skip
    with epochs:
        status = _epochs(fabric, task, model, optimizer, scheduler, data, run, progress, epochs,
                         stop_after_epoch)  # fmt: skip
    if status is not None:
        return status
    if rank0:
        # the resume state (optimizer, RNG, last weights) is needed only while training runs
        (task.partial / "last.pt").unlink(missing_ok=True)
        task.finish(run.history, run.best_epoch)
    fabric.barrier()
    return "done" if rank0 else "worker"


def _epochs(
    fabric: Any,
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: EpochData,
    run: _LoopState,
    progress: bool | None,
    bar: progress_out.Bar,
    stop_after_epoch: int | None,
) -> str | None:
    """The epochs still to train: None when all are done, "stopped" after
    ``stop_after_epoch`` (as if killed)."""
    rank0 = fabric.global_rank == 0
    for epoch in range(run.start + 1, task.epochs + 1):
        row, val = _epoch(fabric, task, model, optimizer, scheduler, data, epoch, progress)
        bar.update()
        run.history.append(row)
        key = epoch_key(row, task.monitor)
        improved = run.best_key is None or key > run.best_key
        if improved:
            run.best_key, run.best_epoch = key, epoch
        if rank0:
            _save_epoch(fabric, task, model, optimizer, scheduler, run, val, improved)
        fabric.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < task.epochs:
            return "stopped"
    return None


def _restore(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, monitor: str | None
) -> _LoopState:
    """Load the optimizer, scheduler and RNG states of ``last.pt``; the loop's state."""
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    history, best = state["history"], int(state["best_epoch"])
    set_rng_state(state["rng"])
    return _LoopState(history, best, epoch_key(history[best - 1], monitor), int(state["epoch"]))


def _epoch(
    fabric: Any,
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: EpochData,
    epoch: int,
    progress: bool | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and validate one epoch: (row, all validation values)."""
    data.sampler.set_epoch(epoch)
    augment = getattr(data.loader.dataset, "augment", None)
    if augment is not None:  # its draws, like the order, from (seed, epoch) alone
        augment.set_epoch(epoch)
    t0 = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    train_loss, n_seen, seconds = train_one_epoch(
        fabric, model, data.loader, optimizer, data.loss, task.batch_size,
        f"epoch {epoch}/{task.epochs}", progress, task.prefix.strip(),
    )  # fmt: skip
    if scheduler is not None:
        scheduler.step()
    row: dict[str, Any] = {
        "epoch": epoch, "train_loss": train_loss, "lr": lr, "images_per_s": n_seen / seconds,
    }  # fmt: skip
    val = {} if data.validate is None else data.validate(model)
    row.update({k: val[k] for k in task.columns if k in val})
    row["time_s"] = time.perf_counter() - t0
    return row, val


def _save_epoch(
    fabric: Any,
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: _LoopState,
    val: dict[str, Any],
    improved: bool,
) -> None:
    """Rank 0: best.pt (if ``improved``), last.pt with the resume state, metrics.csv, a log line."""
    row = run.history[-1]
    metrics = {**row, **{k: val[k] for k in task.extras}}
    info = {**task.info, "epoch": row["epoch"], "metrics": metrics}
    if improved:
        save_checkpoint(task.partial / "best.pt", model, info)
    state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    best = run.history[run.best_epoch - 1]
    state.update(
        epoch=row["epoch"], rng=rng_state(), history=run.history,
        best_value=None if task.monitor is None else float(best[task.monitor]),
        best_epoch=run.best_epoch,
    )  # fmt: skip
    save_checkpoint(task.partial / "last.pt", model, info, state)
    write_metrics_csv(task.partial / "metrics.csv", run.history, task.columns)
    logged = "".join(f" {k} {row[k]:.4f}" for k in task.log_keys if k in row)
    progress_out.info(f"{task.prefix}epoch {row['epoch']}/{task.epochs}: train_loss "
                      f"{row['train_loss']:.4f}{logged}{' *' if improved else ''}")  # fmt: skip
