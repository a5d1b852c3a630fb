"""Model registry, pretrained-weight loading and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ensemblecam import models
from ensemblecam.errors import InputError


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet10", 3), ("resnet18", 1), ("resnet34", 4), ("resnet50", 1), ("resnet101", 2),
     ("vgg19", 1), ("simplecnn", 3)],
)  # fmt: skip
def test_build_model_shapes(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = models.build_model(name, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 32, 32))
    assert out.shape == (2, 2)
    assert models.first_conv(model)[1].in_channels == channels
    # the advertised CAM layer exists
    model.get_submodule(models.cam_layer(model))


def test_vgg19_layout_and_heads() -> None:
    vgg = models.build_model("vgg19", 3)
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16  # 16 conv + 3 fc layers = VGG-19 (torchvision head)
    assert vgg.cam_layer == "features.35"  # last ReLU, torchvision's index
    tv = models.build_model("vgg19", 3, head="torchvision", batch_norm=True)
    assert sum(isinstance(m, nn.Linear) for m in tv.classifier) == 3
    with pytest.raises(InputError, match="head"):
        models.build_model("vgg19", 3, head="nope")


def test_unknown_and_optional_models() -> None:
    with pytest.raises(InputError, match=r"unknown model 'resnet7'.*resnet34.*vgg19"):
        models.build_model("resnet7", 1)
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "vgg19"} <= set(
        models.available_models()
    )
    for pkg in ("torchvision", "timm"):
        if not models.classifiers._has_package(pkg):
            with pytest.raises(InputError, match=f"optional package '{pkg}'"):
                models.build_model(f"{pkg}:resnet50", 1)
    with pytest.raises(InputError, match="bad model arguments"):
        models.build_model("simplecnn", 1, depth=3)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = models.build_model("resnet10", 2, widen_factor=0.25)
    # one training step so BN running stats differ from their initial values
    model.train()(torch.rand(4, 2, 32, 32)).sum().backward()
    args = {"in_channels": 2, "num_classes": 2, "widen_factor": 0.25}
    info = {"model": "resnet10", "model_args": args, "channels": ["a", "b"], "size": [32, 32]}
    models.save_checkpoint(tmp_path / "m.pt", model, info)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded, got = models.load_checkpoint(tmp_path / "m.pt")
    assert got == info
    assert not loaded.training
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    model = models.build_model("simplecnn", 1)
    info = {"model": "simplecnn", "model_args": {"in_channels": 1, "num_classes": 2, "width": 8}}
    models.save_checkpoint(tmp_path / "m.pt", model, info)
    with pytest.raises(InputError, match="weights do not fit model 'simplecnn'") as exc:
        models.load_checkpoint(tmp_path / "m.pt")
    assert "\n" not in str(exc.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        models.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="checkpoint not found"):
        models.load_checkpoint(tmp_path / "missing.pt")


def _imagenet_like(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A 3-channel, 1000-class ResNet-18 saved the way torchvision ships weights."""
    torch.manual_seed(2)
    m3 = models.build_model("resnet18", 3, num_classes=1000, widen_factor=0.25).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in m3.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "imagenet.pth"
    torch.save(m3.state_dict(), path)
    return m3, path


def test_pretrained_3_to_1_channel_by_summing(tmp_path: Path) -> None:
    m3, path = _imagenet_like(tmp_path)
    m1 = models.build_model("resnet18", 1, widen_factor=0.25)
    report = models.load_pretrained(m1, path)
    assert report["adapted"] == ["conv1.weight"]
    assert set(report["reinitialised"]) == {"fc.weight", "fc.bias"}
    assert torch.equal(m1.conv1.weight, m3.conv1.weight.sum(dim=1, keepdim=True))
    # a grey image (equal channels) gives the same features in both models
    m1.fc, m3.fc = nn.Identity(), nn.Identity()
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m1.eval()(x), m3(x.expand(-1, 3, -1, -1)))


def test_pretrained_same_channels_and_bad_files(tmp_path: Path) -> None:
    m3, path = _imagenet_like(tmp_path)
    same = models.build_model("resnet18", 3, widen_factor=0.25)
    models.load_pretrained(same, path)
    assert torch.equal(same.layer3[0].conv1.weight, m3.layer3[0].conv1.weight)
    with pytest.raises(InputError, match="takes 3 input channels, the store has 2"):
        models.load_pretrained(models.build_model("resnet18", 2, widen_factor=0.25), path)
    with pytest.raises(InputError, match=r"'conv1.weight' has shape \(16, 3, 7, 7\)"):
        models.load_pretrained(models.build_model("resnet18", 3), path)  # other width
    with pytest.raises(InputError, match="no tensor"):
        models.load_pretrained(models.build_model("resnet34", 3, widen_factor=0.25), path)
    with pytest.raises(InputError, match="weights file not found"):
        models.load_pretrained(same, tmp_path / "nope.pth")
    # DDP-style "module." prefixes and a {"state_dict": ...} wrapper are accepted
    torch.save({"state_dict": {f"module.{k}": v for k, v in m3.state_dict().items()}},
               tmp_path / "wrapped.pth")  # fmt: skip
    models.load_pretrained(models.build_model("resnet18", 1, widen_factor=0.25),
                           tmp_path / "wrapped.pth")  # fmt: skip
