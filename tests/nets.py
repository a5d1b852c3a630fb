"""Tiny random networks shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import resnet10
from torch import nn

from ensemblecam import models


def small_resnet(widen_factor: float = 0.25, spatial_dims: int = 2) -> nn.Module:
    """MONAI ResNet-10, 1 input channel, 2 classes, seeded (torch.manual_seed(0)), eval mode."""
    torch.manual_seed(0)
    return resnet10(
        spatial_dims=spatial_dims, n_input_channels=1, num_classes=2, widen_factor=widen_factor
    ).eval()


def tiny_checkpoint(path: Path, channels: Sequence[str], size: Sequence[int]) -> Path:
    """A seeded, untrained ``simplecnn`` classifier checkpoint for a store's channels and size."""
    torch.manual_seed(0)
    args = {"in_channels": len(channels), "num_classes": 2, "width": 4}
    model = models.build_model("simplecnn", **args)
    info = {"model": "simplecnn", "model_args": args, "channels": list(channels),
            "size": list(size), "cam_layer": models.cam_layer(model)}  # fmt: skip
    models.save_checkpoint(path, model, info)
    return path
