"""The denoising-autoencoder localiser (``mil.objective: denoise``): its input noise, its
training on lesion-free slices only, and its residual maps, hand-computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from ensemblecam.config import Config, MilConfig
from ensemblecam.errors import InputError
from ensemblecam.io import mapstore
from ensemblecam.io.split import get_fold
from ensemblecam.io.store import SliceStore
from ensemblecam.models import save_checkpoint
from ensemblecam.models.segmenters import UNET, build_unet, model_args
from ensemblecam.stages import unet
from ensemblecam.stages.mil import write_mil_maps
from ensemblecam.training.data import DenoiseDataset, EpochNoise, EpochSpatial, part_indices
from store_factory import build_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw: object) -> MilConfig:
    base = dict(objective="denoise", channels=[4, 8], strides=[2], num_res_units=0,
                scale_quantile=0.99, smooth_sigma=0.0, epochs=2, batch_size=8,
                augment_prob=0.0, accelerator="cpu")  # fmt: skip
    return MilConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dae")
    return build_store(root / "store", n_cases=6, slices_per_case=4, size=(24, 24),
                       channels=("flair", "t2"), seed=5)  # fmt: skip


def test_noise_is_coarse_scaled_and_keyed() -> None:
    x = torch.rand(3, 2, 16, 16)
    # one grid cell per slice (grid >= H, W): the upsampled noise is one constant per
    # sample and channel, so x + n - x is flat
    noisy, clean = EpochNoise(0.5, 16, seed=1, spatial=None)(x, key=7)
    assert torch.equal(clean, x)
    n = noisy - x
    assert torch.allclose(n, n[..., :1, :1].expand_as(n), atol=1e-6)
    assert n[..., 0, 0].abs().max() > 0
    # grid 1: one draw per pixel, N(0, std^2) (bilinear resize to the same size is exact)
    big = torch.zeros(64, 1, 32, 32)
    n1 = EpochNoise(0.2, 1, seed=0, spatial=None)(big, key=0)[0]
    assert float(n1.std()) == pytest.approx(0.2, rel=0.02)
    # same (seed, epoch, key): the same noise; another epoch or batch: other noise
    a = EpochNoise(0.2, 4, seed=0, spatial=None)
    first = a(x, 3)[0]
    assert torch.equal(first, a(x, 3)[0])
    assert not torch.equal(first, a(x, 4)[0])
    a.set_epoch(2)
    assert not torch.equal(first, a(x, 3)[0])


def test_noise_follows_the_mirroring() -> None:
    # rotation off, mirroring on: the clean target is the mirrored slice, the input that
    # slice plus noise
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(8, 1, 1, 1)
    noise = EpochNoise(0.1, 2, seed=0, spatial=EpochSpatial(0.0, 0.0, 0.0, True, seed=0))
    noisy, clean = noise(x, key=0)
    flips = {
        k for k in range(8) for d in ((), (-1,), (-2,), (-2, -1))
        if torch.equal(clean[k], x[k].flip(d) if d else x[k])
    }  # fmt: skip
    assert flips == set(range(8))
    assert not torch.equal(noisy, clean)


def test_denoising_dataset_pairs(store: Path) -> None:
    st = SliceStore.open(store)
    ds = DenoiseDataset(st, np.array([2, 5, 9]), EpochNoise(0.2, 4, 0, None))
    noisy, clean = ds[[1, 2]]
    np.testing.assert_array_equal(clean.numpy(), st.images[[5, 9]].astype(np.float32))
    assert noisy.shape == clean.shape and not torch.equal(noisy, clean)
    _, one_clean = ds[0]
    assert tuple(one_clean.shape) == (2, 24, 24)


def test_autoencoder_trains_on_lesion_free_slices_only(store: Path, tmp_path: Path) -> None:
    st = SliceStore.open(store)
    cfg = _cfg()
    out = unet.train_unet(cfg, store, None, 0, tmp_path / "dae", "labels", progress=False)
    assert out is not None
    summary = json.loads((out / "unet.json").read_text())
    splits = store / "splits.json"
    fold = get_fold(splits, 0)
    train = part_indices(st, splits, fold, "train")
    val = part_indices(st, splits, fold, "val")
    assert summary["targets"] == "healthy" and summary["val_targets"] == "healthy"
    assert summary["n_train"] == int((st.labels[train] == 0).sum()) < len(train)
    assert summary["n_val"] == int((st.labels[val] == 0).sum())
    assert summary["model_args"]["num_classes"] == 2  # one output per input channel
    assert "val_loss" in summary["best"] and "lesion_dice" not in summary["best"]
    # the plan's slices: exactly the lesion-free ones
    plan = unet.plan_unet(cfg, store, None, 0, tmp_path / "other", "labels")
    np.testing.assert_array_equal(plan.train_idx, train[st.labels[train] == 0])


def test_killed_autoencoder_resumes_identically(store: Path, tmp_path: Path) -> None:
    cfg = _cfg(augment_prob=0.5, rotate_deg=10.0)
    whole = unet.train_unet(cfg, store, None, 0, tmp_path / "a", "labels", progress=False)
    assert whole is not None
    out = tmp_path / "b"
    assert unet.train_unet(cfg, store, None, 0, out, "labels", progress=False,
                           stop_after_epoch=1) is None  # fmt: skip
    assert unet.train_unet(cfg, store, None, 0, out, "labels", progress=False) == out
    assert json.loads((out / "unet.json").read_text())["resumed"] is True
    a = (whole / "metrics.csv").read_text().splitlines()
    b = (out / "metrics.csv").read_text().splitlines()
    cut = [",".join(r.split(",")[:3]) for r in a], [",".join(r.split(",")[:3]) for r in b]
    assert cut[0] == cut[1]  # epoch, train loss, val loss (times differ)


def test_residual_maps_hand_computed(store: Path, tmp_path: Path) -> None:
    """With every weight zero the network outputs 0, so r = sum_c |x_c| and the member's
    map is min(G_sigma * r / s, 1), s the 0.99-quantile over the training part."""
    st = SliceStore.open(store)
    cfg = _cfg(smooth_sigma=1.0)
    args = model_args(cfg, 2)
    model = build_unet(**args)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    ckpt = tmp_path / "zero.pt"
    save_checkpoint(ckpt, model, {"model": UNET, "model_args": args, "channels": st.channels})
    idx = np.arange(st.n_slices)
    splits = store / "splits.json"
    train = part_indices(st, splits, get_fold(splits, 0), "train")
    member = mapstore.MapSet.open(
        write_mil_maps(cfg, ckpt, store, idx, tmp_path / "localiser__mil_dae", scale_from=train)
    )
    r = np.abs(np.asarray(st.images, np.float64)).sum(axis=1)
    smooth = np.stack([ndimage.gaussian_filter(s, 1.0, mode="nearest") for s in r])
    s = np.quantile(smooth[train], 0.99)
    expected = np.minimum(smooth / s, 1.0)
    assert member.meta["scale"] == pytest.approx(s, rel=1e-5)
    assert member.meta["method"] == "denoise"
    np.testing.assert_allclose(np.asarray(member.maps, np.float32), expected, atol=1e-3)
    k = int(np.ceil(cfg.top_fraction * 24 * 24))  # slice score: mean of the k largest
    top = -np.sort(-expected.reshape(len(idx), -1), axis=1)[:, :k].mean(axis=1)
    np.testing.assert_allclose(member.probs, top, atol=1e-5)
    # a MIL localiser's checkpoint (2 outputs on 1 input channel) is refused in one line
    st1 = build_store(tmp_path / "one", n_cases=3, slices_per_case=2, size=(24, 24), folds=3)
    margs = model_args(MilConfig(channels=[4, 8], strides=[2]), 1)
    assert margs["num_classes"] == 2
    save_checkpoint(tmp_path / "mil.pt", build_unet(**margs),
                    {"model": UNET, "model_args": margs, "channels": ["flair"]})  # fmt: skip
    with pytest.raises(InputError, match="not a denoising autoencoder"):
        write_mil_maps(cfg, tmp_path / "mil.pt", st1, np.arange(2), tmp_path / "bad", scale=1.0)
    assert not (tmp_path / "bad").exists()


def test_denoise_needs_a_scale_and_lesion_free_slices(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs scale_quantile"):
        MilConfig(objective="denoise")
    with pytest.raises(ValidationError, match="needs scale_quantile"):
        Config.model_validate({"run": {"mil_variants": {"mil_dae": {"objective": "denoise"}}}})
    # a training part of lesion slices only: one error line naming the store
    sick = build_store(tmp_path / "sick", n_cases=6, slices_per_case=2, size=(24, 24),
                       positive_fraction=1.0, folds=3)  # fmt: skip
    with pytest.raises(InputError, match="no slices labelled lesion-free") as err:
        unet.train_unet(_cfg(), sick, None, 0, tmp_path / "out", "labels", progress=False)
    assert "\n" not in str(err.value) and str(sick) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_run_trains_the_autoencoder_member_by_default() -> None:
    variants = Config().localisers()
    dae = variants["mil_dae"]
    assert dae.objective == "denoise" and dae.scale_quantile is not None
    assert model_args(dae, 3)["num_classes"] == 3
    assert {m.objective for n, m in variants.items() if n != "mil_dae"} == {"mil"}
