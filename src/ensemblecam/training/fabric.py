"""Lightning Fabric helpers shared by the training loop and the CAM stage.

Resume state is tensors and plain data only (:func:`rng_state`), so ``last.pt`` loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemblecam.config import DeviceConfig
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil


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


def start_run(fabric: Any, seed: int, partial: Path, resuming: bool, stage: str = "train") -> None:
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


def gather(fabric: Any, values: torch.Tensor, n_total: int) -> np.ndarray:
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


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain data (``weights_only`` loads
    them): numpy's (name, uint32 keys, pos, has_gauss, gauss) with the keys as an int64
    tensor; Python's (version, ints, gauss) as lists."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(gauss)],
            "python": [int(version), [int(v) for v in internal], py_gauss]}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(
        (
            name,
            np.asarray(keys, dtype=np.int64).astype(np.uint32),
            int(pos),
            int(has_gauss),
            float(gauss),
        )
    )
    version, internal, py_gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), py_gauss))
