"""Training throughput: memory-mapped store loader vs in-memory tensors (same model, batch).

A slice store (float16, like prepare writes it) is built in a temp folder; one ResNet-18
(MONAI, 2-D, 3 channels) is trained on 128x128 slices with batch 32 from
``training.data.StoreDataset`` + ``EpochSampler`` + ``DataLoader`` (the training stage's loader)
and, alternately, from batches sliced out of a preloaded float32 tensor. Rounds alternate
to spread the noise of a shared machine; the medians are reported. Goal: ratio >= 0.9.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ensemblecam import models
from ensemblecam.io.store import SliceStore
from ensemblecam.training.data import EpochSampler, StoreDataset, batch_loader
from store_factory import build_store


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _time_store(model, opt, loader, sampler, epoch, n_batches):  # type: ignore[no-untyped-def]
    sampler.set_epoch(epoch)
    it = iter(loader)
    n = 0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        x, y = next(it)
        _step(model, opt, x, y)
        n += len(y)
    return n / (time.perf_counter() - t0)


def _time_memory(model, opt, images, labels, batch, n_batches):  # type: ignore[no-untyped-def]
    n = 0
    t0 = time.perf_counter()
    for b in range(n_batches):
        sl = slice(b * batch, (b + 1) * batch)
        _step(model, opt, images[sl], labels[sl])
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (store side)")
    args = ap.parse_args()

    torch.manual_seed(0)
    n_slices = args.batch * args.batches
    with tempfile.TemporaryDirectory() as tmp:
        path = build_store(
            Path(tmp) / "store", n_cases=n_slices // 16, slices_per_case=16,
            size=(args.size, args.size), channels=("flair", "t1ce", "t2"),
        )  # fmt: skip
        store = SliceStore.open(path)  # memory-mapped
        idx = np.arange(store.n_slices)
        ds = StoreDataset(store, idx)
        sampler = EpochSampler(len(ds), seed=0)
        loader = batch_loader(
            ds, args.batch, sampler, num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )  # fmt: skip
        mem_x = torch.randn(n_slices, 3, args.size, args.size)
        mem_y = torch.randint(0, 2, (n_slices,))

        model = models.build_model(args.model, in_channels=3).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        # warm-up both paths (allocator, first-touch of the memory map)
        _time_store(model, opt, loader, sampler, 0, 1)
        _time_memory(model, opt, mem_x, mem_y, args.batch, 1)

        t0 = time.perf_counter()
        n_load = sum(len(y) for _, y in loader)
        loader_only = n_load / (time.perf_counter() - t0)

        store_rates, mem_rates = [], []
        for r in range(args.rounds):
            store_rates.append(_time_store(model, opt, loader, sampler, r + 1, args.batches))
            mem_rates.append(_time_memory(model, opt, mem_x, mem_y, args.batch, args.batches))
            print(f"round {r}: store {store_rates[-1]:.1f} img/s, memory {mem_rates[-1]:.1f} img/s")

    s, m = statistics.median(store_rates), statistics.median(mem_rates)
    print(json.dumps({
        "bench": "train", "model": args.model, "channels": 3, "size": args.size,
        "batch": args.batch, "workers": args.workers, "threads": torch.get_num_threads(),
        "store_images_per_s": round(s, 2), "memory_images_per_s": round(m, 2),
        "ratio": round(s / m, 3), "loader_only_images_per_s": round(loader_only, 1),
        "rounds": args.rounds,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
