"""Classifier registry: models built by name, no weights loaded (see ``checkpoints``).

Models are built by name with :func:`build_model`; every model maps a (B, C, H, W) float
batch to (B, num_classes) logits, class index 1 = lesion. Built-in names:

- ``resnet10/18/34/50/101``: MONAI's ResNet with ``spatial_dims=2``. Defaults differ from
  MONAI's 3-D ones to match the torchvision/ImageNet layout (``conv1_t_stride=2``,
  ``bias_downsample=False``), so an ImageNet ResNet state dict loads key for key
  (conv1, bn1, layer1..4, fc). Any MONAI ``ResNet`` keyword can be passed
  (e.g. ``widen_factor=0.25`` for a small test model). ``output_stride=16`` or ``8``
  replaces the stride of the last stage(s) by dilation (:func:`set_output_stride`).
- ``vgg19`` (``batch_norm=False``, ``head="gap"`` or ``"torchvision"``): written from torch
  layers with torchvision's ``features``/``avgpool``/``classifier`` layout, so the feature
  weights of an ImageNet VGG-19 load; the default ``gap`` head is global average pooling
  + one linear layer (CAM-compatible and small).
- ``simplecnn`` (``width=16``): three conv blocks, global pooling, linear head; for tests
  and CPU runs.
- ``torchvision:<name>`` / ``timm:<name>``: any model of these optional packages, only
  when the package is installed (nothing is ever downloaded: no pretrained flag).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ensemblecam.errors import InputError

#: MONAI ResNet depths: (block, layers).
_RESNETS: dict[str, tuple[str, list[int]]] = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}

#: VGG-19 configuration (torchvision's "E"): conv widths, "M" = 2x2 max pooling.
_VGG19_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
]  # fmt: skip


def _build_resnet(name: str) -> Callable[..., nn.Module]:
    block, layers = _RESNETS[name]

    def build(
        in_channels: int, num_classes: int, output_stride: int | None = None, **kwargs: Any
    ) -> nn.Module:
        from monai.networks.nets import ResNet

        args: dict[str, Any] = {"conv1_t_stride": 2, "bias_downsample": False}
        args.update(kwargs)
        model = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=num_classes,
            **args,
        )
        model.cam_layer = "layer4"  # type: ignore[assignment]
        if output_stride is not None:
            set_output_stride(model, output_stride)
        return model

    return build


#: Output strides :func:`set_output_stride` accepts -> the stages that lose their stride.
OUTPUT_STRIDES: dict[int, tuple[str, ...]] = {32: (), 16: ("layer4",), 8: ("layer3", "layer4")}


def _convs(block: nn.Module) -> list[nn.Conv2d]:
    """The main-path ``Conv2d`` modules of a residual block, in registration order."""
    return [
        m for name, m in block.named_modules()
        if isinstance(m, nn.Conv2d) and not name.startswith("downsample")
    ]  # fmt: skip


def set_output_stride(model: nn.Module, output_stride: int) -> nn.Module:
    """Make a ResNet's output stride ``output_stride`` (32, 16 or 8) by replacing the
    stride of its last stage(s) with dilation, in place; returns ``model``.

    Convention (torchvision's ``replace_stride_with_dilation``; Chen et al., "DeepLab:
    Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and
    Fully Connected CRFs", arXiv:1606.00915): stages ``layer4`` (OS 16) or ``layer3`` and
    ``layer4`` (OS 8) keep their resolution. In such a stage with incoming dilation
    ``p`` (1, or 2 for ``layer4`` at OS 8) and stride ``s = 2``, the dilation becomes
    ``d = p s``: the first block's strided conv and its downsample conv get stride 1, the
    strided conv keeps dilation ``p`` (it still reads the stage's input grid), and every
    later k x k conv of the stage (k > 1) gets dilation ``d`` and padding ``d (k - 1) / 2``
    (it reads the grid that is no longer sub-sampled). So the output is the same function
    sampled densely: where the original network computed its output, the dilated one
    computes the same value (same weights: the state dict is unchanged). For OS 8 that is
    ``layer3``: p = 1, d = 2; ``layer4``: p = 2, d = 4.

    Works on a ResNet whose ``layer3``/``layer4`` are sequences of residual blocks with a
    module downsample (MONAI's ``shortcut_type="B"``, torchvision's); anything else is an
    InputError. Calling it on an already dilated network is an InputError too.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise InputError(f"output_stride {output_stride}: expected 8, 16 or 32")
    name = type(model).__name__
    stages = [getattr(model, s, None) for s in ("layer3", "layer4")]
    if not all(isinstance(s, nn.Sequential) and len(s) for s in stages):
        raise InputError(f"output_stride: {name} has no ResNet stages layer3/layer4")
    for stage in stages:
        convs = [c for block in stage for c in _convs(block)]
        if any(c.dilation != (1,) * len(c.dilation) for c in convs):
            raise InputError(f"output_stride: {name} is already dilated")
    prev = 1
    for stage_name in OUTPUT_STRIDES[output_stride]:
        stage = getattr(model, stage_name)
        first = stage[0]
        down = getattr(first, "downsample", None)
        if down is not None and not isinstance(down, nn.Module):
            raise InputError(
                f"output_stride: {name} {stage_name} has a function shortcut "
                "(shortcut_type 'A'); use shortcut_type 'B'"
            )
        strided = [c for c in _convs(first) if max(c.stride) > 1]
        down_convs = [m for m in (down.modules() if down else []) if isinstance(m, nn.Conv2d)]
        if len(strided) != 1 or any(max(c.stride) != 2 for c in strided + down_convs):
            raise InputError(f"output_stride: {name} {stage_name} is not a stride-2 stage")
        dil = prev * 2
        for block in stage:
            for conv in _convs(block):
                k = conv.kernel_size
                if conv is strided[0]:
                    conv.stride = (1,) * len(k)
                    d = prev
                else:
                    d = dil
                if max(k) > 1:
                    conv.dilation = (d,) * len(k)
                    conv.padding = tuple(d * (kk - 1) // 2 for kk in k)
        for conv in down_convs:
            conv.stride = (1,) * len(conv.stride)
        prev = dil
    return model


class VGG19(nn.Module):
    """VGG-19 with torchvision's module layout; ``head="gap"``: avg-pool to 1x1 + Linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        batch_norm: bool = False,
        head: str = "gap",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        #: last ReLU before the final pooling: the usual Grad-CAM layer.
        self.cam_layer = f"features.{len(layers) - 2}"
        if head == "gap":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.classifier: nn.Module = nn.Sequential(nn.Linear(512, num_classes))
        elif head == "torchvision":
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )  # fmt: skip
        else:
            raise InputError(f"vgg19 head {head!r}: expected 'gap' or 'torchvision'")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SimpleCNN(nn.Module):
    """Three conv-BN-ReLU blocks (widths w, 2w, 4w; 2x2 pooling between), GAP, linear head."""

    def __init__(self, in_channels: int, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(True)]

        self.features = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
        )  # fmt: skip
        self.cam_layer = "features"
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _build_vgg19(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return VGG19(in_channels, num_classes, **kwargs)


def _build_simplecnn(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return SimpleCNN(in_channels, num_classes, **kwargs)


_BUILTIN: dict[str, Callable[..., nn.Module]] = {
    **{name: _build_resnet(name) for name in _RESNETS},
    "vgg19": _build_vgg19,
    "simplecnn": _build_simplecnn,
}


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available_models() -> list[str]:
    """Built-in model names, plus ``torchvision:<name>`` / ``timm:<name>`` when installed."""
    names = list(_BUILTIN)
    names += [f"{pkg}:<name>" for pkg in ("torchvision", "timm") if _has_package(pkg)]
    return names


def _unknown(name: str) -> InputError:
    extra = (
        ""
        if _has_package("torchvision") and _has_package("timm")
        else ("; torchvision:<name> / timm:<name> need that package installed")
    )
    return InputError(f"unknown model {name!r}; known: {', '.join(available_models())}{extra}")


def build_model(name: str, in_channels: int, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """A freshly initialised classifier ``name`` for ``in_channels``-channel 2-D input.

    ``output_stride`` (8, 16, 32; None: the network's own) is accepted by the built-in
    ResNets only (:func:`set_output_stride`)."""
    if in_channels < 1 or num_classes < 1:
        raise InputError(f"model {name!r}: in_channels and num_classes must be >= 1")
    if kwargs.get("output_stride") is not None and name not in _RESNETS:
        raise InputError(
            f"model {name!r}: output_stride is supported by the built-in ResNets only "
            f"({', '.join(_RESNETS)})"
        )
    kwargs = {k: v for k, v in kwargs.items() if not (k == "output_stride" and v is None)}
    try:
        if name in _BUILTIN:
            return _BUILTIN[name](in_channels, num_classes, **kwargs)
        pkg, _, sub = name.partition(":")
        if pkg == "torchvision" and sub:
            return _build_torchvision(sub, in_channels, num_classes, **kwargs)
        if pkg == "timm" and sub:
            return _build_timm(sub, in_channels, num_classes, **kwargs)
    except TypeError as exc:  # a keyword the model does not take
        raise InputError(f"model {name!r}: bad model arguments {kwargs} ({exc})") from exc
    raise _unknown(name)


def _require(pkg: str, name: str) -> Any:
    if not _has_package(pkg):
        raise InputError(f"model {name!r} needs the optional package {pkg!r}, not installed")
    return importlib.import_module(pkg if pkg == "timm" else "torchvision.models")


def _build_torchvision(sub: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    tvm = _require("torchvision", f"torchvision:{sub}")
    if sub not in tvm.list_models():
        raise InputError(f"model 'torchvision:{sub}': torchvision has no model {sub!r}")
    model = tvm.get_model(sub, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _build_timm(sub: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    timm = _require("timm", f"timm:{sub}")
    if not timm.list_models(sub):
        raise InputError(f"model 'timm:{sub}': timm has no model {sub!r}")
    return timm.create_model(
        sub, pretrained=False, in_chans=in_channels, num_classes=num_classes, **kwargs
    )


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Name and module of the first ``nn.Conv2d`` (in registration order)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise InputError(f"{type(model).__name__}: no Conv2d layer")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = first_conv(model)
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups if conv.groups == 1 else in_channels, conv.bias is not None,
    )  # fmt: skip
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classification head: the top-level child holding the last Linear."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return "" if last is None else last.split(".")[0] + "."


def cam_layer(model: nn.Module) -> str | None:
    """Default Grad-CAM target layer name of a built-in model (None if unknown)."""
    name = getattr(model, "cam_layer", None)
    return name if isinstance(name, str) else None
