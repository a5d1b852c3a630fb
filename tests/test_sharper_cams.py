"""Sharper CAMs: ResNet output stride by dilation, flip test-time augmentation, fusion of
several target layers (engine, stage, training checkpoint, pipeline keys)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ensemblecam import models
from ensemblecam.cam import CamEngine
from ensemblecam.cam.methods import fuse, minmax, postprocess
from ensemblecam.config import CamConfig, TrainConfig
from ensemblecam.errors import InputError
from ensemblecam.io.mapstore import MapSet
from ensemblecam.io.store import SliceStore
from ensemblecam.pipeline.run import _options, stable_hash
from ensemblecam.stages import train
from ensemblecam.stages.cam import run_cam, target_layers

# x_ij = 0..15 row-major on a 4x4 image
X = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
XN = np.arange(16, dtype=np.float64).reshape(4, 4)


def _layer_out(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: got.append(o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return got[0]


def _resnet(name: str, output_stride: int | None) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model(name, 1, 2, output_stride=output_stride, widen_factor=0.25)


def _dilated(model: nn.Module) -> list[tuple[str, int]]:
    """(name, dilation) of every conv with dilation > 1 (all of them must have stride 1)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.dilation[0] > 1:
            assert m.stride == (1, 1) and m.padding == m.dilation
            out.append((name, m.dilation[0]))
    return out


# --------------------------------------------------------------------------- output stride


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_output_stride_sizes_weights_and_dense_equivalence(name: str) -> None:
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    base = _resnet(name, None)
    ref = _layer_out(base, "layer4", x)
    assert ref.shape[2:] == (2, 2)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    for os_, size in ((32, 2), (16, 4), (8, 8)):
        net = _resnet(name, os_)
        assert {k: v.shape for k, v in net.state_dict().items()} == shapes
        net.load_state_dict(base.state_dict())  # same weights: only the forward differs
        out = _layer_out(net, "layer4", x)
        assert out.shape[2:] == (size, size)
        # dilation instead of stride computes the same function densely: sub-sampling
        # the dense output by the removed stride gives the original output
        step = 32 // os_
        tol = 1e-4 * float(ref.abs().max())  # float rounding of a deep net
        torch.testing.assert_close(out[..., ::step, ::step], ref, rtol=0, atol=tol)


def test_output_stride_dilations_by_hand() -> None:
    # resnet18: two basic blocks of two 3x3 convs per stage; the strided conv (block 0,
    # conv1) keeps the incoming dilation, every later 3x3 conv of the stage gets it x 2
    assert _dilated(_resnet("resnet18", 32)) == []
    assert _dilated(_resnet("resnet18", 16)) == [
        ("layer4.0.conv2", 2), ("layer4.1.conv1", 2), ("layer4.1.conv2", 2),
    ]  # fmt: skip
    os8 = dict(_dilated(_resnet("resnet18", 8)))
    assert os8 == {
        "layer3.0.conv2": 2, "layer3.1.conv1": 2, "layer3.1.conv2": 2,
        "layer4.0.conv1": 2, "layer4.0.conv2": 4, "layer4.1.conv1": 4, "layer4.1.conv2": 4,
    }  # fmt: skip
    net = _resnet("resnet50", 8)  # bottleneck: one 3x3 per block, as torchvision's
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer3[0].conv2.stride == (1, 1)
    assert net.layer3[0].downsample[0].stride == (1, 1)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[2].conv2.dilation == (4, 4)
    assert net.layer4[0].conv1.dilation == (1, 1)  # 1x1 convs untouched


def test_output_stride_refused() -> None:
    with pytest.raises(InputError, match="built-in ResNets only"):
        models.build_model("simplecnn", 1, 2, output_stride=16)
    with pytest.raises(InputError, match="output_stride 4: expected 8, 16 or 32"):
        models.build_model("resnet18", 1, 2, output_stride=4)
    with pytest.raises(InputError, match="shortcut_type 'A'"):
        models.build_model("resnet18", 1, 2, output_stride=16, shortcut_type="A")
    with pytest.raises(InputError, match="already dilated"):
        models.set_output_stride(_resnet("resnet18", 16), 8)
    with pytest.raises(InputError, match="no ResNet stages"):
        models.set_output_stride(models.build_model("simplecnn", 1), 16)
    assert isinstance(models.build_model("simplecnn", 1, output_stride=None), nn.Module)


def test_output_stride_in_checkpoint_and_train_args(tmp_path: Path, tiny_store: Path) -> None:
    cfg = TrainConfig(store=tiny_store, out=tmp_path / "r", model="resnet10",
                      model_args={"widen_factor": 0.25}, output_stride=16)  # fmt: skip
    plan = train.plan_run(cfg)
    args = plan.info["model_args"]
    assert args == {"widen_factor": 0.25, "in_channels": 1, "num_classes": 2, "output_stride": 16}
    model = models.build_model("resnet10", **args)
    models.save_checkpoint(tmp_path / "m.pt", model, {"model": "resnet10", "model_args": args})
    loaded, _ = models.load_checkpoint(tmp_path / "m.pt")
    assert _layer_out(loaded, "layer4", torch.zeros(1, 1, 32, 32)).shape[2:] == (2, 2)
    assert (
        "output_stride"
        not in train.plan_run(cfg.model_copy(update={"output_stride": None})).info["model_args"]
    )
    bad = cfg.model_copy(update={"model_args": {"output_stride": 8}})
    with pytest.raises(InputError, match="contradicts"):
        train.plan_run(bad)
    with pytest.raises(InputError, match="built-in ResNets only"):
        train.plan_run(cfg.model_copy(update={"model": "simplecnn", "model_args": {}}))


# --------------------------------------------------------------------------- tiny nets


class ShiftGap(nn.Module):
    """One channel: ``conv`` = shift left (A_ij = x_i,j+1, 0 in the last column) -> GAP ->
    linear with logits (0, mean A)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
            self.fc.weight[:] = torch.tensor([[0.0], [1.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


class TwoLayers(nn.Module):
    """``a`` = x (identity 1x1 conv) -> ``b`` = shift left of a -> GAP -> logits (0, mean b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, 1, bias=False)
        self.b = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.b.weight[:] = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
            self.fc.weight[:] = torch.tensor([[0.0], [1.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.b(self.a(x))).flatten(1))


def _shift_left(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    out[:, :-1] = m[:, 1:]
    return out


def _shift_right(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    out[:, 1:] = m[:, :-1]
    return out


def _mm(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / (m.max() - m.min())


# --------------------------------------------------------------------------- flip TTA


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_flip_tta_hand_computed(method: str) -> None:
    net = ShiftGap()
    res = CamEngine(net, [method], "conv", flip_tta=True)(X)
    # image: A = shift_left(x); mirror image, flipped back: shift_right(x); both weighted
    # by the same positive factor (fc weight 1, or Grad-CAM's mean gradient 1/16)
    want = _mm((_shift_left(XN) + _shift_right(XN)) / 2)
    np.testing.assert_allclose(res.maps[method][0].numpy(), want, atol=1e-6)
    # logit_1 = mean A: (120 - 24) / 16 = 6 for the image, (120 - 36) / 16 = 5.25 mirrored
    prob = (torch.sigmoid(torch.tensor(6.0)) + torch.sigmoid(torch.tensor(5.25))) / 2
    assert res.probs[0].item() == pytest.approx(prob.item(), abs=1e-6)
    assert res.logits[0, 1].item() == pytest.approx(6.0)  # the un-flipped image's logits
    plain = CamEngine(net, [method], "conv")(X)
    np.testing.assert_allclose(plain.maps[method][0].numpy(), _mm(_shift_left(XN)), atol=1e-6)


def test_flip_tta_equals_two_explicit_calls() -> None:
    from nets import small_resnet

    model = small_resnet()
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    methods = ["gradcam", "layercam", "smoothgradcampp"]
    tta = CamEngine(model, methods, "layer3", flip_tta=True, smooth_n=2)(x, keys=[5, 6, 7])
    eng = CamEngine(model, methods, "layer3", smooth_n=2)
    a = eng(x, keys=[5, 6, 7], raw=True)
    b = eng(x.flip(-1), keys=[5, 6, 7], raw=True)
    for m in methods:
        want = minmax((a.maps[m] + b.maps[m].flip(-1)) / 2)
        torch.testing.assert_close(tta.maps[m], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tta.probs, (a.probs + b.probs) / 2)
    torch.testing.assert_close(tta.logits, a.logits)
    # raw maps: the mean of both views without min-max
    raw = CamEngine(model, ["gradcam"], "layer3", flip_tta=True)(x, raw=True)
    torch.testing.assert_close(
        raw.maps["gradcam"], (a.maps["gradcam"] + b.maps["gradcam"].flip(-1)) / 2
    )


# --------------------------------------------------------------------------- layer fusion


def test_layer_fusion_hand_computed() -> None:
    net = TwoLayers()
    res = CamEngine(net, ["gradcam", "layercam"], ["a", "b"])(X)
    # d logit_1 / d b_ij = 1/16 everywhere; d logit_1 / d a_ij = 1/16 for j >= 1 (a's
    # first column is shifted out), 0 in column 0: Grad-CAM weight 12/256 at a
    map_a = _mm(12 / 256 * XN)  # = x / 15
    map_b = _mm(_shift_left(XN) / 16)
    want = _mm((map_a + map_b) / 2)
    np.testing.assert_allclose(res.maps["gradcam"][0].numpy(), want, atol=1e-6)
    # LayerCAM: relu(g) * A element-wise, g_a = 0 in column 0
    g_a = np.full((4, 4), 1 / 16)
    g_a[:, 0] = 0
    want_l = _mm((_mm(g_a * XN) + _mm(_shift_left(XN) / 16)) / 2)
    np.testing.assert_allclose(res.maps["layercam"][0].numpy(), want_l, atol=1e-6)
    # one layer alone is the plain map; layer order does not matter
    only_a = CamEngine(net, ["gradcam"], "a")(X).maps["gradcam"][0].numpy()
    np.testing.assert_allclose(only_a, map_a, atol=1e-6)
    rev = CamEngine(net, ["gradcam"], ["b", "a"])(X).maps["gradcam"]
    torch.testing.assert_close(rev, res.maps["gradcam"])
    assert CamEngine(net, ["gradcam"], ["a", "b"]).resolve_layer((1, 4, 4)) == "a+b"


def test_fusion_with_flip_and_resnet_layers() -> None:
    from nets import small_resnet

    model = small_resnet()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    both = CamEngine(model, ["gradcam"], ["layer2", "layer3"], flip_tta=True)(x).maps["gradcam"]
    singles = [
        CamEngine(model, ["gradcam"], name, flip_tta=True)(x).maps["gradcam"]
        for name in ("layer2", "layer3")
    ]
    torch.testing.assert_close(both, minmax((singles[0] + singles[1]) / 2), rtol=1e-4, atol=1e-5)
    assert float(both.amin()) == 0.0 and float(both.amax()) == 1.0
    with pytest.raises(InputError, match="not a module"):
        CamEngine(model, ["gradcam"], ["layer3", "nope"])(x)
    with pytest.raises(InputError, match="expected a module name or a list"):
        CamEngine(model, ["gradcam"], [])


def test_fuse_single_is_postprocess_and_constant_maps() -> None:
    m = torch.rand(3, 4, 4)
    torch.testing.assert_close(fuse([m], (8, 8)), postprocess(m, (8, 8)))
    const = torch.full((2, 4, 4), 0.5)  # both views constant: zeros, never NaN
    assert torch.equal(fuse([const], (8, 8), views=2), torch.zeros(1, 8, 8))
    out = fuse([const[:1], m[:1]], (8, 8))  # a constant layer counts as zeros
    torch.testing.assert_close(out, minmax(postprocess(m[:1], (8, 8))))


# --------------------------------------------------------------------------- stage, keys


def test_target_layers_config() -> None:
    assert target_layers(CamConfig()) is None
    assert target_layers(CamConfig(layer="layer3")) == ["layer3"]
    assert target_layers(CamConfig(layers=["layer2", "layer3"])) == ["layer2", "layer3"]
    assert target_layers(CamConfig(layer="layer3", layers=["layer2", "layer3"])) == [
        "layer2", "layer3"
    ]  # fmt: skip
    with pytest.raises(InputError, match=r"cam\.layer .layer4. is not one of cam\.layers"):
        target_layers(CamConfig(layer="layer4", layers=["layer2", "layer3"]))
    with pytest.raises(InputError, match="at least one layer"):
        target_layers(CamConfig(layers=[]))
    # the pipeline's cam key changes with each option (and not for the defaults)
    base = stable_hash(_options(CamConfig()))
    assert stable_hash(_options(CamConfig(flip_tta=False, layers=None))) == base
    assert stable_hash(_options(CamConfig(flip_tta=True))) != base
    assert stable_hash(_options(CamConfig(layers=["a", "b"]))) != base
    assert stable_hash(_options(TrainConfig(output_stride=16))) != stable_hash(
        _options(TrainConfig())
    )


def test_stage_flip_and_layers(tiny_store: Path, tmp_path: Path) -> None:
    from nets import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "runs" / "s4" / "best.pt", ["flair"], [32, 32])
    cfg = CamConfig(store=tiny_store, checkpoints=[ck], out=tmp_path / "maps",
                    methods=["gradcam"], parts=["test"], batch_size=8, accelerator="cpu",
                    layers=["features.2", "features"], flip_tta=True)  # fmt: skip
    run_cam(cfg)
    ms = MapSet.open(tmp_path / "maps" / "s4__gradcam")
    assert ms.meta["layer"] == "features.2+features"
    assert ms.meta["layers"] == ["features.2", "features"] and ms.meta["flip_tta"] is True
    model, _ = models.load_checkpoint(ck)
    store = SliceStore.open(tiny_store)
    x = torch.from_numpy(np.asarray(store.images[ms.index[:6]], dtype=np.float32))
    ref = CamEngine(model, ["gradcam"], ["features.2", "features"], flip_tta=True)(x)
    np.testing.assert_allclose(
        ms.maps[:6].astype(np.float32), ref.maps["gradcam"].numpy(), atol=1e-3
    )
    np.testing.assert_allclose(ms.probs[:6], ref.probs.numpy(), atol=1e-5)
    plain = CamEngine(model, ["gradcam"])(x).maps["gradcam"].numpy()
    assert np.abs(ms.maps[:6].astype(np.float32) - plain).max() > 0.05  # the options act
    with pytest.raises(InputError, match=r"is not one of cam\.layers"):
        run_cam(cfg.model_copy(update={"layer": "features.0", "force": True}))


def test_run_config_refuses_up_front(tmp_path: Path) -> None:
    from ensemblecam.config import Config
    from ensemblecam.pipeline.run import check_run_config
    from tiny_run import tiny_sections

    def cfg(**sections: dict) -> Config:
        data = tiny_sections(**sections)
        data["prepare"]["data"] = str(tmp_path)
        return Config(**data)

    check_run_config(cfg())
    check_run_config(
        cfg(train={"output_stride": 8, "model_args": {}}, run={"models": ["resnet10"]})
    )
    with pytest.raises(InputError, match=r"run\.models: model 'simplecnn': output_stride"):
        check_run_config(cfg(train={"output_stride": 16}))
    with pytest.raises(InputError, match="output_stride 12: expected 8, 16 or 32"):
        check_run_config(
            cfg(train={"output_stride": 12, "model_args": {}}, run={"models": ["resnet18"]})
        )
    with pytest.raises(InputError, match=r"is not one of cam\.layers"):
        check_run_config(cfg(cam={"layer": "features", "layers": ["features.2"]}))
