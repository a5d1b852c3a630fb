"""Training data: store slices as tensors, a (seed, epoch) sampler, batch loaders.

Data order depends only on (seed, epoch), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ensemblecam.errors import InputError
from ensemblecam.io.split import Fold
from ensemblecam.io.store import SliceStore


def part_indices(store: SliceStore, splits: Path, fold: Fold, part: str) -> np.ndarray:
    """Ascending store indices of the cases of ``fold``'s ``part``; a case the store lacks
    is one InputError naming the split file, fold and part."""
    try:
        return store.indices_for_cases(fold.part(part))
    except InputError as exc:
        raise InputError(f"{splits}: {fold.name} {part}: {exc}") from exc


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
        augment: EpochBlur | EpochSpatial | None = None,
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
        return torch.as_tensor(self.augment(x)).as_subclass(torch.Tensor)  # type: ignore[call-arg,misc]

    def _read(self, pos: np.ndarray) -> torch.Tensor:
        """Images (B, C, H, W) float32 of positions ``pos``, in one sorted read."""
        idx = self.indices[pos]
        order = np.argsort(idx, kind="stable")
        block = np.empty((len(pos), *self.images.shape[1:]), np.float32)
        block[order] = self.images[idx[order]]
        return torch.from_numpy(block)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, Any]:
        if np.ndim(i) == 0:
            x, y = self[[i]]
            return x[0], int(y[0])
        pos = np.asarray(i, dtype=np.int64)
        x = self._read(pos)
        if isinstance(self.augment, EpochSpatial):  # slice labels do not move
            x = self.augment(x, torch.zeros((len(x), *x.shape[-2:]), dtype=torch.long))[0]
        elif self.augment is not None:
            for k in range(len(x)):
                x[k] = self._aug(x[k])
        return x, torch.from_numpy(self.labels[pos])


class MaskDataset(StoreDataset):
    """Store slices with segmentation targets: ``ds[list]`` = (x (B, C, H, W), y (B, H, W) long).

    ``mask_source`` is the store's memory-mapped masks.npy or an in-memory (n, H, W) array;
    ``mask_rows[k]`` is the row of ``mask_source`` holding the target of position ``k``.
    ``augment`` transforms each batch's images and targets together.
    """

    def __init__(
        self,
        store: SliceStore,
        indices: np.ndarray,
        mask_source: np.ndarray,
        mask_rows: np.ndarray,
        augment: EpochSpatial | None = None,
    ) -> None:
        super().__init__(store, indices)
        self.mask_source = mask_source
        self.mask_rows = np.asarray(mask_rows, dtype=np.int64)
        self.labels = np.zeros(len(self.indices), np.int64)  # unused by segmentation
        self.augment = augment

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, Any]:
        pos = np.atleast_1d(np.asarray(i, dtype=np.int64))
        x = self._read(pos)
        rows = self.mask_rows[pos]
        order = np.argsort(rows, kind="stable")
        y = np.empty((len(pos), *self.mask_source.shape[1:]), np.int64)
        y[order] = self.mask_source[rows[order]]
        yt = torch.from_numpy(y)
        if isinstance(self.augment, EpochSpatial):
            x, yt = self.augment(x, yt)
        if np.ndim(i) == 0:
            return x[0], yt[0]
        return x, yt


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


def train_loader(
    dataset: StoreDataset, batch_size: int, sampler: EpochSampler, workers: int, gpu: bool
) -> DataLoader:
    """The training loader: ``sampler``'s order, the last short batch dropped when the rank
    has more than one batch, seeded workers kept alive across epochs (started anew each
    epoch with an augmentation: they take its epoch with the dataset)."""
    return batch_loader(
        dataset, batch_size, sampler, drop_last=len(sampler) > batch_size,
        num_workers=workers, pin_memory=gpu, worker_init_fn=worker_init,
        persistent_workers=workers > 0 and dataset.augment is None,
    )  # fmt: skip


def _draw_seed(seed: int, epoch: int, worker: int) -> int:
    """The seed of an augmentation's draws at ``epoch`` in process ``worker`` (0: main)."""
    return ((seed * 1_000_003 + epoch) * 1_009 + worker) % 2**32


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of distributed process ``rank`` (``seed`` on rank 0), so ranks
    draw differently."""
    return seed + 7919 * rank


class EpochBlur:
    """MONAI random Gaussian blur of a (C, H, W) slice, sigma ~ U(sigma) per axis, with
    ``prob``; its draws depend on (seed, epoch, worker) alone (:meth:`set_epoch`), like
    :class:`EpochSampler`'s order, so a resumed run blurs as an uninterrupted one."""

    def __init__(self, sigma: tuple[float, float], prob: float, seed: int) -> None:
        from monai.transforms import RandGaussianSmooth

        self.t = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=prob)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, worker: int = 0) -> None:
        """Restart the draws at epoch ``epoch`` of process ``worker`` (0: the main one)."""
        self.epoch = epoch
        self.t.set_random_state(_draw_seed(self.seed, epoch, worker))

    def __call__(self, x: torch.Tensor) -> Any:
        return self.t(x)


class EpochSpatial:
    """Random in-plane rotation and scaling of a batch of slices and their targets
    together (the segmenters' augmentation, after nnU-Net's): with probability ``prob`` a
    sample is rotated by U(-rotate_deg, rotate_deg) degrees and zoomed by U(1 - zoom,
    1 + zoom); with ``flip`` each in-plane axis is mirrored with probability 1/2. One
    affine map per sample, resampled with torch's ``affine_grid``/``grid_sample``: images
    bilinear, targets nearest (so 0, 1 and the ignore value 255 stay as they are), zeros
    outside the slice. Rotation is in pixel units (no shear on non-square slices). The
    draws depend on (seed, epoch, worker) alone, as :class:`EpochBlur`'s."""

    def __init__(self, rotate_deg: float, zoom: float, prob: float, flip: bool, seed: int) -> None:
        self.rotate = math.radians(rotate_deg)
        self.zoom, self.prob, self.flip, self.seed = zoom, prob, flip, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, worker: int = 0) -> None:
        """Restart the draws at epoch ``epoch`` of process ``worker`` (0: the main one)."""
        self.epoch = epoch
        self.g = torch.Generator().manual_seed(_draw_seed(self.seed, epoch, worker))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, C, H, W) float, y (B, H, W) long) transformed alike: 5 draws per sample
        (rotate-and-zoom or not, angle, zoom, mirror x, mirror y). Mirroring is exact; only
        the rotated samples are resampled, by the map from output to input pixels
        ``A = R(angle) / zoom`` (in pixel units, expressed on the normalised grid)."""
        from torch.nn import functional as F

        u = torch.rand(len(x), 5, generator=self.g, dtype=torch.float64)
        for axis, draw in ((-1, u[:, 3]), (-2, u[:, 4])):
            m = self.flip & (draw < 0.5)
            x = torch.where(m[:, None, None, None], x.flip(axis), x)
            y = torch.where(m[:, None, None], y.flip(axis), y)
        on = u[:, 0] < self.prob
        if not on.any():
            return x, y
        h, w = x.shape[-2:]
        angle = (2 * u[on, 1] - 1) * self.rotate
        zoom = 1 + (2 * u[on, 2] - 1) * self.zoom
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(int(on.sum()), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        xs = x[on]
        grid = F.affine_grid(theta.to(x.dtype), list(xs.shape), align_corners=False)
        x, y = x.clone(), y.clone()
        x[on] = F.grid_sample(xs, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # fmt: skip
        yr = F.grid_sample(y[on][:, None].to(x.dtype), grid, mode="nearest",
                           padding_mode="zeros", align_corners=False)  # fmt: skip
        y[on] = yr[:, 0].round().to(y.dtype)
        return x, y


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


class EpochNoise:
    """Coarse Gaussian noise of a denoising autoencoder's input (Kascenas et al., MIDL
    2022): per sample and channel n ~ N(0, std^2) drawn on a (ceil(H / grid),
    ceil(W / grid)) grid and upsampled bilinearly to (H, W); the slices first go through
    ``spatial`` (its draws as ever). A batch's noise is drawn from (seed, epoch, the
    batch's first store index) alone, so it does not depend on worker or order: a
    resumed run sees the same noise, and a validation part (epoch 0 throughout) the same
    noise at every epoch."""

    def __init__(self, std: float, grid: int, seed: int, spatial: EpochSpatial | None) -> None:
        self.std, self.grid, self.seed, self.spatial = std, grid, seed, spatial
        self.set_epoch(0)

    def set_epoch(self, epoch: int, worker: int = 0) -> None:
        """Set the epoch (and restart ``spatial``'s draws) of process ``worker``."""
        self.epoch = epoch
        if self.spatial is not None:
            self.spatial.set_epoch(epoch, worker)

    def __call__(self, x: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x' + n, x') of slices x (B, C, H, W), x' = ``spatial``(x); ``key``: the
        batch's first store index."""
        from torch.nn import functional as F

        if self.spatial is not None:
            x = self.spatial(x, torch.zeros((len(x), *x.shape[-2:]), dtype=torch.long))[0]
        b, c, h, w = x.shape
        g = torch.Generator().manual_seed(_draw_seed(self.seed, self.epoch, key + 1))
        n = torch.randn((b, c, -(-h // self.grid), -(-w // self.grid)), generator=g)
        n = F.interpolate(n * self.std, size=(h, w), mode="bilinear", align_corners=False)
        return x + n, x


class DenoiseDataset(StoreDataset):
    """Store slices as denoising pairs: ``ds[list]`` = (noisy x (B, C, H, W), clean x),
    the noise (and augmentation) of ``augment`` (:class:`EpochNoise`)."""

    def __init__(self, store: SliceStore, indices: np.ndarray, augment: EpochNoise) -> None:
        super().__init__(store, indices)
        self.augment = augment  # type: ignore[assignment]

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, Any]:
        pos = np.atleast_1d(np.asarray(i, dtype=np.int64))
        noisy, clean = self.augment(self._read(pos), int(self.indices[pos[0]]))
        return (noisy[0], clean[0]) if np.ndim(i) == 0 else (noisy, clean)


def worker_init(worker_id: int) -> None:
    """Seed numpy/random in a DataLoader worker from torch's seed, and its copy of an
    augmentation (:class:`EpochBlur`, :class:`EpochSpatial`, :class:`EpochNoise`) from
    (seed, epoch, worker)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    aug = getattr(info.dataset, "augment", None) if info is not None else None
    if aug is not None:
        aug.set_epoch(aug.epoch, worker_id + 1)
